"""Load a results file (one JSON line per run) and aggregate it into the papers' tables as plain data.

A benchmark grid appends one line per finished run (see `saftune.grid`). `aggregate` groups the runs
by (dataset, model) into tables, and inside a table by variant (or by (variant, sparsity) when a variant
was run at several sparsity levels), averaging every metric over seeds. Everything it returns is plain
Python data (dicts, lists, floats), so tests, the CLI and notebooks can use it without this package.

Example:
    >>> import json, pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "results.jsonl"
    >>> lines = [{"variant": "ft", "seed": s, "metrics": {"id": v, "ood/a": v - 0.1, "ood_avg": v - 0.1}}
    ...          for s, v in [(1, 0.70), (2, 0.72), (3, 0.74)]]
    >>> _ = path.write_text("".join(json.dumps(line) + "\\n" for line in lines))
    >>> table = aggregate(load_results(path))[0]
    >>> table["columns"]
    ['id', 'ood/a', 'ood_avg']
    >>> row = table["rows"][0]
    >>> row["label"], row["n_seeds"], format_cell(row["metrics"]["id"])
    ('ft', 3, '72.0 ± 2.0')
"""

from __future__ import annotations

import json
import logging
import math
import re
import statistics
from collections.abc import Iterable
from pathlib import Path

from saftune.record import RunRecord

logger = logging.getLogger(__name__)

# Metric families in the order the papers print them; "val" is left out of the tables on purpose: it
# is the model-selection split, not a reported result (it stays in each row's "metrics").
_LEADING = ("id",)
_TRAILING = ("ood_avg", "base", "new", "hm", "gain/id", "gain/ood_avg")
_HEADERS = {"id": "ID", "ood_avg": "OOD avg", "base": "Base", "new": "New", "hm": "HM"}
# A causal-LM suite (`LMBenchmark`) reports the same keys under the speciality-vs-generality names.
SPECIALITY_SUITE = "speciality-generality"
_SUITE_HEADERS = {SPECIALITY_SUITE: {"id": "Speciality", "ood_avg": "Generality", "gain/id": "Δ Speciality",
                                     "gain/ood_avg": "Δ Generality"}}
MISSING = "–"


# ---------------------------------------------------------------------------------------------- loading
def parse_results(path: str | Path) -> tuple[list[RunRecord], list[str]]:
    """The usable runs of a results file, and one message per line that was skipped.

    A line is skipped when it is not valid JSON (e.g. the runner was killed while appending it), is not
    a JSON object, or has no `metrics` object. When the same run (dataset, model, variant, sparsity,
    seed) appears twice, the later line wins: a re-run supersedes the earlier one.

    Args:
        path: the JSON-lines file.

    Returns:
        (records in file order; messages naming the line).

    Example:
        >>> import pathlib, tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "r.jsonl"
        >>> _ = path.write_text('{"variant": "ft", "metrics": {"id": 0.7}}\\n{"variant": "sa')
        >>> records, problems = parse_results(path)
        >>> len(records), problems[0].split(":")[0]
        (1, 'line 2')
    """
    records: list[RunRecord] = []
    lines_of: list[int] = []  # the line number of each record, for the messages
    problems: list[str] = []
    seen: dict[tuple, int] = {}  # run key -> index in `records`
    superseded: set[int] = set()
    with open(path, "rb") as f:
        lines = f.read().splitlines()
    for number, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            problems.append(f"line {number}: not UTF-8 text (a damaged file?): {e}")
            continue
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"line {number}: not valid JSON (a run cut off while writing?): {e}")
            continue
        if not isinstance(record, dict):
            problems.append(f"line {number}: a JSON {type(record).__name__}, not an object")
            continue
        if not isinstance(record.get("metrics"), dict):
            problems.append(f"line {number}: no 'metrics' object")
            continue
        record = RunRecord.from_dict(record)
        key = (*_group_key(record), _variant(record), record.sparsity, record.seed)
        if record.seed is not None and key in seen:
            earlier = seen[key]
            problems.append(f"line {number}: repeats the run of line {lines_of[earlier]} "
                            f"({_variant(record)}, seed {record.seed}); the later line is used")
            superseded.add(earlier)
        seen[key] = len(records)
        records.append(record)
        lines_of.append(number)
    return [r for i, r in enumerate(records) if i not in superseded], problems


def load_results(path: str | Path) -> list[RunRecord]:
    """The usable runs of a results file; every skipped line is logged as a warning naming its number.

    Example:
        >>> import pathlib, tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "r.jsonl"
        >>> _ = path.write_text('{"variant": "ft", "seed": 1, "metrics": {"id": 0.7}}\\n')
        >>> [r.variant for r in load_results(path)]
        ['ft']
    """
    records, problems = parse_results(path)
    for message in problems:
        logger.warning("%s %s", path, message)
    return records


# ------------------------------------------------------------------------------------------ aggregation
def _variant(record: RunRecord) -> str:
    # a record from `run_experiment` without the benchmark runner has no variant: the method names the row
    return str(record.variant or record.method or "?")


def _group_key(record: RunRecord) -> tuple[str, str]:
    return str(record.dataset or "?"), str(record.model or "?")


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def summarize_values(values: Iterable[float]) -> dict:
    """Mean, sample std (ddof=1; None for one value) and count.

    Example:
        >>> s = summarize_values([0.70, 0.72, 0.74])
        >>> round(s["mean"], 4), round(s["std"], 4), s["n"]
        (0.72, 0.02, 3)
    """
    values = [float(v) for v in values]
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values), "values": values}


def order_columns(keys: Iterable[str]) -> list[str]:
    """Metric keys in the papers' column order: ID, each OOD set (first seen), OOD avg, Base, New, HM.

    Example:
        >>> order_columns(["val", "ood_avg", "ood/b", "id", "ood/a", "hm", "base", "new"])
        ['id', 'ood/b', 'ood/a', 'ood_avg', 'base', 'new', 'hm']
    """
    keys = list(dict.fromkeys(keys))
    return ([k for k in _LEADING if k in keys] + [k for k in keys if k.startswith("ood/")]
            + [k for k in _TRAILING if k in keys])


def column_header(key: str, suite: str | None = None) -> str:
    """Display name of a metric column: "ID", the OOD set's own name, "OOD avg", "Base", "New", "HM".

    Example:
        >>> column_header("ood_avg"), column_header("ood_avg", SPECIALITY_SUITE), column_header("ood/tweets")
        ('OOD avg', 'Generality', 'tweets')
    """
    return _SUITE_HEADERS.get(suite, {}).get(key) or _HEADERS.get(key, key.removeprefix("ood/"))


def _suite(runs: list[RunRecord]) -> str | None:
    """SPECIALITY_SUITE for runs of causal LMs on an `LMBenchmark`, else None (classification)."""
    return SPECIALITY_SUITE if any(r.benchmark.get("modality") == "causal-lm" for r in runs) else None


def _add_gains(rows: list[dict], runs_by_label: dict[str, list[RunRecord]]) -> None:
    """Speciality gain and generality change of every row against the zero-shot row, paired by seed.

    Each seed's fine-tuned accuracy minus the same seed's zero-shot accuracy, then mean ± std over
    seeds (the zero-shot model is the same for every seed, but its probes may be drawn per seed).
    """
    base = next((r for r in rows if r["method"] == "zeroshot"), None)
    if base is None:
        return
    reference = {run.seed: run.metrics for run in runs_by_label[base["label"]]}
    for row in rows:
        for key in ("id", "ood_avg"):
            diffs = [float(run.metrics[key]) - float(reference[run.seed][key]) for run in runs_by_label[row["label"]]
                     if _number(run.metrics.get(key)) is not None and run.seed in reference
                     and _number(reference[run.seed].get(key)) is not None]
            if diffs:
                row["metrics"][f"gain/{key}"] = summarize_values(diffs)


def aggregate(records: list[RunRecord | dict]) -> list[dict]:
    """Group runs into tables (one per dataset and model) with one row per variant, averaged over seeds.

    Rows follow the order in which variants first appear. A variant run at several sparsity levels gets
    one row per level (ascending), labelled "<variant> (α=<level>)".

    Args:
        records: runs as returned by `load_results` (or their dicts).

    Returns:
        A list of tables, each ``{"dataset", "model", "columns", "ood_sets", "rows"}``; a row is
        ``{"label", "variant", "method", "sparsity", "seeds", "n_seeds", "metrics", "trainable",
        "total_params", "trainable_share", "wiseft_curve", "mask_summary", "loss_curve", "run_ids"}``
        with ``metrics[key] = {"mean", "std", "n", "values"}`` as fractions (std None for one seed).
        The curves and the mask summary are averaged over seeds, or None when no run has them.

    Example:
        >>> runs = [{"variant": "saft", "sparsity": a, "seed": 1, "metrics": {"id": 0.7}} for a in (0.01, 0.001)]
        >>> [row["label"] for row in aggregate(runs)[0]["rows"]]
        ['saft (α=0.001)', 'saft (α=0.01)']
    """
    records = [r if isinstance(r, RunRecord) else RunRecord.from_dict(r) for r in records]
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for record in records:
        groups.setdefault(_group_key(record), []).append(record)
    tables = []
    for (dataset, model), runs in groups.items():
        by_variant: dict[str, list[RunRecord]] = {}
        for run in runs:
            by_variant.setdefault(_variant(run), []).append(run)
        rows, runs_by_label = [], {}
        for variant, variant_runs in by_variant.items():
            levels = list(dict.fromkeys(run.sparsity for run in variant_runs))
            if len(levels) == 1:
                runs_by_label[variant] = variant_runs
                rows.append(_row(variant, variant, variant_runs))
                continue
            # None sorts first: a run without a recorded level is the variant's default setting
            for level in sorted(levels, key=lambda s: (s is not None, s if isinstance(s, (int, float)) else 0)):
                label = f"{variant} (α={level:g})" if isinstance(level, (int, float)) else variant
                runs_by_label[label] = [r for r in variant_runs if r.sparsity == level]
                rows.append(_row(label, variant, runs_by_label[label]))
        suite = _suite(runs)
        if suite == SPECIALITY_SUITE:
            _add_gains(rows, runs_by_label)
        columns = order_columns(k for row in rows for k, v in row["metrics"].items() if v)
        tables.append({"dataset": dataset, "model": model, "columns": columns, "suite": suite,
                       "ood_sets": [c.removeprefix("ood/") for c in columns if c.startswith("ood/")], "rows": rows})
    return tables


def _row(label: str, variant: str, runs: list[RunRecord]) -> dict:
    # runs of one row in seed order, so "the first seed" and per-seed lists read naturally
    runs = sorted(runs, key=lambda r: (r.seed is None, r.seed if isinstance(r.seed, int) else 0))
    values: dict[str, list[float]] = {}
    for run in runs:
        for key, value in run.metrics.items():
            if _number(value) is not None:
                values.setdefault(key, []).append(float(value))
    trainable = [t for t in (_number(r.trainable) for r in runs) if t is not None]
    total = [t for t in (_number(r.total_params) for r in runs) if t is not None]
    trainable_mean = round(statistics.fmean(trainable)) if trainable else None
    total_mean = round(statistics.fmean(total)) if total else None
    sparsities = {r.sparsity for r in runs}
    methods = list(dict.fromkeys(str(r.method) for r in runs if r.method))
    return {
        "label": label,
        "variant": variant,
        "method": methods[0] if methods else None,
        "sparsity": sparsities.pop() if len(sparsities) == 1 else None,
        "seeds": [r.seed for r in runs],
        "n_seeds": len(runs),
        "metrics": {key: summarize_values(v) for key, v in values.items()},
        "trainable": trainable_mean,
        "total_params": total_mean,
        "trainable_share": trainable_mean / total_mean if trainable_mean is not None and total_mean else None,
        "wiseft_curve": _mean_curve([r.wiseft_curve for r in runs if isinstance(r.wiseft_curve, list)]),
        "wiseft_layer_curve": _mean_layer_curve([r.wiseft_layer_curve for r in runs
                                                 if isinstance(r.wiseft_layer_curve, list)]),
        "mask_summary": _mean_mask([r.mask_summary for r in runs if isinstance(r.mask_summary, list)]),
        "loss_curve": _mean_loss([r.loss_curve for r in runs if isinstance(r.loss_curve, list)]),
        "run_ids": [r.run_id for r in runs],
        "selection": _selection_summary(runs),
    }


def _selection_summary(runs: list[RunRecord]) -> dict | None:
    """How a row's hyperparameters were chosen (the grid records it in each run), or None.

    Returns {"chosen", "interior", "seeds", "val_mean", "val_std", "trials", "extended"}: the chosen
    options, whether each searched option's choice lies inside its searched values, and the validation
    accuracy over the selection seeds.
    """
    chosen = next((r for r in runs if r.selection), None)
    if chosen is None:
        return None
    return {"chosen": chosen.selected_options, **chosen.selection}


def _mean_curve(curves: list[list[dict]]) -> list[dict] | None:
    """WiSE-FT curves averaged over seeds, point by point (matched on alpha), sorted by alpha."""
    points: dict[float, dict[str, list[float]]] = {}
    for curve in curves:
        for point in curve:
            alpha = _number(point.get("alpha")) if isinstance(point, dict) else None
            if alpha is None:
                continue
            slot = points.setdefault(round(alpha, 9), {})  # rounding: 0.1 + 0.2 style noise must not split a point
            for key, value in point.items():
                if key != "alpha" and _number(value) is not None:
                    slot.setdefault(key, []).append(float(value))
    if not points:
        return None
    return [{"alpha": alpha, "n": max(len(v) for v in slot.values()) if slot else 0,
             **{key: statistics.fmean(v) for key, v in slot.items()}}
            for alpha, slot in sorted(points.items())]


def _mean_layer_curve(curves: list[list[dict]]) -> list[dict] | None:
    """Per-layer averaging points averaged over seeds, matched on their profile ("layer_alphas").

    Example:
        >>> _mean_layer_curve([[{"layer_alphas": [0, 1], "id": 0.5}], [{"layer_alphas": [0, 1], "id": 0.7}]])
        [{'layer_alphas': [0, 1], 'n': 2, 'id': 0.6}]
    """
    points: dict[tuple, dict[str, list[float]]] = {}
    for curve in curves:
        for point in curve:
            profile = point.get("layer_alphas") if isinstance(point, dict) else None
            if not isinstance(profile, list):
                continue
            slot = points.setdefault(tuple(profile), {})
            for key, value in point.items():
                if key != "layer_alphas" and _number(value) is not None:
                    slot.setdefault(key, []).append(float(value))
    if not points:
        return None
    return [{"layer_alphas": list(profile), "n": max((len(v) for v in slot.values()), default=0),
             **{key: round(statistics.fmean(v), 12) for key, v in slot.items()}} for profile, slot in points.items()]


_DIGITS = re.compile(r"\d+")


def natural_block_order(blocks: Iterable[str]) -> list[str]:
    """Blocks in model order with numbered blocks in numeric order ("layer.2" before "layer.10").

    Blocks that differ only in their numbers form a family; families keep the order in which they first
    appear (the model's parameter order), and inside a family numbers are compared as numbers. So a
    lexicographically sorted summary is repaired without moving "embeddings" behind "pooler".

    Example:
        >>> natural_block_order(["emb", "layer.10", "layer.2", "pooler", "layer.1"])
        ['emb', 'layer.1', 'layer.2', 'layer.10', 'pooler']
    """
    blocks = list(dict.fromkeys(blocks))
    family_rank: dict[str, int] = {}
    for block in blocks:
        family_rank.setdefault(_DIGITS.sub("#", block), len(family_rank))
    return sorted(blocks, key=lambda b: (family_rank[_DIGITS.sub("#", b)], [int(n) for n in _DIGITS.findall(b)]))


def _mean_mask(summaries: list[list[dict]]) -> list[dict] | None:
    """Selected entries per block averaged over seeds (blocks in natural order)."""
    selected: dict[str, list[float]] = {}
    totals: dict[str, float] = {}
    for summary in summaries:
        for entry in summary:
            if not isinstance(entry, dict) or "block" not in entry or _number(entry.get("selected")) is None:
                continue
            selected.setdefault(str(entry["block"]), []).append(float(entry["selected"]))
            if _number(entry.get("total")) is not None:
                totals.setdefault(str(entry["block"]), float(entry["total"]))
    if not selected:
        return None
    return [{"block": b, "selected": statistics.fmean(selected[b]), "total": totals.get(b)}
            for b in natural_block_order(selected)]


def _mean_loss(curves: list[list]) -> list[list[float]] | None:
    """Loss per step averaged over seeds at the steps every seed logged; else the first seed's curve."""
    parsed = []
    for curve in curves:
        points = {}
        for point in curve:
            if isinstance(point, (list, tuple)) and len(point) == 2 and None not in map(_number, point):
                points[float(point[0])] = float(point[1])
        if points:
            parsed.append(points)
    if not parsed:
        return None
    common = set(parsed[0]).intersection(*parsed[1:])
    if not common:  # seeds logged at different steps (e.g. different data sizes): show one real curve
        return [[step, loss] for step, loss in sorted(parsed[0].items())]
    return [[step, statistics.fmean(p[step] for p in parsed)] for step in sorted(common)]


# ---------------------------------------------------------------------------------------------- format
def format_percent(value: float | None) -> str:
    """A fraction as a percentage with one decimal: 0.7234 -> "72.3"."""
    return MISSING if value is None else f"{100 * value:.1f}"


def format_cell(stats: dict | None) -> str:
    """Mean ± std in percent with one decimal; a single seed shows the mean alone.

    Example:
        >>> format_cell({"mean": 0.72, "std": 0.02, "n": 3}), format_cell({"mean": 0.7, "std": None, "n": 1})
        ('72.0 ± 2.0', '70.0')
    """
    if not stats:
        return MISSING
    text = format_percent(stats["mean"])
    return text if stats.get("std") is None else f"{text} ± {100 * stats['std']:.1f}"


def format_count(n: float | None) -> str:
    """A parameter count the way papers print it: 151, 22.7K, 22.7M, 1.2B.

    Example:
        >>> [format_count(n) for n in (151, 22713, 999_960, 22_713_216, 1_234_567_890)]
        ['151', '22.7K', '1.0M', '22.7M', '1.2B']
    """
    if n is None:
        return MISSING
    if abs(n) < 1000:
        return f"{n:.0f}"
    for unit, scale in (("K", 1e3), ("M", 1e6), ("B", 1e9)):
        # switch unit on the *rounded* value so 999_960 reads "1.0M", not "1000.0K"
        if round(abs(n) / scale, 1) < 1000 or unit == "B":
            return f"{n / scale:.1f}{unit}"
    raise AssertionError("unreachable")


def format_share(share: float | None) -> str:
    """A fraction of the model as a percentage: 0.001 -> "0.10%"; tiny shares keep two significant digits.

    Example:
        >>> [format_share(s) for s in (0.001, 1.0, 1.2e-5, 0.0)]
        ['0.10%', '100%', '0.0012%', '0%']
    """
    if share is None:
        return MISSING
    percent = 100 * share
    if percent == 0 or percent == 100:
        return f"{percent:.0f}%"
    return f"{percent:.2f}%" if percent >= 0.01 else f"{percent:.2g}%"


def rank_marks(table: dict) -> dict[tuple[int, str], str]:
    """Best ("best") and second-best ("second") row per accuracy column, on the displayed values.

    Ranking uses the rounded percentages a reader sees, so rows that print the same number share the
    mark (dense ranking). A column with fewer than two rows holding a value gets no marks.

    Returns:
        {(row index, column key): "best" | "second"}.

    Example:
        >>> rows = [{"metrics": {"id": {"mean": m}}} for m in (0.70, 0.75, 0.72, 0.75)]
        >>> sorted(rank_marks({"columns": ["id"], "rows": rows}).items())
        [((1, 'id'), 'best'), ((2, 'id'), 'second'), ((3, 'id'), 'best')]
    """
    marks = {}
    for column in table["columns"]:
        shown = {i: round(100 * row["metrics"][column]["mean"], 1)
                 for i, row in enumerate(table["rows"]) if column in row["metrics"]}
        if len(shown) < 2:
            continue
        levels = sorted(set(shown.values()), reverse=True)
        for i, value in shown.items():
            if value == levels[0]:
                marks[(i, column)] = "best"
            elif len(levels) > 1 and value == levels[1]:
                marks[(i, column)] = "second"
    return marks


def table_cells(table: dict) -> tuple[list[str], list[list[tuple[str, str | None]]]]:
    """The header and the cells of a table as (text, mark) pairs: what Markdown and HTML both render.

    Columns: Method, one per metric, Seeds, Trainable, Share. Marks are "best", "second" or None.
    """
    header = ["Method", *(column_header(c, table.get("suite")) for c in table["columns"]), "Seeds", "Trainable", "Share"]
    marks = rank_marks(table)
    body = []
    for i, row in enumerate(table["rows"]):
        cells = [(row["label"], None)]
        cells += [(format_cell(row["metrics"].get(c)), marks.get((i, c))) for c in table["columns"]]
        cells += [(str(row["n_seeds"]), None), (format_count(row["trainable"]), None),
                  (format_share(row["trainable_share"]), None)]
        body.append(cells)
    return header, body


def table_title(table: dict) -> str:
    """"<dataset> · <model>": the heading of a table."""
    return f"{table['dataset']} · {table['model']}"


def table_caption(table: dict) -> str:
    """One sentence saying what the numbers are, naming the OOD sets."""
    if table.get("suite") == SPECIALITY_SUITE:
        return ("Accuracy (%), mean ± sample std over seeds; Speciality: the fine-tuning task's test items; "
                f"generality sets: {', '.join(table['ood_sets'])} (multiple-choice probes: acc_norm; instructions: "
                "strict prompt-level instruction following); Generality: their mean; Δ: change from the zero-shot "
                "model, paired by seed.")
    parts = ["Top-1 accuracy (%), mean ± sample std over seeds"]
    if table["ood_sets"]:
        parts.append(f"ID: in-distribution test set; OOD sets: {', '.join(table['ood_sets'])}")
    if "hm" in table["columns"]:
        parts.append("HM: harmonic mean of Base and New")
    return "; ".join(parts) + "."
