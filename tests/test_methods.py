"""Every method on tiny models: the loss drops, and only what the method may change has changed."""

import numpy as np
import pytest
import torch

import toy_tasks
from saftune.methods import create_method, list_methods
from saftune.models import classification_loss, create
from saftune.results import load_result
from saftune.train import TrainConfig, fit

DUAL_ENCODERS = ["tiny-sentence", "tiny-clip"]
METHOD_OPTIONS = {  # learning rates large enough for a few steps on a tiny random model
    "zeroshot": {}, "lp": {"probe_steps": 100, "probe_lr": 1e-2}, "lpft": {"lr": 1e-3, "probe_steps": 50},
    "ft": {"lr": 1e-3}, "l1": {"lr": 1e-3, "strength": 1e-4}, "l2sp": {"lr": 1e-3, "strength": 0.1},
    "kd": {"lr": 1e-3}, "wiseft": {"lr": 1e-3}, "lora": {"lr": 1e-2, "rank": 4}, "bitfit": {"lr": 1e-2},
    "flyp": {"lr": 1e-3}, "clipood": {"lr": 1e-3}, "coop": {"lr": 1e-2}, "cocoop": {"lr": 1e-2}, "maple": {"lr": 1e-2, "depth": 2},
    "saft": {"lr": 1e-2, "sparsity": 0.05},
}
PROMPT_LEARNERS = {"coop": "prompt_learner.", "cocoop": "prompt_learner.", "maple": "prompt_learner."}


def _setup(spec, seed=0):
    model = create(spec, seed=seed)
    bench = toy_tasks.benchmark(model.modality)
    model.set_classes(bench.classnames, bench.templates)
    return model, bench


def _train_loss(model, bench):
    model.eval()
    with torch.no_grad():
        batch = model.collate(bench.train.inputs, bench.train.labels)
        return float(classification_loss(model, batch).mean())


def test_the_registry_lists_exactly_the_papers_methods():
    assert list(list_methods()) == ["zeroshot", "lp", "lpft", "ft", "l1", "l2sp", "kd", "wiseft", "lora", "bitfit",
                                    "flyp", "clipood", "coop", "cocoop", "maple", "saft"]


@pytest.mark.parametrize("spec", DUAL_ENCODERS)
@pytest.mark.parametrize("name", [n for n in METHOD_OPTIONS if n != "zeroshot"])
def test_training_lowers_the_loss_and_changes_only_what_the_method_may(name, spec):
    if name == "maple" and spec != "tiny-clip":
        pytest.skip("maple needs CLIP's two towers (its refusal is tested below)")
    model, bench = _setup(spec)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss_before = _train_loss(model, bench)
    method = create_method(name, METHOD_OPTIONS[name])
    fit(model, method, bench.train, TrainConfig(epochs=8, batch_size=4, progress=False, augment=False))
    # PEFT moves an adapted layer's own weights to "<layer>.base_layer.<name>": compare them as the originals
    after = {n.replace(".base_layer", ""): p for n, p in model.named_parameters() if "lora_" not in n}
    new = {n for n, _ in model.named_parameters() if "lora_" in n} | (set(after) - set(before))
    assert set(before) <= set(after)
    changed = {n for n, p in before.items() if not torch.equal(after[n].detach(), p)}

    if name in PROMPT_LEARNERS:
        if spec == "tiny-clip":  # CLIP's prompt-side loss starts high and must drop
            assert _train_loss(model, bench) < loss_before
        assert not changed and new and all(n.startswith(PROMPT_LEARNERS[name]) for n in new)
        assert {n for n, p in model.named_parameters() if p.requires_grad} == new
    elif name == "lora":
        assert not changed and new and all("lora_" in n for n in new) and model.peft_config
    elif name == "lp":
        assert not changed and new == {"head.weight", "head.bias"}
    elif name == "bitfit":
        assert changed and all(n.endswith("bias") for n in changed)
    elif name == "saft":
        mask = method.mask
        for n, p in before.items():
            frozen = ~mask.boolean(n)
            assert torch.equal(after[n].detach()[frozen], p[frozen]), n
        assert changed <= set(mask.indices)
    else:
        assert changed
    if name not in PROMPT_LEARNERS:
        assert _train_loss(model, bench) < loss_before, name


def test_zeroshot_changes_nothing():
    model, bench = _setup("tiny-clip")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = fit(model, create_method("zeroshot"), bench.train, TrainConfig(progress=False))
    assert result.steps == 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_methods_with_heads_work_on_a_sequence_classifier():
    for name in ("ft", "lp", "lpft", "saft", "bitfit", "lora", "l2sp", "kd"):
        model = create("tiny-bert-classifier")
        bench = toy_tasks.benchmark("text")
        model.set_classes(bench.classnames)
        loss_before = _train_loss(model, bench)
        fit(model, create_method(name, METHOD_OPTIONS[name]), bench.train,
            TrainConfig(epochs=8, batch_size=4, progress=False))
        assert _train_loss(model, bench) < loss_before, name


@pytest.mark.parametrize("name", ["flyp", "clipood", "coop", "cocoop"])
def test_dual_encoder_methods_refuse_other_models(name):
    model = create("tiny-bert-classifier")
    model.set_classes(["negative", "positive"])
    with pytest.raises(ValueError, match="needs a CLIP-style dual encoder"):
        fit(model, create_method(name), toy_tasks.text_split("t", 4, 0), TrainConfig(progress=False))


@pytest.mark.parametrize("base", ["ft", "saft"])
def test_wiseft_endpoints_are_the_pretrained_and_the_finetuned_model(base):
    options = {"lr": 1e-2, "base": base, "base_options": {"sparsity": 0.05} if base == "saft" else {}}
    model, bench = _setup("tiny-clip")
    pretrained = {n: p.detach().clone() for n, p in model.named_parameters()}
    method = create_method("wiseft", options)
    fit(model, method, bench.train, TrainConfig(epochs=4, batch_size=4, progress=False))
    method.interpolate(model, 0.0)
    assert all(torch.equal(p.detach(), pretrained[n]) for n, p in model.named_parameters())
    method.interpolate(model, 1.0)
    finetuned = {n: p.detach().clone() for n, p in model.named_parameters()}
    reference, _ = _setup("tiny-clip")
    fit(reference, create_method(base, {"lr": 1e-2, **options["base_options"]}), bench.train,
        TrainConfig(epochs=4, batch_size=4, progress=False))
    for n, p in reference.named_parameters():
        assert torch.equal(finetuned[n], p.detach()), n
    method.interpolate(model, 0.5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), (pretrained[n] + finetuned[n]) / 2)


def test_lora_merge_gives_the_same_outputs():
    from saftune.methods.lora import merge_lora

    model, bench = _setup("tiny-clip")
    fit(model, create_method("lora", {"lr": 1e-2}), bench.train, TrainConfig(epochs=4, batch_size=4, progress=False))
    model.eval()
    batch = model.collate(bench.test.inputs)
    with torch.no_grad():
        unmerged = model(batch)
        merge_lora(model)
        model.eval()
        merged = model(batch)
    assert not any("lora_" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)


def test_lora_adapts_fused_multihead_attention():
    """open_clip's towers use nn.MultiheadAttention (fused in_proj_weight); PEFT adapts them whole."""
    import tiny

    from saftune.methods.lora import default_targets

    case = tiny.mha()

    class Wrapped(torch.nn.Module):
        scopes = {"head": ["net.head.*"]}

        def __init__(self):
            super().__init__()
            self.net = case.model

    targets = default_targets(Wrapped())
    assert "net.attn" in targets and "net.attn.out_proj" not in targets and "net.head" not in targets


@pytest.mark.parametrize("name", [n for n in METHOD_OPTIONS if n != "zeroshot"])
def test_saved_results_reproduce_the_trained_model(name, tmp_path):
    model, bench = _setup("tiny-clip")
    method = create_method(name, METHOD_OPTIONS[name])
    fit(model, method, bench.train, TrainConfig(epochs=3, batch_size=4, progress=False))
    model.eval()
    batch = model.collate(bench.test.inputs)
    with torch.no_grad():
        expected = model(batch)
    method.save_result(model, tmp_path / "result", {"method": name, "base_model": "tiny-clip"})
    fresh, _ = _setup("tiny-clip")
    load_result(tmp_path / "result", fresh)
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(batch), expected, atol=1e-5, rtol=1e-5)


def test_clipood_beta_moving_average_weights_the_middle_of_training():
    from saftune.methods.clipood import beta_weight

    weights = [beta_weight(s, 10, 0.5) for s in range(1, 11)]
    assert weights[0] > weights[4] < weights[-1]  # beta = 0.5: U-shaped, as in the paper
    assert np.isclose(weights[0], weights[-1])
    assert beta_weight(5, 10, 2.0) > beta_weight(1, 10, 2.0)  # beta > 1 favours the middle


def test_a_result_kind_is_loaded_one_way():
    from saftune.methods import Method, register_method, result_kinds
    from saftune.methods.base import _METHODS

    class OtherWeights(Method):
        name = "other-weights"
        result_kind = "weights"  # the kind of ft, l2sp, ...: but loaded another way

        @staticmethod
        def apply_result(model, directory, config, *, merge=False):
            pass

    before = result_kinds()
    with pytest.raises(ValueError, match="kind 'weights', which '.*' loads another way"):
        register_method(OtherWeights)
    assert "other-weights" not in _METHODS and result_kinds() == before
    assert result_kinds()["weights"].apply_result is create_method("ft").apply_result


def test_wiseft_choose_alpha_reports_the_best_validation_alpha_and_its_curve():
    from saftune.run import RunConfig, run_experiment

    options = {"base": "saft", "lr": 3e-2, "choose_alpha": True, "alphas": [0.0, 0.5, 1.0], "base_options": {"sparsity": 0.05}}
    record = run_experiment(RunConfig(model="tiny-sentence", dataset="toy-text", method="wiseft", method_options=options,
                                      train=TrainConfig(epochs=3, batch_size=4, progress=False), seed=1))
    vals = {point["alpha"]: point["val"] for point in record.wiseft_curve}
    best = max(vals.values())
    assert record.wiseft_alpha == min(a for a, v in vals.items() if v == best)  # ties: nearer the pretrained model
    assert record.metrics["val"] == best
    reported = next(p for p in record.wiseft_curve if p["alpha"] == record.wiseft_alpha)
    assert {k: reported[k] for k in record.metrics} == record.metrics  # the model was left at the chosen alpha
