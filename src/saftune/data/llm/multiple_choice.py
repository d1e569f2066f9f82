"""Multiple-choice items: a context, its options and the index of the right one.

Items are checked when built: at least two options, none empty, no two the same (a duplicated option
makes `acc` depend on which copy the argmax picks), and the gold index inside the options. The check
names the item (its `id` when given) and the fix.

Example:
    >>> item = MultipleChoiceItem("Question: 2+2?\\nAnswer:", ("4", "5"), gold=0, id="arith-1")
    >>> item.requests()
    [('Question: 2+2?\\nAnswer:', ' 4'), ('Question: 2+2?\\nAnswer:', ' 5')]
    >>> MultipleChoiceItem("Q?", ("yes", "yes"), gold=0, id="q7")
    Traceback (most recent call last):
    ...
    saftune.data.llm.multiple_choice.MultipleChoiceError: item 'q7': option 'yes' appears 2 times; options must differ (drop or reword the copies)
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass


class MultipleChoiceError(ValueError):
    """A malformed multiple-choice item: too few, empty or duplicate options, or a gold index outside them."""


@dataclass(frozen=True)
class MultipleChoiceItem:
    """One question scored by the log-likelihood of each option after the context.

    Attributes:
        context: the text before an option (e.g. "Question: ...\\nAnswer:").
        options: the candidate continuations, without the delimiter.
        gold: index of the right option.
        id: a name for messages and per-item results.
        delimiter: put between context and option (lm-evaluation-harness' `target_delimiter`, " ").
    """

    context: str
    options: tuple[str, ...]
    gold: int
    id: str = ""
    delimiter: str = " "

    def __post_init__(self):
        object.__setattr__(self, "options", tuple(self.options))
        name = f"item {self.id!r}" if self.id else "item"
        if len(self.options) < 2:
            raise MultipleChoiceError(f"{name}: needs at least 2 options, got {len(self.options)}")
        empty = [i for i, o in enumerate(self.options) if not o.strip()]
        if empty:
            raise MultipleChoiceError(f"{name}: option(s) {empty} are empty; every option needs text")
        repeated = [(o, n) for o, n in Counter(self.options).items() if n > 1]
        if repeated:
            option, count = repeated[0]
            raise MultipleChoiceError(f"{name}: option {option!r} appears {count} times; options must differ "
                                      "(drop or reword the copies)")
        if isinstance(self.gold, bool) or not isinstance(self.gold, int) or not 0 <= self.gold < len(self.options):
            raise MultipleChoiceError(f"{name}: gold index {self.gold!r} is outside its {len(self.options)} options "
                                      f"(valid: 0..{len(self.options) - 1})")

    def requests(self) -> list[tuple[str, str]]:
        """(context, continuation) per option, the continuation being delimiter + option."""
        return [(self.context, self.delimiter + option) for option in self.options]
