"""The report: tables, CSV, figures and HTML page from a small results file written by hand.

The numbers are chosen so that every mean and std is easy to check by hand, and the expected values
are recomputed here with `statistics` rather than taken from the report.
"""

import csv
import doctest
import importlib
import json
import logging
import statistics

import pytest
from PIL import Image

from saftune.report import aggregate, format_markdown, load_results, summarize, write_csv, write_report
from saftune.report.plots import mask_panels

TOTAL = 22_713_216
# (variant, sparsity, seed) -> (id, ood/tweets, ood/nyt); seeds deliberately out of order in the file
ACCURACY = {
    ("zeroshot", None, 1): (0.60, 0.58, 0.48),
    ("ft", None, 3): (0.74, 0.62, 0.51),
    ("ft", None, 1): (0.70, 0.60, 0.50),
    ("ft", None, 2): (0.72, 0.61, 0.52),
    # the sparsity grid: the larger level appears first in the file, rows still come out ascending
    ("saft", 0.01, 1): (0.71, 0.64, 0.54),
    ("saft", 0.01, 2): (0.71, 0.64, 0.54),
    ("saft", 0.01, 3): (0.71, 0.64, 0.54),
    ("saft", 0.001, 1): (0.69, 0.66, 0.55),
    ("saft", 0.001, 2): (0.70, 0.66, 0.56),
    ("saft", 0.001, 3): (0.71, 0.66, 0.57),
    ("wiseft", None, 1): (0.73, 0.63, 0.52),
    ("wiseft", None, 2): (0.73, 0.63, 0.52),
}
METHOD = {"zeroshot": "zeroshot", "ft": "ft", "saft": "saft", "wiseft": "wiseft"}
# blocks of a two-tower CLIP, listed with "layers.10" before "layers.2" (a lexicographic sort) on purpose
BLOCKS = ["clip.text_model.embeddings", "clip.text_model.encoder.layers.0", "clip.text_model.encoder.layers.10",
          "clip.text_model.encoder.layers.2", "clip.vision_model.encoder.layers.0",
          "clip.vision_model.encoder.layers.1", "clip.logit_scale"]


def _record(variant, sparsity, seed, accuracies, dataset="sentiment-domains", model="minilm"):
    id_acc, tweets, nyt = accuracies
    metrics = {"val": id_acc + 0.01, "id": id_acc, "ood/tweets": tweets, "ood/nyt": nyt, "ood_avg": (tweets + nyt) / 2}
    trainable = {"zeroshot": 0, "saft": round((sparsity or 0) * TOTAL)}.get(variant, TOTAL)
    record = {"run_id": f"{variant}/seed={seed}", "variant": variant, "method": METHOD[variant], "model": model,
              "dataset": dataset, "seed": seed, "sparsity": sparsity, "metrics": metrics, "trainable": trainable,
              "total_params": TOTAL, "steps": 3, "loss_curve": [[1, 0.7 + seed / 100], [2, 0.6 + seed / 100], [3, 0.5]]}
    if variant == "wiseft":
        record["wiseft_curve"] = [{"alpha": a, "id": 0.60 + 0.1 * a + seed / 100, "ood_avg": 0.53 + 0.02 * a}
                                  for a in (0.0, 0.5, 1.0)]
    if variant == "saft":
        # block i selects (i + 1) * 10 * seed entries: the mean over seeds 1..3 is (i + 1) * 20
        record["mask_summary"] = [{"block": b, "selected": (i + 1) * 10 * seed, "total": 1000}
                                  for i, b in enumerate(BLOCKS)]
    return record


def _write(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


@pytest.fixture
def results(tmp_path):
    return _write(tmp_path / "results.jsonl", [_record(*key, acc) for key, acc in ACCURACY.items()])


def _by_hand(variant, sparsity, column):
    """Mean ± std the way the papers print it, computed here from the inputs."""
    index = {"id": 0, "ood/tweets": 1, "ood/nyt": 2}[column]
    values = [acc[index] for (v, s, _), acc in ACCURACY.items() if v == variant and s == sparsity]
    mean = f"{100 * statistics.mean(values):.1f}"
    return mean if len(values) == 1 else f"{mean} ± {100 * statistics.stdev(values):.1f}"


def _markdown_rows(text):
    """{row label: {header: cell}} of the first Markdown table in `text`."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split(" | ")] for line in lines]
    header, body = cells[0], cells[2:]
    return {row[0]: dict(zip(header, row)) for row in body}


def _unmark(cell):
    return cell.replace("**", "").replace("<u>", "").replace("</u>", "")


def test_tables_reproduce_means_and_stds_computed_by_hand(results):
    rows = _markdown_rows(summarize(results))
    assert list(rows) == ["zeroshot", "ft", "saft (α=0.001)", "saft (α=0.01)", "wiseft"]
    assert _unmark(rows["ft"]["ID"]) == "72.0 ± 2.0"  # mean of 0.70, 0.72, 0.74, sample std
    assert _unmark(rows["zeroshot"]["ID"]) == "60.0"  # one seed: no ±
    labels = {"zeroshot": ("zeroshot", None), "ft": ("ft", None), "saft (α=0.001)": ("saft", 0.001),
              "saft (α=0.01)": ("saft", 0.01), "wiseft": ("wiseft", None)}
    for label, (variant, sparsity) in labels.items():
        for column, header in (("id", "ID"), ("ood/tweets", "tweets"), ("ood/nyt", "nyt")):
            assert _unmark(rows[label][header]) == _by_hand(variant, sparsity, column), (label, header)
    # the OOD average is the mean over seeds of each run's average
    averages = [(tweets + nyt) / 2 for (v, _, _), (_, tweets, nyt) in ACCURACY.items() if v == "ft"]
    assert _unmark(rows["ft"]["OOD avg"]) == f"{100 * statistics.mean(averages):.1f} ± {100 * statistics.stdev(averages):.1f}"
    assert rows["ft"]["Seeds"] == "3" and rows["wiseft"]["Seeds"] == "2"
    assert (rows["saft (α=0.001)"]["Trainable"], rows["saft (α=0.001)"]["Share"]) == ("22.7K", "0.10%")
    assert (rows["ft"]["Trainable"], rows["ft"]["Share"]) == ("22.7M", "100%")
    assert "val" not in " ".join(rows["ft"])  # the selection split is not a reported column


def test_best_is_bold_and_second_best_underlined(results):
    rows = _markdown_rows(format_markdown(aggregate(load_results(results))))
    # ID: wiseft 73.0 > ft 72.0 > saft 71.0 ...
    assert rows["wiseft"]["ID"] == "**73.0 ± 0.0**"
    assert rows["ft"]["ID"] == "<u>72.0 ± 2.0</u>"
    # tweets: saft at 0.001 (66.0) > saft at 0.01 (64.0)
    assert rows["saft (α=0.001)"]["tweets"] == "**66.0 ± 0.0**"
    assert rows["saft (α=0.01)"]["tweets"] == "<u>64.0 ± 0.0</u>"
    marked = [cell for row in rows.values() for header, cell in row.items() if "**" in cell or "<u>" in cell]
    assert len(marked) == 2 * 4  # one best and one second in each of ID, tweets, nyt, OOD avg
    assert "**" not in rows["zeroshot"]["Seeds"] + rows["ft"]["Trainable"]  # only accuracy columns are ranked


def test_aggregate_returns_plain_numbers_and_seed_averaged_curves(results):
    (table,) = aggregate(load_results(results))
    assert table["columns"] == ["id", "ood/tweets", "ood/nyt", "ood_avg"]
    assert table["ood_sets"] == ["tweets", "nyt"]
    rows = {row["label"]: row for row in table["rows"]}
    ft = rows["ft"]
    assert ft["seeds"] == [1, 2, 3]
    assert ft["metrics"]["id"]["mean"] == pytest.approx(0.72)
    assert ft["metrics"]["id"]["std"] == pytest.approx(0.02)
    assert rows["zeroshot"]["metrics"]["id"]["std"] is None
    assert ft["metrics"]["val"]["mean"] == pytest.approx(0.73)  # kept in the data, left out of the table
    assert ft["trainable_share"] == 1.0 and rows["zeroshot"]["trainable"] == 0
    json.dumps(table)  # plain data
    # WiSE-FT: point-wise mean over the two seeds
    curve = rows["wiseft"]["wiseft_curve"]
    assert [p["alpha"] for p in curve] == [0.0, 0.5, 1.0]
    assert curve[1]["id"] == pytest.approx(statistics.mean([0.65 + 0.01, 0.65 + 0.02]))
    # the mask summary: averaged over seeds, numbered blocks in numeric order
    mask = rows["saft (α=0.001)"]["mask_summary"]
    assert [m["block"] for m in mask] == [BLOCKS[i] for i in (0, 1, 3, 2, 4, 5, 6)]
    assert {m["block"]: m["selected"] for m in mask}["clip.text_model.encoder.layers.10"] == pytest.approx(3 * 20)
    # the loss curve: mean over seeds per step
    steps, losses = zip(*rows["ft"]["loss_curve"])
    assert steps == (1, 2, 3) and losses == pytest.approx((0.72, 0.62, 0.5))


def test_csv_parses_and_holds_the_numbers(results, tmp_path):
    path = write_csv(aggregate(load_results(results)), tmp_path / "results.csv")
    rows = {r["label"]: r for r in csv.DictReader(path.open(encoding="utf-8"))}
    assert float(rows["ft"]["id_mean"]) == pytest.approx(72.0)
    assert float(rows["ft"]["id_std"]) == pytest.approx(2.0)
    assert float(rows["saft (α=0.001)"]["ood/nyt_mean"]) == pytest.approx(56.0)
    assert float(rows["saft (α=0.001)"]["sparsity"]) == 0.001
    assert rows["zeroshot"]["id_std"] == ""  # one seed
    assert rows["ft"]["seeds"] == "1;2;3" and rows["ft"]["n_seeds"] == "3"
    assert int(rows["saft (α=0.001)"]["trainable"]) == round(0.001 * TOTAL)
    assert "**" not in path.read_text(encoding="utf-8") and "<u>" not in path.read_text(encoding="utf-8")


def test_write_report_writes_valid_figures_and_a_page_that_links_them(results, tmp_path):
    report = write_report(results, tmp_path / "report")
    for key in ("markdown", "csv", "html"):
        assert report[key].is_file()
    kinds = [f["kind"] for drawn in report["figures"] for f in drawn]
    assert sorted(kinds) == ["id_vs_ood", "loss", "mask", "mask", "sparsity"]  # one mask figure per SAFT level
    page = report["html"].read_text(encoding="utf-8")
    for path in report["plots"]:
        assert path.parent == tmp_path / "report"
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 100 and image.height > 100
            image.verify()
        assert f'src="{path.name}"' in page  # relative link: the page works from the folder
    assert "http" not in page.lower().replace("http-equiv", "")  # nothing from the network
    assert "<b>73.0 ± 0.0</b>" in page and "<u>72.0 ± 2.0</u>" in page
    assert [row["label"] for row in report["rows"]] == ["zeroshot", "ft", "saft (α=0.001)", "saft (α=0.01)", "wiseft"]
    assert "72.0 ± 2.0" in report["markdown"].read_text(encoding="utf-8")


def test_truncated_last_line_is_skipped_with_a_warning(tmp_path, caplog):
    records = [_record(*key, acc) for key, acc in ACCURACY.items()]
    path = _write(tmp_path / "results.jsonl", records, tail=json.dumps(records[1])[:40])
    with caplog.at_level(logging.WARNING):
        report = write_report(path, tmp_path / "report")
    assert f"line {len(records) + 1}" in caplog.text
    assert sum(row["n_seeds"] for row in report["rows"]) == len(records)
    assert report["skipped"] and f"line {len(records) + 1}" in report["skipped"][0]
    assert f"line {len(records) + 1}" in report["html"].read_text(encoding="utf-8")


def test_base_to_new_file_gets_base_new_and_hm_columns(tmp_path):
    runs = [{"variant": v, "method": v, "dataset": "dtd", "model": "clip", "seed": s,
             "metrics": {"base": b, "new": n, "hm": 2 * b * n / (b + n)}}
            for v, b, n in (("coop", 0.80, 0.50), ("saft", 0.78, 0.60)) for s in (1, 2)]
    path = _write(tmp_path / "b2n.jsonl", runs)
    text = summarize(path)
    header = next(line for line in text.splitlines() if line.startswith("| Method"))
    assert [c.strip() for c in header.strip("|").split("|")][:4] == ["Method", "Base", "New", "HM"]
    rows = _markdown_rows(text)
    assert rows["saft"]["HM"] == f"**{100 * 2 * 0.78 * 0.60 / 1.38:.1f} ± 0.0**"
    assert rows["coop"]["Base"] == "**80.0 ± 0.0**"
    report = write_report(path, tmp_path / "report")
    assert [f["kind"] for f in report["figures"][0]] == ["id_vs_ood"]  # Base vs New scatter


def test_domainnet_table_has_a_column_per_ood_domain_and_their_average(tmp_path):
    domains = ["clipart", "infograph", "painting", "quickdraw", "sketch"]
    runs = []
    for v, base in (("ft", 0.50), ("wiseft", 0.60)):
        for s in (1, 3):
            ood = {f"ood/{d}": base + i / 100 + s / 1000 for i, d in enumerate(domains)}
            runs.append({"variant": v, "method": v, "dataset": "domainnet", "model": "clip", "seed": s,
                         "metrics": {"id": 0.8, **ood, "ood_avg": sum(ood.values()) / 5}})
    text = summarize(_write(tmp_path / "domainnet.jsonl", runs))
    header = next(line for line in text.splitlines() if line.startswith("| Method"))
    assert [c.strip() for c in header.strip("|").split("|")][:8] == ["Method", "ID", *domains, "OOD avg"]
    rows = _markdown_rows(text)
    assert rows["wiseft"]["quickdraw"] == "**63.2 ± 0.1**" and rows["ft"]["clipart"] == "<u>50.2 ± 0.1</u>"
    assert rows["wiseft"]["OOD avg"] == "**62.2 ± 0.1**"


def test_tables_are_grouped_by_dataset_and_model(tmp_path):
    runs = [_record("ft", None, 1, (0.7, 0.6, 0.5)), _record("ft", None, 1, (0.9, 0.8, 0.7), model="tiny-clip"),
            _record("saft", 0.001, 1, (0.7, 0.6, 0.5))]
    tables = aggregate(load_results(_write(tmp_path / "r.jsonl", runs)))
    assert [(t["model"], [r["label"] for r in t["rows"]]) for t in tables] == [("minilm", ["ft", "saft"]),
                                                                               ("tiny-clip", ["ft"])]
    report = write_report(tmp_path / "r.jsonl", tmp_path / "report")
    assert "sparsity" not in [f["kind"] for drawn in report["figures"] for f in drawn]  # one level only
    assert len({p.name for p in report["plots"]}) == len(report["plots"])  # no figure overwrites another


def test_repeated_run_keeps_the_later_line(tmp_path, caplog):
    runs = [_record("ft", None, 1, (0.5, 0.5, 0.5)), _record("ft", None, 1, (0.7, 0.6, 0.5))]
    with caplog.at_level(logging.WARNING):
        (table,) = aggregate(load_results(_write(tmp_path / "r.jsonl", runs)))
    assert table["rows"][0]["metrics"]["id"]["values"] == [0.7]
    assert "line 2: repeats the run of line 1" in caplog.text


def test_empty_results_still_give_a_report(tmp_path):
    path = _write(tmp_path / "r.jsonl", [])
    report = write_report(path, tmp_path / "report")
    assert report["rows"] == [] and report["plots"] == []
    assert "No complete runs" in report["html"].read_text(encoding="utf-8")


def test_mask_panels_split_two_towers_and_keep_one_encoder_whole():
    panels = dict(mask_panels(BLOCKS))
    assert panels["image encoder"] == BLOCKS[4:6]
    assert panels["text encoder"] == BLOCKS[:4]
    assert panels["other"] == ["clip.logit_scale"]
    assert mask_panels(["encoder.embeddings", "encoder.encoder.layer.0"]) == \
        [(None, ["encoder.embeddings", "encoder.encoder.layer.0"])]


@pytest.mark.parametrize("module", ["results", "tables", "plots", "html", "__init__"])
def test_docstring_examples(module):
    name = "saftune.report" if module == "__init__" else f"saftune.report.{module}"
    outcome = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert outcome.failed == 0 and outcome.attempted > 0
