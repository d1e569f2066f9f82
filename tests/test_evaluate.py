"""Evaluation: length-sorted, prepared batches give the logits of plain per-batch evaluation, in input order."""

import numpy as np
import pytest
import torch

from saftune.data import Benchmark, Split
from saftune.eval import evaluate, predict
from saftune.eval.evaluate import evaluate_split
from saftune.models import create
from saftune.models.text import TokenizedTexts

# Lengths from 1 to 14 words, in no particular order, with repeats: sorting changes every batch.
TEXTS = [
    "bad",
    "a long and winding story about a family that never quite learns to talk to itself",
    "fine film",
    "the acting is wooden but the music carries every scene of it",
    "not good",
    "i laughed , i cried , i left before the end",
    "terrible",
    "one of the best films of the year , and the best of its kind",
    "ok",
    "a dull , slow , and joyless remake of a classic",
    "superb",
    "nothing happens for two hours",
]
LABELS = [i % 2 for i in range(len(TEXTS))]
IMAGES = [np.random.default_rng(i).integers(0, 256, (24 + 4 * (i % 3), 32, 3), dtype=np.uint8) for i in range(7)]


def _reference(model, examples, batch_size):
    """Straightforward evaluation: input order, fixed-size batches, `collate` per batch, no_grad."""
    model.eval()
    with torch.no_grad():
        chunks = [model(model.collate(examples[i : i + batch_size])).float() for i in range(0, len(examples), batch_size)]
    return torch.cat(chunks)


def _model(name):
    model = create(name, seed=0)
    if name == "tiny-t5":
        model.input_template = "review: {}"  # `prepare` must apply it like `collate`
        model.set_classes(["bad", "good"], ["{}", "very {}"])
    elif name == "tiny-cnn":
        model.set_classes([str(d) for d in range(10)])
    else:
        model.set_classes(["negative", "positive"], ["a {} review.", "{} !"])
    return model


@pytest.mark.parametrize("name", ["tiny-sentence", "tiny-bert-classifier", "tiny-t5", "tiny-clip", "tiny-cnn"])
def test_predict_equals_plain_per_batch_evaluation_in_input_order(name):
    model = _model(name)
    examples = IMAGES if model.modality == "image" else TEXTS
    split = Split("s", examples, [i % 2 for i in range(len(examples))])
    expected = _reference(model, examples, batch_size=3)
    model.eval()
    next(model.children()).train()  # one submodule left in training mode: predict must still switch it
    got = predict(model, split, batch_size=4)
    assert not any(m.training for m in model.modules())
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # Reversed input -> reversed rows: results follow the caller's order, whatever order the batches ran in.
    reversed_split = Split("r", examples[::-1], split.labels[::-1])
    torch.testing.assert_close(predict(model, reversed_split, batch_size=5), expected.flip(0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["tiny-sentence", "tiny-bert-classifier", "tiny-t5"])
def test_text_batches_hold_similar_token_lengths(name):
    model = _model(name)
    widths = []
    handle = model.register_forward_pre_hook(lambda m, args: widths.append(args[0]["attention_mask"].shape[1]))
    predict(model, Split("s", TEXTS, LABELS), batch_size=4)
    handle.remove()
    lengths = model.prepare(TEXTS).lengths
    # Each batch holds the next 4 shortest sentences and is padded to its own longest one only.
    assert widths == sorted(lengths)[3::4]
    in_input_order = sum(max(lengths[i : i + 4]) * 4 for i in range(0, len(lengths), 4))
    assert sum(w * 4 for w in widths) < in_input_order


def test_tokenized_batches_equal_collate_batches():
    model = create("tiny-sentence")
    prepared = model.prepare(TEXTS)
    assert isinstance(prepared, TokenizedTexts)
    for indices in ([0, 1, 2], [11, 3, 8], [5]):
        batch = prepared.batch(indices)
        expected = model.collate([TEXTS[i] for i in indices])
        assert batch.keys() == expected.keys()
        for key in batch:
            assert torch.equal(batch[key], expected[key]), key


def test_tokenized_batches_equal_collate_batches_with_the_real_minilm_tokenizer(require_asset):
    from transformers import AutoTokenizer

    from saftune.models.text import _tokenize

    tokenizer = AutoTokenizer.from_pretrained(str(require_asset("minilm")))
    long_text = " ".join(TEXTS)  # longer than max_length: truncation must match too
    texts = TEXTS + [long_text]
    prepared = TokenizedTexts(tokenizer, texts, max_length=24)
    assert prepared.lengths[-1] == 24
    for indices in ([0, 1, 2], [12, 3, 8], [9]):
        expected = _tokenize(tokenizer, [texts[i] for i in indices], 24)
        batch = prepared.batch(indices)
        assert all(torch.equal(batch[k], expected[k]) for k in ("input_ids", "attention_mask"))


def test_class_prompts_are_embedded_once_per_evaluation_and_stay_usable_by_autograd():
    model = create("tiny-sentence")
    s = Split("s", TEXTS, LABELS)
    bench = Benchmark("toy", "text", ["negative", "positive"], ["a {} review."], s, s, s,
                      {"a": s, "b": Split("b", TEXTS[:5], LABELS[:5])})
    model.set_classes(bench.classnames, bench.templates)
    calls = []
    encode = model.encode_prompts
    model.encode_prompts = lambda tokens: calls.append(1) or encode(tokens)
    metrics = evaluate(model, bench, include_val=True, batch_size=4)
    assert len(metrics) == 5 and len(calls) == 1  # val, id, two OOD sets: one prompt pass
    evaluate(model, bench, batch_size=4)
    assert len(calls) == 2  # a new call embeds them again (weights may have changed in between)
    evaluate_split(model, bench, s, batch_size=4)
    assert len(calls) == 3  # so does every single-split evaluation, even in eval mode (an interpolated model)

    # A split with its own class names gets its own prompts, and the benchmark's come back after it.
    own = Split("own", TEXTS, LABELS, classnames=["awful", "great"])
    bench.ood["own"] = own
    evaluate(model, bench, batch_size=4)
    assert len(calls) == 5 and model.classnames == ["negative", "positive"]  # id (a, b reuse it), then own

    # Cached class embeddings are filled inside inference mode yet are ordinary tensors: with frozen prompts,
    # a step with gradients reuses them and autograd saves them for the backward pass.
    model.freeze_prompt_side()
    model.eval()
    predict(model, s)
    cache = model._class_cache
    assert cache is not None and not cache.is_inference()
    logits = model(model.collate(TEXTS[:3]))  # gradients on, still in eval mode: no mode change dropped the cache
    assert model._class_cache is cache
    logits.sum().backward()
    assert model.encoder.embeddings.word_embeddings.weight.grad is not None


def test_evaluate_restores_training_mode_and_gives_top1_of_predict():
    model = create("tiny-bert-classifier")
    model.set_classes(["negative", "positive"])
    s = Split("s", TEXTS, LABELS)
    bench = Benchmark("toy", "text", ["negative", "positive"], ["{}"], s, s, s, {})
    model.train()
    metrics = evaluate(model, bench, batch_size=5)
    assert model.training
    expected = float((_reference(model, TEXTS, 2).argmax(-1) == torch.tensor(LABELS)).float().mean())
    assert metrics == {"id": expected}
