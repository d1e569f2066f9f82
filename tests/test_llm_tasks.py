"""Causal-LM tasks: supervised fine-tuning on (prompt, answer) pairs and multiple choice by log-likelihood.

Every number is checked against a hand computation from the model's full logits (or transformers' own
loss); tiny random Llama and GPT-2 with a byte tokenizer (token id = byte), so token ids are known.
"""

import logging
import random

import pytest
import torch

from saftune.data.llm import (
    MultipleChoiceError,
    MultipleChoiceItem,
    SFTDataError,
    SFTExample,
    collate_sft,
    encode_sft,
    sft_loss,
)
from saftune.eval.multiple_choice import encode_request, loglikelihoods, score_multiple_choice
from saftune.models.tiny_lm import tiny_causal_lm

ARCHS = ["llama", "gpt2"]
EOS = 256


def _bytes(text):
    return list(text.encode())


# ------------------------------------------------------------------------------------------- SFT encoding
def test_answer_tokens_alone_are_targets_without_chat_template():
    lm = tiny_causal_lm("llama")
    encoded = encode_sft(lm, [("Q: 2+2?\nA:", " 4"), {"prompt": "é?", "answer": "oui"}])
    assert encoded.input_ids[0] == _bytes("Q: 2+2?\nA:") + _bytes(" 4") + [EOS]
    assert encoded.answer_starts == [len("Q: 2+2?\nA:"), len("é?".encode())]
    batch = collate_sft(encoded, pad_id=EOS)
    assert batch["input_ids"].shape == (2, 13)  # 10 prompt bytes + 2 answer bytes + eos
    assert batch["targets"][0].tolist() == [-100] * 10 + _bytes(" 4") + [EOS]
    assert batch["targets"][1].tolist() == [-100] * 3 + _bytes("oui") + [EOS] + [-100] * 6
    assert batch["attention_mask"][1].tolist() == [1] * 7 + [0] * 6


def test_chat_template_wraps_the_prompt_and_the_answer_turn_is_learnt():
    lm = tiny_causal_lm("llama", chat_template=True)
    encoded = encode_sft(lm, [SFTExample("2+2?", "4")])
    ids, start = encoded.input_ids[0], encoded.answer_starts[0]
    assert lm.tokenizer.decode(ids[:start]) == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert lm.tokenizer.decode(ids[start:]) == "4<|im_end|>\n"


def test_long_prompts_are_truncated_from_the_left_and_counted(caplog):
    lm = tiny_causal_lm("gpt2", context=64)
    prompt = "".join(chr(ord("a") + i % 26) for i in range(100))
    with caplog.at_level(logging.WARNING, logger="saftune.data.llm.sft"):
        encoded = encode_sft(lm, [(prompt, "xyz"), ("short", "ok"), (prompt, "ab")])
    assert encoded.truncated == 2
    assert "2 of 3 examples were longer than 64 tokens" in caplog.text
    assert encoded.input_ids[0] == _bytes(prompt[-60:]) + _bytes("xyz") + [EOS]  # 60 + 4 = 64: the answer is whole
    assert encoded.input_ids[1] == _bytes("short") + _bytes("ok") + [EOS]
    assert len(encoded.input_ids[2]) == 64 and encoded.answer_starts[2] == 61


def test_answers_that_cannot_fit_and_empty_answers_are_refused():
    lm = tiny_causal_lm("llama", context=64)
    with pytest.raises(SFTDataError, match=r"2 answer\(s\) do not fit the context of 64 tokens.*examples 0 \(64 tokens\), 2 \(71 tokens\)"):
        encode_sft(lm, [("p", "x" * 63), ("p", "fine"), ("p", "y" * 70)])
    with pytest.raises(SFTDataError, match=r"2 example\(s\) have an empty answer \(indices \[1, 2\]\)"):
        encode_sft(lm, [("p", "a"), ("p", ""), ("p", "  \n")])
    with pytest.raises(SFTDataError, match="example 0 is str"):
        encode_sft(lm, ["just a string"])


# ------------------------------------------------------------------------------------------- SFT loss
def _hand_sft_losses(lm, batch):
    with torch.no_grad():
        logp = lm(batch).float().log_softmax(-1)
    losses = []
    for b in range(batch["input_ids"].shape[0]):
        terms = [-logp[b, t - 1, int(batch["targets"][b, t])] for t in range(1, batch["targets"].shape[1])
                 if batch["targets"][b, t] != -100]
        losses.append(sum(terms) / len(terms))
    return torch.stack(losses)


@pytest.mark.parametrize("arch", ARCHS)
def test_sft_loss_is_the_mean_answer_nll_per_example(arch):
    lm = tiny_causal_lm(arch, seed=7)
    batch = collate_sft(encode_sft(lm, [("The capital of France is", " Paris"), ("1, 2, 3,", " 4"), ("hi", " there you")]),
                        pad_id=EOS)
    with torch.no_grad():
        losses = sft_loss(lm, batch)
    assert torch.allclose(losses, _hand_sft_losses(lm, batch), atol=1e-5)
    # transformers' own causal-LM loss of one example (labels = targets, shifted inside) agrees.
    one = {k: v[:1, : len(encode_sft(lm, [("The capital of France is", " Paris")]).input_ids[0])] for k, v in batch.items()}
    with torch.no_grad():
        reference = lm.lm(input_ids=one["input_ids"], attention_mask=one["attention_mask"], labels=one["targets"]).loss
    assert torch.allclose(losses[0], reference, atol=1e-5)


def test_sft_loss_projects_only_positions_that_predict_answer_tokens():
    lm = tiny_causal_lm("llama")
    batch = collate_sft(encode_sft(lm, [("a long prompt with many tokens", " ab"), ("short", " c")]), pad_id=EOS)
    shapes = []
    handle = lm.lm.lm_head.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    sft_loss(lm, batch)
    handle.remove()
    assert shapes == [(4 + 3, 259)]  # " ab" + eos and " c" + eos: 7 positions, not 2 x 34


def test_sft_loss_gradient_ignores_the_prompt_targets():
    lm = tiny_causal_lm("llama", seed=1)
    a = collate_sft(encode_sft(lm, [("prompt one", " same answer")]), pad_id=EOS)
    b = {k: v.clone() for k, v in a.items()}
    b["input_ids"][0, 3] = ord("X")  # another prompt token changes the context...
    changed = sft_loss(lm, b)
    b["input_ids"][0, 3] = a["input_ids"][0, 3]
    assert torch.equal(sft_loss(lm, b), sft_loss(lm, a))
    assert not torch.equal(changed, sft_loss(lm, a))  # ...so it matters as context, while only answers are targets


# ------------------------------------------------------------------------------------------- multiple choice
def test_items_are_validated_with_clear_messages():
    with pytest.raises(MultipleChoiceError, match=r"item 'm1': gold index 3 is outside its 3 options \(valid: 0..2\)"):
        MultipleChoiceItem("Q?", ("a", "b", "c"), gold=3, id="m1")
    with pytest.raises(MultipleChoiceError, match="gold index -1"):
        MultipleChoiceItem("Q?", ("a", "b"), gold=-1)
    with pytest.raises(MultipleChoiceError, match="option 'b' appears 2 times"):
        MultipleChoiceItem("Q?", ("a", "b", "b"), gold=0)
    with pytest.raises(MultipleChoiceError, match=r"option\(s\) \[1\] are empty"):
        MultipleChoiceItem("Q?", ("a", " "), gold=0)
    with pytest.raises(MultipleChoiceError, match="at least 2 options"):
        MultipleChoiceItem("Q?", ("a",), gold=0)


def test_requests_are_tokenized_as_the_harness_does():
    lm = tiny_causal_lm("llama")
    assert encode_request(lm, "Answer:", " yes") == (_bytes("Answer:"), _bytes(" yes"))
    assert encode_request(lm, "Answer:  ", "yes") == (_bytes("Answer:"), _bytes("  yes"))
    assert encode_request(lm, "", "yes") == ([EOS], _bytes("yes"))


def _random_items(count, seed):
    rng = random.Random(seed)
    words = ["red", "blue", "a cat", "no", "yes", "forty-two", "the moon", "x", "salt water", "ok"]
    items = []
    for i in range(count):
        options = rng.sample(words, rng.randint(2, 4))
        items.append(MultipleChoiceItem(f"Question {i}: pick one.\nAnswer:", tuple(options), rng.randrange(len(options)),
                                        id=f"q{i}"))
    return items


def _hand_loglikelihood(lm, context, continuation):
    ids = torch.tensor([_bytes(context) + _bytes(continuation)])
    with torch.no_grad():
        logp = lm({"input_ids": ids, "attention_mask": torch.ones_like(ids)}).double().log_softmax(-1)[0]
    start = len(_bytes(context))
    return sum(float(logp[t - 1, ids[0, t]]) for t in range(start, ids.shape[1]))


@pytest.mark.parametrize("arch", ARCHS)
def test_acc_and_acc_norm_equal_a_hand_computation(arch):
    lm = tiny_causal_lm(arch, seed=11)
    items = _random_items(16, seed=3)
    result = score_multiple_choice(lm, items, batch_size=5)
    hand_acc, hand_norm, disagreements = 0, 0, 0
    for item, lls in zip(items, result.loglikelihoods):
        hand = [_hand_loglikelihood(lm, item.context, " " + option) for option in item.options]
        assert lls == pytest.approx(hand, abs=1e-4)
        best = max(range(len(hand)), key=lambda k: (hand[k], -k))  # first of equal maxima
        normed = [h / len(option) for h, option in zip(hand, item.options)]
        best_norm = max(range(len(normed)), key=lambda k: (normed[k], -k))
        hand_acc += best == item.gold
        hand_norm += best_norm == item.gold
        disagreements += best != best_norm
    assert result.acc == hand_acc / len(items) and result.acc_norm == hand_norm / len(items)
    assert disagreements > 0  # the length normalisation changed some answers: the two metrics were both tested
    assert result.metrics()["n"] == 16 and result.ids[0] == "q0"


def test_batching_and_order_do_not_change_the_scores():
    lm = tiny_causal_lm("gpt2", seed=2)
    requests = [r for item in _random_items(6, seed=5) for r in item.requests()]
    one, _ = loglikelihoods(lm, requests, batch_size=1)
    many, _ = loglikelihoods(lm, requests, batch_size=7)
    assert many == pytest.approx(one, abs=1e-5)
    reversed_scores, _ = loglikelihoods(lm, requests[::-1], batch_size=4)
    assert reversed_scores[::-1] == pytest.approx(one, abs=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_options_differing_only_in_their_last_token_share_a_row_and_keep_their_scores(arch):
    lm = tiny_causal_lm(arch, seed=4)
    # "Y"/"N"/"M" after one context, and " y"/" n" (one byte each after the shared space): one row each.
    requests = [(context, option) for context in ("Sick?", "Healthy?") for option in "YNM"]
    requests += [("Sick?", " y"), ("Sick?", " n"), ("Sick?", "no")]
    rows = []
    handle = lm.lm.get_input_embeddings().register_forward_hook(lambda m, i, o: rows.append(o.shape[0]))
    scores, _ = loglikelihoods(lm, requests, batch_size=8)
    handle.remove()
    assert rows == [4]  # two contexts' one-byte options, the " y"/" n" pair, "no"
    hand = [_hand_loglikelihood(lm, context, option) for context, option in requests]
    assert scores == pytest.approx(hand, abs=1e-5)


def test_long_contexts_lose_tokens_from_the_left_and_are_counted(caplog):
    lm = tiny_causal_lm("llama", context=64)
    context = "w" * 80 + " Answer:"
    with caplog.at_level(logging.WARNING, logger="saftune.eval.multiple_choice"):
        scores, truncated = loglikelihoods(lm, [(context, " yes"), ("Short:", " no")])
    assert truncated == 1 and "1 of 2 sequences were longer than 64 tokens" in caplog.text
    kept = (_bytes(context) + _bytes(" yes"))[-64:]
    assert scores[0] == pytest.approx(_hand_loglikelihood(lm, bytes(kept[:-4]).decode(), " yes"), abs=1e-4)
    with pytest.raises(ValueError, match="leaves no room for context"):
        loglikelihoods(lm, [("c", " " + "z" * 70)])
