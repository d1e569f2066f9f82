"""Causal-LM task data: the BIG-bench and OpenAI-evals readers, sampling, and the `med-generality` dataset.

Fast tests read the small fixture files in tests/data/llm (same formats as the real assets); the one slow
test (`-m "assets and slow"`) scores a real probe with SmolLM2-135M-Instruct.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from saftune.assets import ASSETS, BIGBENCH_TASKS, MARKER, evals_file
from saftune.data.llm import LMBenchmark, SFTExample
from saftune.data.llm.med_generality import (
    EVAL_SEED,
    MedGeneralityOptions,
    compact_heart,
    dedupe_majority,
    health_prompt,
    speciality_splits,
)
from saftune.data.llm.sources import read_bigbench, read_bigbench_tasks, read_evals_health, read_evals_mcq, subsample
from saftune.data.registry import dataset_config, list_datasets, load_dataset

DATA = Path(__file__).parent / "data" / "llm"


# -- BIG-bench ------------------------------------------------------------------------------------------

def test_bigbench_gold_is_the_highest_target_score_and_malformed_examples_are_counted():
    parsed = read_bigbench(DATA / "bigbench" / "toy_task" / "task.json", "toy")
    assert [(i.context, i.options, i.gold) for i in parsed.items] == [
        ("Question: How many legs does a cat have?\nAnswer:", ("two", "four", "six"), 1),
        ("Question: Which is a colour?\nAnswer:", ("red", "loud"), 0),          # options and input stripped
        ("Question: Partial credit: which is closest to 3.14?\nAnswer:", ("3", "3.1", "4"), 1),  # max of graded scores
    ]
    assert [i.id for i in parsed.items] == ["toy/0", "toy/1", "toy/2"]
    assert parsed.skipped == {"shared highest score": 1, "fewer than 2, empty or repeated options": 2,
                              "no input or target_scores": 2}
    assert parsed.items[0].requests()[1] == ("Question: How many legs does a cat have?\nAnswer:", " four")


def test_bigbench_statement_tasks_are_asked_as_questions(tmp_path):
    path = tmp_path / "task.json"
    path.write_text(json.dumps({"examples": [{"input": "Bats are blind.", "target_scores": {"T": 0, "F": 1}}]}))
    item = read_bigbench(path, "misconceptions").items[0]
    assert item.context == "Question: Is the following statement true or false? Bats are blind.\nAnswer:"
    assert item.options == ("True", "False") and item.gold == 1


def test_bigbench_subtasks_are_merged_with_unique_ids():
    root = DATA / "bigbench" / "hhh"
    parsed = read_bigbench_tasks([root / "helpful" / "task.json", root / "honest" / "task.json"], "hhh_alignment")
    assert [i.id for i in parsed.items] == ["hhh_alignment/helpful/0", "hhh_alignment/honest/0", "hhh_alignment/honest/1"]
    assert all(i.gold == 0 for i in parsed.items)


def test_a_file_that_is_not_a_bigbench_task_is_refused(tmp_path):
    path = tmp_path / "task.json"
    path.write_text(json.dumps({"name": "x"}))
    with pytest.raises(ValueError, match="not a BIG-bench task file"):
        read_bigbench(path, "x")


# -- OpenAI evals ---------------------------------------------------------------------------------------

def test_medmcqa_options_and_gold_from_the_letter_of_the_ideal_answer():
    parsed = read_evals_mcq(DATA / "evals" / "medmcqa.jsonl", "medmcqa")
    assert [(i.context, i.options, i.gold) for i in parsed.items] == [
        ("Question: Which bone is in the upper arm?\nAnswer:", ("Femur", "Humerus", "Tibia", "Fibula"), 1),
        ("Question: Normal resting heart rate in adults:\nAnswer:", ("20-30", "60-100", "150-200", "250-300"), 1),
    ]
    assert parsed.skipped == {"options or answer not found": 1, "fewer than 2, empty or repeated options": 1}


def test_quartz_and_medication_dose_items():
    quartz = read_evals_mcq(DATA / "evals" / "quartz.jsonl", "quartz").items
    assert [(i.options, i.gold) for i in quartz] == [(("increases", "decreases"), 0), (("louder", "quieter"), 1)]
    assert quartz[0].context == "Question: Eric adds more resistors to the series circuit. The resistance\nAnswer:"
    dose = read_evals_mcq(DATA / "evals" / "medication_dose.jsonl", "medication_dose").items[0]
    assert dose.options == ("Metronidazole", "Levofloxacin", "Famotidine") and dose.gold == 1
    assert "Levofloxacin 750 mcg" in dose.context


def test_unknown_evals_task_is_refused():
    with pytest.raises(ValueError, match="no multiple-choice reader for evals task 'heart'"):
        read_evals_mcq(DATA / "evals" / "quartz.jsonl", "heart")


def test_health_tasks_read_descriptions_and_labels():
    texts, labels = read_evals_health(DATA / "evals" / "heart-disease.jsonl")
    assert len(texts) == 24 and labels.tolist() == [i % 2 for i in range(24)]
    assert texts[0].startswith("Age: 35 years, Sex: Female")
    with pytest.raises(ValueError, match=r"sample 0 has answer 'maybe' \(expected 0 or 1\)"):
        read_evals_health(DATA / "evals" / "bad_answer.jsonl")


def test_repeated_descriptions_keep_their_majority_label_and_ties_are_dropped():
    texts, labels = read_evals_health(DATA / "evals" / "diabetes.jsonl")
    assert texts[0] == "Age: Age 58.0 to 62.0, BMI:23.49, Is hypertensive."  # float noise rounded
    kept, kept_labels = dedupe_majority(texts, labels)
    assert kept == [texts[0]] and kept_labels.tolist() == [1]


def test_health_prompts_are_short_questions_with_every_value():
    text = ("Age: 40 years, Sex: Male, Chest pain type: Atypical Angina, Resting blood pressure: 140 mm Hg, "
            "Serum cholesterol: 289 mg/dl, Fasting blood sugar: <= 120 mg/dl, ST Slope: Upsloping")
    assert compact_heart(text) == ("age 40, sex male, chest pain atypical angina, resting BP 140, cholesterol 289, "
                                   "fasting sugar <= 120, ST slope upsloping")
    prompt = health_prompt("diabetes", "BMI:31.57, Is hypertensive.")
    assert prompt == "Patient: BMI:31.57, Is hypertensive.\nIs this patient likely to have diabetes or prediabetes? Answer yes or no."


# -- sampling and splits --------------------------------------------------------------------------------

def test_subsample_is_deterministic_keeps_order_and_refuses_too_large_sizes():
    items = list(range(100))
    a, b = subsample(items, 10, seed=3), subsample(items, 10, seed=3)
    assert a == b and a == sorted(a) and subsample(items, 10, seed=4) != a
    assert subsample(items, None, seed=0) == items
    with pytest.raises(ValueError, match="asked for 101 items but only 100"):
        subsample(items, 101, seed=0)


def _health():
    return read_evals_health(DATA / "evals" / "heart-disease.jsonl")


def test_speciality_splits_are_balanced_disjoint_and_the_test_set_ignores_the_seed():
    texts, labels = _health()
    runs = [speciality_splits("heart-disease", texts, labels, shots=3, val_size=4, test_size=10, seed=s) for s in (0, 0, 1)]
    train, val, test = runs[0]
    assert len(train) == 6 and all(isinstance(x, SFTExample) for x in train.inputs)
    assert sorted(x.answer for x in train.inputs) == ["no"] * 3 + ["yes"] * 3
    assert [i.gold for i in val].count(1) == 2 and [i.gold for i in test].count(1) == 5  # chance is 0.5
    assert all(i.options == ("no", "yes") and i.delimiter == "" for i in val + test)
    prompts = [x.prompt for x in train.inputs], [i.context for i in val], [i.context for i in test]
    assert not (set(prompts[0]) & set(prompts[1]) or set(prompts[0]) & set(prompts[2]) or set(prompts[1]) & set(prompts[2]))
    # labels match the answers; the same seed gives the same split, another seed the same test set only
    assert [("no", "yes")[y] for y in train.labels] == [x.answer for x in train.inputs]
    assert [x.prompt for x in runs[1][0].inputs] == prompts[0]
    assert [i.context for i in runs[2][2]] == prompts[2] and [x.prompt for x in runs[2][0].inputs] != prompts[0]


def test_speciality_splits_refuse_bad_sizes():
    texts, labels = _health()
    with pytest.raises(ValueError, match="test_size must be even"):
        speciality_splits("heart-disease", texts, labels, shots=3, val_size=4, test_size=9, seed=0)
    with pytest.raises(ValueError, match="the smaller class has 12 examples, too few"):
        speciality_splits("heart-disease", texts, labels, shots=10, val_size=4, test_size=10, seed=0)


# -- the registered dataset -----------------------------------------------------------------------------

def _fake_assets(home: Path) -> None:
    """A cache holding fixture files where the real assets keep theirs, marked complete."""
    evals, bigbench = home / "openai-evals", home / "bigbench"
    for task in ("heart-disease", "diabetes"):
        target = evals / evals_file(task)
        target.parent.mkdir(parents=True)
        if target.suffix == ".gz":
            import gzip
            target.write_bytes(gzip.compress((DATA / "evals" / f"{task}.jsonl").read_bytes()))
        else:
            shutil.copy(DATA / "evals" / f"{task}.jsonl", target)
    for task, names in BIGBENCH_TASKS.items():
        for name in names:
            (bigbench / task / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(DATA / "bigbench" / "toy_task" / "task.json", bigbench / task / name)
    for name, directory in (("openai-evals", evals), ("bigbench", bigbench)):
        (directory / MARKER).write_text(json.dumps({"name": name, "sha256": ASSETS[name].sha256}))


def test_med_generality_builds_an_lm_benchmark_from_the_cache(monkeypatch, tmp_path):
    _fake_assets(tmp_path)
    monkeypatch.setenv("SAFTUNE_HOME", str(tmp_path))
    assert "med-generality" in list_datasets()
    bench = load_dataset("med-generality", shots=3, val_size=4, test_size=10, probe_size=2,
                         probes="social_iqa,hhh_alignment", seed=1)
    assert isinstance(bench, LMBenchmark) and len(bench.instructions) == 100 and bench.max_new_tokens == 64
    assert (len(bench.train), len(bench.val), len(bench.test)) == (6, 4, 10)
    assert sorted(bench.probes) == ["hhh_alignment", "social_iqa"]
    assert len(bench.probes["social_iqa"]) == 2 and len(bench.probes["hhh_alignment"]) == 2  # 3 or 12 parsed, 2 drawn
    assert bench.info["speciality"]["chance"] == 0.5 and bench.info["probes"]["social_iqa"]["n"] == 2
    assert sorted(bench.eval_sizes().values()) == [2, 2, 10, 100]
    none = load_dataset("med-generality", shots=3, val_size=4, test_size=10, probe_size=2, probes="social_iqa",
                        instructions=0)
    assert none.instructions == [] and "instructions" not in none.info
    again = load_dataset("med-generality", shots=3, val_size=4, test_size=10, probe_size=2,
                         probes="social_iqa,hhh_alignment", seed=2)
    assert [i.id for i in again.probes["social_iqa"]] == [i.id for i in bench.probes["social_iqa"]]  # fixed seed
    assert [i.context for i in again.test] == [i.context for i in bench.test]


def test_med_generality_options_are_checked_before_reading_anything():
    with pytest.raises(ValueError, match="unknown probe 'social_iq'. Did you mean 'social_iqa'"):
        dataset_config("med-generality", {"probes": "social_iq"})
    with pytest.raises(ValueError, match="task = 'cancer' is not allowed"):
        dataset_config("med-generality", {"task": "cancer"})
    with pytest.raises(ValueError, match="unknown option 'shot'.*did you mean 'shots'"):
        dataset_config("med-generality", {"shot": 4})
    with pytest.raises(ValueError, match="probes is empty"):
        MedGeneralityOptions(probes=[])
    assert dataset_config("med-generality").probes == list(MedGeneralityOptions().probes)
    assert EVAL_SEED == 1234


def test_med_generality_asks_for_the_assets_when_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("SAFTUNE_HOME", str(tmp_path))
    with pytest.raises(Exception, match="saftune fetch openai-evals"):
        load_dataset("med-generality")


# -- the real model -------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.assets
def test_smollm2_beats_chance_on_a_kept_probe(require_asset):
    pytest.importorskip("gguf", reason="GGUF loading needs the llm extra: pip install 'saftune[llm]'")
    from saftune.data.llm.med_generality import load_probe
    from saftune.eval.multiple_choice import score_multiple_choice
    from saftune.models import create

    for name in ("smollm2", "bigbench"):
        require_asset(name)
    items = load_probe("social_iqa", 200)  # the measured set: acc_norm 0.410, chance 0.334
    result = score_multiple_choice(create("smollm2"), items, batch_size=16)
    chance = float(np.mean([1 / len(i.options) for i in items]))
    assert result.acc_norm >= chance + 0.05, (result.acc_norm, chance)
