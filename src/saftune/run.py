"""One experiment: dataset -> model -> method -> training -> ID/OOD evaluation -> saved result.

`run_experiment(RunConfig(...), out_dir)` returns one flat record (the JSON line a benchmark grid
appends) and writes into `out_dir`: `run.json` (the configuration), `log.jsonl` (training), the method's
files (e.g. the SAFT mask), `result/` (the artifact) and `metrics.json`.

Example:
    >>> import tempfile
    >>> config = RunConfig(model="tiny-sentence", dataset="sentiment-domains", method="zeroshot",
    ...                    dataset_options={"max_test": 20, "max_ood": 20})
    >>> record = run_experiment(config, tempfile.mkdtemp())        # doctest: +SKIP
    sorted(record.metrics)                                 # doctest: +SKIP
    ['id', 'ood/amazon', 'ood/nyt', 'ood/tweets', 'ood_avg', 'val']
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from saftune import distributed
from saftune._io import write_json
from saftune.config import Config, option
from saftune.data.registry import check_dataset, dataset_options, load_dataset
from saftune.eval.cache import EvaluationCache
from saftune.data.llm.benchmark import LMBenchmark
from saftune.eval.evaluate import evaluate, evaluate_validation
from saftune.methods.base import create_method
from saftune.models.registry import check_model, create
from saftune.record import RunRecord
from saftune.sparse.quantized import copy_model
from saftune.model_card import write_model_card
from saftune.train.shared import SharedTraining
from saftune.train.trainer import LOG_FILE, TrainConfig, fit, read_log_line

logger = logging.getLogger(__name__)


@dataclass
class RunConfig(Config):
    """Everything that defines one run."""

    model: str = option("minilm", "model spec, e.g. minilm, hf-clip:<path-or-id>, tiny-clip (see `saftune list`)")
    model_options: dict = option(help="options of the model builder", default_factory=dict)
    dataset: str = option("sentiment-domains", "dataset name (see `saftune list`)")
    dataset_options: dict = option(help="options of the dataset builder (shots, root, max_test, ...)", default_factory=dict)
    method: str = option("saft", "method name (see `saftune list`)")
    method_options: dict = option(help="options of the method (lr, sparsity, ...)", default_factory=dict)
    train: TrainConfig = option(help="training-loop options", default_factory=TrainConfig)
    seed: int = option(1, "protocol seed: picks the few-shot subset and seeds training (papers: 1, 2, 3)", low=0)
    eval_batch_size: int = option(64, "batch size of evaluation", low=1)
    save_result: bool = option(True, "write the result artifact (delta, adapter, weights) into <run>/result")

    def identity(self) -> dict:
        """The settings a checkpoint must share to be resumed by this run."""
        return {"model": self.model, "model_options": self.model_options, "dataset": self.dataset,
                "dataset_options": self.dataset_options, "seed": self.seed}


@dataclass
class RunCache:
    """What the runs of one process (a grid) share, each part giving exactly what redoing the work would.

    Attributes:
        models: one pristine copy of each pretrained model, loaded from disk once; runs get deep copies.
        evaluations: accuracies of identical weights on identical splits (`saftune.eval.cache`).
        trainings: trained states of identical trainings (`saftune.train.shared`).
        scores: phase-1 scores of identical selections (`PrepareContext.reuse_scores`): a SAFT sparsity
            sweep and its learning-rate trials score once per seed.
    """

    models: dict | None = field(default_factory=dict)
    evaluations: EvaluationCache | None = field(default_factory=EvaluationCache)
    trainings: SharedTraining | None = field(default_factory=SharedTraining)
    scores: SharedTraining | None = field(default_factory=lambda: SharedTraining(max_bytes=2 * 2**30))

    @classmethod
    def in_directory(cls, directory: str | Path) -> RunCache:
        """Evaluations and trained states also kept in `directory`, shared by the processes of a grid."""
        directory = Path(directory)
        return cls(evaluations=EvaluationCache(directory / "evaluations.jsonl"),
                   trainings=SharedTraining(directory=directory / "trainings"),
                   scores=SharedTraining(max_bytes=2 * 2**30, directory=directory / "scores"))

    @classmethod
    def disabled(cls) -> RunCache:
        """Nothing shared: a single run loads, trains and evaluates everything itself."""
        return cls(models=None, evaluations=None, trainings=None, scores=None)


def build_benchmark(config: RunConfig):
    """The run's benchmark, validated (`Benchmark.validate`); the protocol seed goes to builders that take one."""
    options = dict(config.dataset_options)
    if "seed" in dataset_options(config.dataset):
        options.setdefault("seed", config.seed)
    bench = load_dataset(config.dataset, **options)
    bench.validate()
    return bench


def build_model_and_benchmark(config: RunConfig, model_cache: dict | None = None):
    """The run's benchmark and its pretrained model, set to the benchmark's classes.

    Runs and every CLI command build them here, so each refuses a model whose inputs are not the
    dataset's (before any training).
    """
    bench = build_benchmark(config)
    model = _pretrained(config, model_cache)
    if model.modality != bench.modality:
        raise ValueError(f"model {config.model!r} takes {model.modality} inputs but dataset {config.dataset!r} holds "
                         f"{bench.modality}; choose a {bench.modality} model (saftune list models)")
    if not isinstance(bench, LMBenchmark):  # a causal LM scores options by likelihood: no class head to set
        model.set_classes(bench.classnames, bench.templates)
    return model, bench


def _loss_curve(history: list[dict], points: int = 200) -> list[list[float]]:
    """(step, loss) pairs, thinned to at most `points` for the report's training-curve plot."""
    losses = [(h["step"], round(h["loss"], 5)) for h in history if "loss" in h]
    stride = max(1, len(losses) // points)
    return [list(p) for p in losses[::stride]] + ([list(losses[-1])] if losses and (len(losses) - 1) % stride else [])


def _logged_history(out_dir: Path | None, fallback: list[dict]) -> list[dict]:
    """The run's whole training history: log.jsonl when there is one (it spans resumed attempts)."""
    log = out_dir / LOG_FILE if out_dir is not None else None
    if log is None or not log.is_file():
        return fallback
    records = (read_log_line(line, log) for line in log.read_text(errors="replace").splitlines())
    return [r for r in records if r is not None]


def _pretrained(config: RunConfig, cache: dict | None):
    """A fresh pretrained model: built by the registry, or deep-copied from the cache."""
    options = {"seed": config.seed} | config.model_options
    if cache is None:
        return create(config.model, **options)
    key = json.dumps([config.model, options], sort_keys=True, default=str)
    if key not in cache:
        cache[key] = create(config.model, **options)
    return copy_model(cache[key])  # deepcopy, with quantized weights copied exactly


def finished_record(out_dir: Path, config: RunConfig, evaluate_splits: str = "all") -> RunRecord | None:
    """The record of a run that already finished in `out_dir` with the same configuration, else None.

    `metrics.json` is written last, so its presence means the run finished; a grid stopped before it
    wrote the run's line to its results file finds the run here instead of training it again from
    scratch. A run that kept its checkpoint resumes from it instead (cheap: evaluation only), and a run
    evaluated on validation only (a hyperparameter trial) is not finished for `evaluate_splits="all"`.
    """
    path = out_dir / "metrics.json"
    if not path.is_file() or (out_dir / "checkpoint").exists():
        return None  # a run that kept its checkpoint resumes from it as before (its files checked again)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # a damaged file: the run is redone (from its checkpoint when there is one)
    if not isinstance(data, dict) or data.get("config") != config.to_dict():
        return None
    if evaluate_splits == "all" and not set(data.get("metrics") or {}) - {"val"}:
        return None
    logger.info("%s: finished before (metrics.json); not run again", out_dir)
    return RunRecord.from_dict(data)


def run_experiment(config: RunConfig, out_dir: str | Path | None = None, *, resume: bool = True,
                   evaluate_splits: str = "all", cache: RunCache | None = None) -> RunRecord:
    """Run one experiment and return its record (metrics, parameter counts, timings, configuration).

    Args:
        config: the run.
        out_dir: where the run writes (None: nothing is written).
        resume: continue from a checkpoint in `out_dir` when there is one.
        evaluate_splits: "all" (validation, ID test, OOD sets) or "val" (validation only: hyperparameter trials).
        cache: what a grid's runs share (`RunCache`): pretrained models, evaluations and trainings
            that would come out the same if redone.
    """
    run_started = time.perf_counter()
    if evaluate_splits not in ("all", "val"):
        raise ValueError(f"evaluate_splits must be 'all' or 'val'; got {evaluate_splits!r}")
    # Names and options first: a typo fails at once, before any data or weights are read.
    method = create_method(config.method, config.method_options)
    check_model(config.model, config.model_options)
    check_dataset(config.dataset, config.dataset_options)
    out_dir = Path(out_dir) if out_dir is not None else None
    if resume and out_dir is not None:
        finished = finished_record(out_dir, config, evaluate_splits)
        if finished is not None:
            return finished
    writes = out_dir is not None and distributed.is_main()  # under torchrun, rank 0 writes the files
    if writes:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / "run.json", config.to_dict())
    cache = cache or RunCache.disabled()
    model, bench = build_model_and_benchmark(config, cache.models)
    total_params = sum(p.numel() for p in model.parameters())
    train_config = config.train.replace(seed=config.seed)

    def on_val(m):
        return {"val": evaluate_validation(m, bench, batch_size=config.eval_batch_size, cache=cache.evaluations)}

    started = time.perf_counter()
    trained = fit(model, method, bench.train, train_config, run_dir=out_dir, resume=resume,
                  identity=config.identity(), evaluate_fn=on_val, shared=cache.trainings,
                  shared_scores=cache.scores)
    history = _logged_history(out_dir if writes else None, trained.history)
    train_seconds = time.perf_counter() - started
    if trained.shared:  # the identical training's time: what this result costs to train
        train_seconds = trained.seconds
    elif trained.resumed_from:  # add the time the earlier attempt spent up to the checkpoint
        train_seconds += next((h["seconds"] for h in history if h.get("step") == trained.resumed_from and "seconds" in h), 0.0)

    def evaluate_all(m):
        return evaluate(m, bench, batch_size=config.eval_batch_size, include_val=True, cache=cache.evaluations)

    started = time.perf_counter()
    method.choose_after_training(model, lambda m: on_val(m)["val"])  # validation only, in trials too
    metrics = on_val(model) if evaluate_splits == "val" else evaluate_all(model)
    extra = method.evaluate_extra(model, evaluate_all, metrics) if evaluate_splits == "all" else {}
    eval_seconds = time.perf_counter() - started

    record = RunRecord(method=config.method, model=config.model, dataset=config.dataset, seed=config.seed,
                       metrics=metrics, trainable=method.num_trainable(model), total_params=total_params,
                       steps=trained.steps, train_seconds=round(train_seconds, 2), eval_seconds=round(eval_seconds, 2),
                       config=config.to_dict(), method_config=method.config.to_dict(),
                       benchmark={"modality": bench.modality, "train": len(bench.train), "val": len(bench.val),
                                  **bench.eval_sizes(), **bench.info})
    record.add(method.record_fields(model), f"{config.method}.record_fields")
    record.add(extra, f"{config.method}.evaluate_extra")
    if history:
        record.loss_curve = _loss_curve(history)
    record.wall_seconds = round(time.perf_counter() - run_started, 2)
    if writes:
        if config.save_result:
            info = {"method": config.method, "method_config": method.config.to_dict(), "base_model": config.model,
                    "model_options": config.model_options, "dataset": config.dataset,
                    "dataset_options": config.dataset_options, "seed": config.seed}
            method.save_result(model, out_dir / "result", info)
            write_model_card(out_dir / "result", base_model=config.model, method=config.method, dataset=config.dataset,
                             sparsity=method.config.to_dict().get("sparsity"), trained_values=record.trainable,
                             total_values=total_params, seed=config.seed, metrics=metrics)
        write_json(out_dir / "metrics.json", record.to_dict())
    logger.info("%s on %s (seed %d): %s", config.method, config.dataset, config.seed,
                {k: round(v, 4) for k, v in metrics.items()})
    return record
