"""`toy-text` and `toy-images`: tiny generated tasks for smoke tests (no assets, seconds to run).

toy-text: sentences made of three sentiment words ("the film was good and great and fine"); the OOD
set uses held-out words. toy-images: dark vs bright noisy 32x32 images; the OOD set is lower contrast.
They only prove that the plumbing works; their accuracies mean nothing.

Example:
    >>> b = toy_text(ToyOptions(shots=4, seed=1))
    >>> len(b.train), sorted(b.ood)
    (8, ['shifted'])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from saftune.config import Config, option
from saftune.data.base import Benchmark, Split
from saftune.data.registry import register_dataset

POSITIVE = ["good", "great", "superb", "lovely", "brilliant", "fine", "happy", "excellent"]
NEGATIVE = ["bad", "awful", "poor", "boring", "dreadful", "sad", "terrible", "weak"]


def text_split(name: str, n: int, seed: int, words: slice = slice(0, 6)) -> Split:
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        choice = rng.choice((POSITIVE if label else NEGATIVE)[words], size=3)
        texts.append("the film was " + " and ".join(choice))
        labels.append(label)
    return Split(name, texts, labels)


def image_split(name: str, n: int, seed: int, contrast: float = 1.0) -> Split:
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(n):
        label = i % 2
        base = 128 + contrast * (72 if label else -78)
        images.append(np.clip(base + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype(np.uint8))
        labels.append(label)
    return Split(name, images, labels)


@dataclass
class ToyOptions(Config):
    """Options of the generated toy tasks."""

    shots: int = option(8, "training examples per class", low=1)
    seed: int = option(1, "seed of the generated training set", low=0)
    test_size: int = option(16, "examples in the ID test set and in the OOD set", low=1)


@register_dataset("toy-text", "generated sentiment-word sentences (smoke tests; no assets)", options=ToyOptions)
def toy_text(options: ToyOptions) -> Benchmark:
    shots, seed, test_size = options.shots, options.seed, options.test_size
    return Benchmark("toy-text", "text", ["negative", "positive"], ["a {} review."],
                     text_split("train", 2 * shots, seed), text_split("val", 8, 100 + seed),
                     text_split("test", test_size, 1000), {"shifted": text_split("shifted", test_size, 1001, slice(4, 8))},
                     info={"source": "generated", "shots": shots, "seed": seed})


@register_dataset("toy-images", "generated dark/bright images (smoke tests; no assets)", options=ToyOptions)
def toy_images(options: ToyOptions) -> Benchmark:
    shots, seed, test_size = options.shots, options.seed, options.test_size
    return Benchmark("toy-images", "image", ["dark", "bright"], ["a {} photo."],
                     image_split("train", 2 * shots, seed), image_split("val", 8, 100 + seed),
                     image_split("test", test_size, 1000), {"low-contrast": image_split("low-contrast", test_size, 1001, 0.5)},
                     info={"source": "generated", "shots": shots, "seed": seed})


@dataclass
class ToyLMOptions(Config):
    """Options of the generated causal-LM toy task."""

    train_size: int = option(16, "fine-tuning pairs", low=2)
    seed: int = option(1, "seed of the generated training pairs", low=0)
    test_size: int = option(8, "items in the speciality test set and in each probe", low=2)
    instructions: int = option(0, "instruction-following prompts to include (0: none; generation is the slow part)",
                               low=0)


def _word_questions(n: int, seed: int) -> list[tuple[str, str]]:
    """(prompt, answer) pairs: is a sentiment word positive? Balanced yes/no."""
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(n):
        positive = i % 2 == 0
        word = str(rng.choice(POSITIVE if positive else NEGATIVE))
        pairs.append((f"Is the word '{word}' positive?", "yes" if positive else "no"))
    return pairs


@register_dataset("toy-lm", "generated yes/no speciality + two probes for causal LMs (smoke tests; no assets)",
                  options=ToyLMOptions)
def toy_lm(options: ToyLMOptions):
    from saftune.data.llm import LMBenchmark, MultipleChoiceItem, SFTExample

    def items(pairs, tag):
        return [MultipleChoiceItem(p, ("yes", "no"), 0 if a == "yes" else 1, id=f"{tag}-{i}", delimiter="")
                for i, (p, a) in enumerate(pairs)]

    train = _word_questions(options.train_size, options.seed)
    letters = [MultipleChoiceItem(f"Question: which letter comes after {c}?\nAnswer:", (chr(ord(c) + 1), chr(ord(c) + 2)),
                                  0, id=f"letters-{c}") for c in "abcdefghijklmnop"[: options.test_size]]
    counting = [MultipleChoiceItem(f"Question: what is {k} plus one?\nAnswer:", (str(k + 1), str(k + 3)), 0,
                                   id=f"counting-{k}") for k in range(options.test_size)]
    instructions = []
    if options.instructions:
        from saftune.data.llm.instructions import instruction_prompts

        instructions = instruction_prompts(options.instructions)
    return LMBenchmark("toy-lm", Split("toy-lm/train", [SFTExample(p, a) for p, a in train], [0] * len(train)),
                       val=items(_word_questions(8, 100 + options.seed), "val"),
                       test=items(_word_questions(options.test_size, 1000), "test"),
                       probes={"letters": letters, "counting": counting}, instructions=instructions, max_new_tokens=16,
                       info={"source": "generated", "train_size": options.train_size, "seed": options.seed})
