"""BOSS text suites read from tiny TSV files written in the test."""

from __future__ import annotations

import csv
import json
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


# --------------------------------------------------------------------------------------------------
# text-files: the user's own CSV / TSV / JSONL files


def make_text_files(d: Path) -> Path:
    """train.csv (quoted commas, a multi-line field), val.csv, test.csv, an OOD TSV and an OOD JSONL file."""
    rows = [("a great, warm film", "positive"), ("dull and\nlong", "negative")] + [
        (f"good movie {i}", "positive") for i in range(5)] + [(f"bad movie {i}", "negative") for i in range(5)]
    with open(d / "train.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "review", "sentiment"])
        writer.writerows([(i, text, label) for i, (text, label) in enumerate(rows)])
    (d / "val.csv").write_text("id,review,sentiment\n1,fine,positive\n2,poor,negative\n3,nice,positive\n")
    (d / "test.csv").write_text("id,review,sentiment\n1,superb,positive\n2,awful,negative\n")
    (d / "tweets.tsv").write_text("review\tsentiment\nlove it \u2764\tpositive\nmeh\tnegative\n", encoding="utf-8")
    (d / "news.jsonl").write_text('{"review": "markets rally", "sentiment": "positive"}\n\n'
                                  '{"review": "storm damage", "sentiment": "negative", "extra": 1}\n')
    return d


TEXT_OPTIONS = {"train": "train.csv", "test": "test.csv", "ood": {"tweets": "tweets.tsv", "news": "news.jsonl"},
                "text_column": "review", "label_column": "sentiment"}


def test_text_files_full_data_with_val_file_and_named_ood_files(tmp_path):
    make_text_files(tmp_path)
    b = load_dataset("text-files", root=tmp_path, val="val.csv", templates="a {} review.", **TEXT_OPTIONS)
    b.validate()
    assert b.modality == "text" and b.classnames == ["negative", "positive"]
    assert b.prompts() == [["a negative review."], ["a positive review."]]
    assert len(b.train) == 12 and b.train.inputs[:2] == ["a great, warm film", "dull and\nlong"]
    assert b.train.labels[:2].tolist() == [1, 0]
    assert b.val.inputs == ["fine", "poor", "nice"] and b.val.labels.tolist() == [1, 0, 1]
    assert b.test.inputs == ["superb", "awful"] and b.test.labels.tolist() == [1, 0]
    assert list(b.ood) == ["tweets", "news"]
    assert b.ood["tweets"].inputs == ["love it \u2764", "meh"] and b.ood["news"].labels.tolist() == [1, 0]


def test_text_files_few_shot_carves_validation_and_follows_the_seed(tmp_path):
    make_text_files(tmp_path)
    b = load_dataset("text-files", root=tmp_path, shots=2, seed=1, **TEXT_OPTIONS)
    assert b.train.class_counts(2).tolist() == [2, 2] and b.val.class_counts(2).tolist() == [2, 2]
    assert not set(b.train.inputs) & set(b.val.inputs)
    assert load_dataset("text-files", root=tmp_path, shots=2, seed=1, **TEXT_OPTIONS).train.inputs == b.train.inputs
    assert any(load_dataset("text-files", root=tmp_path, shots=2, seed=s, **TEXT_OPTIONS).train.inputs != b.train.inputs
               for s in (2, 3, 4))
    assert b.templates == ["{}"] and b.prompts() == [["negative"], ["positive"]]  # the default template


def test_text_files_pairs_given_class_names_and_index_labels(tmp_path, caplog):
    (tmp_path / "nli.jsonl").write_text("".join(
        json.dumps({"premise": f"p{i}", "hypothesis": f"h{i}", "label": i % 3}) + "\n" for i in range(9)))
    options = {"train": "nli.jsonl", "val": "nli.jsonl", "test": "nli.jsonl", "text_column": "premise",
               "text_pair_column": "hypothesis"}
    b = load_dataset("text-files", root=tmp_path, classnames=["entailment", "neutral", "contradiction"], **options)
    assert b.classnames == ["entailment", "neutral", "contradiction"] and b.test.labels.tolist() == [0, 1, 2] * 3
    assert b.test.inputs[0] == "p0\nh0"
    assert load_dataset("text-files", root=tmp_path, pair="tuple", **options).test.inputs[1] == ("p1", "h1")
    with caplog.at_level(logging.WARNING):
        numeric = load_dataset("text-files", root=tmp_path, **options)
    assert numeric.classnames == ["0", "1", "2"] and "give classnames=[...]" in caplog.text


def test_text_files_run_through_a_run_config_with_the_run_seed(tmp_path):
    from saftune.run import RunConfig, build_benchmark

    make_text_files(tmp_path)
    options = {**TEXT_OPTIONS, "root": str(tmp_path), "shots": 2}
    b = build_benchmark(RunConfig(model="tiny-sentence", dataset="text-files", dataset_options=options, seed=3))
    assert b.info["seed"] == 3 and len(b.train) == 4


def _write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


@pytest.mark.parametrize("files, options, message", [
    # a column the options name is missing (CSV: the header line; JSON lines: the line)
    ({"train.csv": "id,text,label\n1,a,x\n"}, {"text_column": "review"},
     r"train.csv' line 1: no column 'review' \(text_column\); its columns are 'id', 'text', 'label': set "
     r"--dataset-option text_column=<name>"),
    ({"train.csv": "id,review,sentiment\n1,a,x\n"}, {"text_column": "review"},
     r"train.csv' line 1: no column 'label' \(label_column\); its columns are .*'sentiment': set --dataset-option "
     r"label_column=<name>"),
    ({"test.jsonl": '{"text": "a", "label": "x"}\n{"text": "b"}\n'}, {"test": "test.jsonl"},
     r"test.jsonl' line 2: no field 'label' \(label_column\); its fields are 'text': set --dataset-option "
     r"label_column=<name>"),
    ({"train.csv": "text,label\na,x\n", "pairs.csv": "text,label\na,x\n"}, {"text_pair_column": "hypothesis"},
     r"train.csv' line 1: no column 'hypothesis' \(text_pair_column\)"),
    # empty files
    ({"train.csv": ""}, {}, r"train.csv' is empty; it needs a header line naming the columns, then one row per example"),
    ({"train.csv": "text,label\n"}, {}, r"train.csv' has a header but no rows; add one row per example"),
    ({"test.jsonl": "\n\n"}, {"test": "test.jsonl"}, r"test.jsonl' is empty; it needs one JSON object per line"),
    # labels the training file does not have
    ({"ood.tsv": "text\tlabel\na\tx\nb\tneutral\n"}, {"ood": {"shifted": "ood.tsv"}},
     r"ood.tsv' line 3: label 'neutral' is not a class of the training file '.*train.csv' \(x, y\); fix the label, "
     r"or give classnames=\[...\] listing every class"),
    ({}, {"classnames": ["x", "z"]},
     r"train.csv' line 3: label 'y' is not the class names \(x, z\); fix the label, or add it to classnames"),
    # mixed encodings: a Latin-1 byte in a UTF-8 file
    ({"test.csv": "text,label\ncaf\u00e9,x\n".encode("utf-8") + b"na\xefve,y\n"}, {},
     r"test.csv' line 3: byte 0xef is not UTF-8 \(the file mixes encodings or is not UTF-8\); re-save it as UTF-8"),
    # malformed rows
    ({"test.csv": "text,label\na,x\nb,y,extra\n"}, {},
     r"test.csv' line 3: 3 fields, but the header has 2 \(text, label\); quote fields that contain a comma"),
    ({"test.jsonl": '{"text": "a", "label": "x"}\n{"text": "b", "label": \n'}, {"test": "test.jsonl"},
     r"test.jsonl' line 2: not valid JSON \(.*\); each line must be one object like"),
    ({"test.jsonl": '["a", "x"]\n'}, {"test": "test.jsonl"}, r"test.jsonl' line 1: a JSON list, not an object"),
    ({"test.csv": "text,label\na,x\n ,y\n"}, {}, r"test.csv' line 3: empty text in column 'text'; fill it in or remove"),
    ({"test.csv": "text,label\na,x\nb,\n"}, {}, r"test.csv' line 3: empty label in column 'label'; fill it in or"),
    ({"test.txt": "a x\n"}, {"test": "test.txt"}, r"test.txt': unknown file type '.txt'; use .csv, .tsv or .jsonl"),
])
def test_text_files_malformed_input_names_the_file_line_and_fix(tmp_path, files, options, message):
    from saftune.data.text.files import TextFileError

    _write(tmp_path / "train.csv", "text,label\na,x\nb,y\nc,x\nd,y\n")
    _write(tmp_path / "test.csv", "text,label\ne,x\nf,y\n")
    for name, text in files.items():
        _write(tmp_path / name, text)
    with pytest.raises(TextFileError, match=message):
        load_dataset("text-files", **{"root": tmp_path, "train": "train.csv", "test": "test.csv", **options})


def test_text_files_missing_files_and_options_are_named(tmp_path):
    _write(tmp_path / "train.csv", "text,label\na,x\nb,y\n")
    with pytest.raises(DatasetNotFoundError, match=r"text-files needs test=<file>: e.g. --dataset-option "
                                                   r"test=data/test.csv"):
        load_dataset("text-files", root=tmp_path, train="train.csv")
    with pytest.raises(DatasetNotFoundError, match=r"text file '.*nowhere.csv' not found; give an existing"):
        load_dataset("text-files", root=tmp_path, train="train.csv", test="nowhere.csv")
    with pytest.raises(ValueError, match=r"no validation examples could be carved from '.*train.csv' .*; give a "
                                         r"validation file \(val=<file>\) or train few-shot \(shots=K\)"):
        load_dataset("text-files", root=tmp_path, train="train.csv", test="train.csv")
    with pytest.raises(ValueError, match=r"TextFilesOptions.templates: a prompt template needs exactly one"):
        load_dataset("text-files", root=tmp_path, train="train.csv", test="train.csv", templates="a review")
