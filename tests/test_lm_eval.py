"""lm-evaluation-harness on saftune causal LMs: a local JSON task, item-by-item agreement with saftune's scorer, the CLI.

Everything is offline: the task is a YAML file beside a generated .jsonl, the model a tiny random Llama
with the byte tokenizer. Tests that run the harness skip where the `lm-eval` extra is not installed.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
import yaml

from saftune.cli import main
from saftune.data.llm import MultipleChoiceItem
from saftune.eval.multiple_choice import score_multiple_choice
from saftune.models.tiny_lm import tiny_causal_lm

TASK = "saftune_toy_mc"

# Short enough for the tiny model's 64-token window (one token per byte), so nothing is truncated. They
# cover what tokenization and batching can get wrong: a context ending in spaces or a newline (moved to
# the continuation), one-token options (the harness shares their forward pass), options that differ only
# in their last token (saftune shares those), multi-byte UTF-8, 2 to 4 options, options of unequal length
# (acc and acc_norm can disagree).
ITEMS = [
    ("Question: 2 + 2 =\nAnswer:", ["4", "5", "22"], 0),
    ("Sky colour:", ["blue", "green", "a deep purple"], 0),
    ("Is fire cold? ", ["yes", "no"], 1),
    ("Pick a letter:\n", ["a", "b", "c", "d"], 2),
    ("The cat sat on the", ["mat", "map", "man"], 0),
    ("Café is spelt with", ["é", "e", "è"], 0),
    ("Count: one, two,", ["three", "four", "thirty-three"], 0),
    ("x", ["ab", "ac"], 1),
    ("Q: opposite of up?  ", ["down", "sideways", "d"], 0),
    ("Über means", ["over", "under"], 0),
    ("Tea or coffee?", ["tea", "coffee", "neither of the two"], 2),
    ("1, 2, 3,", ["4", "5"], 0),
]


def _task_folder(tmp_path, items=ITEMS, name=TASK):
    """A folder with `name`.yaml: a multiple-choice task over a local .jsonl of `items`."""
    folder = tmp_path / "tasks"
    folder.mkdir(exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "gold": g}) + "\n" for q, c, g in items))
    task = {"task": name, "dataset_path": "json",
            # cache_dir keeps the datasets library's cache of the file inside the test's folder
            "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(tmp_path / "hf-datasets")},
            "test_split": "test", "output_type": "multiple_choice",
            "doc_to_text": "{{question}}", "doc_to_choice": "choices", "doc_to_target": "gold",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(task, sort_keys=False))
    return folder


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return pytest.importorskip("lm_eval")


def _saftune_items(items=ITEMS):
    return [MultipleChoiceItem(q, tuple(c), g, id=str(i)) for i, (q, c, g) in enumerate(items)]


def test_lm_eval_agrees_with_saftune_item_by_item(tmp_path, offline):
    from saftune.integrations.lm_eval import evaluate_with_lm_eval

    lm = tiny_causal_lm("llama", seed=3)
    out = evaluate_with_lm_eval(lm, [TASK], batch_size=3, include_path=_task_folder(tmp_path), log_samples=True,
                                builtin_tasks=False)
    ours = score_multiple_choice(lm, _saftune_items(), batch_size=3)
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    assert len(samples) == len(ITEMS) and out["n_samples"][TASK]["effective"] == len(ITEMS)
    worst = 0.0
    for sample, item, lls in zip(samples, _saftune_items(), ours.loglikelihoods):
        # the same requests: the context as given, " " + option
        assert [tuple(a) for a in sample["arguments"]] == item.requests()
        theirs = [float(r[0]) for r in sample["filtered_resps"]]
        assert theirs == pytest.approx(lls, abs=1e-4), item.id
        worst = max(worst, *(abs(a - b) for a, b in zip(theirs, lls)))
    assert [s["acc"] for s in samples] == [float(p == g) for p, g in zip(ours.predictions, ours.golds)]
    assert [s["acc_norm"] for s in samples] == [float(p == g) for p, g in zip(ours.predictions_norm, ours.golds)]
    assert out["metrics"][TASK]["acc"] == pytest.approx(ours.acc)
    assert out["metrics"][TASK]["acc_norm"] == pytest.approx(ours.acc_norm)
    # a check that means something: the random model gets some right and some wrong, and the two metrics differ
    assert 0 < ours.acc < 1 and ours.predictions != ours.predictions_norm
    print(f"{len(ITEMS)} items, {sum(len(c) for _, c, _ in ITEMS)} options, max |delta loglikelihood| {worst:.2e}")


def test_limit_and_the_model_left_as_it_was(tmp_path, offline):
    from saftune.integrations.lm_eval import evaluate_with_lm_eval

    lm = tiny_causal_lm("llama")
    lm.train()
    before = {n: p.detach().clone() for n, p in lm.named_parameters()}
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    out = evaluate_with_lm_eval(lm, [TASK], batch_size=4, limit=5, include_path=_task_folder(tmp_path),
                                builtin_tasks=False)
    assert torch.equal(torch.rand(3), expected)  # the harness seeds the global generators; the caller's come back
    assert out["n_samples"][TASK] == {"original": len(ITEMS), "effective": 5}
    assert set(out["metrics"][TASK]) >= {"acc", "acc_norm"} and "samples" not in out
    assert out["lm_eval_version"] == offline.__version__
    assert lm.training and all(p.equal(before[n]) for n, p in lm.named_parameters())


def test_an_unknown_task_is_named_with_a_suggestion(tmp_path, offline):
    from saftune.integrations.lm_eval import evaluate_with_lm_eval

    folder = _task_folder(tmp_path)
    with pytest.raises(ValueError, match=r"no task 'saftune_toy_m'.*Did you mean 'saftune_toy_mc'"):
        evaluate_with_lm_eval(tiny_causal_lm("llama"), ["saftune_toy_m"], include_path=folder, builtin_tasks=False)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        evaluate_with_lm_eval(tiny_causal_lm("llama"), [TASK], include_path=tmp_path / "missing")


def test_a_model_that_is_not_a_causal_lm_is_refused_before_lm_eval_is_needed():
    from saftune.integrations.lm_eval import evaluate_with_lm_eval
    from saftune.models import create

    with pytest.raises(ValueError, match="scores causal language models.*--harness saftune"):
        evaluate_with_lm_eval(create("tiny-sentence"), ["hellaswag"])


def test_a_missing_extra_names_what_to_install(monkeypatch, capsys):
    from saftune.integrations.lm_eval import evaluate_with_lm_eval

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'saftune\[lm-eval\]'"):
        evaluate_with_lm_eval(tiny_causal_lm("llama"), ["hellaswag"])
    assert main(["eval", "--model", "tiny-llama", "--harness", "lm-eval", "--tasks", "hellaswag"]) == 2
    assert "saftune[lm-eval]" in capsys.readouterr().err


def test_cli_refuses_lm_eval_on_another_model_and_tasks_without_the_harness(capsys):
    assert main(["eval", "--model", "tiny-sentence", "--harness", "lm-eval", "--tasks", "hellaswag"]) == 2
    assert "evaluates causal language models; 'tiny-sentence' is a text model" in capsys.readouterr().err
    assert main(["eval", "--model", "tiny-llama", "--harness", "lm-eval"]) == 2
    assert "needs --tasks" in capsys.readouterr().err
    assert main(["eval", "--model", "tiny-llama", "--tasks", "hellaswag"]) == 2
    assert "add --harness lm-eval" in capsys.readouterr().err


def test_cli_evaluates_a_saved_result_as_applied_in_memory_and_as_merged(tmp_path, offline):
    from saftune.integrations.lm_eval import evaluate_with_lm_eval
    from saftune.models import create
    from saftune.models.causal_lm import load_causal_lm
    from saftune.results import load_result

    run = tmp_path / "run"
    assert main(["train", "--model", "tiny-llama", "--dataset", "toy-lm", "--method", "saft",
                 "--method-option", "sparsity=0.05", "--method-option", "lr=5e-2", "--set", "train.epochs=1",
                 "--set", "train.batch_size=8", "--set", "train.progress=false", "--out", str(run)]) == 0
    folder = _task_folder(tmp_path)
    assert main(["eval", "--result", str(run), "--harness", "lm-eval", "--tasks", TASK, "--include-path", str(folder),
                 "--limit", "10", "--batch-size", "4", "--out", str(tmp_path / "lm-eval.json")]) == 0
    written = json.loads((tmp_path / "lm-eval.json").read_text())
    assert written["harness"] == "lm-eval" and written["tasks"] == [TASK] and written["limit"] == 10
    assert written["n_samples"][TASK]["effective"] == 10
    # The numbers are those of the trained weights: saftune's scorer on the base model with the result applied.
    tuned = create("tiny-llama", seed=1)
    load_result(run / "result", tuned)
    ours = score_multiple_choice(tuned, _saftune_items(ITEMS[:10]))
    assert written["metrics"][TASK]["acc"] == pytest.approx(ours.acc)
    assert written["metrics"][TASK]["acc_norm"] == pytest.approx(ours.acc_norm)
    base = score_multiple_choice(create("tiny-llama", seed=1), _saftune_items(ITEMS[:10]))
    assert (base.acc, base.acc_norm) != (ours.acc, ours.acc_norm)  # so the match above shows the result was applied
    # The merged result (a plain transformers directory) gives the same log-likelihoods.
    assert main(["merge", "--result", str(run), "--out", str(tmp_path / "merged")]) == 0
    merged = evaluate_with_lm_eval(load_causal_lm(tmp_path / "merged"), [TASK], limit=10, include_path=folder,
                                   log_samples=True, builtin_tasks=False)
    applied = evaluate_with_lm_eval(tuned, [TASK], limit=10, include_path=folder, log_samples=True,
                                    builtin_tasks=False)
    assert merged["metrics"][TASK] == written["metrics"][TASK]
    for a, b in zip(merged["samples"][TASK], applied["samples"][TASK]):
        assert [r[0] for r in a["filtered_resps"]] == pytest.approx([r[0] for r in b["filtered_resps"]], abs=1e-5)
