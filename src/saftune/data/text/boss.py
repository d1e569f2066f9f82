"""The BOSS NLP out-of-distribution benchmark (Yuan et al., 2023) from its local TSV files.

BOSS pairs one in-distribution (ID) training set per task with three OOD test sets. saftune reads the
three classification tasks (NER is not a classification task and is left out):

| registry name  | task folder              | ID             | OOD test sets                     |
|----------------|--------------------------|----------------|-----------------------------------|
| boss-sentiment | SentimentAnalysis        | amazon         | dynasent, semeval, sst5           |
| boss-toxicity  | ToxicDetection           | civil_comments | adv_civil, implicit_hate, toxigen |
| boss-nli       | NaturalLanguageInference | mnli           | anli, contract_nli, wanli         |

Classes in label order (BOSS's numbering): sentiment negative, positive, neutral; toxicity benign,
toxic; NLI entailment, neutral, contradiction.

Layout, as the BOSS release unpacks (`datasets/process/` in its repository):

    $SAFTUNE_DATA/BOSS/
      SentimentAnalysis/amazon/train.tsv, amazon/test.tsv, dynasent/test.tsv, semeval/test.tsv, sst5/test.tsv
      ToxicDetection/civil_comments/{train,test}.tsv, adv_civil/test.tsv, ...
      NaturalLanguageInference/mnli/{train,test}.tsv, anli/test.tsv, ...

`root` may be the `BOSS/` folder itself, the data root holding it, or BOSS's `datasets/process/`.

File format (tolerant):

* tab-separated, UTF-8, fields quoted with '"' where needed (as pandas writes them);
* an optional header row (recognised because its last field is not a label). With a header, columns
  are found by name (case-insensitive): text in "text" / "sentence" / "review" / "comment" /
  "content"; NLI in "premise" + "hypothesis" (or "sentence1" + "sentence2"); the label in "label" /
  "labels" / "gold_label" (else the last column). Unfamiliar text column names fall back to
  positions. Without a header: text (NLI: premise, hypothesis) first, the label in the last column;
* labels are class indices in the order above (BOSS's numbering) or class names ("positive",
  "toxic", "entailment"; a few aliases such as "non-toxic" or "contradict" are accepted);
* rows with an empty text or an unusable label (e.g. MNLI's -1) are skipped and counted in a warning.

NLI inputs are strings by default: `"{premise}\\n{hypothesis}"` joined by `NLI_SEPARATOR` (a newline
keeps the two sentences apart for any tokenizer without assuming its special tokens). With
`pair="tuple"` they are `(premise, hypothesis)` tuples, for cross-encoders that take text pairs.

Few-shot: `shots` examples per class from the ID training file (seeded, `few_shot_indices`); None
uses the whole file. BOSS has no validation file, so validation is carved from the training file,
disjoint from the training examples: `val_shots` per class (default min(shots, 4); with the full
training set 100 per class, but never more than 10% of a class).

Example:
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "test.tsv").write_text("Text\\tLabel\\ngreat phone\\t1\\nawful\\t0\\n")
    >>> rows = read_boss_tsv(d / "test.tsv", TASKS["sentiment"])
    >>> rows.inputs, rows.labels, rows.skipped
    (['great phone', 'awful'], [1, 0], 0)
"""

from __future__ import annotations

import csv
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from saftune.config import Config, option
from saftune.data.base import Benchmark, Split
from saftune.data.registry import register_dataset
from saftune.data.templates import templates_for
from saftune.data.vision.fewshot import HOLDOUT_FRACTION, check_shots, few_shot_indices
from saftune.data.vision.paths import DATA_ENV, DatasetNotFoundError

logger = logging.getLogger(__name__)

#: Joins premise and hypothesis into one NLI input string.
NLI_SEPARATOR = "\n"

_TEXT_COLUMNS = ("text", "sentence", "review", "comment", "content", "text_a")
_PREMISE_COLUMNS = ("premise", "sentence1", "text_a")
_HYPOTHESIS_COLUMNS = ("hypothesis", "sentence2", "text_b")
_LABEL_COLUMNS = ("label", "labels", "gold_label", "class")


@dataclass(frozen=True)
class BossTask:
    """One BOSS classification task: its folder, ID set, OOD sets and class names in label order."""

    key: str
    folder: str
    id_dataset: str
    ood_datasets: tuple[str, ...]
    classnames: tuple[str, ...]
    pair: bool = False
    aliases: dict = field(default_factory=dict)

    @property
    def registry_name(self) -> str:
        return f"boss-{self.key}"

    def label_of(self, value: str) -> int | None:
        """Class index from a label field: an index ("1", "1.0") or a name; None if unusable."""
        v = value.strip()
        try:
            f = float(v)
        except ValueError:
            name = v.lower()
            if name in self.classnames:
                return self.classnames.index(name)
            return self.aliases.get(name)
        if f.is_integer() and 0 <= int(f) < len(self.classnames):
            return int(f)
        return None

    def layout(self) -> str:
        files = [f"{self.id_dataset}/train.tsv", f"{self.id_dataset}/test.tsv"] + [
            f"{d}/test.tsv" for d in self.ood_datasets
        ]
        return f"$SAFTUNE_DATA/BOSS/{self.folder}/\n" + "\n".join(f"  {f}" for f in files)


TASKS = {
    "sentiment": BossTask(
        "sentiment",
        "SentimentAnalysis",
        "amazon",
        ("dynasent", "semeval", "sst5"),
        ("negative", "positive", "neutral"),
        aliases={"neg": 0, "pos": 1, "neu": 2},
    ),
    "toxicity": BossTask(
        "toxicity",
        "ToxicDetection",
        "civil_comments",
        ("adv_civil", "implicit_hate", "toxigen"),
        ("benign", "toxic"),
        aliases={"non-toxic": 0, "nontoxic": 0, "not toxic": 0, "non_toxic": 0, "clean": 0},
    ),
    "nli": BossTask(
        "nli",
        "NaturalLanguageInference",
        "mnli",
        ("anli", "contract_nli", "wanli"),
        ("entailment", "neutral", "contradiction"),
        pair=True,
        aliases={"entails": 0, "entailed": 0, "contradict": 2, "contradicts": 2, "yes": 0, "maybe": 1, "no": 2},
    ),
}


@dataclass
class TsvRows:
    """Examples read from one TSV file: inputs, labels and how many rows were skipped."""

    inputs: list
    labels: list[int]
    skipped: int


def _find(header: list[str], names: tuple[str, ...]) -> int | None:
    lowered = [h.strip().lower() for h in header]
    for n in names:
        if n in lowered:
            return lowered.index(n)
    return None


def read_boss_tsv(path: str | os.PathLike, task: BossTask, pair: str = "text") -> TsvRows:
    """Read one BOSS TSV file (see the module docstring for the accepted format).

    Args:
        path: the file.
        task: which task's labels and columns to expect.
        pair: NLI only: "text" joins premise and hypothesis with `NLI_SEPARATOR`; "tuple" keeps a pair.

    Raises:
        DatasetNotFoundError: the file is missing.
        ValueError: a header without the needed columns, or a file with no usable row (naming the file).
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"BOSS file {str(path)!r} not found; expected this layout:\n{task.layout()}")
    # Long comments exceed csv's default 128 KiB field limit.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f, delimiter="\t", quotechar='"'))
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        raise ValueError(f"BOSS file {str(path)!r} is empty")
    n_text = 2 if task.pair else 1
    first = rows[0]
    if task.label_of(first[-1]) is None:
        # The first row's last field is no label: a header. Find columns by name, else by position.
        header, rows = first, rows[1:]
        label_col = _find(header, _LABEL_COLUMNS)
        label_col = -1 if label_col is None else label_col
        if task.pair:
            text_cols = [_find(header, _PREMISE_COLUMNS), _find(header, _HYPOTHESIS_COLUMNS)]
        else:
            text_cols = [_find(header, _TEXT_COLUMNS)]
        if any(c is None for c in text_cols):
            text_cols = list(range(n_text))
    else:
        label_col, text_cols = -1, list(range(n_text))
    inputs, labels, skipped = [], [], 0
    for r in rows:
        if len(r) <= max(max(text_cols), label_col if label_col >= 0 else n_text):
            skipped += 1
            continue
        texts = [r[c].strip() for c in text_cols]
        label = task.label_of(r[label_col])
        if label is None or not all(texts):
            skipped += 1
            continue
        if task.pair:
            inputs.append(tuple(texts) if pair == "tuple" else NLI_SEPARATOR.join(texts))
        else:
            inputs.append(texts[0])
        labels.append(label)
    if skipped:
        logger.warning("%s: skipped %d of %d rows with an empty text or an unusable label", path, skipped, len(rows))
    if not inputs:
        raise ValueError(
            f"BOSS file {str(path)!r} has no usable rows (expected text and label columns, see saftune.data.text.boss)"
        )
    return TsvRows(inputs, labels, skipped)


def boss_dir(root, task: BossTask) -> Path:
    """The task folder: `root/BOSS/<Task>`, `root/<Task>`, `root/datasets/process/<Task>` or `root/process/<Task>`."""
    if root is None:
        root = os.environ.get(DATA_ENV)
        if not root:
            raise DatasetNotFoundError(
                f"no data root: pass root=... or set {DATA_ENV}; expected this layout:\n{task.layout()}"
            )
    root = Path(root).expanduser()
    for base in (root, root / "BOSS", root / "datasets" / "process", root / "process"):
        if (base / task.folder).is_dir():
            return base / task.folder
    if root.name == task.folder:
        return root
    raise DatasetNotFoundError(
        f"BOSS task folder {str(root / 'BOSS' / task.folder)!r} not found; expected this layout:\n{task.layout()}"
    )


def _split(rows: TsvRows, name: str) -> Split:
    # Keep inputs a list: a numpy object array would turn NLI tuples into a 2-D array.
    return Split(name, list(rows.inputs), np.asarray(rows.labels, dtype=np.int64))


@dataclass
class BossOptions(Config):
    """Options of the BOSS tasks."""

    root: str | None = option(None, "folder holding BOSS (default $SAFTUNE_DATA; see `boss_dir`)")
    shots: int | None = option(None, "training examples per class; none: the whole ID training file", low=1)
    seed: int = option(1, "sampling seed", low=0)
    val_shots: int | None = option(None, "validation examples per class carved from the training file (default "
                                   "min(shots, 4); 100 with the whole file, capped at 10% of each class)", low=1)


@dataclass
class BossPairOptions(BossOptions):
    """`BossOptions` of a sentence-pair task (NLI): how premise and hypothesis reach the model."""

    pair: str = option("text", "text: premise and hypothesis joined by a newline; tuple: (premise, hypothesis) "
                       "for cross-encoders", choices=("text", "tuple"))


def build_boss(task_key: str, options: BossOptions) -> Benchmark:
    """A BOSS benchmark: ID train/val/test from the task's ID dataset, OOD = its three OOD test sets.

    Args:
        task_key: "sentiment", "toxicity" or "nli".
        options: `BossPairOptions` for NLI, else `BossOptions`.
    """
    root, seed = options.root, options.seed
    pair = getattr(options, "pair", "text")
    shots, val_shots = options.shots, options.val_shots
    task = TASKS[task_key]
    shots = check_shots(shots)
    val_shots = check_shots(val_shots, "val_shots") if val_shots is not None else (min(shots, 4) if shots else 100)
    folder = boss_dir(root, task)
    name = task.registry_name
    pool = _split(read_boss_tsv(folder / task.id_dataset / "train.tsv", task, pair), f"{task.id_dataset}/train")
    test = _split(read_boss_tsv(folder / task.id_dataset / "test.tsv", task, pair), f"{task.id_dataset}/test")
    ood = {d: _split(read_boss_tsv(folder / d / "test.tsv", task, pair), d) for d in task.ood_datasets}
    keys = [str(x) for x in pool.inputs]
    if shots is None:
        val_idx = few_shot_indices(pool.labels, val_shots, seed, stream=1, keys=keys, max_fraction=HOLDOUT_FRACTION)
        train = pool.subset(np.setdiff1d(np.arange(len(pool)), val_idx), f"{task.id_dataset}/train")
    else:
        train_idx = few_shot_indices(pool.labels, shots, seed, stream=0, keys=keys, classnames=task.classnames)
        val_idx = few_shot_indices(
            pool.labels, val_shots, seed, stream=1, keys=keys, exclude=train_idx, classnames=task.classnames
        )
        train = pool.subset(train_idx, f"{task.id_dataset}/train")
    val = pool.subset(val_idx, f"{task.id_dataset}/val")
    return Benchmark(
        name=name,
        modality="text",
        classnames=list(task.classnames),
        templates=templates_for(name),
        train=train,
        val=val,
        test=test,
        ood=ood,
        info={
            "source": "BOSS (Yuan et al., 2023)",
            "task_dir": str(folder),
            "id_dataset": task.id_dataset,
            "shots": shots,
            "seed": seed,
            "val_shots": val_shots,
            "input_format": ("pair tuple" if pair == "tuple" else "premise + '\\n' + hypothesis")
            if task.pair
            else "text",
            "train_pool": len(pool),
        },
    )


def _register(task: BossTask) -> None:
    ood = ", ".join(task.ood_datasets)
    help_text = f"BOSS {task.folder} from local TSVs: ID {task.id_dataset}, OOD {ood}"

    def build(options: BossOptions) -> Benchmark:
        return build_boss(task.key, options)

    build.__name__ = f"build_boss_{task.key}"
    build.__doc__ = f"{help_text}. See `build_boss`."
    register_dataset(task.registry_name, help_text, options=BossPairOptions if task.pair else BossOptions)(build)


for _task in TASKS.values():
    _register(_task)
