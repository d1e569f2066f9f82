"""Instruction following by generation: greedy answers to `InstructionPrompt`s, scored strictly and loosely.

`evaluate_instructions(model, prompts)` generates one answer per prompt and checks every instruction in
it (`saftune.eval.instruction_checks`). The benchmark reports the strict prompt-level accuracy as
"ood/instructions".

Decoding is fixed, whatever the model's own generation config says: greedy (no sampling, no repetition
penalty), at most `max_new_tokens` new tokens, stopping at the eos token or the chat template's
end-of-turn token. Prompts go through the chat template when the model has one (`format_prompt`), are
sorted by token length (longest first) and generated in batches, left-padded by hand (the tokenizer is
not touched), and the answers are put back in the prompts' order. Only the new tokens are decoded,
without special tokens and stripped of surrounding white space.

Batched and one-at-a-time generation give the same text on the tiny test models (a test checks it):
left padding is masked out and positions are counted from each prompt's first real token, so only
float rounding differs between batch shapes; on a real model a near-tie between two tokens can in
principle still flip a greedy choice.

Example:
    >>> from saftune.data.llm.instructions import InstructionPrompt, Instruction
    >>> from saftune.models.tiny_lm import tiny_causal_lm
    >>> lm = tiny_causal_lm("llama", context=256)
    >>> prompts = [InstructionPrompt("a", "Say hi.", (Instruction.make("no_commas"),)),
    ...            InstructionPrompt("b", "Name a fruit.", (Instruction.make("max_words", n=5),))]
    >>> result = evaluate_instructions(lm, prompts, batch_size=2, max_new_tokens=8)
    >>> sorted(result.metrics())
    ['loose', 'loose_instruction', 'n', 'strict', 'strict_instruction']
    >>> len(result.responses), result.metrics()["n"]
    (2, 2)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from saftune.data.llm.instructions import InstructionPrompt
from saftune.eval.instruction_checks import check, check_loose
from saftune.models.causal_lm import CausalLM

logger = logging.getLogger(__name__)

# Zero-shot SmolLM2-135M-Instruct stops by itself within 128 tokens on 35% of the set (it tends to ramble and
# repeat); the cost of a batch grows linearly with this limit, since a batch runs until its longest answer ends.
MAX_NEW_TOKENS = 128
# End-of-turn tokens of common chat templates (ChatML, Llama 3, Gemma, Mistral/Llama 2); those a tokenizer
# has stop generation besides its eos token.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "</s>")


@dataclass
class InstructionResult:
    """Answers to instruction prompts and which instructions they follow.

    Attributes:
        prompts: the prompts, in the order given.
        responses: the decoded answers, same order.
        strict, loose: per prompt, per instruction, whether it is followed.
        lengths: per answer, the tokens generated (`max_new_tokens`: it was cut there).
        seconds: wall time of the generation.
    """

    prompts: list[InstructionPrompt]
    responses: list[str]
    strict: list[list[bool]]
    loose: list[list[bool]]
    lengths: list[int] = field(default_factory=list)
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)

    @property
    def cut(self) -> int:
        """How many answers reached `max_new_tokens` without stopping."""
        return sum(n >= self.settings.get("max_new_tokens", float("inf")) for n in self.lengths)

    def metrics(self) -> dict[str, float]:
        """Prompt-level ("strict", "loose": all instructions of a prompt followed) and instruction-level
        ("strict_instruction", "loose_instruction") accuracies, and "n" (prompts)."""
        def prompt_level(rows):
            return sum(all(r) for r in rows) / len(rows) if rows else float("nan")

        def instruction_level(rows):
            flat = [x for r in rows for x in r]
            return sum(flat) / len(flat) if flat else float("nan")

        return {"strict": prompt_level(self.strict), "loose": prompt_level(self.loose),
                "strict_instruction": instruction_level(self.strict),
                "loose_instruction": instruction_level(self.loose), "n": len(self.prompts)}

    def per_kind(self) -> dict[str, dict[str, float]]:
        """Instruction kind -> {"strict", "loose": fraction followed, "n": instructions of that kind}."""
        tally: dict[str, list[int]] = {}
        for prompt, strict, loose in zip(self.prompts, self.strict, self.loose):
            for instruction, s, lo in zip(prompt.instructions, strict, loose):
                t = tally.setdefault(instruction.kind, [0, 0, 0])
                t[0], t[1], t[2] = t[0] + s, t[1] + lo, t[2] + 1
        return {k: {"strict": s / n, "loose": lo / n, "n": n} for k, (s, lo, n) in sorted(tally.items())}

    def examples(self, k: int = 3, *, followed: bool | None = None) -> list[dict]:
        """Up to k (prompt, response, strict results) records, for a report; `followed` filters on strict
        prompt-level success."""
        rows = []
        for prompt, response, strict in zip(self.prompts, self.responses, self.strict):
            if followed is None or all(strict) == followed:
                rows.append({"id": prompt.id, "prompt": prompt.prompt, "response": response,
                             "followed": dict(zip(prompt.kinds, strict))})
            if len(rows) == k:
                break
        return rows


def stop_token_ids(model: CausalLM) -> list[int]:
    """The eos token, and the chat template's end-of-turn token when prompts use the template.

    Example:
        >>> from saftune.models.tiny_lm import tiny_causal_lm
        >>> stop_token_ids(tiny_causal_lm("llama")), stop_token_ids(tiny_causal_lm("llama", chat_template=True))
        ([256], [256, 258])
    """
    tokenizer = model.tokenizer
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if model.use_chat_template:
        vocab = tokenizer.get_vocab()
        ids += [vocab[t] for t in END_OF_TURN if t in vocab]
    return list(dict.fromkeys(ids))


@torch.inference_mode()
def generate(model: CausalLM, prompts: Sequence[str], *, batch_size: int = 16,
             max_new_tokens: int = MAX_NEW_TOKENS, progress: bool = False) -> tuple[list[str], list[int]]:
    """Greedy answers to user messages, batched: (answers, their lengths in tokens), in the prompts' order.

    An answer of `max_new_tokens` tokens was cut there; a shorter one stopped by itself (the stop token
    is neither decoded nor counted).

    Args:
        model: the `CausalLM` (its train/eval mode is restored afterwards).
        prompts: user messages (the chat template is applied when the model uses one).
        batch_size: prompts per `generate` call (sorted by length, longest first).
        max_new_tokens: the most tokens an answer may have.
        progress: show a progress bar (batches, with rate and ETA).

    Raises:
        ValueError: a prompt plus `max_new_tokens` does not fit the model's `max_length`.

    Example:
        >>> from saftune.models.tiny_lm import tiny_causal_lm
        >>> answers, lengths = generate(tiny_causal_lm("gpt2", context=128), ["Hi!", "Hello there"], max_new_tokens=4)
        >>> len(answers), all(0 <= n <= 4 for n in lengths)
        (2, True)
    """
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be at least 1; got {batch_size} and {max_new_tokens}")
    tokenizer = model.tokenizer
    encoded = [model.encode(model.format_prompt(p), first=True) for p in prompts]
    for i, ids in enumerate(encoded):
        if len(ids) + max_new_tokens > model.max_length:
            raise ValueError(f"prompt {i} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} it exceeds the "
                             f"model's max_length {model.max_length}: shorten it or lower max_new_tokens")
    stops = stop_token_ids(model)
    pad = tokenizer.pad_token_id
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=stops,
                              pad_token_id=pad, repetition_penalty=1.0, use_cache=True)
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i))
    answers, lengths = [""] * len(encoded), [0] * len(encoded)
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="generate", disable=not progress, leave=False):
            chunk = order[start: start + batch_size]
            width = max(len(encoded[i]) for i in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, i in enumerate(chunk):  # left padding: every prompt ends where generation starts
                ids[r, width - len(encoded[i]):] = torch.tensor(encoded[i])
                mask[r, width - len(encoded[i]):] = 1
            out = model.lm.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
            for r, i in enumerate(chunk):
                new = out[r, width:].tolist()
                # Rows that finished early are padded to the batch's longest answer: cut at the first stop.
                ended = next((k for k, t in enumerate(new) if t in stops), len(new))
                answers[i] = tokenizer.decode(new[:ended], skip_special_tokens=True).strip()
                lengths[i] = ended
    finally:
        model.train(was_training)
    return answers, lengths


def evaluate_instructions(model: CausalLM, prompts: Sequence[InstructionPrompt], *, batch_size: int = 16,
                          max_new_tokens: int = MAX_NEW_TOKENS, progress: bool = False) -> InstructionResult:
    """Generate an answer to every prompt and check its instructions, strictly and loosely.

    Args:
        model: the `CausalLM`.
        prompts: `InstructionPrompt`s (`saftune.data.llm.instructions.instruction_prompts()`).
        batch_size: prompts per generation batch.
        max_new_tokens: the longest answer, in tokens (answers are cut there and scored as they are).
        progress: show a progress bar.

    Returns:
        An `InstructionResult`; ``.metrics()["strict"]`` is what the benchmark reports as "ood/instructions".
    """
    prompts = list(prompts)
    started = time.perf_counter()
    responses, lengths = generate(model, [p.prompt for p in prompts], batch_size=batch_size,
                                  max_new_tokens=max_new_tokens, progress=progress)
    seconds = time.perf_counter() - started
    cut = sum(n >= max_new_tokens for n in lengths)
    strict = [[check(i.kind, i.args, r) for i in p.instructions] for p, r in zip(prompts, responses)]
    loose = [[check_loose(i.kind, i.args, r) for i in p.instructions] for p, r in zip(prompts, responses)]
    if cut:
        logger.info("%d of %d answers reached max_new_tokens=%d and were cut", cut, len(prompts), max_new_tokens)
    return InstructionResult(prompts, responses, strict, loose, lengths=lengths, seconds=seconds,
                             settings={"batch_size": batch_size, "max_new_tokens": max_new_tokens, "greedy": True})
