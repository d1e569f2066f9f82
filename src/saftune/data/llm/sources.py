"""Readers of the causal-LM track's offline task files: BIG-bench and OpenAI-evals items as multiple choice.

Every reader takes a path (so tests can hand it a small fixture file) and returns `MultipleChoiceItem`s
asked the way lm-evaluation-harness asks common-sense tasks: the context ``"Question: <text>\\nAnswer:"``
and each option scored as the continuation after a space (DESIGN.md §7).

* BIG-bench (`read_bigbench`): a ``task.json`` whose examples carry ``target_scores`` (option -> score);
  the options are its keys, the gold one the option with the highest score. An example whose highest
  score is shared, or with fewer than two distinct non-empty options, is skipped and counted.
* OpenAI evals (`read_evals_mcq`, `read_evals_health`): JSON lines of a chat (``input``: system and user
  turns) and an ``ideal`` answer. Multiple-choice tasks list their options in the user turn (``a) ...``
  for MedMCQA, `` A: ...`` for QuaRTz; medication_dose lists "drug dose" pairs in the system turn and the
  answer is the drug whose dose is wrong). The tabular health tasks (diabetes, heart-disease) describe a
  patient in the user turn and answer 1 or 0; `read_evals_health` gives (patient description, label).

Skipped items are counted in the returned `Parsed.skipped` (reason -> count) and logged, never silently.
`subsample` picks items deterministically by seed.

Example:
    >>> import json, tempfile, pathlib
    >>> task = {"examples": [{"input": "How many legs do horses have?", "target_scores": {"two": 0, "four": 1}},
    ...                      {"input": "Tie?", "target_scores": {"a": 1, "b": 1}}]}
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "task.json"; _ = path.write_text(json.dumps(task))
    >>> parsed = read_bigbench(path, "toy")
    >>> parsed.items[0].context, parsed.items[0].options, parsed.items[0].gold
    ('Question: How many legs do horses have?\\nAnswer:', ('two', 'four'), 1)
    >>> parsed.skipped
    {'shared highest score': 1}
    >>> [i.id for i in subsample(parsed.items * 3, 2, seed=0)] == [i.id for i in subsample(parsed.items * 3, 2, seed=0)]
    True
"""

from __future__ import annotations

import gzip
import json
import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from saftune.data.llm.multiple_choice import MultipleChoiceError, MultipleChoiceItem

logger = logging.getLogger(__name__)


@dataclass
class Parsed:
    """Items read from one task file, and how many examples were skipped for which reason."""

    items: list
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.items)


def question(text: str) -> str:
    """The harness-style context of a question: ``"Question: <text>\\nAnswer:"`` (text stripped).

    Example:
        >>> question("  Why is the sky blue? ")
        'Question: Why is the sky blue?\\nAnswer:'
    """
    return f"Question: {text.strip()}\nAnswer:"


def read_jsonl(path: str | Path) -> list[dict]:
    """The JSON objects of a JSON-lines file (gzipped when the name ends in .gz), blank lines ignored."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as e:
                    raise ValueError(f"{path.name}:{number}: not valid JSON ({e})") from None
    return rows


def _finish(items: list, skipped: Counter, source: str) -> Parsed:
    if skipped:
        logger.info("%s: kept %d items, skipped %s", source, len(items), dict(skipped))
    return Parsed(items, dict(skipped))


# -- BIG-bench ----------------------------------------------------------------------------------------

# How a task's input becomes a question when the input alone is not one: the statement tasks are asked
# as the task's own instruction, and their one-letter options spelled out (a length-normalised score of
# a one-character option is noisy).
BIGBENCH_QUESTIONS = {
    "misconceptions": "Is the following statement true or false? {input}",
    "winowhy": "Is the reasoning in the following sentence correct or incorrect? {input}",
}
BIGBENCH_OPTIONS = {"misconceptions": {"T": "True", "F": "False"}}


def read_bigbench(path: str | Path, task: str) -> Parsed:
    """Multiple-choice items of a BIG-bench ``task.json`` (its ``target_scores`` examples).

    Args:
        path: the task's JSON file.
        task: the task name (ids are ``<task>/<index>``; some tasks phrase their question, see
            `BIGBENCH_QUESTIONS`).

    Returns:
        `Parsed` items, gold = the option with the highest score; examples without ``target_scores``, with
        a shared highest score, or whose options are fewer than two, empty or repeated are skipped.
    """
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("examples"), list):
        raise ValueError(f"{path}: not a BIG-bench task file (no 'examples' list)")
    template = BIGBENCH_QUESTIONS.get(task, "{input}")
    rename = BIGBENCH_OPTIONS.get(task, {})
    items, skipped = [], Counter()
    for index, example in enumerate(data["examples"]):
        scores = example.get("target_scores") if isinstance(example, dict) else None
        text = example.get("input") if isinstance(example, dict) else None
        if not isinstance(scores, dict) or not scores or not isinstance(text, str) or not text.strip():
            skipped["no input or target_scores"] += 1
            continue
        options = [rename.get(str(o).strip(), str(o).strip()) for o in scores]
        values = list(scores.values())
        if not all(isinstance(v, (int, float)) for v in values):
            skipped["non-numeric score"] += 1
            continue
        best = max(values)
        if values.count(best) != 1:
            skipped["shared highest score"] += 1
            continue
        try:
            items.append(MultipleChoiceItem(question(template.format(input=text.strip())), tuple(options),
                                            values.index(best), id=f"{task}/{index}"))
        except MultipleChoiceError:
            skipped["fewer than 2, empty or repeated options"] += 1
    return _finish(items, skipped, f"bigbench/{task}")


def read_bigbench_tasks(paths: Sequence[str | Path], task: str) -> Parsed:
    """`read_bigbench` over several files of one task (hhh_alignment's subtasks), ids made unique."""
    items, skipped = [], Counter()
    for path in paths:
        part = read_bigbench(path, task)
        sub = Path(path).parent.name
        items += [MultipleChoiceItem(i.context, i.options, i.gold, id=f"{task}/{sub}/{i.id.rsplit('/', 1)[1]}")
                  for i in part.items]
        skipped.update(part.skipped)
    return Parsed(items, dict(skipped))


# -- OpenAI evals -------------------------------------------------------------------------------------

def _turns(row: dict) -> tuple[str, str]:
    """(system text, last user text) of an evals chat sample."""
    turns = row.get("input")
    if not isinstance(turns, list):
        raise ValueError("no 'input' chat")
    system = " ".join(t.get("content", "") for t in turns if t.get("role") == "system")
    user = [t.get("content", "") for t in turns if t.get("role") == "user"]
    return system, (user[-1] if user else "")


_MEDMCQA_OPTION = re.compile(r"^([a-z])\) ?(.*)$")
_QUARTZ_OPTION = re.compile(r"^\s*([A-Z]): ?(.*)$")
_DOSE = re.compile(r"^(.*?)\s+\d")


def _mcq_medmcqa(system: str, user: str, ideal: str):
    body = user.split("\n\n", 1)[1] if user.startswith("Subject:") and "\n\n" in user else user
    lines = body.strip().split("\n")
    letters, options = [], []
    while lines and (m := _MEDMCQA_OPTION.match(lines[-1].strip())):
        letters.insert(0, m.group(1))
        options.insert(0, m.group(2).strip())
        lines.pop()
    answer = _MEDMCQA_OPTION.match(ideal.strip())
    if not answer or answer.group(1) not in letters:
        return None
    return "\n".join(lines).strip(), options, letters.index(answer.group(1))


def _mcq_quartz(system: str, user: str, ideal: str):
    stem, _, listing = user.partition("\n\n")
    letters, options = [], []
    for line in listing.split("\n"):
        if m := _QUARTZ_OPTION.match(line):
            letters.append(m.group(1))
            options.append(m.group(2).strip())
    if ideal.strip() not in letters:
        return None
    return stem, options, letters.index(ideal.strip())


def _mcq_medication_dose(system: str, user: str, ideal: str):
    _, _, listing = system.rpartition("?")
    drugs = [m.group(1).strip() for part in listing.split(",") if (m := _DOSE.match(part.strip()))]
    folded = [d.casefold() for d in drugs]
    if ideal.strip().casefold() not in folded:
        return None
    return (f"Which of these medications is prescribed at a dose outside its standard range? {listing.strip()}",
            drugs, folded.index(ideal.strip().casefold()))


EVALS_MCQ = {"medmcqa": _mcq_medmcqa, "quartz": _mcq_quartz, "medication_dose": _mcq_medication_dose}


def read_evals_mcq(path: str | Path, task: str) -> Parsed:
    """Multiple-choice items of an OpenAI-evals task: "medmcqa", "quartz" or "medication_dose".

    Example:
        >>> import json, tempfile, pathlib
        >>> row = {"input": [{"role": "system", "content": "Answer."}, {"role": "user",
        ...        "content": "Subject: Anatomy\\n\\nWhich bone is in the arm?\\n\\na) Femur\\nb) Humerus"}], "ideal": "b) Humerus"}
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "s.jsonl"; _ = path.write_text(json.dumps(row) + "\\n")
        >>> item = read_evals_mcq(path, "medmcqa").items[0]
        >>> item.context, item.options, item.gold
        ('Question: Which bone is in the arm?\\nAnswer:', ('Femur', 'Humerus'), 1)
    """
    if task not in EVALS_MCQ:
        raise ValueError(f"no multiple-choice reader for evals task {task!r}; known: {', '.join(EVALS_MCQ)}")
    parse = EVALS_MCQ[task]
    items, skipped = [], Counter()
    for index, row in enumerate(read_jsonl(path)):
        try:
            system, user = _turns(row)
            parsed = parse(system, user, str(row.get("ideal", "")))
        except (ValueError, AttributeError, TypeError):
            parsed = None
        if parsed is None:
            skipped["options or answer not found"] += 1
            continue
        text, options, gold = parsed
        try:
            items.append(MultipleChoiceItem(question(text), tuple(options), gold, id=f"{task}/{index}"))
        except MultipleChoiceError:
            skipped["fewer than 2, empty or repeated options"] += 1
    return _finish(items, skipped, f"evals/{task}")


_LONG_DECIMAL = re.compile(r"(\d+\.\d{2})\d+")


def read_evals_health(path: str | Path) -> tuple[list[str], np.ndarray]:
    """(patient descriptions, labels 0/1) of a tabular health task of OpenAI evals (diabetes, heart-disease).

    Float noise in the descriptions ("BMI:23.490000000000002") is rounded to two decimals. Samples whose
    answer is not 0 or 1 are refused (the files have none).

    Example:
        >>> import json, tempfile, pathlib
        >>> row = {"input": [{"role": "system", "content": "Predict."}, {"role": "user", "content": "BMI:23.490000000001"}],
        ...        "ideal": "1"}
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "s.jsonl"; _ = path.write_text(json.dumps(row) + "\\n")
        >>> read_evals_health(path)
        (['BMI:23.49'], array([1]))
    """
    texts, labels = [], []
    for index, row in enumerate(read_jsonl(path)):
        _, user = _turns(row)
        ideal = str(row.get("ideal", "")).strip()
        if ideal not in ("0", "1") or not user.strip():
            raise ValueError(f"{Path(path).name}: sample {index} has answer {ideal!r} (expected 0 or 1) or no description")
        texts.append(_LONG_DECIMAL.sub(r"\1", user.strip()))
        labels.append(int(ideal))
    return texts, np.asarray(labels, dtype=np.int64)


# -- sampling -----------------------------------------------------------------------------------------

def subsample(items: Sequence, size: int | None, seed: int) -> list:
    """`size` items drawn without replacement with `seed`, in their original order (all when size is None).

    Raises:
        ValueError: fewer items than `size`.

    Example:
        >>> subsample(list("abcdef"), 3, seed=0) == subsample(list("abcdef"), 3, seed=0)
        True
        >>> subsample(list("ab"), 3, seed=0)
        Traceback (most recent call last):
        ...
        ValueError: asked for 3 items but only 2 are available; lower the size (at most 2)
    """
    if size is None:
        return list(items)
    if size > len(items):
        raise ValueError(f"asked for {size} items but only {len(items)} are available; lower the size (at most {len(items)})")
    chosen = np.sort(np.random.default_rng(seed).permutation(len(items))[:size])
    return [items[i] for i in chosen]
