"""`med-generality`: fine-tune a causal LM on a medical prediction task, measure what it forgets.

The speciality-vs-generality protocol of Lin et al. (arXiv 2309.06256), sized for SmolLM2-135M-Instruct
on a CPU. All data is offline (the `openai-evals` and `bigbench` assets).

Speciality: heart-disease (default) or diabetes, from OpenAI evals: a patient described by tabular
health indicators, asked as a yes/no question (`health_prompt`). Training pairs are (prompt, "yes"/"no");
validation and test items are the same prompts with the options ("yes", "no"), scored as the answer
after the chat-formatted prompt (`saftune.eval.lm.as_asked`), so chance is 0.5. Splits:

* test: `test_size` items, half per class, chosen once with a constant seed (independent of `seed`);
* validation and training from the rest, per class with the run `seed` (`few_shot`): `val_size / 2`
  and `shots` per class (None: the whole rest of the pool, unbalanced as the pool is);
* diabetes descriptions repeat (288k samples, 144k distinct texts, some with both labels): a text is kept
  once, with its majority label (ties dropped), so no text is in two splits.

Instruction following (`instructions` prompts of saftune's own 200, greedy answers of at most
`max_new_tokens` tokens, `saftune.eval.instruction_following`) is the other half of generality; its strict
prompt-level accuracy is averaged with the probes.

Generality probes: zero-shot multiple choice, ``"Question: ...\\nAnswer:"`` + option, `acc_norm`
reported (lm-evaluation-harness' length-normalised accuracy). `probe_size` items per probe (all when a
probe has fewer) are drawn once with a constant seed. A probe is kept in the default set only when
SmolLM2-135M-Instruct scores clearly above chance on it: a probe the model cannot answer zero-shot
cannot show forgetting, it only adds noise to the generality average.

Measured zero-shot (SmolLM2-135M-Instruct, fp32, CPU; n items drawn with seed 1234 -- 200, or all
when fewer, or 100 where marked * for lack of time; chance = mean of 1/options). Kept when acc_norm is at
least 5 points above chance (with n = 200 one standard error of an accuracy near 0.4 is 3.5 points, so 5
points is about 1.5 standard errors; below it the probe cannot tell "forgot" from noise) *and* acc is not
below chance (else the acc_norm gain only says that the gold option tends to be the longer one).

    ==================  ====  ======  =====  ========  ====
    probe                  n  chance    acc  acc_norm  kept
    ==================  ====  ======  =====  ========  ====
    general_knowledge     69   0.144  0.449     0.319  yes
    social_iqa           200   0.334  0.370     0.410  yes
    strategyqa           200   0.500  0.565     0.545  no
    winowhy              200   0.500  0.440     0.545  no
    misconceptions       200   0.500  0.520     0.530  no
    quartz (evals)       200   0.500  0.535     0.500  no
    physical_intuition    81   0.255  0.259     0.210  no
    medmcqa (evals)      100*  0.250  0.230     0.330  no (1)
    hhh_alignment        100*  0.500  0.400     0.700  no (1)
    truthful_qa (mc)     100*  0.259  0.200     0.270  no
    ==================  ====  ======  =====  ========  ====

(1) acc_norm above chance but acc below it: the gain comes from the length normalisation (the gold
option tends to be the longer one), not from knowledge; MedMCQA is also medical, next to the speciality
rather than general. Every probe in `PROBES` can still be chosen by name (``probes=...``);
medication_dose and timedial were not measured (too slow on a shared 2-core machine in the time given).

Speciality, measured on the same model (default options, seed 0: 400 training pairs, the 200 test
items): heart-disease zero-shot accuracy 0.500 (it answers "no" to every item); after full fine-tuning
(`ft`, lr 1e-4, batch 8, 60 steps = 1.2 epochs, 6 warmup steps, cosine) 0.820 (54% "yes"), +32 points:
learnable in well under 100 steps. Cost on 2 AVX2 cores (2 threads, load average ~1.8): 7.5 s per
training step (batch 8, ~105 tokens per pair with the chat template), 48 s per 100 speciality items
scored (2 options each). MedMCQA was not tried as a speciality (300 items, no training split of its own).

Example:
    >>> bench = load_dataset("med-generality", shots=8, val_size=20, test_size=40, probe_size=30)  # doctest: +SKIP
    >>> len(bench.train), len(bench.val), len(bench.test), sorted(bench.probes)  # doctest: +SKIP
    (16, 20, 40, ['general_knowledge', 'social_iqa'])
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from saftune._io import did_you_mean
from saftune.assets import BIGBENCH_TASKS, asset_path, evals_file
from saftune.config import Config, option
from saftune.data.base import Split
from saftune.data.embedded.sampling import few_shot, fixed_balanced
from saftune.data.llm.benchmark import LMBenchmark
from saftune.data.llm.instructions import instruction_prompts
from saftune.data.llm.multiple_choice import MultipleChoiceItem
from saftune.data.llm.sft import SFTExample
from saftune.data.llm.sources import Parsed, read_bigbench, read_bigbench_tasks, read_evals_health, read_evals_mcq, subsample
from saftune.data.registry import register_dataset

EVAL_SEED = 1234  # constant: the test set and the probe subsets never depend on the run seed
ANSWERS = ("no", "yes")  # label 0, label 1

# The yes/no question asked after a patient's description.
HEALTH_QUESTIONS = {
    "heart-disease": "Does this patient have heart disease? Answer yes or no.",
    "diabetes": "Is this patient likely to have diabetes or prediabetes? Answer yes or no.",
}

# Generality probe candidates: name -> (asset, task). BIG-bench tasks are read from their task.json
# (`BIGBENCH_TASKS`), the evals ones by `read_evals_mcq`.
PROBES = {
    **{task: ("bigbench", task) for task in BIGBENCH_TASKS},
    "quartz": ("openai-evals", "quartz"),
    "medmcqa": ("openai-evals", "medmcqa"),
    "medication_dose": ("openai-evals", "medication_dose"),
}
PROBE_SOURCES = {
    "bigbench": "PyPI sdist bigbench==1.0.0, benchmark_tasks (Apache-2.0 per the BIG-bench repository; the sdist has no licence file)",
    "openai-evals": "PyPI evals==3.0.1.post1 (MIT), evals/registry/data",
}
# Kept by default: clearly above chance zero-shot (see the table above).
DEFAULT_PROBES = ("social_iqa", "general_knowledge")


# Heart-disease descriptions spell out every field with its unit ("Resting blood pressure: 140 mm Hg");
# SmolLM2's tokenizer splits numbers into digits, so the full text is ~110 tokens. The short names below
# keep every value and cut that to ~75 tokens (~105 with the chat template).
HEART_FIELDS = {
    "Age": "age", "Sex": "sex", "Chest pain type": "chest pain", "Resting blood pressure": "resting BP",
    "Serum cholesterol": "cholesterol", "Fasting blood sugar": "fasting sugar", "Resting ECG results": "ECG",
    "Max heart rate achieved": "max HR", "Exercise induced angina": "exercise angina", "Oldpeak": "ST depression",
    "ST Slope": "ST slope",
}
_UNITS = (" years", " mm Hg", " mg/dl")


def compact_heart(description: str) -> str:
    """A heart-disease description with short field names and no units (unknown fields kept as they are).

    Example:
        >>> compact_heart("Age: 40 years, Sex: Male, Resting blood pressure: 140 mm Hg, Oldpeak: 0, ST Slope: Upsloping")
        'age 40, sex male, resting BP 140, ST depression 0, ST slope upsloping'
    """
    parts = []
    for part in description.split(", "):
        key, sep, value = part.partition(": ")
        if not sep or key not in HEART_FIELDS:
            parts.append(part)
            continue
        for unit in _UNITS:
            value = value.removesuffix(unit)
        parts.append(f"{HEART_FIELDS[key]} {value if value.startswith('ST') else value.lower()}")
    return ", ".join(parts)


def health_prompt(task: str, description: str) -> str:
    """The question asked about one patient (heart-disease descriptions shortened by `compact_heart`).

    Example:
        >>> print(health_prompt("heart-disease", "Age: 40 years, Sex: Male"))
        Patient: age 40, sex male.
        Does this patient have heart disease? Answer yes or no.
    """
    if task == "heart-disease":
        description = compact_heart(description)
    return f"Patient: {description.rstrip('. ')}.\n{HEALTH_QUESTIONS[task]}"


def load_probe(name: str, size: int | None = None, *, seed: int = EVAL_SEED) -> list[MultipleChoiceItem]:
    """The items of a generality probe (from the fetched assets), `size` of them drawn with `seed`.

    Args:
        name: a name from `PROBES`.
        size: items to keep; None or more than the probe has: all of them.
        seed: the subsampling seed (default: the benchmark's constant one).
    """
    check_probe_names([name])
    asset, task = PROBES[name]
    root = asset_path(asset)
    if asset == "bigbench":
        names = BIGBENCH_TASKS[task]
        files = [root / task / n for n in names if len(names) == 1 or n != "task.json"]  # a parent task.json lists subtasks
        parsed: Parsed = read_bigbench(files[0], task) if len(files) == 1 else read_bigbench_tasks(files, task)
    else:
        parsed = read_evals_mcq(root / evals_file(task), task)
    items = parsed.items
    return items if size is None or size >= len(items) else subsample(items, size, seed)


def check_probe_names(names) -> None:
    """Refuse unknown probe names, suggesting the closest known one."""
    for name in names:
        if name not in PROBES:
            hint = did_you_mean(name, PROBES)
            raise ValueError(f"unknown probe {name!r}.{hint} Known probes: {', '.join(PROBES)}")


def load_health(task: str) -> tuple[list[str], np.ndarray]:
    """Distinct patient descriptions of an evals health task and their labels (majority label; ties dropped)."""
    if task not in HEALTH_QUESTIONS:
        raise ValueError(f"unknown speciality task {task!r}; known: {', '.join(HEALTH_QUESTIONS)}")
    texts, labels = read_evals_health(asset_path("openai-evals") / evals_file(task))
    return dedupe_majority(texts, labels)


def dedupe_majority(texts: list[str], labels: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Each distinct text once, in first-seen order, with its majority label; texts whose labels tie are dropped.

    Example:
        >>> dedupe_majority(["a", "b", "a", "c", "c"], np.array([1, 0, 1, 0, 1]))
        (['a', 'b'], array([1, 0]))
    """
    votes: dict[str, Counter] = {}
    for text, label in zip(texts, labels):
        votes.setdefault(text, Counter())[int(label)] += 1
    kept, out = [], []
    for text, count in votes.items():
        (top, n), *rest = count.most_common()
        if not rest or rest[0][1] < n:
            kept.append(text)
            out.append(top)
    return kept, np.asarray(out, dtype=np.int64)


def speciality_splits(task: str, texts: list[str], labels: np.ndarray, *, shots: int | None, val_size: int,
                      test_size: int, seed: int) -> tuple[Split, list[MultipleChoiceItem], list[MultipleChoiceItem]]:
    """(training pairs, validation items, test items) of a yes/no health task (see the module docstring).

    Example:
        >>> texts = [f"Age: {a} years" for a in range(40)]
        >>> train, val, test = speciality_splits("heart-disease", texts, np.arange(40) % 2, shots=3, val_size=4,
        ...                                      test_size=10, seed=0)
        >>> len(train), [i.gold for i in test].count(1), train.inputs[0].answer in ("yes", "no")
        (6, 5, True)
    """
    labels = np.asarray(labels)
    for name, size in (("val_size", val_size), ("test_size", test_size)):
        if size < 2 or size % 2:
            raise ValueError(f"{name} must be even and at least 2 (half per answer) so chance is 0.5; got {size}")
    counts = np.bincount(labels, minlength=2)
    need = test_size // 2 + val_size // 2 + (shots or 1)
    if counts.min() < need:
        raise ValueError(f"{task}: the smaller class has {counts.min()} examples, too few for test_size={test_size}, "
                         f"val_size={val_size} and shots={shots} (needs {need} per class); lower them")
    test = fixed_balanced(labels, test_size // 2, EVAL_SEED)
    pool = np.setdiff1d(np.arange(len(labels)), test)
    train, val = few_shot(labels[pool], shots, val_size // 2, seed, num_classes=2)
    train, val = pool[train], pool[val]
    # Shuffle the training order once (few_shot returns sorted indices; the trainer shuffles again per epoch).
    train = train[np.random.default_rng(seed).permutation(len(train))]

    def items(indices, role):
        return [MultipleChoiceItem(health_prompt(task, texts[i]), ANSWERS, int(labels[i]), id=f"{task}/{role}/{i}",
                                   delimiter="") for i in indices]

    pairs = [SFTExample(health_prompt(task, texts[i]), ANSWERS[labels[i]]) for i in train]
    return Split(f"{task}/train", pairs, labels[train].tolist()), items(val, "val"), items(test, "test")


@dataclass
class MedGeneralityOptions(Config):
    task: str = option("heart-disease", "speciality task (OpenAI evals, tabular health -> yes/no)",
                       choices=tuple(HEALTH_QUESTIONS))
    shots: int | None = option(200, "training pairs per answer (yes / no); None: the whole pool", low=1)
    val_size: int = option(100, "validation items, half per answer", low=2)
    test_size: int = option(200, "test items, half per answer (fixed, independent of seed)", low=2)
    probe_size: int | None = option(200, "items per generality probe (all when a probe has fewer; None: all)", low=1)
    probes: list[str] = option(default_factory=lambda: list(DEFAULT_PROBES),
                               help="generality probes (comma-separated); default: those SmolLM2 beats chance on")
    seed: int = option(0, "seed of the training and validation draw", low=0)
    instructions: int = option(100, "instruction-following prompts (of 200, a fixed subsample; 0: not measured)",
                               low=0, high=200)
    max_new_tokens: int = option(64, "answer length limit of instruction-following generation (greedy)", low=1)

    def __post_init__(self):
        super().__post_init__()
        check_probe_names(self.probes)
        if not self.probes:
            raise ValueError("MedGeneralityOptions.probes is empty; name at least one generality probe")


@register_dataset("med-generality", "causal LM: heart-disease / diabetes yes-no speciality (OpenAI evals) vs "
                  "common-sense probes (BIG-bench); needs the openai-evals and bigbench assets",
                  options=MedGeneralityOptions)
def build_med_generality(options: MedGeneralityOptions) -> LMBenchmark:
    texts, labels = load_health(options.task)
    train, val, test = speciality_splits(options.task, texts, labels, shots=options.shots, val_size=options.val_size,
                                         test_size=options.test_size, seed=options.seed)
    probes = {name: load_probe(name, options.probe_size) for name in options.probes}
    info = {
        "speciality": {"task": options.task, "source": PROBE_SOURCES["openai-evals"],
                       "chance": 0.5, "pool": len(texts), "pool_positive": int(labels.sum())},
        "probes": {name: {"source": PROBE_SOURCES[PROBES[name][0]], "n": len(items),
                          "chance": round(float(np.mean([1 / len(i.options) for i in items])), 4)}
                   for name, items in probes.items()},
        "options": options.to_dict(),
    }
    instructions = instruction_prompts(options.instructions) if options.instructions else []
    if instructions:
        info["instructions"] = {"n": len(instructions), "max_new_tokens": options.max_new_tokens,
                                "measure": "strict prompt-level accuracy (saftune.eval.instruction_following)"}
    bench = LMBenchmark("med-generality", train=train, val=val, test=test, probes=probes, instructions=instructions,
                        max_new_tokens=options.max_new_tokens, info=info)
    bench.validate()
    return bench
