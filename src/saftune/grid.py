"""Grids of runs: methods x sparsity levels x seeds on one suite, one JSON line per finished run.

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
      all_seeds: true               # on the mean over the grid's seeds (default: `seed: 1` alone)
      grid: {ft: {lr: [1e-5, 3e-5]}, saft: {lr: [1e-4, 1e-3], sparsity: [1e-4, 1e-3, 1e-2]}}
      limits: {sparsity: [1e-4, 1e-2]}   # an edge choice is extended (see `saftune.selection`), inside these

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
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from saftune._io import atomic_path, write_json
from saftune.config import Config, option
from saftune.methods.base import method_class
from saftune.record import RunRecord
from saftune.pool import Job, RunPool
from saftune.run import RunConfig
from saftune.selection import Trial, best_trial, candidates, edges, extension, searched_values, within
from saftune.train.checkpoint import config_fingerprint
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
    model_options: dict = option(help="model options of this row, over the grid's (e.g. {quantize: int8})",
                                 default_factory=dict)

    def __post_init__(self):
        super().__post_init__()
        if not self.method:
            raise ValueError("a grid entry needs a `method`")
        method_class(self.method)  # unknown names fail here, before any run starts
        self.name = _check_name(self.name or self.method, "grid row")


@dataclass
class Selection(Config):
    """Hyperparameter selection on validation data (never on OOD sets)."""

    seed: int = option(1, "protocol seed whose validation split chooses (unless `all_seeds`)", low=0)
    all_seeds: bool = option(False, "choose on the mean validation accuracy over all the grid's seeds (the winning "
                             "trials become the grid's runs of every seed)")
    grid: dict = option(help="variant name -> {option: [candidate values]}", default_factory=dict)
    epochs: int | None = option(None, "epochs of the selection runs (default: the grid's)", low=1)
    extend: int = option(2, "how often a numeric list may be extended when its best value lies at an edge "
                         "(a geometric step beyond it; 0: never)", low=0)
    limits: dict = option(help="option -> [low, high]: extensions stay inside these bounds "
                          "(e.g. {sparsity: [1.0e-4, 1.0e-2]})", default_factory=dict)

    def __post_init__(self):
        super().__post_init__()
        for key, bounds in self.limits.items():
            if not (isinstance(bounds, (list, tuple)) and len(bounds) == 2 and all(isinstance(b, (int, float)) for b in bounds)
                    and bounds[0] <= bounds[1]):
                raise ValueError(f"selection.limits.{key} must be [low, high] with low <= high; got {bounds!r}")


@dataclass
class GridConfig(Config):
    """A benchmark grid (a YAML recipe)."""

    name: str = option("grid", "name of the grid")
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
    workers: int = option(1, "processes running trials and runs side by side, the CPU's threads split among them "
                          "(2 on a 2-core CPU: benchmarks/grid_workers.py)", low=1)

    def __post_init__(self):
        super().__post_init__()
        _check_name(self.name, "grid")  # the default output directory is runs/<name>
        for variant in self.variants():  # bad rows and names fail when the grid is read, before any run starts
            if variant.model_options:
                from saftune.models.registry import check_model

                check_model(self.model, {**self.model_options, **variant.model_options})
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

    def for_dataset(self, name: str, options: dict) -> GridConfig:
        """This grid restricted to one dataset."""
        return self.replace(dataset=name, dataset_options=options, datasets=None)

    @classmethod
    def load(cls, source: str | Path) -> GridConfig:
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
    return {r.run_id for r in records if r.run_id}


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


def _run_config(grid: GridConfig, variant: Variant, seed: int, options: dict, train: TrainConfig | None = None,
                save: bool = True) -> RunConfig:
    return RunConfig(model=grid.model, model_options={**grid.model_options, **variant.model_options}, dataset=grid.dataset,
                     dataset_options=grid.dataset_options, method=variant.method, method_options=options,
                     train=train or grid.train, seed=seed, eval_batch_size=grid.eval_batch_size, save_result=save)


def _same_work(config: RunConfig) -> str | None:
    """The runs of a method the seed does not change (zero-shot) do the same work (`Job.same_work`)."""
    if not method_class(config.method).seed_free:
        return None
    return config_fingerprint({**config.identity(), "seed": None, "method": config.method,
                               "method_options": config.method_options, "eval_batch_size": config.eval_batch_size})


def selection_seeds(grid: GridConfig) -> list[int]:
    """The protocol seeds whose validation splits choose the hyperparameters."""
    return list(grid.seeds) if grid.selection.all_seeds else [grid.selection.seed]


def _option_valid(method: str, options: dict) -> bool:
    """Whether a method accepts these option values (an extension must not step outside an option's range)."""
    try:
        method_class(method).config_class.from_dict(options)
    except ValueError:
        return False
    return True


def select_hyperparameters(grid: GridConfig, out_dir: Path, pool: RunPool | None = None,
                           reuse_dir=None, *, tracker: GridProgress | None = None, on_selected=None) -> dict[str, dict]:
    """Choose each gridded variant's options by validation accuracy; returns {variant: {chosen, ...}}.

    Every candidate runs on each selection seed (`selection.seed`, or all the grid's seeds with
    `all_seeds`) and is evaluated on the validation split only; the best mean wins (ties: the earlier
    candidate). A best value at the edge of a numeric list is extended (see `saftune.selection`) up to
    `selection.extend` times, inside `selection.limits` and the option's own range. The outcome, with
    every trial and extension, is written to `<out_dir>/selection.json` after each variant, and reused
    while the grid's settings and the variant's own row are unchanged. The winning trial of a seed *is* the grid's run of that
    variant and seed (same options, same seed), so its directory becomes that run's: the grid then only
    evaluates it instead of training it again.

    Args:
        pool: runs the trials (`RunPool`; default: one at a time in this process).
        reuse_dir: (variant name, seed) -> the grid's run directory (default: the single-dataset layout).
        tracker: counts each trial (`GridProgress`).
        on_selected: called with (variant name, outcome, tracker) when a variant is chosen.
    """
    if not grid.selection or not grid.selection.grid:
        return {}
    reuse_dir = reuse_dir or (lambda name, seed: run_dir(out_dir, run_id(name, seed)))
    pool = pool or RunPool()
    cache_path = Path(out_dir) / "selection.json"
    key = _selection_key(grid)
    done = _cached_selection(cache_path, key)
    seeds = selection_seeds(grid)
    reusable = grid.selection.epochs is None and set(seeds) <= set(grid.seeds) and not grid.sparsities
    train = grid.train if grid.selection.epochs is None else grid.train.replace(epochs=grid.selection.epochs)
    if reusable:  # keep each trial's final state (without AdamW's moments), so the winner can stand as the grid's run
        train = train.replace(checkpoint_every=10**9, final_moments=False)
    variants = {v.name: v for v in grid.variants()}
    trials_dir = Path(out_dir) / "selection"

    def start_trials(name: str, options: list[dict], first: int, dirs: dict) -> list[tuple[Trial, int, object]]:
        """Submit trials `first`, `first + 1`, ... of `name` on every selection seed; (trial, seed, handle)."""
        variant, started = variants[name], []
        for index, candidate in enumerate(options, start=first):
            trial = Trial(candidate)
            for seed in seeds:
                config = _run_config(grid, variant, seed, {**variant.options, **candidate}, train, save=False)
                trial_dir = trials_dir / f"{name}-{index}-seed{seed}" if reusable else None
                if trial_dir is not None:
                    shutil.rmtree(trial_dir, ignore_errors=True)
                    dirs[(index, seed)] = trial_dir
                started.append((trial, seed, Job(config, trial_dir, evaluate_splits="val")))
        # A row's extensions go before other rows' trials: its choice (and its runs) should not wait for them.
        handles = pool.submit([job for _, _, job in started], urgent=first > 0)
        _count_when_done(handles, tracker)
        return [(trial, seed, handle) for (trial, seed, _), handle in zip(started, handles)]

    def finish_trials(name: str, started: list) -> list[Trial]:
        new_trials = []
        for trial, _, _ in started:
            if not any(t is trial for t in new_trials):
                new_trials.append(trial)
        for trial, seed, handle in started:
            trial.val[seed] = handle.result().metrics["val"]
        for trial in new_trials:
            logger.info("selection %s %s: val %.4f", name, trial.options, trial.mean)
        return new_trials

    # Every row's first trials are queued at once, so that the workers never wait for a row to be chosen;
    # a row's extensions go ahead of them (with a single worker everything runs in this order, as before).
    todo = [name for name in grid.selection.grid if name not in done]
    all_dirs = {name: {} for name in todo}
    first_trials = {name: start_trials(name, candidates(grid.selection.grid[name]), 0, all_dirs[name]) for name in todo}
    for name in todo:
        variant, dirs = variants[name], all_dirs[name]
        trials: list[Trial] = finish_trials(name, first_trials.pop(name))
        extensions = []
        for round_ in range(1, grid.selection.extend + 1):
            best = best_trial(trials)
            new = []
            for option_name, direction in edges(trials, best).items():
                value = extension(trials, option_name, direction)
                candidate = {**best.options, option_name: value}
                allowed = within(value, grid.selection.limits.get(option_name)) and \
                    _option_valid(variant.method, {**variant.options, **candidate})
                extensions.append({"round": round_, "option": option_name, "direction": direction, "value": value,
                                   "tried": allowed})
                if allowed and candidate not in [t.options for t in trials]:
                    new.append(candidate)
            if not new:
                break
            if tracker is not None:
                tracker.add(len(new) * len(seeds))
            trials += finish_trials(name, start_trials(name, new, len(trials), dirs))
        best = best_trial(trials)
        at_edge = edges(trials, best)
        searched = [k for k in best.options if len(searched_values(trials, k)) >= 2]
        outcome = {"chosen": best.options, "interior": {k: k not in at_edge for k in searched},
                   "seeds": seeds, "val_mean": best.mean, "val_std": best.std, "extensions": extensions,
                   "trials": [t.to_dict() for t in trials]}
        if at_edge:
            logger.warning("selection %s: the best %s lie at the edge of the searched values (selection.extend = %d); "
                           "widen the list, or raise `extend` or the limits", name, sorted(at_edge), grid.selection.extend)
        done[name] = outcome
        write_json(cache_path, {"settings": key, "metric": "val", "seeds": seeds, "variants": done})
        if reusable:
            index = trials.index(best)
            for seed in seeds:
                target = reuse_dir(name, seed)
                shutil.rmtree(target, ignore_errors=True)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(dirs[(index, seed)], target)
            for trial_dir in dirs.values():
                shutil.rmtree(trial_dir, ignore_errors=True)
        if on_selected:
            on_selected(name, outcome, tracker)
    return done


def _count_when_done(handles: list, tracker: GridProgress | None) -> None:
    """Count each job in the progress when it finishes (with workers, not when its result is collected)."""
    if tracker is not None:
        for handle in handles:
            handle.add_done_callback(lambda _: tracker.step())


def _selection_key(grid: GridConfig) -> dict:
    """The settings a cached selection must share to be reused (the seeds only as far as selection uses them)."""
    key = {k: v for k, v in grid.to_dict().items() if k not in ("seeds", "description", "name", "workers")}
    key["selection_seeds"] = selection_seeds(grid)
    # Only the rows that are selected: changing a fixed row (its learning rate) keeps the trials of the others.
    gridded = set(grid.selection.grid) if grid.selection else set()
    key["methods"] = [m for m in key.get("methods", [])
                      if (m if isinstance(m, str) else m.get("name", m.get("method"))) in gridded]
    return key


def _row_keys(key: dict) -> tuple[dict, dict]:
    """A selection key split into what every row shares and, per selected row, its method entry and its grid."""
    common = {k: v for k, v in key.items() if k != "methods"}
    selection = dict(common.get("selection") or {})
    grids = selection.pop("grid", None) or {}
    common["selection"] = selection
    rows = {}
    for m in key.get("methods", []):
        name = m if isinstance(m, str) else m.get("name", m.get("method"))
        rows[name] = {"method": m, "grid": grids.get(name)}
    return common, rows


def _cached_selection(cache_path: Path, key: dict) -> dict[str, dict]:
    """The variants already chosen under the same settings: the grid's shared ones and the variant's own row.

    A row added to the grid (or another row's grid changed) keeps the others' choices and trials.
    """
    if not cache_path.is_file():
        return {}
    try:
        cached = json.loads(cache_path.read_text())
        cached_common, cached_rows = _row_keys(cached["settings"])
        common, rows = _row_keys(key)
        if cached_common != common:
            return {}
        return {name: dict(entry) for name, entry in cached["variants"].items()
                if "chosen" in entry and name in rows and cached_rows.get(name) == rows[name]}
    except (OSError, ValueError, AttributeError, KeyError, TypeError) as e:
        # Not redone silently: the grid's finished runs used the options it recorded.
        raise ValueError(f"{str(cache_path)!r} is damaged ({e!r}); delete it to select the hyperparameters again "
                         "(its trials run again)") from e


def selection_record(outcome: dict | None) -> dict | None:
    """What a run record keeps of its variant's selection: how the options were chosen."""
    if not outcome:
        return None
    return {k: outcome[k] for k in ("interior", "seeds", "val_mean", "val_std") if k in outcome} | \
        {"trials": len(outcome.get("trials", [])), "extended": sum(e["tried"] for e in outcome.get("extensions", []))}


def run_dir(out_dir: Path, rid: str) -> Path:
    """The directory of one grid run: `<out_dir>/runs/<run id, "/" written "__">`, never outside it."""
    runs = Path(out_dir) / "runs"
    path = runs / rid.replace("/", "__")
    # Names are checked when the grid is read; this guards any other caller (and a planted symlink).
    if "\0" in rid or path.resolve().parent != runs.resolve():
        raise ValueError(f"run id {rid!r} does not name a directory inside {str(runs)!r}")
    return path


def plan(grid: GridConfig) -> list[tuple[Variant, float | None, int]]:
    """(variant, sparsity level or None, seed) for every run of the grid, in order."""
    runs = []
    for variant in grid.variants():
        fixed = "sparsity" in variant.options
        levels = grid.sparsities if (grid.sparsities and _has_option(variant.method, "sparsity") and not fixed) else [None]
        for sparsity in levels:
            for seed in grid.seeds:
                runs.append((variant, sparsity, seed))
    return runs


def run_grid(grid: GridConfig, results_path: str | Path, out_dir: str | Path, *, on_record=None, on_selected=None,
             progress: bool = False) -> list[RunRecord]:
    """Run every grid cell not yet in `results_path`; return the new records.

    Args:
        grid: the grid.
        results_path: JSON-lines file; existing run ids are skipped.
        out_dir: run directories (checkpoints, logs, masks) and the selection cache.
        on_record: called with each new record and the progress (`GridProgress`) (the CLI prints a line).
        on_selected: called with (variant name, selection outcome, progress) when a variant's
            hyperparameters are chosen.
        progress: show a progress bar over trials and runs (rate, ETA) on stderr.
    """
    results_path, out_dir = Path(results_path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    repair_tail(results_path)
    done = finished_run_ids(results_path)
    entries = grid.dataset_entries()
    many = len(entries) > 1
    cells = [(dataset, options, variant, sparsity, seed)
             for (dataset, options), (variant, sparsity, seed) in itertools.product(entries, plan(grid))
             if run_id(variant.name, seed, sparsity, dataset if many else None) not in done]
    # Hyperparameters are chosen once, on the first dataset's validation split (the source dataset).
    first, source = entries[0][0], grid.for_dataset(*entries[0])
    gridded = set(source.selection.grid) if source.selection else set()
    cached = _cached_selection(out_dir / "selection.json", _selection_key(source)) if gridded else {}
    tracker = GridProgress(grid, set(cached), len(cells), progress)
    # Pretrained models, evaluations and trainings the runs share (through files when several workers run).
    cache_dir = out_dir / "cache"
    with tracker, RunPool(grid.workers, cache_dir=cache_dir if grid.workers > 1 else None) as pool:
        handles, outcomes = {}, {}  # cell index -> the run's handle; variant name -> its selection outcome

        def queue_runs(name: str, outcome: dict, urgent: bool = False) -> None:
            """Queue the runs of a row whose options are known (with one worker they run when collected)."""
            outcomes[name] = outcome
            indices = [i for i, cell in enumerate(cells) if cell[2].name == name]
            jobs = []
            for i in indices:
                dataset, options, variant, sparsity, seed = cells[i]
                run_options = {**variant.options, **outcome.get("chosen", {})}
                if sparsity is not None:
                    run_options["sparsity"] = sparsity
                config = _run_config(grid.for_dataset(dataset, options), variant, seed, run_options, save=grid.save_results)
                jobs.append(Job(config, run_dir(out_dir, run_id(variant.name, seed, sparsity, dataset if many else None)),
                                same_work=_same_work(config)))
            submitted = pool.submit(jobs, urgent=urgent)
            _count_when_done(submitted, tracker)
            handles.update(zip(indices, submitted))

        def chosen(name: str, outcome: dict, progress_) -> None:
            queue_runs(name, outcome, urgent=True)  # its runs need not wait for the other rows' trials
            if on_selected:
                on_selected(name, outcome, progress_)

        for variant in grid.variants():
            if variant.name not in gridded or variant.name in cached:
                queue_runs(variant.name, cached.get(variant.name, {}))
        select_hyperparameters(source, out_dir, pool,
                               lambda name, seed: run_dir(out_dir, run_id(name, seed, None, first if many else None)),
                               tracker=tracker, on_selected=chosen)
        new = []
        for i, (dataset, _, variant, sparsity, seed) in enumerate(cells):  # in the plan's order
            record = handles[i].result()
            outcome = outcomes[variant.name]
            record.run_id, record.variant, record.grid = run_id(variant.name, seed, sparsity, dataset if many else None), \
                variant.name, grid.name
            record.selected_options = outcome.get("chosen", {})
            record.selection = selection_record(outcome)
            if record.sparsity is None:
                record.sparsity = sparsity
            append_result(results_path, record.to_dict())
            new.append(record)
            if on_record:
                on_record(record, tracker)
    shutil.rmtree(cache_dir, ignore_errors=True)  # the grid is complete: nothing left to share
    return new


class GridProgress:
    """Trials and runs done out of the planned total, elapsed time and ETA; optionally a tqdm bar.

    Selection trials and grid runs count one unit each (a run reused from a winning trial only
    evaluates, so the ETA is an upper estimate while runs remain).
    """

    def __init__(self, grid: GridConfig, chosen_before: set[str], runs: int, show_bar: bool):
        trials = 0
        if grid.selection:
            seeds = selection_seeds(grid)
            trials = sum(len(candidates(g)) * len(seeds) for n, g in grid.selection.grid.items()
                         if n not in chosen_before)
        self.total, self.done, self.started = trials + runs, 0, time.perf_counter()
        self._lock = threading.Lock()
        self.bar = None
        if show_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc=f"grid {grid.name}", unit="run", dynamic_ncols=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()

    def add(self, units: int) -> None:
        """More work than planned (an extended hyperparameter list)."""
        self.total += units
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.refresh()

    def step(self) -> None:
        with self._lock:  # worker jobs finish on the pool's thread
            self.done += 1
            if self.bar is not None:
                self.bar.update(1)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    @property
    def eta(self) -> float | None:
        return self.elapsed / self.done * (self.total - self.done) if self.done else None

    def describe(self) -> str:
        """"[12/40, 3m05s, ETA 7m40s]": for log lines when no bar is shown."""
        eta = "" if self.eta is None else f", ETA {_duration(self.eta)}"
        return f"[{self.done}/{self.total}, {_duration(self.elapsed)}{eta}]"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
