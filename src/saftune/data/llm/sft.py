"""Supervised fine-tuning data: (prompt, answer) pairs -> token batches whose loss covers the answer only.

A prompt is wrapped in the tokenizer's chat template when the model has one (user turn + assistant
header), and the answer is what follows: the assistant turn with its end-of-turn marker, or, without a
template, the answer and the eos token. Both are learnt, so a fine-tuned model also learns to stop.

A pair longer than the model's context keeps its whole answer and loses prompt tokens from the left
(the most recent context is what the answer depends on most); `encode_sft` counts such pairs and logs
the count. An answer that fills the context alone, or an empty answer, is refused before any training.

`sft_loss(model, batch)` is the per-example loss (mean negative log-likelihood of the answer tokens) that
`select_mask` and the trainer take as `loss_fn`; the model projects only the positions that predict an
answer token onto the vocabulary.

Example:
    >>> from saftune.models.tiny_lm import tiny_causal_lm
    >>> lm = tiny_causal_lm("llama")
    >>> encoded = encode_sft(lm, [SFTExample("Q: 1+1?\\nA:", " 2")])
    >>> batch = collate_sft(encoded, pad_id=lm.tokenizer.pad_token_id)
    >>> batch["targets"][0].tolist()[-3:]    # " 2" and the eos token are the targets
    [32, 50, 256]
    >>> sft_loss(lm, batch).shape
    torch.Size([1])
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from saftune.models.causal_lm import IGNORE_INDEX, CausalLM

logger = logging.getLogger(__name__)


class SFTDataError(ValueError):
    """A (prompt, answer) pair that cannot be trained on: empty answer, or an answer longer than the context."""


@dataclass(frozen=True)
class SFTExample:
    """One supervised pair: the model reads `prompt` and should answer `answer`."""

    prompt: str
    answer: str


@dataclass
class SFTEncoding:
    """Token ids of encoded pairs.

    Attributes:
        input_ids: per example, prompt tokens then answer tokens.
        answer_starts: per example, the position of its first answer token.
        truncated: how many examples lost prompt tokens (from the left) to fit the context.
    """

    input_ids: list[list[int]]
    answer_starts: list[int]
    truncated: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)


def as_examples(pairs: Iterable) -> list[SFTExample]:
    """`SFTExample`s from SFTExamples, (prompt, answer) tuples or {"prompt", "answer"} dicts."""
    examples = []
    for i, pair in enumerate(pairs):
        if isinstance(pair, SFTExample):
            examples.append(pair)
        elif isinstance(pair, dict) and {"prompt", "answer"} <= set(pair):
            examples.append(SFTExample(str(pair["prompt"]), str(pair["answer"])))
        elif isinstance(pair, (tuple, list)) and len(pair) == 2:
            examples.append(SFTExample(str(pair[0]), str(pair[1])))
        else:
            raise SFTDataError(f"example {i} is {type(pair).__name__} {pair!r:.80}; give (prompt, answer) pairs, "
                               "{'prompt': ..., 'answer': ...} dicts or SFTExample")
    return examples


def encode_sft(model: CausalLM, pairs: Iterable, *, max_length: int | None = None) -> SFTEncoding:
    """Tokenize (prompt, answer) pairs for fine-tuning, answer tokens marked for the loss.

    Args:
        model: the `CausalLM` (its tokenizer and chat template are used).
        pairs: `SFTExample`s, (prompt, answer) tuples or dicts.
        max_length: longest sequence (default: `model.max_length`).

    Raises:
        SFTDataError: an empty answer, or an answer that alone fills the context (all such examples
            are named at once, before anything is trained).
    """
    examples = as_examples(pairs)
    limit = max_length or model.max_length
    empty = [i for i, ex in enumerate(examples) if not ex.answer.strip()]
    if empty:
        raise SFTDataError(f"{len(empty)} example(s) have an empty answer (indices {empty[:10]}); there is nothing to "
                           "learn from them: drop them or give them answers")
    ids, starts, too_long, truncated = [], [], [], 0
    for i, ex in enumerate(examples):
        prompt = model.encode(model.format_prompt(ex.prompt), first=True)
        answer = model.encode(model.format_answer(ex.prompt, ex.answer), first=False)
        if len(answer) >= limit:  # at least one prompt token must precede the first answer token
            too_long.append((i, len(answer)))
            continue
        if len(prompt) + len(answer) > limit:
            prompt = prompt[len(prompt) + len(answer) - limit:]
            truncated += 1
        ids.append(prompt + answer)
        starts.append(len(prompt))
    if too_long:
        shown = ", ".join(f"{i} ({n} tokens)" for i, n in too_long[:10])
        raise SFTDataError(f"{len(too_long)} answer(s) do not fit the context of {limit} tokens with any prompt: examples "
                           f"{shown}; shorten those answers or raise max_length (the model allows {model.context_length})")
    if truncated:
        logger.warning("%d of %d examples were longer than %d tokens: their prompts lost tokens from the left",
                       truncated, len(examples), limit)
    return SFTEncoding(ids, starts, truncated)


def collate_sft(encoded: SFTEncoding | Sequence[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: `input_ids`, `attention_mask` and `targets` (-100 except at answer tokens).

    Args:
        encoded: an `SFTEncoding` (or a slice of it as (input_ids, answer_start) pairs).
        pad_id: the tokenizer's pad token id.
    """
    rows = list(zip(encoded.input_ids, encoded.answer_starts)) if isinstance(encoded, SFTEncoding) else list(encoded)
    if not rows:
        raise SFTDataError("cannot collate an empty batch")
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for r, (ids, start) in enumerate(rows):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        attention_mask[r, : len(ids)] = 1
        targets[r, start: len(ids)] = torch.tensor(ids[start:])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "targets": targets}


def sft_loss(model: CausalLM, batch: dict) -> torch.Tensor:
    """Per-example loss [B]: the mean negative log-likelihood of each example's answer tokens.

    Every example weighs the same whatever its answer length (SAFT's phase 1 averages gradients over
    examples). Logits are computed only at the positions that predict an answer token.
    """
    logprobs, rows = model.target_log_probs(batch["input_ids"], batch["attention_mask"], batch["targets"])
    batch_size = batch["input_ids"].shape[0]
    totals = torch.zeros(batch_size, dtype=logprobs.dtype, device=logprobs.device).index_add(0, rows, -logprobs)
    counts = torch.bincount(rows, minlength=batch_size).to(logprobs.dtype)
    if bool((counts == 0).any()):
        raise SFTDataError("a batch row has no answer token; encode examples with encode_sft")
    return totals / counts
