"""Evaluation: ID + OOD accuracy of a classifier on a benchmark, as one flat dict of metrics.

Keys: "id" (in-distribution test accuracy), "ood/<name>" per OOD set, "ood_avg" (their mean), and for
base-to-new benchmarks (an OOD set named "new") "base", "new", "hm" (harmonic mean).

Example:
    >>> from saftune.models import create
    >>> from saftune.data import Benchmark, Split
    >>> model = create("tiny-sentence")
    >>> s = Split("toy", ["good film", "bad film"], [1, 0])
    >>> b = Benchmark("toy", "text", ["negative", "positive"], ["a {} review."], s, s, s, {"other": s})
    >>> sorted(evaluate(model, b))
    ['id', 'ood/other', 'ood_avg']
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import torch
from tqdm.auto import tqdm

from saftune import distributed
from saftune.data.base import Benchmark, Split
from saftune.data.llm.benchmark import LMBenchmark
from saftune.eval.cache import EvaluationCache, weights_digest
from saftune.eval.lm import evaluate_lm, evaluate_lm_validation
from saftune.eval.metrics import average_ood, harmonic_mean, project_logits, top1
from saftune.models.base import Classifier

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _task(model: Classifier, benchmark: Benchmark, split: Split):
    """Switch the classifier to a split's own class names / templates (cross-dataset), then back."""
    own = split.classnames or split.templates
    if own:
        model.set_classes(split.classnames or benchmark.classnames, split.templates or benchmark.templates)
    try:
        yield
    finally:
        if own:
            model.set_classes(benchmark.classnames, benchmark.templates)


def predict(model: Classifier, split: Split, *, batch_size: int = 64, progress: bool = False,
            fresh_prompts: bool = True) -> torch.Tensor:
    """Logits [N, C] of a split (projected onto its class subset when it has one), in eval mode, in input order.

    The model prepares the split once (`Classifier.prepare`: text models tokenize it) and batches examples
    of similar length together, so batches carry little padding; the logits are put back in input order.
    Nothing is recorded for autograd (`torch.inference_mode`). Under torchrun each process predicts every
    W-th example and all of them get the whole result.

    Example:
        >>> from saftune.models import create
        >>> model = create("tiny-sentence"); model.set_classes(["negative", "positive"], ["a {} review."])
        >>> predict(model, Split("toy", ["a long and rather good film", "bad"], [1, 0])).shape
        torch.Size([2, 2])
    """
    # Switching to eval mode drops the class-prompt embeddings a dual encoder caches: the weights may have
    # changed since the last call even in eval mode (WiSE-FT interpolation, a loaded result). Only
    # `evaluate`, whose splits all see the same weights, keeps them across its splits (fresh_prompts=False).
    if fresh_prompts or any(m.training for m in model.modules()):
        model.eval()
    device = next(model.parameters()).device
    prepared = model.prepare(split.inputs)
    order = list(range(len(split)))
    if prepared.lengths is not None:
        order.sort(key=prepared.lengths.__getitem__)  # stable: equal lengths keep input order
    order = list(distributed.shard(order))
    starts = list(range(0, len(order), batch_size))
    # A sharded base all-gathers in every forward: a process with fewer batches than another runs
    # forwards on one example until they match, and drops their logits.
    padding = max(distributed.gather_objects(len(starts))) - len(starts) if distributed.forwards_are_collective(model) else 0
    chunks = []
    with torch.inference_mode():
        for start in tqdm(starts, desc=f"eval {split.name}", disable=not progress, leave=False):
            batch = prepared.batch(order[start : start + batch_size])
            batch = {k: v.to(device) for k, v in batch.items()}
            chunks.append(project_logits(model(batch).float(), split.class_subset).cpu())
        for _ in range(padding):
            model({k: v.to(device) for k, v in prepared.batch(order[:1] or [0]).items()})
    parts = distributed.gather_objects((order, torch.cat(chunks) if chunks else None))
    filled = [(o, c) for o, c in parts if c is not None]
    logits = torch.empty(len(split), filled[0][1].shape[1])
    for o, c in filled:
        logits[torch.as_tensor(o)] = c
    return logits


def evaluate_split(model: Classifier, benchmark: Benchmark, split: Split, *, batch_size: int = 64,
                   progress: bool = False, fresh_prompts: bool = True, cache: EvaluationCache | None = None,
                   weights: str | None = None) -> float:
    """Top-1 accuracy on one split (`fresh_prompts`: see `predict`).

    With `cache`, an accuracy already measured for the same weights and split is returned without
    evaluating (`weights`: the model's `weights_digest` when the caller has it).
    """
    if len(split) == 0:
        raise ValueError(f"split {split.name!r} is empty: nothing to evaluate")
    with _task(model, benchmark, split):
        key = None
        if cache is not None:
            # The prompts the model actually uses (a prompt learner keeps its own templates).
            content = (split.inputs, np.asarray(split.labels), list(model.classnames), list(model.templates or []),
                       split.class_subset)
            key = cache.key(model, content, batch_size=batch_size, weights=weights)
            score = cache.get(key)
            if score is not None:
                return score
        logits = predict(model, split, batch_size=batch_size, progress=progress, fresh_prompts=fresh_prompts)
    score = top1(logits, torch.as_tensor(split.labels))
    if key is not None:
        cache.put(key, score)
    return score


def evaluate_validation(model: Classifier, benchmark: Benchmark, *, batch_size: int = 64,
                        cache: EvaluationCache | None = None) -> float:
    """Validation accuracy, what hyperparameters are chosen on: the val split, or an `LMBenchmark`'s
    speciality validation items (`saftune.eval.lm.evaluate_lm_validation`)."""
    if isinstance(benchmark, LMBenchmark):
        return evaluate_lm_validation(model, benchmark, batch_size=batch_size, cache=cache)
    return evaluate_split(model, benchmark, benchmark.val, batch_size=batch_size, cache=cache)


def evaluate(model: Classifier, benchmark: Benchmark, *, batch_size: int = 64, include_val: bool = False,
             progress: bool = False, cache: EvaluationCache | None = None) -> dict[str, float]:
    """ID and OOD accuracies of `model` on `benchmark` (plus "val" when `include_val`).

    The model keeps its training mode afterwards; evaluation itself runs in eval mode without gradients.
    With `cache` (`EvaluationCache`), splits already evaluated with the same weights are not evaluated again.
    A causal LM on an `LMBenchmark` is scored by `saftune.eval.lm.evaluate_lm` (speciality and generality
    under the same metric names).
    """
    if isinstance(benchmark, LMBenchmark):
        return evaluate_lm(model, benchmark, batch_size=batch_size, include_val=include_val, cache=cache)
    was_training = model.training
    if model.classnames != benchmark.classnames or model.templates != benchmark.templates:
        model.set_classes(benchmark.classnames, benchmark.templates)
    metrics: dict[str, float] = {}
    # Eval mode once for all splits (weights do not change while it evaluates): a dual encoder embeds its
    # class prompts once per call, not once per split.
    model.eval()
    options = {"batch_size": batch_size, "progress": progress, "fresh_prompts": False, "cache": cache,
               "weights": weights_digest(model) if cache is not None else None}
    try:
        if include_val:
            metrics["val"] = evaluate_split(model, benchmark, benchmark.val, **options)
        metrics["id"] = evaluate_split(model, benchmark, benchmark.test, **options)
        for name, split in benchmark.ood.items():
            metrics[f"ood/{name}"] = evaluate_split(model, benchmark, split, **options)
    finally:
        model.train(was_training)
    if benchmark.ood:
        metrics["ood_avg"] = average_ood(metrics)
    if "ood/new" in metrics:  # base-to-new generalisation: the ID test set holds the base classes
        metrics["base"], metrics["new"] = metrics["id"], metrics["ood/new"]
        metrics["hm"] = harmonic_mean(metrics["base"], metrics["new"])
    return metrics
