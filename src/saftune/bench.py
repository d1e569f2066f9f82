"""Benchmark grids: methods x sparsity levels x seeds on one suite, one JSON line per finished run.

A grid is a YAML recipe (see `saftune/recipes/demo.yaml`):

    model: minilm
    dataset: sentiment-domains
    dataset_options: {shots: 16, max_test: 500, max_ood: 500}
    seeds: [1, 2, 3]
    train: {epochs: 10, batch_size: 8}
    methods:
      - zeroshot
      - ft
      - {name: saft-random, method: saft, options: {score: random}}
    selection:                      # hyperparameters chosen on the validation split, never on OOD sets
      seed: 1
      grid: {ft: {lr: [1e-5, 3e-5]}, saft: {lr: [1e-4, 1e-3]}}

Runs already in the results file are skipped, so an interrupted grid continues where it stopped; a
half-written last line (a run killed while appending) is dropped before new lines are added. The
chosen hyperparameters are stored in `<out>/selection.json` and in every run's record. Each run writes
into `<out>/runs/<run id>`; grid, row and dataset names become parts of those directory names, so they
are restricted to letters, digits and `. _ + -`.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from saftune._io import atomic_path, write_json
from saftune.config import Config, option
from saftune.methods.base import method_class
from saftune.run import RunConfig, run_experiment
from saftune.train.trainer import TrainConfig

logger = logging.getLogger(__name__)

RECIPES = Path(__file__).parent / "recipes"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")


def _check_name(name, what: str) -> str:
    """`name` if it can be part of a directory name under the output directory, else a ValueError.

    Refused: anything that could leave the directory or collide with another run's ("..", "a/b", a NUL,
    "a__b", which is how run ids join their parts).
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name) or "__" in name:
        raise ValueError(f"{what} name {name!r} cannot be part of a directory name: use 1 to 100 letters, digits and "
                         "'.', '_', '+', '-', starting with a letter or digit and without '__'")
    return name


@dataclass
class Variant(Config):
    """One row of the grid: a method with fixed options."""

    name: str = option("", "row name in the report (default: the method name)")
    method: str = option("", "registered method name")
    options: dict = option(help="method options", default_factory=dict)

    def __post_init__(self):
        super().__post_init__()
        if not self.method:
            raise ValueError("a grid entry needs a `method`")
        method_class(self.method)  # unknown names fail here, before any run starts
        self.name = _check_name(self.name or self.method, "grid row")


@dataclass
class Selection(Config):
    """Hyperparameter selection on the validation split of one seed."""

    seed: int = option(1, "protocol seed whose validation split is used", low=0)
    grid: dict = option(help="variant name -> {option: [candidate values]}", default_factory=dict)
    epochs: int | None = option(None, "epochs of the selection runs (default: the grid's)", low=1)


@dataclass
class BenchConfig(Config):
    """A benchmark grid (a YAML recipe)."""

    name: str = option("bench", "name of the grid")
    description: str = option("", "what the grid reproduces")
    model: str = option("minilm", "model spec")
    model_options: dict = option(help="model builder options", default_factory=dict)
    dataset: str = option("sentiment-domains", "dataset name")
    dataset_options: dict = option(help="dataset builder options", default_factory=dict)
    datasets: list | None = option(None, "several datasets, each a name or {name, options} (merged over "
                                   "dataset_options): the grid runs on each; hyperparameters are chosen on the first")
    seeds: list[int] = option(help="protocol seeds", default_factory=lambda: [1, 2, 3])
    methods: list = option(help="grid rows: method names or {name, method, options}", default_factory=lambda: ["saft"])
    sparsities: list[float] | None = option(None, "sparsity levels for variants whose method has a `sparsity` option")
    train: TrainConfig = option(help="training-loop options", default_factory=TrainConfig)
    eval_batch_size: int = option(64, "evaluation batch size", low=1)
    save_results: bool = option(False, "keep each run's artifact (delta, adapter, weights) under the run directory")
    selection: Selection | None = option(None, "hyperparameter selection on validation data")

    def __post_init__(self):
        super().__post_init__()
        _check_name(self.name, "grid")  # the default output directory is runs/<name>
        self.variants()  # bad rows and names fail when the grid is read, before any run starts
        self.dataset_entries()

    def variants(self) -> list[Variant]:
        out = []
        for entry in self.methods:
            variant = Variant(method=entry) if isinstance(entry, str) else Variant.from_dict(entry)
            if variant.name in [v.name for v in out]:
                raise ValueError(f"two grid rows are named {variant.name!r}; give one a `name`")
            out.append(variant)
        if self.selection:
            unknown = set(self.selection.grid) - {v.name for v in out}
            if unknown:
                raise ValueError(f"selection.grid names {sorted(unknown)}, which are not rows of the grid")
        return out

    def dataset_entries(self) -> list[tuple[str, dict]]:
        """(dataset name, options) for every dataset of the grid."""
        if not self.datasets:
            return [(self.dataset, dict(self.dataset_options))]
        entries = []
        for entry in self.datasets:
            name, options = (entry, {}) if isinstance(entry, str) else (entry.get("name"), entry.get("options") or {})
            if not name:
                raise ValueError(f"a `datasets` entry needs a name: {entry!r}")
            entries.append((_check_name(name, "dataset"), {**self.dataset_options, **options}))  # part of run ids
        return entries

    def for_dataset(self, name: str, options: dict) -> BenchConfig:
        """This grid restricted to one dataset."""
        return self.replace(dataset=name, dataset_options=options, datasets=None)

    @classmethod
    def load(cls, source: str | Path) -> BenchConfig:
        """From a YAML file, or the name of a built-in recipe (e.g. "demo")."""
        path = Path(source)
        if not path.is_file():
            builtin = RECIPES / f"{source}.yaml"
            if not builtin.is_file():
                known = sorted(p.stem for p in RECIPES.glob("*.yaml"))
                raise FileNotFoundError(f"no grid file {str(source)!r} and no built-in recipe of that name; built-in: {known}")
            path = builtin
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{str(path)!r} is not valid YAML: {e}") from e
        return cls.from_dict(data)


def _has_option(method: str, name: str) -> bool:
    return name in method_class(method).config_class.field_names()


def run_id(variant: str, seed: int, sparsity: float | None = None, dataset: str | None = None) -> str:
    """The key that identifies a finished run in a results file (the dataset only in multi-dataset grids)."""
    rid = f"{variant}/sparsity={sparsity:g}/seed={seed}" if sparsity is not None else f"{variant}/seed={seed}"
    return f"{dataset}/{rid}" if dataset else rid


def finished_run_ids(path: Path) -> set[str]:
    """Run ids of the complete lines of a results file (damaged lines are logged and ignored)."""
    if not Path(path).is_file():
        return set()
    from saftune.report.results import parse_results

    records, problems = parse_results(path)  # a line that is not JSON, or not even text, only costs its run
    for problem in problems:
        logger.warning("%s %s", path, problem)
    return {r["run_id"] for r in records if "run_id" in r}


def repair_tail(path: Path) -> None:
    """End the file with a newline, so the next record cannot merge with its last line.

    A last line without its newline is complete when it parses (the crash came just before the newline),
    and is kept; otherwise it was cut off by a crash and is dropped.
    """
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    start = data.rfind(b"\n") + 1
    try:
        complete = isinstance(json.loads(data[start:]), dict)
    except ValueError:
        complete = False
    if complete:
        kept = data + b"\n"
    else:
        kept = data[:start]
        logger.warning("%s ends with a partial line (%d bytes); dropping it", path, len(data) - start)
    with atomic_path(path) as tmp:
        tmp.write_bytes(kept)


def append_result(path: Path, record: dict) -> None:
    """Append one JSON line in a single write, flushed to disk."""
    line = json.dumps(record) + "\n"
    with open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def _run_config(bench: BenchConfig, variant: Variant, seed: int, options: dict, train: TrainConfig | None = None,
                save: bool = True) -> RunConfig:
    return RunConfig(model=bench.model, model_options=bench.model_options, dataset=bench.dataset,
                     dataset_options=bench.dataset_options, method=variant.method, method_options=options,
                     train=train or bench.train, seed=seed, eval_batch_size=bench.eval_batch_size, save_result=save)


def select_hyperparameters(bench: BenchConfig, out_dir: Path, model_cache: dict | None = None,
                           reuse_dir=None) -> dict[str, dict]:
    """Choose each gridded variant's options by validation accuracy (ties: the first candidate).

    Trials run on `selection.seed` and are evaluated on the validation split only. The outcome is
    cached in `<out_dir>/selection.json` (reused while the grid's settings are unchanged). The winning
    trial *is* the grid's run of that variant on the selection seed (same options, same seed), so its
    run directory becomes that run's: the grid then only evaluates it instead of training it again.

    Args:
        reuse_dir: variant name -> the grid's run directory of that variant on the selection seed
            (default: the single-dataset layout under `out_dir`).
    """
    reuse_dir = reuse_dir or (lambda name: run_dir(out_dir, run_id(name, bench.selection.seed)))
    if not bench.selection or not bench.selection.grid:
        return {}
    cache_path = Path(out_dir) / "selection.json"
    key = {k: v for k, v in bench.to_dict().items() if k not in ("seeds", "description", "name")}
    if cache_path.is_file():
        try:
            cached = json.loads(cache_path.read_text())
            if cached.get("settings") == key:
                return {name: dict(entry["chosen"]) for name, entry in cached["variants"].items()}
        except (OSError, ValueError, AttributeError, KeyError, TypeError) as e:
            # Not redone silently: the grid's finished runs used the options it recorded.
            raise ValueError(f"{str(cache_path)!r} is damaged ({e!r}); delete it to select the hyperparameters again "
                             "(its trials run again)") from e
    reusable = bench.selection.epochs is None and bench.selection.seed in bench.seeds and not bench.sparsities
    train = bench.train if bench.selection.epochs is None else bench.train.replace(epochs=bench.selection.epochs)
    if reusable:  # keep each trial's final state, so the winner can stand as the grid's run
        train = train.replace(checkpoint_every=10**9)
    variants = {v.name: v for v in bench.variants()}
    outcome = {}
    trials_dir = Path(out_dir) / "selection"
    for name, grid in bench.selection.grid.items():
        variant = variants[name]
        keys = list(grid)
        trials = []
        for i, values in enumerate(itertools.product(*(grid[k] if isinstance(grid[k], list) else [grid[k]] for k in keys))):
            candidate = dict(zip(keys, values))
            config = _run_config(bench, variant, bench.selection.seed, {**variant.options, **candidate}, train, save=False)
            trial_dir = trials_dir / f"{name}-{i}" if reusable else None
            if trial_dir is not None:
                shutil.rmtree(trial_dir, ignore_errors=True)
            record = run_experiment(config, trial_dir, evaluate_splits="val", model_cache=model_cache)
            trials.append({"options": candidate, "val": record["metrics"]["val"], "dir": str(trial_dir) if trial_dir else None})
            logger.info("selection %s %s: val %.4f", name, candidate, record["metrics"]["val"])
        best = max(trials, key=lambda t: t["val"])  # max keeps the first of equal values
        if reusable:
            target = reuse_dir(name)
            shutil.rmtree(target, ignore_errors=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(best["dir"], target)
            for trial in trials:
                if trial is not best and trial["dir"]:
                    shutil.rmtree(trial["dir"], ignore_errors=True)
        outcome[name] = {"chosen": best["options"], "trials": [{k: t[k] for k in ("options", "val")} for t in trials]}
    write_json(cache_path, {"settings": key, "metric": "val", "seed": bench.selection.seed, "variants": outcome})
    return {name: entry["chosen"] for name, entry in outcome.items()}


def run_dir(out_dir: Path, rid: str) -> Path:
    """The directory of one grid run: `<out_dir>/runs/<run id, "/" written "__">`, never outside it."""
    runs = Path(out_dir) / "runs"
    path = runs / rid.replace("/", "__")
    # Names are checked when the grid is read; this guards any other caller (and a planted symlink).
    if "\0" in rid or path.resolve().parent != runs.resolve():
        raise ValueError(f"run id {rid!r} does not name a directory inside {str(runs)!r}")
    return path


def plan(bench: BenchConfig) -> list[tuple[Variant, float | None, int]]:
    """(variant, sparsity level or None, seed) for every run of the grid, in order."""
    runs = []
    for variant in bench.variants():
        fixed = "sparsity" in variant.options
        levels = bench.sparsities if (bench.sparsities and _has_option(variant.method, "sparsity") and not fixed) else [None]
        for sparsity in levels:
            for seed in bench.seeds:
                runs.append((variant, sparsity, seed))
    return runs


def run_bench(bench: BenchConfig, results_path: str | Path, out_dir: str | Path, *, on_record=None) -> list[dict]:
    """Run every grid cell not yet in `results_path`; return the new records.

    Args:
        bench: the grid.
        results_path: JSON-lines file; existing run ids are skipped.
        out_dir: run directories (checkpoints, logs, masks) and the selection cache.
        on_record: called with each new record (the CLI prints a line).
    """
    results_path, out_dir = Path(results_path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    repair_tail(results_path)
    done = finished_run_ids(results_path)
    model_cache: dict = {}  # one pristine pretrained model per process; each run gets a copy
    entries = bench.dataset_entries()
    many = len(entries) > 1
    # Hyperparameters are chosen once, on the first dataset's validation split (the source dataset).
    first = entries[0][0]
    seed = bench.selection.seed if bench.selection else None
    chosen = select_hyperparameters(bench.for_dataset(*entries[0]), out_dir, model_cache,
                                    lambda name: run_dir(out_dir, run_id(name, seed, None, first if many else None)))
    new = []
    for (dataset, options), (variant, sparsity, seed) in itertools.product(entries, plan(bench)):
        rid = run_id(variant.name, seed, sparsity, dataset if many else None)
        grid = bench.for_dataset(dataset, options)
        if rid in done:
            logger.info("skip %s: already in %s", rid, results_path)
            continue
        run_options = {**variant.options, **chosen.get(variant.name, {})}
        if sparsity is not None:
            run_options["sparsity"] = sparsity
        config = _run_config(grid, variant, seed, run_options, save=bench.save_results)
        started = time.perf_counter()
        record = run_experiment(config, run_dir(out_dir, rid), model_cache=model_cache)
        record.update({"run_id": rid, "variant": variant.name, "grid": bench.name,
                       "selected_options": chosen.get(variant.name, {}), "wall_seconds": round(time.perf_counter() - started, 2)})
        record.setdefault("sparsity", sparsity)
        append_result(results_path, record)
        new.append(record)
        if on_record:
            on_record(record)
    return new
