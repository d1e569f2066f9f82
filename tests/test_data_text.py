"""BOSS text suites read from tiny TSV files written in the test."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest

from saftune.data.base import Benchmark
from saftune.data.registry import load_dataset
from saftune.data.text.boss import NLI_SEPARATOR, TASKS, boss_dir, read_boss_tsv
from saftune.data.vision.paths import DatasetNotFoundError


@pytest.fixture(autouse=True)
def _no_env_root(monkeypatch):
    monkeypatch.delenv("SAFTUNE_DATA", raising=False)


def write_tsv(path: Path, header: list[str] | None, rows: list[list]) -> Path:
    """Write a TSV the way pandas' to_csv(sep="\\t") does (minimal quoting)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t", quotechar='"', quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
        if header:
            w.writerow(header)
        w.writerows(rows)
    return path


def make_sentiment(root: Path, per_class: int = 10) -> Path:
    task = root / "BOSS" / "SentimentAnalysis"
    train = [[f"amazon review {i} class {c}", c] for c in range(3) for i in range(per_class)]
    write_tsv(task / "amazon" / "train.tsv", ["Text", "Label"], train)
    write_tsv(task / "amazon" / "test.tsv", ["Text", "Label"], [["works fine", 1], ["broke", 0], ["it is a phone", 2]])
    write_tsv(task / "dynasent" / "test.tsv", ["Text", "Label"], [["the food was great", 1], ["meh", 2]])
    write_tsv(task / "semeval" / "test.tsv", ["Text", "Label"], [["@user so sad today", 0]])
    write_tsv(task / "sst5" / "test.tsv", ["Text", "Label"], [["a gorgeous film", 1], ["a tedious mess", 0]])
    return root


def make_nli(root: Path) -> Path:
    task = root / "BOSS" / "NaturalLanguageInference"
    header = ["Premise", "Hypothesis", "Label"]
    train = [[f"premise {i}", f"hypothesis {i}", i % 3] for i in range(30)]
    write_tsv(task / "mnli" / "train.tsv", header, train + [["no gold label", "x", -1]])
    write_tsv(task / "mnli" / "test.tsv", header, [["A man sleeps.", "A person rests.", 0]])
    for d in ("anli", "contract_nli", "wanli"):
        write_tsv(task / d / "test.tsv", header, [[f"{d} premise", f"{d} hypothesis", 2]])
    return root


def test_reader_header_labels_and_quoting(tmp_path):
    path = write_tsv(
        tmp_path / "test.tsv",
        ["Text", "Label"],
        [['she said "wow"\tand left', 1], ["line one\nline two", 0], ["", 1], ["no label here", "?"], ["ok", 2]],
    )
    rows = read_boss_tsv(path, TASKS["sentiment"])
    assert rows.inputs == ['she said "wow"\tand left', "line one\nline two", "ok"]
    assert rows.labels == [1, 0, 2] and rows.skipped == 2


def test_reader_headerless_names_and_floats(tmp_path, caplog):
    path = write_tsv(
        tmp_path / "t.tsv",
        None,
        [["you are awful", "toxic"], ["nice day", "non-toxic"], ["hello", "0.0"], ["bye", "1"], ["odd", "3"]],
    )
    with caplog.at_level(logging.WARNING, logger="saftune.data.text.boss"):
        rows = read_boss_tsv(path, TASKS["toxicity"])
    assert rows.inputs == ["you are awful", "nice day", "hello", "bye"] and rows.labels == [1, 0, 0, 1]
    assert rows.skipped == 1 and any("skipped 1 of 5" in r.getMessage() for r in caplog.records)


def test_reader_columns_by_name_in_any_order(tmp_path):
    path = write_tsv(
        tmp_path / "t.tsv", ["id", "label", "sentence"], [["7", "positive", "lovely"], ["8", "negative", "bad"]]
    )
    rows = read_boss_tsv(path, TASKS["sentiment"])
    assert rows.inputs == ["lovely", "bad"] and rows.labels == [1, 0]


def test_reader_nli_text_and_tuple(tmp_path):
    path = write_tsv(
        tmp_path / "t.tsv",
        ["Premise", "Hypothesis", "Label"],
        [["A dog runs.", "An animal moves.", 0], ["A cat.", "No cat.", "contradiction"], ["x", "y", -1]],
    )
    rows = read_boss_tsv(path, TASKS["nli"])
    assert rows.inputs == ["A dog runs.\nAn animal moves.", "A cat.\nNo cat."] and NLI_SEPARATOR == "\n"
    assert rows.labels == [0, 2] and rows.skipped == 1  # MNLI's -1 (no gold label) is dropped
    pairs = read_boss_tsv(path, TASKS["nli"], pair="tuple")
    assert pairs.inputs == [("A dog runs.", "An animal moves."), ("A cat.", "No cat.")]


def test_reader_errors_name_the_file(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="missing.tsv"):
        read_boss_tsv(tmp_path / "missing.tsv", TASKS["sentiment"])
    bad = write_tsv(tmp_path / "bad.tsv", ["Text", "Label"], [["x", "banana"]])
    with pytest.raises(ValueError, match="bad.tsv.*no usable rows"):
        read_boss_tsv(bad, TASKS["sentiment"])


def test_boss_sentiment_benchmark_full_and_few_shot(tmp_path):
    make_sentiment(tmp_path)
    b = load_dataset("boss-sentiment", root=tmp_path)
    assert isinstance(b, Benchmark) and b.modality == "text"
    assert b.classnames == ["negative", "positive", "neutral"] and b.templates == ["a {} review."]
    assert set(b.ood) == {"dynasent", "semeval", "sst5"}
    assert b.ood["dynasent"].inputs == ["the food was great", "meh"] and b.ood["dynasent"].labels.tolist() == [1, 2]
    assert len(b.test) == 3 and b.test.inputs[0] == "works fine"
    # Full ID train: everything but the held-out validation (100 per class asked, capped at 10% of a
    # class: 1 of 10).
    assert b.val.class_counts(3).tolist() == [1, 1, 1] and b.train.class_counts(3).tolist() == [9, 9, 9]
    assert not set(b.train.inputs) & set(b.val.inputs)
    assert b.prompts() == [["a negative review."], ["a positive review."], ["a neutral review."]]

    few = load_dataset("boss-sentiment", root=tmp_path, shots=4, seed=1)
    assert few.train.class_counts(3).tolist() == [4, 4, 4]
    assert few.val.class_counts(3).tolist() == [4, 4, 4]
    assert not set(few.train.inputs) & set(few.val.inputs)
    assert all(isinstance(x, str) for x in few.train.inputs)
    assert all(f"class {y}" in x for x, y in zip(few.train.inputs, few.train.labels))
    again = load_dataset("boss-sentiment", root=tmp_path, shots=4, seed=1)
    other = load_dataset("boss-sentiment", root=tmp_path, shots=4, seed=2)
    assert again.train.inputs == few.train.inputs and other.train.inputs != few.train.inputs
    assert few.info["shots"] == 4 and few.info["id_dataset"] == "amazon"


def test_boss_nli_benchmark(tmp_path):
    make_nli(tmp_path)
    b = load_dataset("boss-nli", root=tmp_path / "BOSS", shots=2, seed=3)
    assert b.classnames == ["entailment", "neutral", "contradiction"]
    assert set(b.ood) == {"anli", "contract_nli", "wanli"}
    assert b.ood["wanli"].inputs == ["wanli premise\nwanli hypothesis"] and b.ood["wanli"].labels.tolist() == [2]
    assert b.train.class_counts(3).tolist() == [2, 2, 2]
    t = load_dataset("boss-nli", root=tmp_path, shots=2, seed=3, pair="tuple")
    assert all(isinstance(x, tuple) and len(x) == 2 for x in t.train.inputs)
    assert [NLI_SEPARATOR.join(x) for x in t.train.inputs] == b.train.inputs
    with pytest.raises(ValueError, match="pair"):
        load_dataset("boss-nli", root=tmp_path, pair="list")


def test_boss_toxicity_and_root_forms(tmp_path, monkeypatch):
    task = tmp_path / "datasets" / "process" / "ToxicDetection"
    write_tsv(task / "civil_comments" / "train.tsv", ["Text", "Label"], [[f"c{i}", i % 2] for i in range(12)])
    write_tsv(task / "civil_comments" / "test.tsv", ["Text", "Label"], [["t", 0]])
    for d in ("adv_civil", "implicit_hate", "toxigen"):
        write_tsv(task / d / "test.tsv", ["Text", "Label"], [[f"{d} text", 1]])
    b = load_dataset("boss-toxicity", root=tmp_path, shots=3)  # BOSS's own datasets/process/ layout
    assert b.classnames == ["benign", "toxic"] and b.templates == ["a {} comment."]
    assert set(b.ood) == {"adv_civil", "implicit_hate", "toxigen"}
    monkeypatch.setenv("SAFTUNE_DATA", str(tmp_path / "datasets" / "process"))
    assert boss_dir(None, TASKS["toxicity"]) == task


def test_boss_missing_files_name_layout(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="SAFTUNE_DATA"):
        load_dataset("boss-sentiment")
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("boss-sentiment", root=tmp_path)
    assert "SentimentAnalysis" in str(info.value) and "dynasent/test.tsv" in str(info.value)
    make_sentiment(tmp_path)
    (tmp_path / "BOSS" / "SentimentAnalysis" / "sst5" / "test.tsv").unlink()
    with pytest.raises(DatasetNotFoundError, match="sst5/test.tsv"):
        load_dataset("boss-sentiment", root=tmp_path)


def test_boss_registered():
    try:
        from saftune.data.registry import list_datasets

        names = set(list_datasets())
    except ModuleNotFoundError as e:
        if "saftune.data.embedded" not in str(e):
            raise
        import saftune.data.text  # noqa: F401
        from saftune.data.registry import _DATASETS

        names = set(_DATASETS)
    assert {"boss-sentiment", "boss-toxicity", "boss-nli"} <= names
