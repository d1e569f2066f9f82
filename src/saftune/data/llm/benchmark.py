"""A speciality-vs-generality benchmark for causal LMs (Lin et al., arXiv 2309.06256).

The model is fine-tuned on one *speciality* task, given as (prompt, answer) pairs, and scored on that
task's held-out multiple-choice items (validation: chooses hyperparameters; test: reported as "id").
*Generality* is what it had before and should keep: multiple-choice probes of common sense and
knowledge, and instruction following by generation. Each is reported, and their average.

An `LMBenchmark` plays the role a `Benchmark` plays for classifiers: the grid, the runner and the
report take either. Its training split holds `SFTExample`s (labels unused); evaluation is
`saftune.eval.lm.evaluate_lm`.

Example:
    >>> from saftune.data.llm import MultipleChoiceItem, SFTExample
    >>> item = MultipleChoiceItem("Question: 2+2?\\nAnswer:", ("4", "5"), gold=0, id="a1")
    >>> bench = LMBenchmark("toy", train=Split("toy/train", [SFTExample("2+2?", "4")], [0]), val=[item],
    ...                     test=[item], probes={"arith": [item]})
    >>> bench.validate(); bench.modality
    'causal-lm'
"""

from __future__ import annotations

from dataclasses import dataclass, field

from saftune.data.base import Split
from saftune.data.llm.multiple_choice import MultipleChoiceItem
from saftune.data.llm.sft import SFTExample


@dataclass
class LMBenchmark:
    """One speciality task with its generality probes.

    Attributes:
        name: registry name.
        train: the speciality's fine-tuning pairs (`SFTExample` inputs; labels are ignored).
        val: speciality multiple-choice items for choosing hyperparameters (never the test or probes).
        test: speciality multiple-choice items, reported as "id".
        probes: name -> multiple-choice items of a generality probe, reported as "ood/<name>".
        instructions: instruction-following prompts (`saftune.data.llm.instructions`), reported as
            "ood/instructions" (strict prompt-level accuracy); empty: not measured.
        max_new_tokens: the answer length limit of instruction-following generation (greedy decoding).
        generation_batch_size: prompts generated together (32 is the fastest measured on a CPU).
        info: provenance and protocol (sources, licences, sizes, chance levels), recorded with results.
    """

    name: str
    train: Split
    val: list[MultipleChoiceItem]
    test: list[MultipleChoiceItem]
    probes: dict[str, list[MultipleChoiceItem]] = field(default_factory=dict)
    instructions: list = field(default_factory=list)
    max_new_tokens: int = 128
    generation_batch_size: int = 32
    info: dict = field(default_factory=dict)

    modality = "causal-lm"

    def eval_sizes(self) -> dict[str, int]:
        """Items per evaluated set: "id" (the speciality test), each probe and "instructions" by name."""
        sizes = {"id": len(self.test), **{k: len(v) for k, v in self.probes.items()}}
        if self.instructions:
            sizes["instructions"] = len(self.instructions)
        return sizes

    def validate(self) -> None:
        """Refuse a benchmark that cannot be trained or scored, naming the set and the fix."""
        if not len(self.train):
            raise ValueError(f"dataset {self.name!r}: the training split is empty; it needs (prompt, answer) pairs")
        wrong = [type(x).__name__ for x in self.train.inputs if not isinstance(x, SFTExample)][:1]
        if wrong:
            raise ValueError(f"dataset {self.name!r}: training inputs must be SFTExample(prompt, answer); got {wrong[0]}")
        for role, items in (("validation", self.val), ("test", self.test), *self.probes.items()):
            if not items:
                raise ValueError(f"dataset {self.name!r}: the {role} set is empty; give it multiple-choice items")
            if not all(isinstance(i, MultipleChoiceItem) for i in items):
                raise ValueError(f"dataset {self.name!r}: the {role} set must hold MultipleChoiceItem objects")
        if self.instructions:
            from saftune.data.llm.instructions import InstructionPrompt

            if not all(isinstance(p, InstructionPrompt) for p in self.instructions):
                raise ValueError(f"dataset {self.name!r}: instructions must be InstructionPrompt objects "
                                 "(saftune.data.llm.instructions.instruction_prompts)")
            if self.max_new_tokens < 1 or self.generation_batch_size < 1:
                raise ValueError(f"dataset {self.name!r}: max_new_tokens and generation_batch_size must be >= 1")
