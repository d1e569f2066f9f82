"""Numerical faults: a non-finite loss stops the run and keeps the last good checkpoint; an fp16 gradient
overflow only skips its step (GradScaler). The fp32 NaN case is test_trainer.py::
test_a_nan_loss_stops_the_run_and_keeps_the_last_checkpoint."""

import json

import pytest
import torch
import toy_tasks
from safetensors.torch import load_file

from saftune.methods import create_method
from saftune.models import create
from saftune.train import NonFiniteLossError, TrainConfig, fit


def _setup():
    model = create("tiny-clip")
    bench = toy_tasks.benchmark(model.modality)
    model.set_classes(bench.classnames, bench.templates)
    return model, bench


def _scaled_loss(method, factor, at_call=1):
    """Multiply the method's loss by `factor` from its `at_call`-th micro-batch on."""
    original, calls = method.training_step, {"n": 0}

    def step(model, batch):
        calls["n"] += 1
        terms = original(model, batch)
        return {k: v * factor for k, v in terms.items()} if calls["n"] >= at_call else terms

    method.training_step = step
    return method


@pytest.mark.parametrize("precision, bad", [("bf16", float("inf")), ("fp32", float("inf")), ("bf16", float("nan"))])
def test_a_non_finite_loss_stops_with_the_step_and_terms_and_keeps_the_last_good_checkpoint(tmp_path, precision, bad):
    model, bench = _setup()
    method = _scaled_loss(create_method("ft", {"lr": 1e-3}), bad, at_call=3)
    config = TrainConfig(epochs=2, batch_size=4, precision=precision, checkpoint_every=1, progress=False)
    with pytest.raises(NonFiniteLossError, match=rf"step 3: the loss is {bad} \(terms {{'ce_loss': {bad}}}\); "
                                                 r"the last good checkpoint is .*checkpoint\. Lower the learning rate"):
        fit(model, method, bench.train, config, run_dir=tmp_path)
    assert json.loads((tmp_path / "checkpoint" / "trainer.json").read_text())["step"] == 2
    # The run stopped before the bad step's update: the checkpoint holds the weights the model has now.
    saved = load_file(str(tmp_path / "checkpoint" / "trainable.safetensors"))
    params = dict(model.named_parameters())
    assert saved and all(torch.isfinite(t).all() and torch.equal(t, params[n].detach().cpu()) for n, t in saved.items())


def test_finite_loss_with_overflowing_gradients_stops_before_the_update(tmp_path):
    # An Inf gradient with a finite loss: a hook on the logits' gradient makes it Inf at the third
    # micro-batch. Without a scaler, stepping would write Inf/NaN weights; the run must stop first.
    model, bench = _setup()
    method = create_method("ft", {"lr": 1e-3})
    original, calls = method.training_step, {"n": 0}

    def step(model, batch):
        calls["n"] += 1
        terms = original(model, batch)
        if calls["n"] == 3:
            loss = terms["ce_loss"]
            terms["ce_loss"] = loss + 0.0 * _inf_gradient(loss)
        return terms

    method.training_step = step
    config = TrainConfig(epochs=2, batch_size=4, checkpoint_every=1, progress=False)
    with pytest.raises(NonFiniteLossError, match=r"step 3: the gradient norm is (inf|nan) although the loss is finite"):
        fit(model, method, bench.train, config, run_dir=tmp_path)
    assert json.loads((tmp_path / "checkpoint" / "trainer.json").read_text())["step"] == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _inf_gradient(x: torch.Tensor) -> torch.Tensor:
    """Forward: x; backward: an Inf gradient for whatever x depends on."""
    class InfGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, g):
            return torch.full_like(g, float("inf"))

    return InfGrad.apply(x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: fp16 training needs a GPU (GradScaler)")
def test_an_fp16_gradient_overflow_skips_the_step_instead_of_stopping():
    # A finite loss of ~1e6, times the initial loss scale 2**16, overflows fp16 gradients: GradScaler must
    # skip that update (weights unchanged) and training must go on.
    config = TrainConfig(max_steps=1, batch_size=4, precision="fp16", device="cuda", progress=False)
    model, bench = _setup()
    before = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
    result = fit(model, _scaled_loss(create_method("ft", {"lr": 1e-3}), 1e6), bench.train, config)
    assert not torch.isfinite(torch.tensor(result.history[0]["grad_norm"]))
    assert result.history[0]["skipped"] is True
    assert all(torch.equal(p.detach().cpu(), before[n]) for n, p in model.named_parameters())

    model, bench = _setup()  # the same run without the overflow does update the weights
    fit(model, create_method("ft", {"lr": 1e-3}), bench.train, config.replace(max_steps=5))
    assert not all(torch.equal(p.detach().cpu(), before[n]) for n, p in model.named_parameters())
