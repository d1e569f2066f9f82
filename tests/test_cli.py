"""Every `saftune` subcommand on tiny models and generated data: outputs exist, parse and agree."""

import json
import re

import pytest
import torch
import yaml

from saftune.cli import main

TEXT = ["--model", "tiny-sentence", "--dataset", "toy-text"]
IMAGE = ["--model", "tiny-clip", "--dataset", "toy-images"]


def _train(tmp_path, method="saft", extra=(), data=TEXT):
    out = tmp_path / f"run-{method}"
    args = ["train", *data, "--method", method, "--set", "train.epochs=3", "--set", "train.batch_size=4",
            "--set", "train.progress=false", "--out", str(out), *extra]
    assert main(args) == 0
    return out


def test_list_shows_every_registry(capsys):
    assert main(["list"]) == 0
    text = capsys.readouterr().out
    for word in ("minilm", "tiny-clip", "sentiment-domains", "toy-text", "saft", "wiseft", "vader", "demo"):
        assert word in text
    assert main(["list", "methods"]) == 0
    assert "sparsity" in capsys.readouterr().out  # method options with help text
    # Models and datasets show every option's type, default and help the same way.
    assert main(["list", "datasets"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"\n      test_size +int +default 16 +examples in the ID test set", text)
    assert re.search(r"\n      subsample +str +default 'all' +base-to-new protocol", text)
    assert main(["list", "models"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"\n  minilm .*\n      seed +int +default 0 .*\n      quantize +str \| None +default None .*int8.*\n"
                     r"      scale +float +default 30.0 +logit scale", text)


def test_select_writes_a_mask_and_its_summary(tmp_path, capsys):
    out = tmp_path / "mask"
    assert main(["select", *TEXT, "--sparsity", "0.01", "--out", str(out)]) == 0
    from saftune import SparseMask

    mask = SparseMask.load(out / "mask.safetensors")
    summary = json.loads((out / "mask_summary.json").read_text())
    assert sum(b["selected"] for b in summary["blocks"]) == mask.num_selected == int(0.01 * mask.num_candidates)
    assert "encoder.encoder.layer.0" in {b["block"] for b in summary["blocks"]}
    assert "all" in capsys.readouterr().out


def test_train_then_eval_reproduces_the_metrics(tmp_path, capsys):
    out = _train(tmp_path, "saft", ["--method-option", "lr=1e-2", "--method-option", "sparsity=0.02"])
    for name in ("result/saftune_config.json", "result/delta.safetensors", "log.jsonl", "metrics.json", "run.json",
                 "mask.safetensors", "checkpoint/trainer.json", "checkpoint/trainable.safetensors"):
        assert (out / name).is_file(), name
    trained = json.loads((out / "metrics.json").read_text())["metrics"]
    capsys.readouterr()
    assert main(["eval", "--result", str(out), "--out", str(tmp_path / "m.json")]) == 0
    evaluated = json.loads((tmp_path / "m.json").read_text())["metrics"]
    assert evaluated == pytest.approx(trained)


def test_eval_of_the_pretrained_model(tmp_path):
    assert main(["eval", *IMAGE, "--out", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())["metrics"]
    assert set(metrics) == {"val", "id", "ood/low-contrast", "ood_avg"}


def test_interpolate_ends_at_the_pretrained_and_the_finetuned_model(tmp_path):
    out = _train(tmp_path, "ft", ["--method-option", "lr=1e-3"], data=IMAGE)
    assert main(["interpolate", "--result", str(out), "--alphas", "0,0.5,1", "--out", str(tmp_path / "c.json")]) == 0
    curve = json.loads((tmp_path / "c.json").read_text())["curve"]
    assert [p["alpha"] for p in curve] == [0.0, 0.5, 1.0]
    main(["eval", *IMAGE, "--out", str(tmp_path / "zs.json")])
    assert curve[0]["id"] == json.loads((tmp_path / "zs.json").read_text())["metrics"]["id"]
    assert curve[-1]["id"] == json.loads((out / "metrics.json").read_text())["metrics"]["id"]


@pytest.mark.parametrize("method", ["saft", "lora"])
@pytest.mark.parametrize("command", ["merge", "apply"])
def test_merge_saves_a_hugging_face_model_with_the_trained_weights(tmp_path, method, command):
    out = _train(tmp_path, method, ["--method-option", "lr=1e-2"], data=IMAGE)
    merged = tmp_path / "merged"
    assert main([command, "--result", str(out), "--out", str(merged)]) == 0
    from transformers import CLIPModel

    from saftune.results import load_result
    from saftune.methods.lora import merge_lora
    from saftune.models import create

    reference = create("tiny-clip", seed=1)
    reference.set_classes(["dark", "bright"], ["a {} photo."])
    load_result(out / "result", reference)
    if method == "lora":
        merge_lora(reference)
    loaded = CLIPModel.from_pretrained(merged)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, reference.clip.state_dict()[name]), name


GRID = {
    "name": "tiny", "model": "tiny-sentence", "dataset": "toy-text", "seeds": [1, 2],
    "train": {"epochs": 2, "batch_size": 4, "progress": False},
    "methods": ["zeroshot", "saft", {"name": "saft-random", "method": "saft", "options": {"score": "random"}}],
    "sparsities": [0.01, 0.05],
    "selection": {"seed": 1, "extend": 0, "grid": {"saft": {"lr": [1e-3, 1e-2]}}},
}


def test_bench_runs_the_grid_and_an_interrupted_grid_continues(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(GRID))
    results = tmp_path / "out" / "results.jsonl"
    assert main(["bench", str(grid), "--out", str(tmp_path / "out"), "--no-report"]) == 0
    lines = [json.loads(x) for x in results.read_text().splitlines()]
    assert len(lines) == 2 + 2 * 2 * 2  # zeroshot x 2 seeds; saft and saft-random x 2 levels x 2 seeds
    assert {line["run_id"] for line in lines} >= {"zeroshot/seed=1", "saft/sparsity=0.05/seed=2"}
    saft = [line for line in lines if line["variant"] == "saft"]
    assert all(line["selected_options"]["lr"] in (1e-3, 1e-2) for line in saft)
    assert all(line["method_config"]["lr"] == saft[0]["selected_options"]["lr"] for line in saft)
    selection = json.loads((tmp_path / "out" / "selection.json").read_text())
    assert [t["options"]["lr"] for t in selection["variants"]["saft"]["trials"]] == [1e-3, 1e-2]

    # A run killed while appending leaves a partial last line: it is dropped and only that run redone.
    text = results.read_text().splitlines(keepends=True)
    results.write_text("".join(text[:-1]) + text[-1][:40])
    capsys.readouterr()
    assert main(["bench", str(grid), "--out", str(tmp_path / "out"), "--no-report"]) == 0
    assert "1 new runs" in capsys.readouterr().out
    again = [json.loads(x) for x in results.read_text().splitlines()]
    assert len(again) == len(lines) and again[-1]["run_id"] == lines[-1]["run_id"]


def test_report_from_a_bench(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({**GRID, "sparsities": None, "selection": None}))
    assert main(["bench", str(grid), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "report" / "index.html").is_file()
    assert main(["report", str(tmp_path / "out" / "results.jsonl"), "--out", str(tmp_path / "r2")]) == 0
    assert (tmp_path / "r2" / "results.md").is_file()
    assert "saft-random" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["train", "--method", "saftt", "--out", "x"], "unknown method 'saftt'. Did you mean 'saft'"),
    (["train", *TEXT, "--method", "saft", "--method-option", "sparsty=0.1", "--out", "x"], "did you mean 'sparsity'"),
    (["train", *TEXT, "--method", "saft", "--method-option", "sparsity=2", "--out", "x"], r"outside the allowed range \(0.0, 1.0\]"),
    (["train", "--model", "nope", "--out", "x"], "unknown model 'nope'"),
    (["eval", "--dataset", "sentiment-domain", "--model", "tiny-sentence"], "Did you mean 'sentiment-domains'"),
    (["bench", "no-such-grid"], "no grid file 'no-such-grid'"),
    (["report", "missing.jsonl"], "does not exist"),
    (["train", "--model", "tiny-clip", "--dataset", "toy-text", "--out", "x"], "takes image inputs but dataset"),
    (["eval", "--model", "tiny-clip", "--dataset", "toy-text"], "takes image inputs but dataset"),
    (["select", "--model", "tiny-sentence", "--dataset", "toy-images", "--out", "x"], "takes text inputs but dataset"),
])
def test_bad_input_exits_with_a_clear_message(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    assert __import__("re").search(message, capsys.readouterr().err)
