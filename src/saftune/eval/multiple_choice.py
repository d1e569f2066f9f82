"""Multiple choice by log-likelihood, with `acc` and `acc_norm` as lm-evaluation-harness computes them.

Each option is scored by the summed log-probability of its tokens after the context (the harness'
`loglikelihood` request with continuation = " " + option). Tokenization follows the harness: spaces at
the end of the context move to the continuation, the continuation's tokens are those of
tokenize(context + continuation) after the context's own tokens, no special tokens are added (an
empty context is preceded by the eos token), and a sequence longer than the context window loses
tokens from the left. Requests are scored in batches, longest first.

* `acc`: the option with the highest log-likelihood is the gold one.
* `acc_norm`: the same after dividing each log-likelihood by the option's length in characters
  (`len(option)`, the text without the leading space, exactly as the harness' `completion_len`; for
  ASCII options this is the byte length).

Ties go to the first option (numpy's argmax, as in the harness).

Example:
    >>> from saftune.data.llm import MultipleChoiceItem
    >>> from saftune.models.tiny_lm import tiny_causal_lm
    >>> lm = tiny_causal_lm("llama")
    >>> items = [MultipleChoiceItem("Sky color:", ("blue", "green"), 0), MultipleChoiceItem("2+2 =", ("4", "22"), 0)]
    >>> result = score_multiple_choice(lm, items, batch_size=3)
    >>> sorted(result.metrics())
    ['acc', 'acc_norm', 'n']
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from saftune.data.llm.multiple_choice import MultipleChoiceItem
from saftune.models.causal_lm import IGNORE_INDEX, CausalLM

logger = logging.getLogger(__name__)


@dataclass
class MultipleChoiceResult:
    """Scores of a list of items.

    Attributes:
        loglikelihoods: per item, the summed log-probability of each option.
        predictions: per item, the option `acc` picks; predictions_norm: the one `acc_norm` picks.
        golds: per item, the right option.
        truncated: how many option sequences lost context tokens (from the left) to fit the window.
    """

    loglikelihoods: list[list[float]]
    predictions: list[int]
    predictions_norm: list[int]
    golds: list[int]
    truncated: int = 0
    ids: list[str] = field(default_factory=list)

    @property
    def acc(self) -> float:
        return float(np.mean([p == g for p, g in zip(self.predictions, self.golds)])) if self.golds else float("nan")

    @property
    def acc_norm(self) -> float:
        return float(np.mean([p == g for p, g in zip(self.predictions_norm, self.golds)])) if self.golds else float("nan")

    def metrics(self) -> dict[str, float]:
        """{"acc", "acc_norm", "n"}: flat metrics for results files."""
        return {"acc": self.acc, "acc_norm": self.acc_norm, "n": len(self.golds)}


def encode_request(model: CausalLM, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) of one log-likelihood request, tokenized as the harness does.

    Example:
        >>> from saftune.models.tiny_lm import tiny_causal_lm
        >>> encode_request(tiny_causal_lm("llama"), "Answer: ", "yes")   # the trailing space moves over
        ([65, 110, 115, 119, 101, 114, 58], [32, 121, 101, 115])
    """
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    tokenizer = model.tokenizer
    whole = list(tokenizer(context + continuation, add_special_tokens=False)["input_ids"])
    if context:
        context_ids = list(tokenizer(context, add_special_tokens=False)["input_ids"])
        return context_ids, whole[len(context_ids):]
    return [tokenizer.eos_token_id], whole


@dataclass
class _Sequence:
    """One forward-pass row: `tokens`, scored from `start` on, answering the requests in `members`.

    Requests that differ only in the last token of their continuation (yes/no after the same context, or
    "\nyes" / "\nno" once the context's trailing newline has moved over) share the row: each member is
    (request index, its last token), and its log-likelihood is the row's sum up to the last position
    plus its own token's log-probability at that position.
    """

    tokens: list[int]
    start: int
    members: list[tuple[int, int]]


def _sequences(model: CausalLM, requests: Sequence[tuple[str, str]], limit: int) -> tuple[list[_Sequence], int]:
    """The rows that answer `requests`: one per distinct (context, continuation but its last token)."""
    rows, by_prefix, truncated = [], {}, 0
    for i, (context, continuation) in enumerate(requests):
        context_ids, continuation_ids = encode_request(model, context, continuation)
        if not continuation_ids:
            raise ValueError(f"request {i}: the continuation {continuation!r} has no tokens")
        if len(continuation_ids) >= limit:
            raise ValueError(f"request {i}: the continuation has {len(continuation_ids)} tokens, which leaves no room "
                             f"for context in the window of {limit}; raise max_length or shorten the option")
        tokens = context_ids + continuation_ids
        if len(tokens) > limit:
            tokens, truncated = tokens[-limit:], truncated + 1
        start = len(tokens) - len(continuation_ids)
        # The options of one item run their shared context once (the harness shares one-token
        # continuations the same way); a multiple-choice eval of yes/no items halves.
        key = (tuple(tokens[:-1]), start)
        if key in by_prefix:
            by_prefix[key].members.append((i, tokens[-1]))
        else:
            by_prefix[key] = _Sequence(tokens, start, [(i, tokens[-1])])
            rows.append(by_prefix[key])
    return rows, truncated


@torch.no_grad()
def loglikelihoods(model: CausalLM, requests: Sequence[tuple[str, str]], *, batch_size: int = 16,
                   max_length: int | None = None) -> tuple[list[float], int]:
    """Summed log-probability of each continuation after its context.

    Args:
        model: the `CausalLM`.
        requests: (context, continuation) pairs.
        batch_size: sequences per forward pass (sorted longest first, so padding stays small); requests
            that differ only in their last token share one sequence.
        max_length: the window (default: `model.max_length`); longer sequences lose context from the left.

    Returns:
        (log-likelihoods in request order, how many requests were truncated).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size}")
    sequences, truncated = _sequences(model, requests, max_length or model.max_length)
    if truncated:
        logger.warning("%d of %d sequences were longer than %d tokens and lost context from the left",
                       truncated, len(requests), max_length or model.max_length)
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: (-len(sequences[i].tokens), i))
    results = [0.0] * len(requests)
    was_training = model.training
    model.eval()
    try:
        for b in range(0, len(order), batch_size):
            chunk = [sequences[i] for i in order[b: b + batch_size]]
            ids = torch.full((len(chunk), len(chunk[0].tokens)), model.tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            targets = torch.full_like(ids, IGNORE_INDEX)
            for r, row in enumerate(chunk):
                seq = torch.tensor(row.tokens)
                ids[r, : len(seq)], mask[r, : len(seq)] = seq, 1
                targets[r, row.start: len(seq)] = seq[row.start:]
            logits, chosen, rows = model.answer_logits(ids.to(device), mask.to(device), targets.to(device))
            logprobs = torch.log_softmax(logits.double(), dim=-1)
            for r, row in enumerate(chunk):
                where = (rows == r).nonzero().squeeze(1)  # the row's scored positions, in order
                shared = float(logprobs[where[:-1], chosen[where[:-1]]].sum())
                for i, token in row.members:
                    results[i] = shared + float(logprobs[where[-1], token])
    finally:
        model.train(was_training)
    return results, truncated


def score_multiple_choice(model: CausalLM, items: Sequence[MultipleChoiceItem], *, batch_size: int = 16,
                          max_length: int | None = None) -> MultipleChoiceResult:
    """Score items by option log-likelihood; `acc` and `acc_norm` as in lm-evaluation-harness.

    Args:
        model: the `CausalLM` (contexts are used as given: no chat template, as the harness' default).
        items: `MultipleChoiceItem`s (validated when built).
        batch_size: option sequences per forward pass.
        max_length: the window (default: `model.max_length`).
    """
    requests = [r for item in items for r in item.requests()]
    flat, truncated = loglikelihoods(model, requests, batch_size=batch_size, max_length=max_length)
    lls, preds, preds_norm, start = [], [], [], 0
    for item in items:
        scores = np.array(flat[start: start + len(item.options)])
        start += len(item.options)
        lengths = np.array([float(len(option)) for option in item.options])
        lls.append(scores.tolist())
        preds.append(int(np.argmax(scores)))
        preds_norm.append(int(np.argmax(scores / lengths)))
    return MultipleChoiceResult(lls, preds, preds_norm, [item.gold for item in items], truncated,
                                [item.id for item in items])
