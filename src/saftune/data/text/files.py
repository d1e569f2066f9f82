"""Your own text data as a benchmark: `load_dataset("text-files", train="train.csv", test="test.csv")`.

Files are CSV (`.csv`), TSV (`.tsv`, `.tab`) or JSON lines (`.jsonl`, `.ndjson`), UTF-8 (a byte-order
mark is fine). CSV and TSV files start with a header line naming the columns; in JSON lines each line
is one object. Columns are named by options: `text_column` ("text"), `label_column` ("label") and, for
sentence pairs (NLI, paraphrase), `text_pair_column`, whose text joins the first with a newline (or
makes a `(text, pair)` tuple with `pair="tuple"`).

    train: train.csv            # the training pool (few-shot sampled with `shots`, else used whole)
    val: val.csv                # optional; without it, validation is carved from the training file
    test: test.csv              # the ID test set
    ood: {tweets: tweets.jsonl, news: news.tsv}     # any number of named OOD test sets

Class names are `classnames` when given (a label is then a class name or its index 0..n-1), else the
distinct labels of the training file (numbers in numeric order, other labels alphabetically). Prompt
templates are `templates` ("{}": the class name itself, by default). Every file is checked before any
model loads: a missing column, an empty file, an empty text or label, a label the training file does
not have, a line that is not UTF-8, a malformed row: each is refused naming the file, the line and
the fix.

Example:
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "train.csv").write_text("text,label\\ngreat,pos\\nawful,neg\\nfine,pos\\nbad,neg\\n")
    >>> _ = (d / "test.jsonl").write_text('{"text": "superb", "label": "pos"}\\n')
    >>> from saftune.data.registry import load_dataset
    >>> b = load_dataset("text-files", root=d, train="train.csv", test="test.jsonl", templates="a {} review.",
    ...                  shots=1)
    >>> b.classnames, b.prompts(), len(b.train), len(b.val)
    (['neg', 'pos'], [['a neg review.'], ['a pos review.']], 2, 2)
"""

from __future__ import annotations

import csv
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from saftune.config import Config, option
from saftune.data.base import Benchmark, Split
from saftune.data.registry import register_dataset
from saftune.data.templates import check_template
from saftune.data.text.boss import NLI_SEPARATOR
from saftune.data.vision.fewshot import HOLDOUT_FRACTION, few_shot_indices
from saftune.data.vision.paths import DatasetNotFoundError

logger = logging.getLogger(__name__)

_DELIMITERS = {".csv": ",", ".tsv": "\t", ".tab": "\t"}
_JSON_LINES = (".jsonl", ".ndjson")


class TextFileError(ValueError):
    """A text data file is malformed; the message names the file, the line and the fix."""


@dataclass
class TextFilesOptions(Config):
    """Options of `text-files` (see the module docstring)."""

    train: str | None = option(None, "training file (.csv, .tsv or .jsonl)")
    test: str | None = option(None, "ID test file")
    val: str | None = option(None, "validation file (default: carved from the training file)")
    ood: dict = option(help="OOD test files by name: {tweets: tweets.jsonl}, or on the command line "
                       "--dataset-option ood.tweets=tweets.jsonl", default_factory=dict)
    root: str | None = option(None, "folder that relative file paths start from (default: the working directory)")
    text_column: str = option("text", "column (or JSON field) holding the text")
    text_pair_column: str | None = option(None, "column holding the second text of a pair (NLI, paraphrase)")
    label_column: str = option("label", "column (or JSON field) holding the label")
    classnames: list[str] | None = option(None, "class names in label order (default: the training file's labels)")
    templates: str | list[str] = option(help="prompt templates with {} for the class name",
                                        default_factory=lambda: ["{}"])
    pair: str = option("text", "pair input form: text (joined by a newline) or tuple", choices=("text", "tuple"))
    shots: int | None = option(None, "training examples per class, drawn by `seed`; none: the whole training file",
                               low=1)
    seed: int = option(1, "sampling seed", low=0)
    val_shots: int | None = option(None, "validation examples per class (default min(shots, 4); with the whole "
                                   "training file 100 carved from it, at most 10% of a class, or the whole val file)",
                                   low=1)
    name: str = option("text-files", "benchmark name (names the splits in results)")

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.templates, str):
            self.templates = [self.templates]
        for t in self.templates:
            try:
                check_template(t)
            except ValueError as e:
                raise ValueError(f"TextFilesOptions.templates: {e}") from None
        for key, value in self.ood.items():
            if not isinstance(value, str) or not value:
                raise ValueError(f"TextFilesOptions.ood[{key!r}] must be a file path, got {value!r}")


@dataclass
class TextRows:
    """One file's examples: inputs, raw labels and the line each came from."""

    path: Path
    inputs: list
    labels: list[str]
    lines: list[int]


def _decode(path: Path) -> str:
    """The file's text; a byte sequence that is not UTF-8 is refused with its line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise TextFileError(
            f"{str(path)!r} line {line}: byte 0x{data[e.start]:02x} is not UTF-8 (the file mixes encodings or is "
            "not UTF-8); re-save it as UTF-8, e.g. iconv -f latin1 -t utf-8"
        ) from None


def _missing_column(path: Path, line: int, option_name: str, column: str, present, what: str) -> TextFileError:
    return TextFileError(f"{str(path)!r} line {line}: no {what} {column!r} ({option_name}); its {what}s are "
                         f"{', '.join(map(repr, present)) or 'none'}: set --dataset-option {option_name}=<name>")


def _records(path: Path, options: TextFilesOptions):
    """(line number, row as a dict) for every example of a CSV / TSV / JSON-lines file."""
    suffix = path.suffix.lower()
    text = _decode(path)
    if not text.strip():
        raise TextFileError(f"{str(path)!r} is empty; it needs "
                            + ("one JSON object per line" if suffix in _JSON_LINES else
                               "a header line naming the columns, then one row per example"))
    if suffix in _JSON_LINES:
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TextFileError(f"{str(path)!r} line {number}: not valid JSON ({e.msg}); each line must be one "
                                    f"object like {{\"{options.text_column}\": ..., \"{options.label_column}\": ...}}"
                                    ) from None
            if not isinstance(row, dict):
                raise TextFileError(f"{str(path)!r} line {number}: a JSON {type(row).__name__}, not an object; each "
                                    f"line must be one object like {{\"{options.text_column}\": ..., "
                                    f"\"{options.label_column}\": ...}}")
            yield number, row
        return
    if suffix not in _DELIMITERS:
        raise TextFileError(f"{str(path)!r}: unknown file type {suffix!r}; use .csv, .tsv or .jsonl")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long documents exceed the 128 KiB default
    reader = csv.reader(text.splitlines(keepends=True), delimiter=_DELIMITERS[suffix])
    header = [h.strip() for h in next(reader)]
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise TextFileError(f"{str(path)!r} line {reader.line_num}: {len(row)} fields, but the header has "
                                f"{len(header)} ({', '.join(header)}); quote fields that contain "
                                f"{'a tab' if _DELIMITERS[suffix] == chr(9) else 'a comma'} with double quotes")
        yield reader.line_num, dict(zip(header, row))


def _label_text(value) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def read_text_file(path: Path, options: TextFilesOptions) -> TextRows:
    """Read one file's examples (labels still as text), refusing malformed rows."""
    if not path.is_file():
        raise DatasetNotFoundError(f"text file {str(path)!r} not found; give an existing .csv, .tsv or .jsonl file "
                                   "(relative paths start from the `root` option, else the working directory)")
    columns = [("text_column", options.text_column)]
    if options.text_pair_column:
        columns.append(("text_pair_column", options.text_pair_column))
    columns.append(("label_column", options.label_column))
    what = "field" if path.suffix.lower() in _JSON_LINES else "column"
    inputs, labels, lines = [], [], []
    for number, row in _records(path, options):
        for option_name, column in columns:
            if column not in row:
                raise _missing_column(path, number if what == "field" else 1, option_name, column, list(row), what)
        texts = [row[c] for _, c in columns[:-1]]
        for (_, column), value in zip(columns, texts):
            if not isinstance(value, str) or not value.strip():
                raise TextFileError(f"{str(path)!r} line {number}: empty text in {what} {column!r}; fill it in or "
                                    "remove the row")
        label = _label_text(row[options.label_column])
        if not label:
            raise TextFileError(f"{str(path)!r} line {number}: empty label in {what} {options.label_column!r}; fill "
                                "it in or remove the row")
        texts = [t.strip() for t in texts]
        if len(texts) == 2:
            inputs.append(tuple(texts) if options.pair == "tuple" else NLI_SEPARATOR.join(texts))
        else:
            inputs.append(texts[0])
        labels.append(label)
        lines.append(number)
    if not inputs:
        raise TextFileError(f"{str(path)!r} has a header but no rows; add one row per example")
    return TextRows(path, inputs, labels, lines)


def _class_names(train: TextRows) -> list[str]:
    distinct = set(train.labels)
    if all(label.lstrip("-").isdigit() for label in distinct):
        names = sorted(distinct, key=int)
        logger.warning("%s: the class names are the labels %s; give classnames=[...] for prompts that mean "
                       "something", train.path, ", ".join(names[:5]))
        return names
    return sorted(distinct)


def _label_indices(rows: TextRows, classnames: list[str], given: bool, train_path: Path) -> np.ndarray:
    index = {name: i for i, name in enumerate(classnames)}
    out = []
    for label, number in zip(rows.labels, rows.lines):
        if label in index:
            out.append(index[label])
        elif given and label.isdigit() and int(label) < len(classnames):
            out.append(int(label))
        else:
            where = "the class names" if given else f"a class of the training file {str(train_path)!r}"
            fix = ("fix the label, or add it to classnames" if given else
                   "fix the label, or give classnames=[...] listing every class")
            shown = ", ".join(classnames[:10]) + (", ..." if len(classnames) > 10 else "")
            raise TextFileError(f"{str(rows.path)!r} line {number}: label {label!r} is not {where} ({shown}); {fix}")
    return np.asarray(out, dtype=np.int64)


@register_dataset(
    "text-files",
    "your own text: CSV / TSV / JSONL files for train, val (optional), test and named OOD sets",
    options=TextFilesOptions,
)
def build_text_files(options: TextFilesOptions) -> Benchmark:
    """A benchmark from the user's text files (see the module docstring)."""
    for option_name in ("train", "test"):
        if not getattr(options, option_name):
            raise DatasetNotFoundError(f"text-files needs {option_name}=<file>: e.g. --dataset-option "
                                       f"{option_name}=data/{option_name}.csv (see saftune list datasets)")
    base = Path(options.root).expanduser() if options.root else Path.cwd()

    def read(file: str) -> TextRows:
        return read_text_file(base / Path(file).expanduser(), options)

    train_rows = read(options.train)
    given = options.classnames is not None
    classnames = list(options.classnames) if given else _class_names(train_rows)

    def split(rows: TextRows, name: str) -> Split:
        # Keep inputs a list: a numpy object array would turn pair tuples into a 2-D array.
        return Split(name, list(rows.inputs), _label_indices(rows, classnames, given, train_rows.path))

    pool = split(train_rows, f"{options.name}/train")
    test = split(read(options.test), f"{options.name}/test")
    ood = {name: split(read(file), name) for name, file in options.ood.items()}
    keys = [str(x) for x in pool.inputs]
    shots = options.shots
    if options.val:
        vpool = split(read(options.val), f"{options.name}/val")
        val_shots = options.val_shots or (min(shots, 4) if shots else None)
        val = vpool if val_shots is None else vpool.subset(
            few_shot_indices(vpool.labels, val_shots, options.seed, stream=1, keys=[str(x) for x in vpool.inputs]))
        train_idx = (np.arange(len(pool)) if shots is None else
                     few_shot_indices(pool.labels, shots, options.seed, stream=0, keys=keys, classnames=classnames))
    else:
        val_shots = options.val_shots or (min(shots, 4) if shots else 100)
        if shots is None:
            val_idx = few_shot_indices(pool.labels, val_shots, options.seed, stream=1, keys=keys,
                                       max_fraction=HOLDOUT_FRACTION)
            train_idx = np.setdiff1d(np.arange(len(pool)), val_idx)
        else:
            train_idx = few_shot_indices(pool.labels, shots, options.seed, stream=0, keys=keys, classnames=classnames)
            val_idx = few_shot_indices(pool.labels, val_shots, options.seed, stream=1, keys=keys, exclude=train_idx,
                                       classnames=classnames)
        if not len(val_idx):
            raise ValueError(f"text-files: no validation examples could be carved from {str(train_rows.path)!r} (with "
                             f"the whole training file, at most 10% of a class goes to validation, and no class has "
                             "10 examples); give a validation file (val=<file>) or train few-shot (shots=K)")
        val = pool.subset(val_idx, f"{options.name}/val")
    train = pool.subset(train_idx, f"{options.name}/train")
    return Benchmark(
        name=options.name,
        modality="text",
        classnames=classnames,
        templates=list(options.templates),
        train=train,
        val=val,
        test=test,
        ood=ood,
        info={
            "source": "text-files",
            "files": {"train": str(train_rows.path), "val": options.val, "test": options.test, "ood": dict(options.ood)},
            "shots": shots,
            "seed": options.seed,
            "val_shots": val_shots,
            "train_pool": len(pool),
            "classnames_from": "option" if given else "training labels",
        },
    )
