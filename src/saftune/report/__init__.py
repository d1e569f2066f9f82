"""Reports from a results file: the papers' tables (Markdown, CSV), figures (PNG) and an HTML page.

The data flow is: results file (one JSON line per run) -> `load_results` -> `aggregate` (tables of
rows averaged over seeds, plain Python data) -> `format_markdown` / `write_csv` / `saftune.report.plots`
/ `render_html`. `write_report` does all of it into one folder; `summarize` returns the Markdown tables.

Example:
    >>> import json, pathlib, tempfile
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> runs = [{"variant": v, "seed": s, "dataset": "toy", "model": "tiny",
    ...          "metrics": {"id": a, "ood/b": a - 0.1, "ood_avg": a - 0.1}}
    ...         for v, a0 in (("ft", 0.70), ("saft", 0.72)) for s, a in ((1, a0), (2, a0 + 0.02))]
    >>> _ = (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\\n" for r in runs))
    >>> report = write_report(folder / "results.jsonl", folder / "report")
    >>> sorted(p.name for p in report["plots"])
    ['toy_tiny_id_vs_ood.png']
    >>> report["html"].name, [row["label"] for row in report["rows"]]
    ('index.html', ['ft', 'saft'])
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from saftune._io import atomic_path
from saftune.report.html import render_html, write_html
from saftune.report.results import aggregate, load_results, parse_results
from saftune.report.tables import format_csv, format_markdown, write_csv

__all__ = ["aggregate", "format_csv", "format_markdown", "load_results", "parse_results", "render_html",
           "summarize", "write_csv", "write_html", "write_report"]

logger = logging.getLogger(__name__)


def summarize(results_path: str | os.PathLike) -> str:
    """The Markdown tables of a results file, for printing (skipped lines are logged as warnings).

    Example:
        >>> import pathlib, tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "r.jsonl"
        >>> _ = path.write_text('{"variant": "ft", "seed": 1, "metrics": {"id": 0.7}}\\n')
        >>> print(summarize(path).splitlines()[-1])
        | ft     | 70.0 |     1 |         – |     – |
    """
    return format_markdown(aggregate(load_results(results_path)))


def _slug(text: str) -> str:
    # file names from dataset / model / variant names, which may hold "/", ":" or spaces (model paths)
    return re.sub(r"[^A-Za-z0-9._=-]+", "-", text).strip("-.") or "x"


def _add(figures: list[dict], kind: str, title: str, path: Path | None) -> None:
    if path is not None:  # a plot function returns None when the data has nothing for it
        figures.append({"kind": kind, "title": title, "file": path.name, "path": path})


def write_report(results_path: str | os.PathLike, out_dir: str | os.PathLike) -> dict:
    """Write `results.md`, `results.csv`, the PNG figures and `index.html` for a results file.

    Figures per (dataset, model) table, each only when the data has what it needs: ID vs OOD avg
    scatter with WiSE-FT curves, accuracy vs sparsity (variants run at several levels), selected
    parameters per block (one figure per sparse row), training loss. PNG names start with
    "<dataset>_<model>_". Lines of the results file that cannot be used are skipped with a warning
    and listed on the page.

    Args:
        results_path: JSON-lines results file (one run per line).
        out_dir: folder to write into (created if missing).

    Returns:
        {"markdown", "csv", "html": Path, "plots": [Path], "figures": [[{"title", "file", "kind"}] per table],
        "tables": aggregated tables, "rows": the rows of all tables (each with "dataset" and "model"),
        "skipped": messages about skipped lines}.
    """
    from saftune.report import plots  # matplotlib is imported only when figures are drawn

    results_path, out_dir = Path(results_path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records, skipped = parse_results(results_path)
    for message in skipped:
        logger.warning("%s %s", results_path, message)
    tables = aggregate(records)

    markdown_path = out_dir / "results.md"
    with atomic_path(markdown_path) as tmp:
        tmp.write_text(f"# Results: {results_path.name}\n\n{format_markdown(tables)}", encoding="utf-8")
    csv_path = write_csv(tables, out_dir / "results.csv")

    figures: list[list[dict]] = []
    used: set[str] = set()
    for table in tables:
        prefix = _slug(f"{table['dataset']}_{table['model']}")
        while prefix in used:  # two (dataset, model) pairs that slug alike must not overwrite each other
            prefix += "_"
        used.add(prefix)
        drawn: list[dict] = []
        axes = plots.scatter_axes(table)
        if axes:
            _add(drawn, "id_vs_ood", "ID vs average OOD accuracy (mean ± std over seeds) with WiSE-FT curves"
                if axes == ("id", "ood_avg") else "Base vs New accuracy (mean ± std over seeds)",
                plots.plot_id_vs_ood(table, out_dir / f"{prefix}_id_vs_ood.png"))
        _add(drawn, "sparsity", "Accuracy vs sparsity level",
            plots.plot_sparsity(table, out_dir / f"{prefix}_sparsity.png"))
        names: set[str] = set()
        for row in table["rows"]:
            if row["mask_summary"]:
                name = _slug(row["label"].replace("α=", "sparsity="))
                while name in names:
                    name += "_"
                names.add(name)
                _add(drawn, "mask", f"{row['label']}: selected parameters per block (mean over seeds)",
                    plots.plot_mask(row, out_dir / f"{prefix}_mask_{name}.png"))
        _add(drawn, "loss", "Training loss", plots.plot_loss(table, out_dir / f"{prefix}_loss.png"))
        figures.append(drawn)

    html_path = write_html(out_dir / "index.html", tables, figures, source=results_path.name, notes=skipped,
                           title=f"saftune report: {results_path.name}")
    rows = [{"dataset": t["dataset"], "model": t["model"], **row} for t in tables for row in t["rows"]]
    return {"markdown": markdown_path, "csv": csv_path, "html": html_path,
            "plots": [f["path"] for drawn in figures for f in drawn], "figures": figures,
            "tables": tables, "rows": rows, "skipped": skipped}
