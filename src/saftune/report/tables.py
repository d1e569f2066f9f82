"""The papers' results tables as Markdown (for reading and printing) and CSV (for spreadsheets).

Both take the tables that `saftune.report.results.aggregate` returns.

Example:
    >>> from saftune.report.results import aggregate
    >>> runs = [{"variant": v, "seed": s, "metrics": {"id": a, "ood/x": a - 0.1, "ood_avg": a - 0.1},
    ...          "trainable": 22713, "total_params": 22713216}
    ...         for v, base in (("ft", 0.70), ("saft", 0.71)) for s, a in ((1, base), (2, base + 0.02))]
    >>> print(format_markdown(aggregate(runs), heading_level=0), end="")
    | Method |                ID |                 x |           OOD avg | Seeds | Trainable | Share |
    | :----- | ----------------: | ----------------: | ----------------: | ----: | --------: | ----: |
    | ft     | <u>71.0 ± 1.4</u> | <u>61.0 ± 1.4</u> | <u>61.0 ± 1.4</u> |     2 |     22.7K | 0.10% |
    | saft   |    **72.0 ± 1.4** |    **62.0 ± 1.4** |    **62.0 ± 1.4** |     2 |     22.7K | 0.10% |
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from saftune._io import atomic_path
from saftune.report.results import format_cell, order_columns, table_caption, table_cells, table_title

_MARKDOWN = {"best": "**{}**", "second": "<u>{}</u>", None: "{}"}


def _escape(text: str) -> str:
    return text.replace("|", "\\|")  # a "|" in a variant name would split the cell


def format_markdown(tables: list[dict], *, heading_level: int = 3) -> str:
    """The tables as Markdown: one titled table per (dataset, model), best in bold, second underlined.

    Args:
        tables: from `aggregate`.
        heading_level: Markdown heading level of each table's title ("### dataset · model"); 0 prints
            the bare tables without title or caption.

    Returns:
        The Markdown text (columns padded so it also reads well in a terminal).
    """
    if not tables:
        return "No complete runs to report.\n"
    parts = []
    for table in tables:
        header, body = table_cells(table)
        rows = [[_escape(h) for h in header]]
        rows += [[_MARKDOWN[mark].format(_escape(text)) for text, mark in cells] for cells in body]
        widths = [max(3, *(len(r[j]) for r in rows)) for j in range(len(header))]
        # the first column (method) is left-aligned, numbers right-aligned
        rule = [":" + "-" * (w - 1) if j == 0 else "-" * (w - 1) + ":" for j, w in enumerate(widths)]

        def line(cells, widths=widths):
            return "| " + " | ".join(c.ljust(w) if j == 0 else c.rjust(w)
                                     for j, (c, w) in enumerate(zip(cells, widths))) + " |"

        text = [line(rows[0]), "| " + " | ".join(rule) + " |", *(line(r) for r in rows[1:])]
        if heading_level:
            text = [f"{'#' * heading_level} {table_title(table)}", "", table_caption(table) +
                    " Best in **bold**, second best <u>underlined</u>.", "", *text]
        selection = format_selection(table)
        if selection:
            text += ["", selection]
        parts.append("\n".join(text))
    return "\n\n".join(parts) + "\n"


def format_options(options: dict) -> str:
    """Chosen options as "lr=0.001, sparsity=0.0001".

    Example:
        >>> format_options({"lr": 1e-3, "strength": 1.0})
        'lr=0.001, strength=1'
    """
    return ", ".join(f"{k}={v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else f"{k}={v}"
                     for k, v in options.items())


SELECTION_HEADER = ["Method", "Chosen", "At edge", "Val (selection seeds)", "Trials"]


def selection_cells(table: dict) -> list[list[str]]:
    """The cells of `format_selection`'s table, one list per row that had hyperparameters chosen."""
    out = []
    for row in table["rows"]:
        sel = row.get("selection")
        if not sel:
            continue
        edge = [k for k, inside in (sel.get("interior") or {}).items() if not inside]
        val = format_cell({"mean": sel["val_mean"], "std": sel.get("val_std")}) if sel.get("val_mean") is not None else "–"
        seeds = ",".join(str(s) for s in sel.get("seeds") or [])
        out.append([row["label"], format_options(sel.get("chosen") or {}), ", ".join(edge) or "none",
                    f"{val} (seeds {seeds})", str(sel.get("trials", "–"))])
    return out


def format_selection(table: dict) -> str:
    """A Markdown table of how each row's hyperparameters were chosen, or "" when none were.

    Columns: the row, the chosen options, the options whose choice lies at the edge of the searched
    values (even after extending the lists), validation accuracy (mean ± std over the selection seeds:
    the spread to read beside the test spread), the number of trials.
    """
    rows = selection_cells(table)
    if not rows:
        return ""
    lines = ["Hyperparameters chosen on validation data only (no OOD data). *At edge*: options whose best value is "
             "still the smallest or largest tried (a choice to distrust).", "",
             "| " + " | ".join(SELECTION_HEADER) + " |", "| :--- | :--- | :--- | ---: | ---: |"]
    lines += ["| " + " | ".join(_escape(c) for c in cells) + " |" for cells in rows]
    return "\n".join(lines)


def csv_rows(tables: list[dict]) -> tuple[list[str], list[dict]]:
    """The CSV columns and one dict per row: accuracies in percent, mean and std in separate columns.

    Columns: dataset, model, variant, sparsity, label, n_seeds, seeds ("1;2;3"), then `<metric>_mean`
    and `<metric>_std` for every metric column of any table (empty where a table lacks it or a row has
    one seed), then trainable, total_params, trainable_percent.
    """
    metric_columns: list[str] = []
    for table in tables:
        metric_columns += [c for c in table["columns"] if c not in metric_columns]
    # the OOD sets of all tables together still go between ID and the averages
    metric_columns = order_columns(metric_columns)
    fields = ["dataset", "model", "variant", "sparsity", "label", "n_seeds", "seeds"]
    fields += [f"{c}_{stat}" for c in metric_columns for stat in ("mean", "std")]
    fields += ["trainable", "total_params", "trainable_percent"]
    out = []
    for table in tables:
        for row in table["rows"]:
            entry = {"dataset": table["dataset"], "model": table["model"], "variant": row["variant"],
                     "sparsity": "" if row["sparsity"] is None else row["sparsity"], "label": row["label"],
                     "n_seeds": row["n_seeds"], "seeds": ";".join(str(s) for s in row["seeds"] if s is not None),
                     "trainable": "" if row["trainable"] is None else row["trainable"],
                     "total_params": "" if row["total_params"] is None else row["total_params"],
                     "trainable_percent": "" if row["trainable_share"] is None else 100 * row["trainable_share"]}
            for c in metric_columns:
                stats = row["metrics"].get(c) if c in table["columns"] else None
                # 6 decimals of a percentage: exact enough to recompute, free of float noise like 72.00000000000001
                entry[f"{c}_mean"] = "" if stats is None else round(100 * stats["mean"], 6)
                entry[f"{c}_std"] = "" if stats is None or stats["std"] is None else round(100 * stats["std"], 6)
            out.append(entry)
    return fields, out


def format_csv(tables: list[dict]) -> str:
    """The CSV text of `csv_rows` (header line first)."""
    fields, rows = csv_rows(tables)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_csv(tables: list[dict], path: str | Path) -> Path:
    """Write the tables as one CSV file (UTF-8, atomically); returns the path.

    Example:
        >>> import csv, tempfile, pathlib
        >>> from saftune.report.results import aggregate
        >>> runs = [{"variant": "ft", "seed": s, "metrics": {"id": a}} for s, a in ((1, 0.70), (2, 0.72), (3, 0.74))]
        >>> path = write_csv(aggregate(runs), pathlib.Path(tempfile.mkdtemp()) / "results.csv")
        >>> row = next(csv.DictReader(path.open()))
        >>> row["variant"], row["id_mean"], row["id_std"]
        ('ft', '72.0', '2.0')
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(format_csv(tables), encoding="utf-8")
    return path
