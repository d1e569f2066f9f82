"""The training loop: resuming lands on the same weights, faults stop cleanly, logs are complete."""

import json
import os
import signal

import pytest
import torch

import toy_tasks
from saftune.methods import create_method
from saftune.models import create
from saftune.train import CheckpointError, NonFiniteLossError, TrainConfig, fit

CONFIG = dict(epochs=4, batch_size=4, progress=False, checkpoint_every=2)


def _setup(spec="tiny-clip"):
    model = create(spec)
    bench = toy_tasks.benchmark(model.modality)
    model.set_classes(bench.classnames, bench.templates)
    return model, bench


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class Crash(RuntimeError):
    pass


@pytest.mark.parametrize("name, options", [("ft", {"lr": 1e-3}), ("saft", {"lr": 1e-2, "sparsity": 0.05}),
                                           ("clipood", {"lr": 1e-3}), ("lora", {"lr": 1e-2})])
def test_resume_after_a_crash_reaches_the_same_weights(name, options, tmp_path):
    model, bench = _setup()
    fit(model, create_method(name, options), bench.train, TrainConfig(**CONFIG))
    uninterrupted = _weights(model)

    model, bench = _setup()
    method = create_method(name, options)
    original = method.after_step

    def crash_at_step_5(m, step, total):
        original(m, step, total)
        if step == 5:
            raise Crash
    method.after_step = crash_at_step_5
    with pytest.raises(Crash):
        fit(model, method, bench.train, TrainConfig(**CONFIG), run_dir=tmp_path)
    assert json.loads((tmp_path / "checkpoint" / "trainer.json").read_text())["step"] == 4

    model, bench = _setup()  # a fresh process would rebuild the model from scratch
    result = fit(model, create_method(name, options), bench.train, TrainConfig(**CONFIG), run_dir=tmp_path)
    assert result.resumed_from == 4
    for n, p in _weights(model).items():
        assert torch.equal(p, uninterrupted[n]), n
    steps = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 17))  # the log has each step once, old lines past the checkpoint dropped


def test_ctrl_c_saves_a_checkpoint_and_the_run_resumes(tmp_path):
    config = TrainConfig(epochs=4, batch_size=4, progress=False)  # no periodic checkpoints: Ctrl-C writes one
    model, bench = _setup()
    fit(model, create_method("ft", {"lr": 1e-3}), bench.train, config)
    uninterrupted = _weights(model)

    model, bench = _setup()
    method = create_method("ft", {"lr": 1e-3})
    original = method.after_step

    def press_ctrl_c(m, step, total):
        original(m, step, total)
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)
    method.after_step = press_ctrl_c
    with pytest.raises(KeyboardInterrupt):
        fit(model, method, bench.train, config, run_dir=tmp_path)
    assert json.loads((tmp_path / "checkpoint" / "trainer.json").read_text())["step"] == 3

    model, bench = _setup()
    fit(model, create_method("ft", {"lr": 1e-3}), bench.train, config, run_dir=tmp_path)
    assert all(torch.equal(p, uninterrupted[n]) for n, p in _weights(model).items())


def test_a_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path):
    model, bench = _setup()
    method = create_method("ft", {"lr": 1e-3})
    original = method.training_step
    calls = {"n": 0}

    def poisoned(m, batch):
        calls["n"] += 1
        terms = original(m, batch)
        if calls["n"] == 5:
            terms["ce_loss"] = terms["ce_loss"] * float("nan")
        return terms
    method.training_step = poisoned
    with pytest.raises(NonFiniteLossError, match=r"step 5: the loss is nan .*ce_loss.*last good checkpoint"):
        fit(model, method, bench.train, TrainConfig(**CONFIG), run_dir=tmp_path)
    assert json.loads((tmp_path / "checkpoint" / "trainer.json").read_text())["step"] == 4


def test_a_checkpoint_of_another_configuration_is_refused(tmp_path):
    model, bench = _setup()
    fit(model, create_method("ft", {"lr": 1e-3}), bench.train, TrainConfig(**CONFIG), run_dir=tmp_path)
    model, bench = _setup()
    with pytest.raises(CheckpointError, match="different configuration"):
        fit(model, create_method("ft", {"lr": 2e-3}), bench.train, TrainConfig(**CONFIG), run_dir=tmp_path)
    # settings that do not change the weights may differ
    model, bench = _setup()
    fit(model, create_method("ft", {"lr": 1e-3}), bench.train, TrainConfig(**{**CONFIG, "log_every": 3}), run_dir=tmp_path)


def test_gradient_accumulation_matches_a_larger_batch():
    results = []
    for batch_size, accum in ((8, 1), (4, 2)):
        model, bench = _setup("tiny-sentence")
        fit(model, create_method("ft", {"lr": 1e-3}), bench.train,
            TrainConfig(epochs=2, batch_size=batch_size, grad_accum=accum, progress=False))
        results.append(_weights(model))
    for n in results[0]:
        torch.testing.assert_close(results[0][n], results[1][n], atol=1e-5, rtol=1e-4)


def test_same_seed_same_result_and_another_seed_differs():
    runs = []
    for seed in (3, 3, 4):
        model, bench = _setup()
        fit(model, create_method("ft", {"lr": 1e-3}), bench.train, TrainConfig(epochs=2, batch_size=4, seed=seed, progress=False))
        runs.append(_weights(model))
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])
    assert not all(torch.equal(runs[0][n], runs[2][n]) for n in runs[0])


def test_log_has_named_loss_terms_and_evaluations(tmp_path):
    model, bench = _setup()
    from saftune.eval import evaluate_split

    fit(model, create_method("l2sp", {"lr": 1e-3}), bench.train,
        TrainConfig(epochs=2, batch_size=4, progress=False, eval_every=2), run_dir=tmp_path,
        evaluate_fn=lambda m: {"val": evaluate_split(m, bench, bench.val)})
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "loss" in line]
    evals = [line for line in lines if "eval" in line]
    assert len(steps) == 8 and len(evals) == 4
    assert {"ce_loss", "l2sp_loss", "lr", "grad_norm"} <= set(steps[0])
    assert steps[0]["loss"] == pytest.approx(steps[0]["ce_loss"] + steps[0]["l2sp_loss"])
    assert 0 <= evals[0]["eval"]["val"] <= 1


def test_cosine_schedule_reaches_zero_and_warmup_ramps():
    model, bench = _setup()
    result = fit(model, create_method("ft", {"lr": 1e-3}), bench.train,
                 TrainConfig(epochs=2, batch_size=4, warmup_steps=2, progress=False))
    lrs = [h["lr"] for h in result.history]
    assert lrs[0] == pytest.approx(5e-4) and lrs[1] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(0.0, abs=1e-12)


def test_bf16_autocast_trains():
    model, bench = _setup()
    result = fit(model, create_method("saft", {"lr": 1e-2, "sparsity": 0.05}), bench.train,
                 TrainConfig(epochs=4, batch_size=4, precision="bf16", progress=False))
    assert result.steps == 16 and all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        fit(*_setup()[:1], create_method("ft"), bench.train, TrainConfig(precision="fp16", progress=False))
