"""The papers' figures as PNG files, drawn from one aggregated table (see `results.aggregate`).

* `plot_id_vs_ood`: ID vs average OOD accuracy, one point per variant with std error bars, and the
  WiSE-FT interpolation curves (the "effective robustness" view). Base vs New for base-to-new tables.
* `plot_sparsity`: ID and OOD accuracy vs sparsity level on a log axis (SAFT paper, Fig. 5).
* `plot_mask`: selected parameters per block, one panel per encoder of a two-tower model (Fig. 6).
* `plot_loss`: training loss vs step per variant.

Figures are built with `matplotlib.figure.Figure` and saved straight to PNG (the Agg renderer), so no
GUI backend is touched, pyplot's global state stays untouched and nothing is ever shown. Each function
returns the written path, or None when the table has nothing to draw.

Example:
    >>> import pathlib, tempfile
    >>> from saftune.report.results import aggregate
    >>> runs = [{"variant": v, "seed": s, "metrics": {"id": a, "ood_avg": a - 0.1}}
    ...         for v, a0 in (("ft", 0.7), ("saft", 0.72)) for s, a in ((1, a0), (2, a0 + 0.01))]
    >>> path = plot_id_vs_ood(aggregate(runs)[0], pathlib.Path(tempfile.mkdtemp()) / "id_vs_ood.png")
    >>> path.suffix
    '.png'
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure

from saftune.report.results import column_header

_MARKERS = "osD^vP*Xph<>"
_DPI = 120


def _style(index: int) -> dict:
    """Colour and marker of the table's row `index`, the same in every figure of the table."""
    palette = matplotlib.colormaps["tab10" if index < 10 else "tab20"]
    return {"color": palette(index % palette.N), "marker": _MARKERS[index % len(_MARKERS)]}


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # bbox "tight" keeps legends placed outside the axes inside the image
    fig.savefig(path, dpi=_DPI, bbox_inches="tight", format="png")
    return path


def _percent(stats: dict | None) -> tuple[float, float] | None:
    if not stats:
        return None
    return 100 * stats["mean"], 100 * (stats["std"] or 0.0)


def _title(table: dict) -> str:
    return f"{table['dataset']} · {table['model']}"


def scatter_axes(table: dict) -> tuple[str, str] | None:
    """The metrics of the scatter plot: ("id", "ood_avg"), or ("base", "new") for base-to-new tables."""
    for x, y in (("id", "ood_avg"), ("base", "new")):
        if x in table["columns"] and y in table["columns"]:
            return x, y
    return None


def plot_id_vs_ood(table: dict, path: str | os.PathLike) -> Path | None:
    """ID vs average OOD accuracy per variant (mean ± std over seeds) with the WiSE-FT curves.

    Each WiSE-FT curve is the seed-averaged accuracy at every mixing coefficient α, drawn as a dashed
    line from α=0 (the zero-shot model) to α=1 (the fine-tuned one) and labelled with the α values.

    Args:
        table: one table from `aggregate`.
        path: PNG file to write.

    Returns:
        The path, or None when the table has neither ID + OOD avg nor Base + New columns.
    """
    axes_keys = scatter_axes(table)
    if axes_keys is None:
        return None
    xk, yk = axes_keys
    fig = Figure(figsize=(7.5, 5.0), layout="constrained")
    ax = fig.add_subplot()
    for i, row in enumerate(table["rows"]):
        x, y = _percent(row["metrics"].get(xk)), _percent(row["metrics"].get(yk))
        style = _style(i)
        if x and y:
            ax.errorbar(x[0], y[0], xerr=x[1], yerr=y[1], fmt=style["marker"], color=style["color"],
                        markersize=7, capsize=3, label=row["label"])
        curve = [p for p in row["wiseft_curve"] or [] if xk in p and yk in p]
        if len(curve) > 1:
            xs, ys = [100 * p[xk] for p in curve], [100 * p[yk] for p in curve]
            ax.plot(xs, ys, "--", color=style["color"], marker=".", linewidth=1.2,
                    label=f"{row['label']}: WiSE-FT α={curve[0]['alpha']:g}…{curve[-1]['alpha']:g}")
            for p, px, py in zip(curve, xs, ys):
                ax.annotate(f"{p['alpha']:g}", (px, py), xytext=(3, -9), textcoords="offset points",
                            fontsize=7, color=style["color"])
        layers = [p for p in row.get("wiseft_layer_curve") or [] if xk in p and yk in p]
        for j, p in enumerate(layers):  # per-layer averaging: one point per profile (bottom/.../top alphas)
            ax.plot(100 * p[xk], 100 * p[yk], "*", color=style["color"], markersize=9,
                    label=f"{row['label']}: per-layer α (bottom→top)" if j == 0 else None)
            ax.annotate("/".join(f"{a:g}" for a in p["layer_alphas"]), (100 * p[xk], 100 * p[yk]), xytext=(4, 3),
                        textcoords="offset points", fontsize=7, color=style["color"])
    ax.margins(0.12)  # points on the data limits would sit on the frame
    suite = table.get("suite")
    ax.set_xlabel(f"{column_header(xk, suite)} accuracy (%)")
    if yk != "ood_avg":
        ax.set_ylabel(f"{column_header(yk, suite)} accuracy (%)")
    else:
        ax.set_ylabel("Generality, average over probes (%)" if suite else "OOD accuracy, average over sets (%)")
    ax.set_title(f"{_title(table)}: {column_header(xk, suite)} vs {column_header(yk, suite)}")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    return _save(fig, path)


def _sparsity_families(table: dict) -> dict[str, list[dict]]:
    """Variants with rows at two or more positive sparsity levels, their rows in ascending level."""
    families: dict[str, list[dict]] = {}
    for row in table["rows"]:
        if isinstance(row["sparsity"], (int, float)) and row["sparsity"] > 0:
            families.setdefault(row["variant"], []).append(row)
    return {v: sorted(rows, key=lambda r: r["sparsity"]) for v, rows in families.items()
            if len({r["sparsity"] for r in rows}) > 1}


def plot_sparsity(table: dict, path: str | os.PathLike) -> Path | None:
    """Accuracy vs sparsity level α (log axis) for the variants run at several levels.

    One panel per metric (ID and OOD avg; Base, New and HM for base-to-new tables). Rows without a
    sparsity level (full fine-tuning, zero-shot, ...) appear as dashed horizontal reference lines.

    Returns:
        The path, or None when no variant was run at more than one level.
    """
    families = _sparsity_families(table)
    if not families:
        return None
    metrics = [m for m in ("id", "ood_avg") if m in table["columns"]] or \
              [m for m in ("base", "new", "hm") if m in table["columns"]]
    if not metrics:
        return None
    index = {id(row): i for i, row in enumerate(table["rows"])}
    in_family = {id(r) for rows in families.values() for r in rows}
    references = [r for r in table["rows"] if r["sparsity"] is None and id(r) not in in_family]
    levels = sorted({r["sparsity"] for rows in families.values() for r in rows})
    fig = Figure(figsize=(4.2 * len(metrics) + 1.8, 4.2), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics):
        for variant, rows in families.items():
            points = [(r["sparsity"], _percent(r["metrics"].get(metric))) for r in rows]
            points = [(s, p) for s, p in points if p]
            if not points:
                continue
            style = _style(index[id(rows[0])])
            ax.errorbar([s for s, _ in points], [p[0] for _, p in points], yerr=[p[1] for _, p in points],
                        marker=style["marker"], color=style["color"], capsize=3, label=variant)
        for row in references:
            stats = _percent(row["metrics"].get(metric))
            if stats:
                ax.axhline(stats[0], linestyle="--", linewidth=1, alpha=0.7, color=_style(index[id(row)])["color"],
                           label=row["label"])
        ax.set_xscale("log")
        ax.set_xticks(levels, [f"{s:g}" for s in levels])
        ax.minorticks_off()
        ax.set_xlabel("sparsity level α (share of parameters trained)")
        ax.set_ylabel(f"{column_header(metric, table.get('suite'))} accuracy (%)")
        ax.set_title(column_header(metric, table.get("suite")))
        ax.grid(True, alpha=0.3)
    axes[-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    fig.suptitle(f"{_title(table)}: accuracy vs sparsity")
    return _save(fig, path)


_PANEL_COLORS = {"image encoder": "tab:blue", "text encoder": "tab:orange", "other": "tab:gray"}
_TOWER_WORDS = {"image encoder": ("vision", "visual", "image"), "text encoder": ("text",)}


def tower_of(block: str) -> str | None:
    """The encoder a block belongs to, read from its name ("image encoder", "text encoder"), or None.

    Example:
        >>> tower_of("clip.vision_model.encoder.layers.3"), tower_of("clip.text_model.embeddings"), tower_of("clip")
        ('image encoder', 'text encoder', None)
    """
    parts = block.lower().split(".")
    for tower, words in _TOWER_WORDS.items():
        if any(word in part for part in parts for word in words):
            return tower
    return None


def mask_panels(blocks: list[str]) -> list[tuple[str | None, list[str]]]:
    """Blocks split into panels: one per encoder when the names show an image and a text tower.

    Blocks of neither tower (e.g. CLIP's logit scale) get a third panel "other". A single-encoder
    model (no image and text tower both present) gets one panel titled None. Order is preserved.

    Example:
        >>> mask_panels(["clip.text_model.layers.0", "clip.vision_model.layers.0", "clip"])
        [('image encoder', ['clip.vision_model.layers.0']), ('text encoder', ['clip.text_model.layers.0']), ('other', ['clip'])]
        >>> mask_panels(["encoder.layer.0", "encoder.pooler"])
        [(None, ['encoder.layer.0', 'encoder.pooler'])]
    """
    towers = {b: tower_of(b) for b in blocks}
    if not {"image encoder", "text encoder"} <= set(towers.values()):
        return [(None, list(blocks))]
    panels = [(name, [b for b in blocks if towers[b] == name]) for name in ("image encoder", "text encoder")]
    rest = [b for b in blocks if towers[b] is None]
    return panels + ([("other", rest)] if rest else [])


def _short_names(blocks: list[str]) -> list[str]:
    """Block names without the dotted prefix the panel's blocks share (keeps tick labels short)."""
    split = [b.split(".") for b in blocks]
    common = 0
    while all(len(s) > common + 1 and s[common] == split[0][common] for s in split):
        common += 1
    return [".".join(s[common:]) for s in split]


def plot_mask(row: dict, path: str | os.PathLike, *, value: str = "selected", title: str | None = None) -> Path | None:
    """Bar chart of the parameters selected per block (mean over seeds), one panel per encoder.

    Args:
        row: a table row whose `mask_summary` is set (sparse methods: SAFT, BitFit).
        path: PNG file to write.
        value: "selected" (count of selected entries) or "share" (percent of the block's entries).
        title: figure title (default: the row's label).

    Returns:
        The path, or None when the row has no mask summary.
    """
    if value not in ("selected", "share"):
        raise ValueError(f"value must be 'selected' or 'share'; got {value!r}")
    summary = row.get("mask_summary")
    if not summary:
        return None
    by_block = {entry["block"]: entry for entry in summary}
    panels = mask_panels(list(by_block))
    widths = [len(blocks) + 0.5 for _, blocks in panels]  # bars keep one width across panels
    longest = max(len(name) for _, blocks in panels for name in _short_names(blocks))
    # rotated tick labels take height from the bars: grow the figure with the longest label
    fig = Figure(figsize=(min(max(6.0, 0.28 * sum(widths) + 2.5), 40.0), min(3.4 + 0.075 * longest, 10.0)),
                 layout="constrained")
    # a shared y axis, so the two encoders' counts compare by bar height
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True, gridspec_kw={"width_ratios": widths})[0]
    for ax, (name, blocks) in zip(axes, panels):
        entries = [by_block[b] for b in blocks]
        if value == "share":
            heights = [100 * e["selected"] / e["total"] if e.get("total") else 0.0 for e in entries]
        else:
            heights = [e["selected"] for e in entries]
        ax.bar(range(len(blocks)), heights, color=_PANEL_COLORS.get(name, "tab:blue"))
        ax.set_xticks(range(len(blocks)), _short_names(blocks), rotation=90, fontsize=7)
        heading = f"{sum(e['selected'] for e in entries):,.0f} selected"
        ax.set_title(f"{name}\n{heading}" if name else heading, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].set_ylabel("selected entries (mean over seeds)" if value == "selected" else "% of block selected")
    fig.suptitle(title or f"{row['label']}: selected parameters per block")
    return _save(fig, path)


def plot_loss(table: dict, path: str | os.PathLike) -> Path | None:
    """Training loss vs step, one line per variant (averaged over seeds where the steps match).

    Returns:
        The path, or None when no run of the table logged a loss curve.
    """
    rows = [(i, row) for i, row in enumerate(table["rows"]) if row["loss_curve"]]
    if not rows:
        return None
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for i, row in rows:
        steps, losses = zip(*row["loss_curve"])
        ax.plot(steps, losses, color=_style(i)["color"], linewidth=1.3, label=row["label"])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"{_title(table)}: training loss (mean over seeds)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    return _save(fig, path)
