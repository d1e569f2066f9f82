"""CoCoOp and MaPLe on the tiny CLIP: their outputs at initialisation against a hand computation.

Training (only their own parameters change, the loss drops) and save/load are covered with every other
method in test_methods.py.
"""

import pytest
import torch
import torch.nn.functional as F

import toy_tasks
from saftune.methods import PrepareContext, create_method
from saftune.models import create


def _setup(spec="tiny-clip"):
    model = create(spec, seed=0)
    bench = toy_tasks.benchmark(model.modality)
    model.set_classes(bench.classnames, bench.templates)
    return model, bench


def _prepared(name, options, spec="tiny-clip"):
    model, bench = _setup(spec)
    method = create_method(name, options)
    method.prepare(model, PrepareContext(batches=lambda: iter(()), seed=0))
    model.eval()
    return model, bench


def _text_features(clip, tokens, first, deeper=()):
    """CLIP's text tower by hand: token embeddings with the first prompts [P, n, width] written in at
    positions 1..n, position embeddings, a causal + padding mask, and `deeper[i]` written over the same
    positions before layer i + 1; pooled where the tiny tokenizer's ids peak (this config's rule)."""
    tm = clip.text_model
    ids, keep = tokens["input_ids"], tokens["attention_mask"]
    n, length = first.shape[1], ids.shape[1]
    h = tm.embeddings.token_embedding(ids).clone()
    h[:, 1 : n + 1] = first
    h = h + tm.embeddings.position_embedding(torch.arange(length))[None]
    causal = torch.full((length, length), float("-inf")).triu(1)
    mask = causal[None, None] + torch.where(keep[:, None, None, :].bool(), 0.0, float("-inf"))
    for i, layer in enumerate(tm.encoder.layers):
        if 1 <= i <= len(deeper):
            h = h.clone()
            h[:, 1 : n + 1] = deeper[i - 1]
        h = layer(h, mask)
    h = tm.final_layer_norm(h)
    return clip.text_projection(h[torch.arange(h.shape[0]), ids.argmax(-1)])


def _image_features(clip, pixels, vision_prompts=()):
    """CLIP's image tower by hand, with MaPLe's vision prompts appended / replaced per layer."""
    vm = clip.vision_model
    h = vm.embeddings(pixels)
    if vision_prompts:
        h = torch.cat([h, vision_prompts[0].expand(h.shape[0], -1, -1)], dim=1)
    h = vm.pre_layrnorm(h)
    n = vision_prompts[0].shape[0] if vision_prompts else 0
    for i, layer in enumerate(vm.encoder.layers):
        if 1 <= i < len(vision_prompts):
            h = torch.cat([h[:, :-n], vision_prompts[i].expand(h.shape[0], -1, -1)], dim=1)
        h = layer(h, None)
    return clip.visual_projection(vm.post_layernorm(h[:, 0]))


@pytest.mark.parametrize("spec", ["tiny-clip", "tiny-sentence"])
def test_cocoop_with_a_zero_meta_net_is_the_zero_shot_model_of_its_template(spec):
    model, bench = _prepared("cocoop", {}, spec)
    assert model.templates == ["a photo of a {}."]
    with torch.no_grad():
        model.prompt_learner.meta_net.linear2.weight.zero_()
        model.prompt_learner.meta_net.linear2.bias.zero_()
    reference, _ = _setup(spec)
    reference.set_classes(bench.classnames, ["a photo of a {}."])
    reference.eval()
    batch = model.collate(bench.test.inputs)
    with torch.no_grad():
        torch.testing.assert_close(model(batch), reference(batch), atol=1e-5, rtol=1e-5)


def test_cocoop_logits_are_each_inputs_own_prompts_by_hand():
    model, bench = _prepared("cocoop", {})
    learner = model.prompt_learner
    with torch.no_grad():  # a meta-net that moves the context visibly
        learner.meta_net.linear2.weight.normal_(0, 1.0)
    fresh, _ = _setup()
    fresh.set_classes(bench.classnames, ["a photo of a {}."])
    tokens = fresh.prompt_tokens()
    batch = model.collate(bench.test.inputs[:4])
    with torch.no_grad():
        logits = model(batch)
        images = F.normalize(_image_features(fresh.clip, batch["pixel_values"]), dim=-1)
        scale = fresh.clip.logit_scale.exp().clamp(max=100.0)
        for b, image in enumerate(images):
            shifted = learner.context + learner.meta_net(image)  # pi(f_b) added to every context vector
            texts = _text_features(fresh.clip, tokens, shifted.expand(len(bench.classnames), -1, -1))
            expected = scale * F.normalize(texts, dim=-1) @ image
            torch.testing.assert_close(logits[b], expected, atol=1e-5, rtol=1e-5)
    assert learner.meta_net.linear1.in_features == 16 and learner.meta_net.linear1.out_features == 1  # E/16, E = 16


def test_cocoop_prompt_chunks_do_not_change_the_logits():
    model, bench = _prepared("cocoop", {})
    batch = model.collate(bench.test.inputs)
    with torch.no_grad():
        whole = model(batch)
        model.prompt_learner.prompt_chunk = 1  # one input's prompts per text-encoder call
        torch.testing.assert_close(model(batch), whole, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("depth", [1, 2])
def test_maple_equals_a_hand_computed_forward_at_initialisation(depth):
    model, bench = _prepared("maple", {"depth": depth})
    prompts = model.prompt_learner
    assert prompts.first.shape == (2, 32) and prompts.deeper.shape == (depth - 1, 2, 32)
    fresh, _ = _setup()
    fresh.set_classes(bench.classnames, ["a photo of a {}."])
    tokens = fresh.prompt_tokens()
    with torch.no_grad():  # layer 0's text prompts start as the embeddings of "a photo"
        torch.testing.assert_close(prompts.first, fresh.prompt_token_embedding(tokens["input_ids"][0, 1:3]))
    batch = model.collate(bench.test.inputs)
    with torch.no_grad():
        count = len(bench.classnames)
        texts = _text_features(fresh.clip, tokens, prompts.first.expand(count, -1, -1),
                               [prompts.text(i).expand(count, -1, -1) for i in range(1, depth)])
        images = _image_features(fresh.clip, batch["pixel_values"], [prompts.vision(i) for i in range(depth)])
        expected = fresh.clip.logit_scale.exp().clamp(max=100.0) * F.normalize(images, dim=-1) @ F.normalize(texts, dim=-1).T
        torch.testing.assert_close(model(batch), expected, atol=1e-5, rtol=1e-5)
        plain, _ = _setup()
        plain.eval()
        assert not torch.allclose(model(batch), plain(batch), atol=1e-3)  # the prompts do change the outputs


def test_maple_refuses_what_it_cannot_prompt():
    model, _ = _setup("tiny-sentence")
    context = PrepareContext(batches=lambda: iter(()), seed=0)
    with pytest.raises(ValueError, match="maple needs a CLIP model with an image and a text tower"):
        create_method("maple").prepare(model, context)
    model, _ = _setup()
    with pytest.raises(ValueError, match="depth 9 is more than the model's 2 text and 2 vision layers; lower `depth`"):
        create_method("maple").prepare(model, context)


def test_context_words_must_cover_n_ctx_tokens():
    model, _ = _setup()
    method = create_method("cocoop", {"ctx_init": "a photo", "n_ctx": 3})
    with pytest.raises(ValueError, match="'a photo' do not give 3 tokens"):
        method.prepare(model, PrepareContext(batches=lambda: iter(()), seed=0))


def test_random_context_uses_placeholders():
    model, _ = _prepared("cocoop", {"ctx_init": "", "n_ctx": 3})
    assert model.templates == ["X X X {}."]
    assert model.prompt_learner.context.std() < 0.05


# ---------------------------------------------------------------------------------------------------
# The one API a learned-prompt method changes the model through: attach_prompt_learner / detach.

PROMPT_METHODS = [("coop", {}, "tiny-clip"), ("coop", {}, "tiny-sentence"), ("cocoop", {}, "tiny-clip"),
                  ("cocoop", {}, "tiny-sentence"), ("maple", {"depth": 2}, "tiny-clip")]


def _hook_counts(model):
    return {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()}


def _attributes(model):
    """Every module's own attribute names and child slots, by module name."""
    return {n: (set(vars(m)), dict(m._modules)) for n, m in model.named_modules()}


@pytest.mark.parametrize("name, options, spec", PROMPT_METHODS)
def test_a_prompt_method_changes_the_model_only_through_the_prompt_learner_api(name, options, spec):
    model, bench = _setup(spec)
    model.eval()
    batch = model.collate(bench.test.inputs)
    with torch.no_grad():
        zero_shot = model(batch)
    attributes, hooks = _attributes(model), _hook_counts(model)
    parameters = {n for n, _ in model.named_parameters()}
    assert model.prompt_learner is None

    create_method(name, options).prepare(model, PrepareContext(batches=lambda: iter(()), seed=0))
    assert model.prompt_learner is not None
    after = _attributes(model)
    for module_name, (names, children) in attributes.items():  # no attribute added to any module
        assert set(after[module_name][0]) == names, module_name
        changed = {k for k, child in after[module_name][1].items() if children.get(k, "absent") is not child}
        assert changed == ({"prompt_learner"} if module_name == "" else set()), module_name
    assert all(n.startswith("prompt_learner.") for n, _ in model.named_parameters() if n not in parameters)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {f"prompt_learner.{n}" for n, _ in model.prompt_learner.named_parameters()}
    model.eval()
    with torch.no_grad():
        assert not torch.equal(model(batch), zero_shot)

    model.detach_prompt_learner()
    assert model.prompt_learner is None and model.templates == bench.templates
    assert _hook_counts(model) == hooks and {n for n, _ in model.named_parameters()} == parameters
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(batch), zero_shot)


def test_a_second_prompt_learner_is_refused_and_the_first_kept():
    model, bench = _prepared("coop", {})
    batch = model.collate(bench.test.inputs)
    first, hooks = model.prompt_learner, _hook_counts(model)
    with torch.no_grad():
        expected = model(batch)
    for name, options in (("coop", {}), ("cocoop", {}), ("maple", {"depth": 2})):
        with pytest.raises(RuntimeError, match=r"a prompt learner \(PromptContext\) is already attached to this "
                                               r"model; call detach_prompt_learner\(\) first"):
            create_method(name, options).prepare(model, PrepareContext(batches=lambda: iter(()), seed=0))
        assert model.prompt_learner is first and _hook_counts(model) == hooks  # the refused hooks are removed
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(batch), expected)
    model.detach_prompt_learner()
    create_method("cocoop").prepare(model, PrepareContext(batches=lambda: iter(()), seed=0))  # after detach: fine
    assert type(model.prompt_learner).__name__ == "ConditionalPrompt"


def test_the_learners_template_holds_across_set_classes_until_detach():
    model, bench = _prepared("cocoop", {})
    model.set_classes(["dark", "bright", "grey"], ["{}.", "a {}."])
    assert model.templates == ["a photo of a {}."] and model.classnames == ["dark", "bright", "grey"]
    model.detach_prompt_learner()
    assert model.templates == ["{}.", "a {}."]  # the task's templates given while the learner was attached
    assert model.detach_prompt_learner() is None  # nothing attached: nothing to do
