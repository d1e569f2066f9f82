"""A single self-contained HTML page: the tables and the figures of a report.

The page has inline CSS only and links the PNGs by relative name, so it opens from the file system
in any browser with no network and can be copied around together with its folder.

Example:
    >>> from saftune.report.results import aggregate
    >>> runs = [{"variant": "ft", "seed": 1, "metrics": {"id": 0.7}}]
    >>> page = render_html(aggregate(runs), figures=[[{"title": "ID vs OOD", "file": "a.png"}]])
    >>> '<img src="a.png"' in page and "<table>" in page
    True
"""

from __future__ import annotations

import html
import os
from pathlib import Path

from saftune._io import atomic_path
from saftune.report.results import table_caption, table_cells, table_title

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1200px;
       padding: 0 1rem; color: #222; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.25rem; margin-top: 2.5rem; border-bottom: 1px solid #ddd; }
p.caption, p.meta { color: #555; font-size: 0.9rem; }
table { border-collapse: collapse; margin: 0.75rem 0; font-size: 0.9rem; }
th, td { padding: 0.3rem 0.7rem; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
thead th { border-bottom: 2px solid #444; } tbody tr:nth-child(even) { background: #f6f6f6; }
figure { margin: 1.5rem 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.85rem; }
.notes { background: #fff8e1; border-left: 4px solid #f0b400; padding: 0.5rem 1rem; font-size: 0.85rem; }
"""

_MARKUP = {"best": "<b>{}</b>", "second": "<u>{}</u>", None: "{}"}


def table_html(table: dict) -> str:
    """One table as an HTML <table>: best value per column in bold, second best underlined."""
    header, body = table_cells(table)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "\n".join("<tr>" + "".join(f"<td>{_MARKUP[mark].format(html.escape(text))}</td>" for text, mark in cells)
                     + "</tr>" for cells in body)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{rows}\n</tbody>\n</table>"


def selection_html(table: dict) -> str:
    """How each row's hyperparameters were chosen (see `saftune.report.tables.format_selection`), or ""."""
    from saftune.report.tables import SELECTION_HEADER, selection_cells

    rows = selection_cells(table)
    if not rows:
        return ""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in SELECTION_HEADER)
    body = ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>" for cells in rows]
    return f'<table class="selection">\n<tr>{head}</tr>\n' + "\n".join(body) + "\n</table>"


def render_html(tables: list[dict], figures: list[list[dict]] | None = None, *, title: str = "saftune report",
                source: str | None = None, notes: list[str] | None = None) -> str:
    """The report page.

    Args:
        tables: from `aggregate`.
        figures: per table, a list of {"title", "file"} (file: PNG name relative to the page).
        title: page title.
        source: name of the results file, shown under the title.
        notes: messages shown in a box (e.g. skipped lines of the results file).

    Returns:
        The HTML text.
    """
    figures = figures or [[] for _ in tables]
    runs = sum(row["n_seeds"] for table in tables for row in table["rows"])
    parts = [f"<h1>{html.escape(title)}</h1>"]
    meta = f"{runs} runs in {len(tables)} table{'s' if len(tables) != 1 else ''}"
    parts.append(f'<p class="meta">{html.escape((f"From {source}: " if source else "") + meta)}. '
                 "Best value per column in <b>bold</b>, second best <u>underlined</u>.</p>")
    if notes:
        items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
        parts.append(f'<div class="notes"><p>Lines of the results file that were skipped:</p><ul>{items}</ul></div>')
    if not tables:
        parts.append("<p>No complete runs to report.</p>")
    for table, table_figures in zip(tables, figures):
        parts.append(f"<section>\n<h2>{html.escape(table_title(table))}</h2>")
        parts.append(f'<p class="caption">{html.escape(table_caption(table))}</p>')
        parts.append(table_html(table))
        parts.append(selection_html(table))
        for figure in table_figures:
            name, caption = html.escape(str(figure["file"]), quote=True), html.escape(figure["title"])
            parts.append(f'<figure><img src="{name}" alt="{caption}"><figcaption>{caption}</figcaption></figure>')
        parts.append("</section>")
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


def write_html(path: str | os.PathLike, tables: list[dict], figures: list[list[dict]] | None = None, **kwargs) -> Path:
    """Write `render_html(tables, figures, **kwargs)` to `path` (UTF-8, atomically); returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(render_html(tables, figures, **kwargs), encoding="utf-8")
    return path
