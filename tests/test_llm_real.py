"""The embedded SmolLM2-135M-Instruct (opt-in: `pytest -m "assets and slow" tests/test_llm_real.py`).

Needs the fetched asset (`saftune fetch smollm2`) and the `gguf` package; the first run dequantizes the
GGUF into the cache (a few minutes on 2 CPU cores), later runs load the cached safetensors in seconds.
"""

import pytest
import torch

pytestmark = [pytest.mark.assets, pytest.mark.slow]


@pytest.fixture(scope="module")
def smollm2(require_asset):
    pytest.importorskip("gguf", reason="GGUF loading needs the llm extra: pip install 'saftune[llm]'")
    from saftune.models import create

    require_asset("smollm2")
    return create("smollm2", max_length=512)


def test_smollm2_is_the_documented_model(smollm2):
    facts = smollm2.describe()
    assert facts["architecture"] == "LlamaForCausalLM" and facts["parameters"] == 134_515_008
    config = smollm2.lm.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert smollm2.tied_embeddings and smollm2.use_chat_template
    assert smollm2.format_prompt("Hi").endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_smollm2_scores_multiple_choice_items(smollm2):
    from saftune.data.llm import MultipleChoiceItem
    from saftune.eval.multiple_choice import encode_request, score_multiple_choice

    items = [
        MultipleChoiceItem("Question: What is the capital of France?\nAnswer:", ("Paris", "London", "Berlin", "Madrid"), 0),
        MultipleChoiceItem("Question: How many legs does a spider have?\nAnswer:", ("eight", "six", "four", "two"), 0),
        MultipleChoiceItem("Question: What do bees make?\nAnswer:", ("honey", "milk", "silk", "glass"), 0),
        MultipleChoiceItem("Question: Which planet do we live on?\nAnswer:", ("Earth", "Mars", "Venus", "Jupiter"), 0),
    ]
    result = score_multiple_choice(smollm2, items, batch_size=8)
    assert result.acc >= 0.75  # easy facts: a 135M instruct model gets (nearly) all of them
    # The batched, head-sliced scorer agrees with the full model on one option.
    context_ids, option_ids = encode_request(smollm2, items[0].context, " Paris")
    ids = torch.tensor([context_ids + option_ids])
    with torch.no_grad():
        logp = smollm2({"input_ids": ids, "attention_mask": torch.ones_like(ids)}).double().log_softmax(-1)[0]
    hand = sum(float(logp[t - 1, ids[0, t]]) for t in range(len(context_ids), ids.shape[1]))
    assert result.loglikelihoods[0][0] == pytest.approx(hand, abs=1e-3)


def test_smollm2_lean_phase_1_selects_the_one_pass_mask(smollm2):
    import torch.nn.functional as F

    import saftune

    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 49152, (1, 256), generator=generator) for _ in range(2)]

    def loss_fn(model, ids):
        logits = model.lm(input_ids=ids, use_cache=False).logits.float()
        return F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").mean(1)

    one_pass = saftune.select_mask(smollm2, loss_fn, batches, sparsity=1e-3)
    assert saftune.select_mask(smollm2, loss_fn, batches, sparsity=1e-3, lean=True) == one_pass


def test_smollm2_on_an_int8_base_selects_and_trains_through_the_dequantized_weights(require_asset):
    pytest.importorskip("torchao")
    import torch.nn.functional as F

    import saftune
    from saftune.models import create
    from saftune.sparse import quantized as q

    require_asset("smollm2")
    lm = create("smollm2", max_length=512, quantize="int8")
    assert len(q.quantized_parameter_names(lm)) == 30 * 7  # every projection; the tied embedding stays fp32
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 49152, (1, 128), generator=generator) for _ in range(2)]

    def loss_fn(model, ids):
        logits = model.lm(input_ids=ids, use_cache=False).logits.float()
        return F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").mean(1)

    mask = saftune.select_mask(lm, loss_fn, batches, sparsity=1e-3, lean=True)
    # The same weights in plain form: torchao computes (x Q^T) * scale, the plain copy x (Q * scale)^T, so the
    # activations and gradients differ by rounding and entries near the top-k's threshold may trade places.
    plain = q.dequantize_model(create("smollm2", max_length=512, quantize="int8"))
    reference = saftune.select_mask(plain, loss_fn, batches, sparsity=1e-3)
    shared = (mask & reference).num_selected
    print(f"int8 mask vs dequantized-copy mask: {shared} of {mask.num_selected} entries shared")
    assert shared >= 0.9999 * mask.num_selected
    sm = saftune.sparsify(lm, mask)
    optimizer = torch.optim.AdamW(sm.trainable_parameters(), lr=1e-4)
    before = float(loss_fn(lm, batches[0]).mean())
    for _ in range(3):
        optimizer.zero_grad()
        loss_fn(lm, batches[0]).mean().backward()
        optimizer.step()
    assert float(loss_fn(lm, batches[0]).mean()) < before
