"""The causal-LM track through the runner, the cache and the report: tiny Llama on the generated `toy-lm`."""

from __future__ import annotations

import json

import pytest

from saftune.data.base import Split
from saftune.data.llm import LMBenchmark, MultipleChoiceItem, SFTExample
from saftune.eval.cache import EvaluationCache
from saftune.eval.lm import as_asked, evaluate_lm
from saftune.eval.multiple_choice import score_multiple_choice
from saftune.models.tiny_lm import tiny_causal_lm
from saftune.report import aggregate, format_markdown
from saftune.run import RunCache, RunConfig, run_experiment
from saftune.train.checkpoint import find_checkpoint
from saftune.train.trainer import TrainConfig


def _config(method: str, **options) -> RunConfig:
    return RunConfig(model="tiny-llama", dataset="toy-lm", method=method, method_options=options,
                     train=TrainConfig(epochs=2, batch_size=4), eval_batch_size=8)


def test_a_run_reports_speciality_each_probe_and_their_mean(tmp_path):
    record = run_experiment(_config("ft", lr=1e-3), tmp_path / "ft")
    metrics = record.metrics
    assert {"val", "id", "ood/letters", "ood/counting", "acc/letters", "acc/counting", "ood_avg"} <= set(metrics)
    assert metrics["ood_avg"] == pytest.approx((metrics["ood/letters"] + metrics["ood/counting"]) / 2)
    assert record.benchmark["modality"] == "causal-lm" and record.benchmark["letters"] == 8
    assert record.trainable == record.total_params  # full fine-tuning of a tied model: every parameter once
    saved = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert saved["metrics"] == metrics


def test_speciality_items_are_asked_through_the_chat_template_like_the_training_pairs():
    lm = tiny_causal_lm("llama", chat_template=True)
    item = MultipleChoiceItem("Is 'good' positive?", ("yes", "no"), gold=0, delimiter="")
    asked = as_asked(lm, [item])[0]
    assert asked.context == lm.format_prompt(item.context)
    # the scored continuation of the gold option is exactly the start of the answer the model is trained on
    assert lm.format_answer(item.context, "yes").startswith(asked.delimiter + asked.options[0])
    assert as_asked(tiny_causal_lm("llama"), [item])[0] == item  # no template: asked as given


def test_evaluation_scores_come_from_the_cache_for_the_same_weights():
    lm = tiny_causal_lm("llama")
    probe = [MultipleChoiceItem(f"Question: {k} plus one?\nAnswer:", (str(k + 1), str(k + 2)), 0) for k in range(4)]
    item = MultipleChoiceItem("Is 'bad' positive?", ("yes", "no"), gold=1, delimiter="")
    bench = LMBenchmark("t", Split("t/train", [SFTExample("q", "a")], [0]), [item], [item], {"plus": probe})
    cache = EvaluationCache()
    first = evaluate_lm(lm, bench, cache=cache)
    assert first["ood/plus"] == score_multiple_choice(lm, probe).acc_norm
    assert evaluate_lm(lm, bench, cache=cache) == first and cache.hits == 2  # test set and probe
    with __import__("torch").no_grad():
        lm.lm.get_input_embeddings().weight.add_(0.5)
    evaluate_lm(lm, bench, cache=cache)
    assert cache.hits == 2  # new weights: scored again


def test_report_of_an_lm_grid_shows_gains_over_zero_shot_paired_by_seed(tmp_path):
    cache = RunCache()
    records = [run_experiment(_config(m, **({"lr": 3e-3} if m != "zeroshot" else {})).replace(seed=seed),
                              cache=cache).to_dict()
               for m in ("zeroshot", "ft") for seed in (1, 2)]
    for r in records:
        r["variant"] = r["method"]
    table = aggregate(records)[0]
    assert table["suite"] == "speciality-generality"
    zero = {r["seed"]: r["metrics"] for r in records if r["method"] == "zeroshot"}
    tuned = [r for r in records if r["method"] == "ft"]
    expected = [r["metrics"]["ood_avg"] - zero[r["seed"]]["ood_avg"] for r in tuned]
    row = next(row for row in table["rows"] if row["label"] == "ft")
    assert row["metrics"]["gain/ood_avg"]["values"] == pytest.approx(expected)
    assert row["metrics"]["gain/id"]["values"] == pytest.approx(
        [r["metrics"]["id"] - zero[r["seed"]]["id"] for r in tuned])
    text = format_markdown([table])
    assert "Speciality" in text and "Δ Generality" in text and "Top-1" not in text


def test_a_sentence_encoder_on_an_lm_benchmark_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="causal-lm"):
        run_experiment(RunConfig(model="tiny-sentence", dataset="toy-lm", method="zeroshot"), tmp_path)


class _Killed(BaseException):
    """Stands for the process dying mid-training (not an Exception: nothing catches it)."""


@pytest.mark.parametrize("method, options", [("saft", {"lr": 1e-2, "sparsity": 0.01}), ("kd", {"lr": 1e-3})])
def test_an_lm_run_stopped_mid_training_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch, method, options):
    def config():
        return RunConfig(model="tiny-llama", dataset="toy-lm", method=method, method_options=options,
                         train=TrainConfig(epochs=3, batch_size=4, checkpoint_every=2), eval_batch_size=8)

    clean = run_experiment(config(), tmp_path / "clean")
    from saftune.methods.base import method_class

    cls = method_class(method)
    real = cls.after_step

    def dies_at_step_7(self, model, step, total_steps):
        if step == 7:
            raise _Killed
        return real(self, model, step, total_steps)

    monkeypatch.setattr(cls, "after_step", dies_at_step_7)
    with pytest.raises(_Killed):
        run_experiment(config(), tmp_path / "killed")
    monkeypatch.setattr(cls, "after_step", real)
    checkpoint = find_checkpoint(tmp_path / "killed")
    assert json.loads((checkpoint / "trainer.json").read_text())["step"] == 6  # what the second attempt resumes from
    resumed = run_experiment(config(), tmp_path / "killed")
    assert resumed.steps == clean.steps == 12
    assert resumed.metrics == clean.metrics
    clean_log = [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                 for line in (tmp_path / "clean" / "log.jsonl").read_text().splitlines()]
    killed_log = [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                  for line in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()]
    assert killed_log == clean_log  # the same losses at every step, each logged once


def test_per_layer_averaging_reaches_the_record_the_table_rows_and_the_plot(tmp_path):
    from saftune.report.plots import plot_id_vs_ood

    record = run_experiment(_config("wiseft", lr=3e-3, alphas=[0.0, 1.0], layer_alphas=[[0.0, 1.0], [1.0, 0.0]]))
    assert [p["layer_alphas"] for p in record.wiseft_layer_curve] == [[0.0, 1.0], [1.0, 0.0]]
    row = aggregate([{**record.to_dict(), "variant": "wiseft"}])[0]["rows"][0]
    assert row["wiseft_layer_curve"][1]["ood_avg"] == pytest.approx(record.wiseft_layer_curve[1]["ood_avg"])
    table = aggregate([{**record.to_dict(), "variant": "wiseft"}])[0]
    assert plot_id_vs_ood(table, tmp_path / "plot.png").stat().st_size > 0


def test_instruction_following_is_a_generality_set_scored_once_per_weights():
    from saftune.data.registry import load_dataset

    bench = load_dataset("toy-lm", instructions=6)
    lm, cache = tiny_causal_lm("llama", context=512), EvaluationCache()  # byte tokens: prompts are long
    metrics = evaluate_lm(lm, bench, cache=cache)
    assert {"ood/instructions", "instructions/loose", "instructions/strict_instruction"} <= set(metrics)
    assert metrics["ood_avg"] == pytest.approx(
        (metrics["ood/letters"] + metrics["ood/counting"] + metrics["ood/instructions"]) / 3)
    # the test set, the two probes and the instruction set (generation is the slow part) all come back from the cache
    assert evaluate_lm(lm, bench, cache=cache) == metrics and cache.hits == 4 and len(cache) == 4
