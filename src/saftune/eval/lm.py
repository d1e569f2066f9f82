"""Evaluation of a causal LM on an `LMBenchmark`: speciality, each generality probe, and their average.

Metric names follow the classifier evaluation so the grid, the selection and the report read both:

* "val", "id": accuracy on the speciality's validation and test items. They are asked the way the model
  was fine-tuned: the item's context is the training prompt, wrapped in the model's chat template when
  it has one (`CausalLM.format_prompt`), and each option is scored as the answer that follows it.
* "ood/<probe>": `acc_norm` of a generality probe (lm-evaluation-harness' length-normalised accuracy;
  contexts as given, no chat template, as the harness does); "acc/<probe>" keeps its `acc`.
* "ood/instructions": strict prompt-level instruction-following accuracy (greedy generation, verified
  checks); "instructions/<measure>" keeps the loose and instruction-level rates.
* "ood_avg": generality, the mean of the "ood/" entries (each probe and instruction following count once).

With an `EvaluationCache`, a set already scored with the same weights is not scored again.

Example:
    >>> from saftune.data.base import Split
    >>> from saftune.data.llm import LMBenchmark, MultipleChoiceItem, SFTExample
    >>> from saftune.models.tiny_lm import tiny_causal_lm
    >>> item = MultipleChoiceItem("Is water wet?", ("yes", "no"), gold=0, delimiter="")
    >>> probe = MultipleChoiceItem("Question: sky?\\nAnswer:", ("blue", "green"), gold=0)
    >>> bench = LMBenchmark("toy", Split("toy/train", [SFTExample("Is water wet?", "yes")], [0]), [item], [item],
    ...                     probes={"sky": [probe]})
    >>> sorted(evaluate_lm(tiny_causal_lm("llama"), bench, include_val=True))
    ['acc/sky', 'id', 'ood/sky', 'ood_avg', 'val']
"""

from __future__ import annotations

from collections.abc import Sequence

from saftune.data.llm.benchmark import LMBenchmark
from saftune.data.llm.multiple_choice import MultipleChoiceItem
from saftune.eval.cache import EvaluationCache, weights_digest
from saftune.eval.metrics import average_ood
from saftune.eval.multiple_choice import score_multiple_choice
from saftune.models.causal_lm import CausalLM

INSTRUCTIONS = "instructions"


def as_asked(model: CausalLM, items: Sequence[MultipleChoiceItem]) -> list[MultipleChoiceItem]:
    """Speciality items with their prompts formatted as the fine-tuning pairs are (the chat template)."""
    if not model.use_chat_template:
        return list(items)
    return [MultipleChoiceItem(model.format_prompt(i.context), i.options, i.gold, i.id, i.delimiter) for i in items]


def _items_content(items: Sequence[MultipleChoiceItem]) -> list:
    return [[i.context, list(i.options), i.gold, i.delimiter] for i in items]


def _cached(cache, model, content, *, batch_size, weights, compute):
    """`compute()`, or what the cache kept for the same weights, content and batch size."""
    if cache is None:
        return compute()
    return cache.get_or_compute(cache.key(model, content, batch_size=batch_size, weights=weights), compute)


def _scored(model, items, *, batch_size, cache, weights, tag) -> dict[str, float]:
    """{"acc", "acc_norm"} of `items`, from the cache when the same weights scored them before."""
    def compute():
        result = score_multiple_choice(model, items, batch_size=batch_size)
        return {"acc": result.acc, "acc_norm": result.acc_norm}

    return _cached(cache, model, [tag, _items_content(items)], batch_size=batch_size, weights=weights, compute=compute)


def evaluate_lm_validation(model: CausalLM, bench: LMBenchmark, *, batch_size: int = 16,
                           cache: EvaluationCache | None = None) -> float:
    """Speciality validation accuracy: what hyperparameter trials are chosen on."""
    return evaluate_lm(model, bench, batch_size=batch_size, cache=cache, only_val=True)["val"]


def evaluate_lm(model: CausalLM, bench: LMBenchmark, *, batch_size: int = 16, include_val: bool = False,
                only_val: bool = False, cache: EvaluationCache | None = None) -> dict[str, float]:
    """Speciality and generality metrics of `model` (see the module docstring); the training mode is kept."""
    was_training = model.training
    model.eval()
    weights = weights_digest(model) if cache is not None else None
    options = {"batch_size": batch_size, "cache": cache, "weights": weights}
    metrics: dict[str, float] = {}
    try:
        if include_val or only_val:
            metrics["val"] = _scored(model, as_asked(model, bench.val), tag="speciality", **options)["acc"]
        if only_val:
            return metrics
        metrics["id"] = _scored(model, as_asked(model, bench.test), tag="speciality", **options)["acc"]
        for name, items in bench.probes.items():
            scores = _scored(model, items, tag="probe", **options)
            metrics[f"ood/{name}"], metrics[f"acc/{name}"] = scores["acc_norm"], scores["acc"]
        if bench.instructions:
            rates = _instruction_rates(model, bench.instructions, batch_size=bench.generation_batch_size,
                                       max_new_tokens=bench.max_new_tokens, cache=cache, weights=weights)
            metrics[f"ood/{INSTRUCTIONS}"] = rates["strict"]
            metrics.update({f"{INSTRUCTIONS}/{k}": v for k, v in rates.items() if k != "strict"})
    finally:
        model.train(was_training)
    if any(k.startswith("ood/") for k in metrics):
        metrics["ood_avg"] = average_ood(metrics)
    return metrics


def _instruction_rates(model, prompts, *, batch_size, max_new_tokens, cache, weights) -> dict[str, float]:
    from saftune.eval.instruction_following import evaluate_instructions

    def compute():
        result = evaluate_instructions(model, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens)
        return {k: float(v) for k, v in result.metrics().items() if k != "n"}

    content = [INSTRUCTIONS, max_new_tokens, [repr(p) for p in prompts]]
    return _cached(cache, model, content, batch_size=batch_size, weights=weights, compute=compute)
