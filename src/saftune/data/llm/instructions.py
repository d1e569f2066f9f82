"""Instruction-following prompts with verifiable instructions, in the manner of IFEval (written for saftune).

Each `InstructionPrompt` is an everyday task ("Tell me about making tea.") followed by one or two
instructions whose compliance a program can check ("Do not use any commas in your answer."). The
instructions travel with their parameters (`Instruction(kind, args)`), so a response is scored by a
deterministic function of (kind, args, response): see `saftune.eval.instruction_checks`.

The set is generated, not collected: `TOPICS` (40 everyday topics, each with three related words) ×
`TASKS` (5 task verbs) × `KINDS` (20 instruction kinds with their templates and parameter cycles).
Prompt ``i`` of topic ``t`` gets the primary kind ``KINDS[(5 t + i) % 20]`` (so every kind leads 10 of
the 200 prompts) and half of each kind's prompts a second, compatible kind. Lengths fit a very small model
(SmolLM2-135M-Instruct) answering in about 128 new tokens: at most 30-60 words, 2-3 paragraphs,
3-4 bullets, and so on. Nothing here is random: the same code gives the same prompts everywhere.

Instruction kinds (IFEval's groups): change of case (`lowercase`, `uppercase`); length (`max_words`,
`min_words`, `sentences`, `paragraphs`); keywords (`include_keywords`, `exclude_word`,
`keyword_frequency`, `letter_frequency`); detectable format (`json`, `title`, `bullets`,
`highlights`, `sections`, `quotation`); punctuation (`no_commas`); start/end (`end_phrase`,
`start_word`); postscript (`postscript`).

Example:
    >>> prompts = instruction_prompts()
    >>> len(prompts), prompts[0].id
    (200, 'if-000')
    >>> prompts[0].prompt
    'Write a short blog post about a walk in the park. Write your entire answer in lowercase letters only; no capital letters.'
    >>> [i.kind for i in prompts[1].instructions]
    ['uppercase', 'no_commas']
    >>> [p.id for p in instruction_prompts(n=3)]
    ['if-098', 'if-107', 'if-194']
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

# ---------------------------------------------------------------------------------------------- the tables
# (topic, three related words): the words feed the keyword instructions, so a model that answers on topic
# can reasonably use (or avoid) them.
TOPICS: tuple[tuple[str, tuple[str, str, str]], ...] = (
    ("a walk in the park", ("trees", "bench", "path")),
    ("making tea", ("kettle", "cup", "water")),
    ("learning to ride a bike", ("balance", "helmet", "wheel")),
    ("a rainy afternoon", ("window", "umbrella", "rain")),
    ("cooking rice", ("pot", "grain", "water")),
    ("keeping a houseplant alive", ("soil", "light", "leaves")),
    ("a trip to the beach", ("sand", "waves", "sun")),
    ("saving money each month", ("budget", "bank", "spend")),
    ("a visit to the library", ("books", "quiet", "shelf")),
    ("getting a good night's sleep", ("bed", "dark", "rest")),
    ("walking a dog", ("leash", "street", "dog")),
    ("baking bread", ("flour", "oven", "dough")),
    ("moving to a new city", ("boxes", "neighbors", "city")),
    ("a birthday party", ("cake", "candles", "friends")),
    ("cleaning the kitchen", ("sponge", "sink", "dishes")),
    ("a first day at a new job", ("desk", "team", "work")),
    ("planting a vegetable garden", ("seeds", "tomatoes", "garden")),
    ("a long train journey", ("ticket", "station", "train")),
    ("learning a new language", ("words", "practice", "language")),
    ("a snowy morning", ("snow", "boots", "cold")),
    ("fixing a flat tire", ("pump", "tube", "tire")),
    ("a picnic with friends", ("basket", "blanket", "food")),
    ("drinking enough water", ("bottle", "thirst", "drink")),
    ("a visit to the dentist", ("teeth", "chair", "dentist")),
    ("camping in the woods", ("tent", "fire", "forest")),
    ("writing a letter by hand", ("pen", "paper", "letter")),
    ("a family dinner", ("table", "soup", "dinner")),
    ("going to a concert", ("music", "crowd", "stage")),
    ("painting a room", ("brush", "color", "wall")),
    ("taking the bus to school", ("seat", "driver", "bus")),
    ("a day at the zoo", ("lions", "map", "animals")),
    ("making a sandwich", ("bread", "cheese", "knife")),
    ("organizing a messy closet", ("shirts", "hangers", "closet")),
    ("watching the sunset", ("sky", "orange", "sun")),
    ("a morning run", ("shoes", "breath", "run")),
    ("sharing a meal with a neighbor", ("plate", "door", "neighbor")),
    ("visiting a farmers market", ("apples", "stall", "market")),
    ("studying for an exam", ("notes", "focus", "exam")),
    ("a lazy Sunday", ("couch", "coffee", "sunday")),
    ("caring for a pet cat", ("food", "purr", "cat")),
)

TASKS: tuple[str, ...] = (
    "Write a short blog post about",
    "Tell me about",
    "Write a short letter to a friend about",
    "Give some advice about",
    "Write a short story about",
)


@dataclass(frozen=True)
class InstructionKind:
    """One kind of verifiable instruction: how it reads, and which parameter values the set cycles through.

    Attributes:
        name: the kind, as checks and per-kind metrics name it.
        group: IFEval's group ("case", "length", "keywords", "format", "punctuation", "startend", "postscript").
        template: the instruction text; ``{...}`` fields are filled from the arguments.
        cycle: argument dicts used in turn (the k-th prompt of this kind gets ``cycle[k % len(cycle)]``);
            the topic's words fill the keyword kinds instead.
    """

    name: str
    group: str
    template: str
    cycle: tuple = ({},)


KINDS: tuple[InstructionKind, ...] = (
    InstructionKind("lowercase", "case", "Write your entire answer in lowercase letters only; no capital letters."),
    InstructionKind("uppercase", "case", "Write your entire answer in capital letters only."),
    InstructionKind("max_words", "length", "Keep your answer to at most {n} words.", ({"n": 40}, {"n": 50}, {"n": 60})),
    InstructionKind("min_words", "length", "Your answer must be at least {n} words long.", ({"n": 30}, {"n": 40})),
    InstructionKind("sentences", "length", "Answer in {relation} {n} sentences.",
                    ({"relation": "at most", "n": 3}, {"relation": "at least", "n": 3}, {"relation": "at most", "n": 2})),
    InstructionKind("paragraphs", "length", "Write exactly {n} paragraphs, separated from each other by a blank line.",
                    ({"n": 2}, {"n": 3})),
    InstructionKind("include_keywords", "keywords", 'Make sure to use the words "{words[0]}" and "{words[1]}".'),
    InstructionKind("exclude_word", "keywords", 'Do not use the word "{word}" anywhere in your answer.'),
    InstructionKind("keyword_frequency", "keywords", 'Use the word "{word}" at least {n} times.', ({"n": 2}, {"n": 3})),
    InstructionKind("letter_frequency", "keywords", 'The letter "{letter}" must appear at least {n} times in your answer.',
                    ({"letter": "r", "n": 6}, {"letter": "d", "n": 4}, {"letter": "w", "n": 3}, {"letter": "p", "n": 3})),
    InstructionKind("json", "format", "Format your entire answer as valid JSON. You may put it in a ```json code block."),
    InstructionKind("title", "format", "Give your answer a title wrapped in double angular brackets, like <<a title>>."),
    InstructionKind("bullets", "format", 'Answer with exactly {n} bullet points, each on its own line starting with "* ".',
                    ({"n": 3}, {"n": 4})),
    InstructionKind("highlights", "format",
                    "Highlight at least {n} parts of your answer with single asterisks, like *this part*.", ({"n": 1}, {"n": 2})),
    InstructionKind("sections", "format",
                    'Divide your answer into {n} sections, starting each with "Section" and its number, like "Section 1".',
                    ({"n": 2}, {"n": 3})),
    InstructionKind("quotation", "format", "Wrap your entire answer in double quotation marks."),
    InstructionKind("no_commas", "punctuation", "Do not use any commas in your answer."),
    InstructionKind("end_phrase", "startend", 'End your answer with the exact phrase "{phrase}" and nothing after it.',
                    ({"phrase": "That is all."}, {"phrase": "Thank you for reading."}, {"phrase": "See you soon!"})),
    InstructionKind("start_word", "startend", 'Begin your answer with the word "{word}".',
                    ({"word": "Today"}, {"word": "Yes"}, {"word": "Imagine"}, {"word": "First"})),
    InstructionKind("postscript", "postscript", 'At the end of your answer, add a postscript starting with "P.S."'),
)
KIND_NAMES: tuple[str, ...] = tuple(k.name for k in KINDS)
_BY_NAME = {k.name: k for k in KINDS}

# Second instructions are drawn, in turn, from kinds that combine with most others...
SECONDARY: tuple[str, ...] = ("no_commas", "include_keywords", "postscript", "lowercase", "exclude_word", "title",
                              "max_words", "end_phrase", "start_word", "highlights")
# ...never from the primary's own family (two case rules, two lengths, two layouts, two endings contradict or
# blur each other)...
_FAMILIES = (
    {"lowercase", "uppercase", "sections"},           # "Section 1" has a capital
    {"max_words", "min_words", "sentences"},
    {"paragraphs", "bullets", "sections", "json"},
    {"json", "quotation", "end_phrase", "postscript", "start_word"},
    {"end_phrase", "postscript"},
)
# ...and a JSON answer takes only rules about its words.
_JSON_PARTNERS = {"include_keywords", "exclude_word", "lowercase"}


def compatible(a: str, b: str) -> bool:
    """Whether instructions of kinds `a` and `b` can both be followed in one answer (as this set pairs them).

    Example:
        >>> compatible("lowercase", "uppercase"), compatible("lowercase", "no_commas"), compatible("json", "title")
        (False, True, False)
    """
    if a == b or any(a in f and b in f for f in _FAMILIES):
        return False
    if "json" in (a, b):
        return (b if a == "json" else a) in _JSON_PARTNERS
    return True


# ---------------------------------------------------------------------------------------------- the objects
@dataclass(frozen=True)
class Instruction:
    """One verifiable instruction: its kind, its arguments and the sentence the prompt says it with.

    Example:
        >>> i = Instruction.make("max_words", n=40)
        >>> i.text, i.args["n"]
        ('Keep your answer to at most 40 words.', 40)
    """

    kind: str
    args: Mapping = field(default_factory=dict, hash=False)
    text: str = ""

    def __post_init__(self):
        if self.kind not in _BY_NAME:
            raise ValueError(f"instruction kind must be one of {', '.join(KIND_NAMES)}; got {self.kind!r}")
        object.__setattr__(self, "args", MappingProxyType(dict(self.args)))  # read-only, like the rest
        if not self.text:
            object.__setattr__(self, "text", _BY_NAME[self.kind].template.format(**self.args))

    @classmethod
    def make(cls, kind: str, **args) -> Instruction:
        return cls(kind, args)

    @property
    def group(self) -> str:
        return _BY_NAME[self.kind].group

    def to_dict(self) -> dict:
        return {"kind": self.kind, "args": {k: list(v) if isinstance(v, tuple) else v for k, v in self.args.items()}}


@dataclass(frozen=True)
class InstructionPrompt:
    """A prompt and the instructions in it that a response is checked against.

    Attributes:
        id: stable identifier ("if-000" ...).
        prompt: the full user message (task, then the instructions' sentences).
        instructions: what is checked, in the order the prompt states them.
    """

    id: str
    prompt: str
    instructions: tuple[Instruction, ...]

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(i.kind for i in self.instructions)

    def to_dict(self) -> dict:
        return {"id": self.id, "prompt": self.prompt, "instructions": [i.to_dict() for i in self.instructions]}


def _instruction(kind: str, use: int, words: tuple[str, str, str]) -> Instruction:
    """The `use`-th instruction of `kind` in the set: cycle through its parameters; keywords from the topic."""
    spec = _BY_NAME[kind]
    args = dict(spec.cycle[use % len(spec.cycle)])
    if kind == "include_keywords":
        args["words"] = words[:2]
    elif kind == "exclude_word":
        args["word"] = words[2]
    elif kind == "keyword_frequency":
        args["word"] = words[2]
    return Instruction(kind, args)


def _build() -> tuple[InstructionPrompt, ...]:
    prompts, uses, second = [], Counter(), 0
    per_topic = len(KINDS) // 4  # 5 prompts per topic; 40 topics -> 200 prompts, each kind leads 10
    for t, (topic, words) in enumerate(TOPICS):
        for i in range(per_topic):
            index = len(prompts)
            primary = KINDS[(per_topic * t + i) % len(KINDS)].name
            kinds = [primary]
            if (t // 4 + i) % 2 == 1:  # half the prompts of each primary kind carry a second instruction
                for step in range(len(SECONDARY)):
                    candidate = SECONDARY[(second + step) % len(SECONDARY)]
                    if compatible(primary, candidate):
                        kinds.append(candidate)
                        second += step + 1
                        break
            instructions = []
            for kind in kinds:
                instructions.append(_instruction(kind, uses[kind], words))
                uses[kind] += 1
            task = f"{TASKS[(t + i) % len(TASKS)]} {topic}."
            text = " ".join([task, *(x.text for x in instructions)])
            prompts.append(InstructionPrompt(f"if-{index:03d}", text, tuple(instructions)))
    return tuple(prompts)


_PROMPTS = _build()


def instruction_prompts(n: int | None = None, seed: int = 0) -> list[InstructionPrompt]:
    """The instruction-following prompt set (200 prompts), or a deterministic subsample of `n` of them.

    Args:
        n: how many prompts (None: all). A subsample keeps the set's order.
        seed: which subsample.

    Example:
        >>> ps = instruction_prompts()
        >>> sum(len(p.instructions) for p in ps), len({p.prompt for p in ps})
        (300, 200)
        >>> instruction_prompts(n=5, seed=1) == instruction_prompts(n=5, seed=1)
        True
    """
    if n is None:
        return list(_PROMPTS)
    if not 0 < n <= len(_PROMPTS):
        raise ValueError(f"n must be in 1..{len(_PROMPTS)}; got {n}")
    chosen = sorted(random.Random(seed).sample(range(len(_PROMPTS)), n))
    return [_PROMPTS[i] for i in chosen]


def composition(prompts: list[InstructionPrompt] | None = None) -> dict[str, int]:
    """How many instructions of each kind a prompt list holds (default: the whole set).

    Example:
        >>> composition()["json"], composition()["no_commas"]
        (10, 20)
    """
    counts = Counter(i.kind for p in (prompts if prompts is not None else _PROMPTS) for i in p.instructions)
    return {k: counts.get(k, 0) for k in KIND_NAMES}
