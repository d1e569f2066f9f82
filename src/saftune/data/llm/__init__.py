"""Causal-LM task data: supervised (prompt, answer) pairs and multiple-choice items.

Example:
    >>> from saftune.data.llm import MultipleChoiceItem, SFTExample
    >>> SFTExample("Capital of France?", "Paris").answer
    'Paris'
"""

from saftune.data.llm.multiple_choice import MultipleChoiceError, MultipleChoiceItem
from saftune.data.llm.sft import SFTDataError, SFTEncoding, SFTExample, collate_sft, encode_sft, sft_loss
from saftune.data.llm.benchmark import LMBenchmark  # noqa: E402  (after the types it holds)
from saftune.data.llm.instructions import Instruction, InstructionPrompt, instruction_prompts  # noqa: E402

__all__ = ["Instruction", "InstructionPrompt", "LMBenchmark", "MultipleChoiceError", "MultipleChoiceItem",
           "SFTDataError", "SFTEncoding", "SFTExample", "collate_sft", "encode_sft", "instruction_prompts", "sft_loss"]
