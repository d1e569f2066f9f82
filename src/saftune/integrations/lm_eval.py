"""lm-evaluation-harness tasks on a saftune causal LM (a pretrained model, a result applied in memory, or merged).

`evaluate_with_lm_eval` hands the wrapped `transformers` model and its tokenizer to the harness' own
`HFLM` (built from the model instance, so the weights in memory are what is scored, a sparse delta
or LoRA adapters included) and runs `lm_eval.simple_evaluate`. Tasks are the harness' names
("hellaswag", "arc_easy", ...; those download their data from the hub) or tasks of your own: task
YAML files in a folder given as `include_path`, e.g. a local JSON file as a multiple-choice task::

    task: my_mc
    dataset_path: json
    dataset_kwargs: {data_files: {test: /data/items.jsonl}}
    test_split: test
    output_type: multiple_choice
    doc_to_text: "{{question}}"
    doc_to_choice: choices
    doc_to_target: gold
    metric_list: [{metric: acc}, {metric: acc_norm}]

The harness is an optional extra (`pip install 'saftune[lm-eval]'`), imported on first use.
On a multiple-choice task its `acc` and `acc_norm` are those of `saftune.eval.multiple_choice`,
item by item (tests/test_lm_eval.py checks it), except where a sequence is longer than the window:
the harness keeps one context token more (its window is the model's input, saftune's the whole sequence).

Example:
    >>> from saftune.models.tiny_lm import tiny_causal_lm
    >>> out = evaluate_with_lm_eval(tiny_causal_lm("llama"), ["my_mc"], include_path="tasks/",
    ...                             batch_size=8)                              # doctest: +SKIP
    >>> sorted(out["metrics"]["my_mc"])                                        # doctest: +SKIP
    ['acc', 'acc_norm', 'acc_norm_stderr', 'acc_stderr']
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from saftune._io import did_you_mean
from saftune.models.causal_lm import CausalLM

logger = logging.getLogger(__name__)

INSTALL = "pip install 'saftune[lm-eval]'"


def _import_lm_eval():
    """The `lm_eval` package, or an ImportError that says which extra installs it."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401 - fails on a broken or too old install
    except ImportError as e:
        raise ImportError(f"evaluating with lm-eval tasks needs lm-evaluation-harness (the lm_eval package): {INSTALL} "
                          f"({e})") from None
    return lm_eval


def task_manager(tasks: Sequence[str], include_path: str | os.PathLike | None = None, *, builtin_tasks: bool = True):
    """An `lm_eval.tasks.TaskManager` that knows every name in `tasks`, or a ValueError naming the unknown ones.

    Args:
        tasks: task, group or tag names, or paths of task YAML files.
        include_path: a folder of task YAML files (searched after, and overriding, the built-in tasks).
        builtin_tasks: index the harness' own tasks too; False skips reading its ~14,000 task files
            (several seconds) when every task is under `include_path`.
    """
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise FileNotFoundError(f"--include-path {str(include_path)!r} is not a folder; give the folder that holds "
                                "your task YAML files")
    if not builtin_tasks and include_path is None:
        raise ValueError("builtin_tasks=False leaves no task to run; give include_path, a folder of task YAML files")
    manager = TaskManager(include_path=str(include_path) if include_path is not None else None,
                          include_defaults=builtin_tasks)
    known = set(manager.all_tasks)
    for name in tasks:
        if name not in known and not Path(name).is_file():
            where = f" or under {str(include_path)!r}" if include_path is not None else ""
            raise ValueError(f"lm-eval has no task {name!r}{' among its own tasks' if builtin_tasks else ''}{where}."
                             f"{did_you_mean(name, known)} Give a task name (lm-eval ls tasks), a task YAML file, or "
                             "--include-path FOLDER with your task YAMLs")
    return manager


@contextlib.contextmanager
def _global_rng_kept():
    """simple_evaluate seeds Python's, numpy's and torch's global generators; give the caller's back afterwards."""
    state, np_state = random.getstate(), np.random.get_state()
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda):
        try:
            yield
        finally:
            random.setstate(state)
            np.random.set_state(np_state)


def task_metrics(results: dict) -> dict[str, dict[str, float]]:
    """Per task (and group): {metric: value} from the harness' results, without its ",none" filter suffix.

    Metrics of another filter keep it ("exact_match,strict-match"); values that are not numbers (a
    stderr of "N/A") are left out.

    Example:
        >>> task_metrics({"results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": "N/A"}}})
        {'t': {'acc': 0.5}}
    """
    metrics = {}
    for task, values in results.get("results", {}).items():
        row = {}
        for key, value in values.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # "alias", "name", "sample_len": labels, not metrics
            name, _, filter_name = key.partition(",")
            row[name if filter_name == "none" else key] = float(value)
        metrics[task] = row
    return metrics


def evaluate_with_lm_eval(model: CausalLM, tasks: Sequence[str], *, batch_size: int = 16, limit: int | float | None = None,
                          include_path: str | os.PathLike | None = None, num_fewshot: int | None = None,
                          log_samples: bool = False, apply_chat_template: bool = False,
                          builtin_tasks: bool = True) -> dict:
    """Run lm-evaluation-harness tasks on a saftune causal LM, as its weights are in memory now.

    Args:
        model: the `CausalLM` (with a result applied, or merged, or pretrained).
        tasks: lm-eval task, group or tag names, or paths of task YAML files.
        batch_size: requests per forward pass.
        limit: only the first `limit` items of each task (a float below 1: that fraction); for smoke runs.
        include_path: a folder of your own task YAML files.
        num_fewshot: examples put in front of each item (default: each task's own setting, else 0).
        log_samples: also return every item's requests, log-likelihoods and metrics (under "samples").
        apply_chat_template: wrap prompts in the tokenizer's chat template (the harness' default is not to).
        builtin_tasks: index the harness' own tasks; False is faster when every task is under `include_path`.

    Returns:
        {"metrics": {task: {metric: value}}, "n_samples": {task: {"original", "effective"}}, "n_shot",
        "versions", "higher_is_better", "lm_eval_version", "max_length"} and, with `log_samples`,
        "samples": {task: [one dict per item, as the harness logs them]}.

    Raises:
        ImportError: lm-eval is not installed (the message says how to install it).
        ValueError: `model` is not a causal LM, an unknown task, or a bad `batch_size` / `limit`.

    Example:
        >>> from saftune.models.tiny_lm import tiny_causal_lm
        >>> evaluate_with_lm_eval(tiny_causal_lm("llama"), ["arc_easy"], limit=10)["metrics"]  # doctest: +SKIP
        {'arc_easy': {'acc': 0.3, 'acc_stderr': 0.15, 'acc_norm': 0.2, 'acc_norm_stderr': 0.13}}
    """
    if not isinstance(model, CausalLM):
        kind = getattr(model, "modality", type(model).__name__)
        raise ValueError(f"lm-evaluation-harness scores causal language models; this model is a {kind} model "
                         f"({type(model).__name__}). Give a causal LM (causal-lm:<path>, smollm2, tiny-llama), or "
                         "evaluate it with saftune's own benchmarks (--harness saftune)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
    if limit is not None and not (limit > 0 and math.isfinite(limit)):
        raise ValueError(f"limit must be a number of items (>= 1) or a fraction in (0, 1); got {limit!r}")
    tasks = list(tasks)
    if not tasks:
        raise ValueError("no lm-eval task given; name at least one (e.g. --tasks hellaswag,arc_easy)")
    lm_eval = _import_lm_eval()
    from lm_eval.models.huggingface import HFLM

    manager = task_manager(tasks, include_path, builtin_tasks=builtin_tasks)
    was_training = model.training
    # HFLM warns that a model instance makes some of its own arguments unused: that is the point here.
    hf_logger = logging.getLogger("lm_eval.models.huggingface")
    level = hf_logger.level
    hf_logger.setLevel(logging.ERROR)
    try:
        # The window is the CausalLM's max_length, so that both scorers see the same context.
        harness_lm = HFLM(pretrained=model.lm, tokenizer=model.tokenizer, batch_size=batch_size,
                          max_length=model.max_length)
    finally:
        hf_logger.setLevel(level)
    try:
        with _global_rng_kept():
            results = lm_eval.simple_evaluate(model=harness_lm, tasks=tasks, task_manager=manager, limit=limit,
                                              num_fewshot=num_fewshot, log_samples=log_samples,
                                              apply_chat_template=apply_chat_template)
    finally:
        model.train(was_training)  # HFLM put the model in eval mode
    out = {
        "metrics": task_metrics(results),
        "n_samples": results.get("n-samples", {}),
        "n_shot": results.get("n-shot", {}),
        "versions": results.get("versions", {}),
        "higher_is_better": results.get("higher_is_better", {}),
        "lm_eval_version": lm_eval.__version__,
        "max_length": model.max_length,
    }
    if log_samples:
        out["samples"] = results.get("samples", {})
    return out
