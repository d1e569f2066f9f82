"""Instruction following: the prompt set, every checker (passing and failing answers), strict/loose scoring,
and batched greedy generation on tiny models (one real-model test, opt-in: -m "assets and slow")."""

import json

import pytest
import torch

from saftune.data.llm import instructions as ins
from saftune.data.llm.instructions import Instruction, InstructionPrompt, compatible, composition, instruction_prompts
from saftune.eval import instruction_following as ifol
from saftune.eval.instruction_checks import CHECKS, check, check_loose, count_sentences, count_words, loose_variants
from saftune.eval.instruction_following import evaluate_instructions, generate, stop_token_ids
from saftune.models.tiny_lm import tiny_causal_lm


# ------------------------------------------------------------------------------------------------ the prompt set
def test_the_set_is_large_covers_every_kind_and_is_deterministic():
    prompts = instruction_prompts()
    assert len(prompts) >= 200
    assert len({p.id for p in prompts}) == len({p.prompt for p in prompts}) == len(prompts)
    counts = composition()
    assert set(counts) == set(CHECKS) and min(counts.values()) >= 10
    assert ins._build() == tuple(prompts)  # rebuilt from the tables: the same prompts
    assert [p.to_dict() for p in prompts] == json.loads(json.dumps([p.to_dict() for p in prompts]))


def test_prompts_state_their_instructions_and_pair_only_compatible_ones():
    for p in instruction_prompts():
        assert 1 <= len(p.instructions) <= 2 and len(p.prompt) < 260
        for i in p.instructions:
            assert i.text in p.prompt and "{" not in i.text
        if len(p.instructions) == 2:
            assert compatible(*p.kinds), p


def test_length_constraints_fit_a_short_answer():
    for p in instruction_prompts():
        for i in p.instructions:
            if i.kind in ("max_words", "min_words"):
                assert 20 <= i.args["n"] <= 60
            if i.kind in ("bullets", "paragraphs", "sections", "sentences", "highlights"):
                assert 1 <= i.args["n"] <= 4


def test_subsample_is_deterministic_and_ordered():
    a = instruction_prompts(n=20, seed=3)
    assert a == instruction_prompts(n=20, seed=3) and a != instruction_prompts(n=20, seed=4)
    ids = [p.id for p in a]
    assert ids == sorted(ids) and len(set(ids)) == 20
    with pytest.raises(ValueError, match="n must be in 1..200"):
        instruction_prompts(n=0)


def test_instruction_validates_its_kind_and_is_read_only():
    with pytest.raises(ValueError, match="instruction kind must be one of"):
        Instruction.make("haiku")
    i = Instruction.make("bullets", n=3)
    with pytest.raises(TypeError):
        i.args["n"] = 5
    assert i == Instruction.make("bullets", n=3) and hash(i) == hash(Instruction.make("bullets", n=3))


# ------------------------------------------------------------------------------------------------ the checkers
CASES = [
    # kind, args, a response that follows it, one that does not
    ("lowercase", {}, "tea is best hot.\nreally.", "Tea is best hot."),
    ("uppercase", {}, "TEA IS BEST HOT. P.S. YES!", "TEA IS best HOT."),
    ("max_words", {"n": 5}, "One two three four five.", "One two three four five six."),
    ("min_words", {"n": 4}, "It's a nice day.", "Nice day."),
    ("sentences", {"relation": "at most", "n": 2}, "Tea is hot. Drink it!", "Tea is hot. Drink it! Now?"),
    ("sentences", {"relation": "at least", "n": 3}, "1. Boil water.\n2. Add tea.\n3. Wait.", "Boil water. Add tea."),
    ("paragraphs", {"n": 2}, "First part here.\n\nSecond part here.", "First part.\nStill first.\n\nSecond.\n\nThird."),
    ("include_keywords", {"words": ("kettle", "cup")}, "Fill the Kettle, then two cups.", "Fill the kettle."),
    ("exclude_word", {"word": "water"}, "Use a watering can.", "Boil the Water first."),
    ("keyword_frequency", {"word": "tea", "n": 2}, "Tea, more teas, then a team.", "Tea and a team."),
    ("letter_frequency", {"letter": "r", "n": 3}, "Red rivers run.", "Red rose."),
    ("json", {}, '```json\n{"tea": "hot", "cups": 2}\n```', '```json\n{"tea": "hot",\n'),
    ("title", {}, "<<Morning Tea>>\nBoil water.", "<< >>\nBoil water."),
    ("bullets", {"n": 3}, "Steps:\n* Boil\n* Pour\n- Wait", "* Boil\n* Pour\n*not a bullet*"),
    ("highlights", {"n": 2}, "Use *fresh* water and **loose** leaves.", "Use *fresh* water and ** leaves."),
    ("sections", {"n": 2}, "Section 1\nBoil.\n## Section 2\nPour.", "Section 1\nBoil. See section 2."),
    ("quotation", {}, '  "Tea is best hot."\n', '"Tea is best hot." said Ann.'),
    ("no_commas", {}, "Tea is hot and strong.", "Tea is hot, and strong."),
    ("end_phrase", {"phrase": "That is all."}, '"Boil it. That is all."', "That is all. Enjoy!"),
    ("start_word", {"word": "Today"}, "**Today,** we boil.", "So today we boil."),
    ("postscript", {}, "Boil it.\n\nP.S. Use a lid.", "Boil it. I wrote a P.S. once."),
]


@pytest.mark.parametrize("kind,args,good,bad", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_checker_accepts_a_following_answer_and_rejects_another(kind, args, good, bad):
    assert check(kind, args, good) is True
    assert check(kind, args, bad) is False


def test_every_kind_has_a_checker_with_cases():
    assert set(CHECKS) == set(ins.KIND_NAMES) == {c[0] for c in CASES}


@pytest.mark.parametrize("kind,args", [(k, a) for k, a, _, _ in CASES])
def test_an_empty_answer_follows_nothing(kind, args):
    assert not check(kind, args, "") and not check(kind, args, "  \n") and not check_loose(kind, args, "")


def test_counting_helpers():
    assert count_words("It's a well-known fact.") == 6
    assert count_sentences("Mr. Smith came.") == 2  # the documented simple rule
    assert count_sentences("1. Boil.\n2) Pour.\n* Wait") == 3


def test_loose_forgives_a_preamble_a_closing_line_and_asterisks():
    answer = "Sure! Here it is:\nthe whole answer in lowercase.\nHope This Helps!"
    assert not check("lowercase", {}, answer) and check_loose("lowercase", {}, answer)
    assert check_loose("no_commas", {}, "Well, here:\nno commas here") and not check("no_commas", {}, "Well, here:\nno commas")
    assert check_loose("end_phrase", {"phrase": "See you soon!"}, "Bye. **See you soon!**")
    assert not check("end_phrase", {"phrase": "See you soon!"}, "Bye. **See you soon!**")
    assert len(loose_variants("a\nb\nc")) == 8
    with pytest.raises(KeyError, match="no check for instruction kind"):
        check("haiku", {}, "text")


# ------------------------------------------------------------------------------------------------ scoring
def _prompt(pid, *instructions):
    return InstructionPrompt(pid, "Tell me about tea.", tuple(instructions))


def test_metrics_are_ifeval_prompt_and_instruction_level(monkeypatch):
    prompts = [
        _prompt("a", Instruction.make("no_commas"), Instruction.make("lowercase")),
        _prompt("b", Instruction.make("lowercase")),
        _prompt("c", Instruction.make("end_phrase", phrase="That is all.")),
    ]
    responses = ["tea is hot and good.",              # both followed
                 "Sure!\ntea is hot.",                # lowercase only loosely (first line dropped)
                 "Tea, hot, good."]                   # not followed
    monkeypatch.setattr(ifol, "generate", lambda model, texts, **kw: (list(responses), [5, 7, 9]))
    result = evaluate_instructions(None, prompts, max_new_tokens=9)
    assert result.metrics() == {"strict": 1 / 3, "loose": 2 / 3, "strict_instruction": 2 / 4, "loose_instruction": 3 / 4,
                                "n": 3}
    assert result.per_kind() == {"end_phrase": {"strict": 0.0, "loose": 0.0, "n": 1},
                                 "lowercase": {"strict": 0.5, "loose": 1.0, "n": 2},
                                 "no_commas": {"strict": 1.0, "loose": 1.0, "n": 1}}
    assert result.cut == 1 and result.strict == [[True, True], [False], [False]]
    assert [e["id"] for e in result.examples(5, followed=False)] == ["b", "c"]


# ------------------------------------------------------------------------------------------------ generation
TEXTS = ["Hi.", "Tell me about tea in five words please.", "Name two fruits.", "Why is the sky blue? Explain briefly.",
         "Ok"]


@pytest.mark.parametrize("arch,chat", [("llama", False), ("llama", True), ("gpt2", False)])
def test_batched_generation_equals_one_at_a_time(arch, chat):
    lm = tiny_causal_lm(arch, chat_template=chat, context=256)
    batched, lengths = generate(lm, TEXTS, batch_size=3, max_new_tokens=12)
    single = [generate(lm, [t], batch_size=1, max_new_tokens=12) for t in TEXTS]
    assert batched == [s[0][0] for s in single] and lengths == [s[1][0] for s in single]
    assert all(0 <= n <= 12 for n in lengths)
    assert lm.tokenizer.padding_side == "right"  # the tokenizer is left as it was
    # Only new tokens are decoded: one new byte token gives at most one character, never the prompt.
    assert all(len(a) <= 1 for a in generate(lm, TEXTS, batch_size=2, max_new_tokens=1)[0])


def test_generation_stops_at_the_stop_token_and_restores_the_mode(monkeypatch):
    lm = tiny_causal_lm("llama", context=256)
    free, lengths = generate(lm, TEXTS[:2], max_new_tokens=10)
    assert lengths == [10, 10]  # the random model never says eos here
    # Make the third token the first answer produces a stop token: that answer ends before it.
    third = lm.tokenizer(free[0], add_special_tokens=False)["input_ids"][2]
    monkeypatch.setattr(ifol, "stop_token_ids", lambda model: [third])
    lm.train()
    cut, lengths = generate(lm, TEXTS[:2], max_new_tokens=10)
    assert lm.training  # the mode it had
    assert lengths[0] <= 2 and free[0].startswith(cut[0])
    assert cut[1] == free[1][: len(cut[1])]


def test_decoding_is_greedy_whatever_the_models_generation_config_says():
    lm = tiny_causal_lm("gpt2", context=256)
    before, _ = generate(lm, TEXTS, batch_size=2, max_new_tokens=8)
    lm.lm.generation_config.do_sample, lm.lm.generation_config.temperature = True, 1.5
    lm.lm.generation_config.repetition_penalty = 1.3
    torch.manual_seed(1)
    assert generate(lm, TEXTS, batch_size=2, max_new_tokens=8)[0] == before


def test_stop_tokens_and_prompt_length_errors():
    assert stop_token_ids(tiny_causal_lm("llama", chat_template=True)) == [256, 258]  # eos, <|im_end|>
    lm = tiny_causal_lm("llama", context=64)
    with pytest.raises(ValueError, match="exceeds the model's max_length 64"):
        generate(lm, ["x" * 60], max_new_tokens=8)
    with pytest.raises(ValueError, match="at least 1"):
        generate(lm, ["x"], batch_size=0)


def test_evaluate_on_a_tiny_model_end_to_end():
    lm = tiny_causal_lm("llama", chat_template=True, context=320)
    prompts = instruction_prompts(n=6)
    result = evaluate_instructions(lm, prompts, batch_size=4, max_new_tokens=6)
    assert [p.id for p in result.prompts] == [p.id for p in prompts] and len(result.responses) == 6
    m = result.metrics()
    assert 0 <= m["strict"] <= m["loose"] <= 1 and 0 <= m["strict_instruction"] <= m["loose_instruction"] <= 1
    assert result.settings == {"batch_size": 4, "max_new_tokens": 6, "greedy": True}


# ------------------------------------------------------------------------------------------------ the real model
@pytest.mark.slow
@pytest.mark.assets
def test_smollm2_follows_some_instructions(require_asset):
    pytest.importorskip("gguf", reason="GGUF loading needs the llm extra: pip install 'saftune[llm]'")
    from saftune.models import create

    require_asset("smollm2")
    lm = create("smollm2")
    easy = [p for p in instruction_prompts() if p.kinds in (("max_words",), ("title",), ("bullets",))][:6]
    result = evaluate_instructions(lm, easy, batch_size=6, max_new_tokens=64)
    assert all(result.responses) and not any(r.startswith("<|im_start|>") for r in result.responses)
    assert result.metrics()["loose_instruction"] > 0  # a zero-shot instruct model follows some of these
    one_by_one = [generate(lm, [p.prompt], batch_size=1, max_new_tokens=64)[0][0] for p in easy[:2]]
    assert one_by_one == result.responses[:2]
