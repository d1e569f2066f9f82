"""Checks for verifiable instructions, and IFEval's strict and loose scoring (written for saftune).

One function per instruction kind (`CHECKS[kind](response, **args) -> bool`), each a plain function of
the text. They are hand-written rather than taken from PyPI ``if-verifiable`` 0.1.2 (which repackages
IFEval's checkers) because that package (a) imports ``datasets`` when imported, (b) counts sentences
with NLTK's punkt model, loaded from a pickle that must be downloaded at run time (these machines are
offline, and the project never unpickles), (c) calls ``langdetect`` in its case checks, which is
randomized unless seeded globally, so a score could change between runs, and (d) brings six
dependencies for checks of a few lines each. The definitions below follow IFEval's where it has one:

* words are runs of ``\\w`` characters; a keyword matches as a whole word, or with a plural "s"/"es",
  case-insensitively;
* a sentence ends at ".", "!" or "?" followed by white space or the end, or at a line break (a simple
  rule: "Mr. Smith" counts as two); list markers ("1.", "*") are not sentences;
* paragraphs are separated by blank lines; bullets are lines starting with "* " or "- ";
* highlights are ``*text*`` (or ``**text**``) spans within one line; sections are lines starting with
  "Section <number>" (after markdown heading or bold marks), at least the asked number;
* JSON may sit in a ```` ``` ```` / ```` ```json ```` fence; the quotation check wants straight double quotes.

Strict and loose, as IFEval defines them: an instruction is followed *strictly* when its check passes on
the response; *loosely* when it passes on any of eight variants: the response, or the response without
its first line, without its last line, or without both, each with and without markdown asterisks (so
"Sure! Here is ..." preambles and closing remarks are forgiven). An empty (or all-space) text fails every
check. Prompt-level accuracy: the fraction of prompts whose instructions all pass; instruction-level:
the fraction of instructions that pass.

Example:
    >>> check("no_commas", {}, "Fine and dry.")
    True
    >>> check("end_phrase", {"phrase": "That is all."}, "Tea is nice. That is all.\\nHope this helps!")
    False
    >>> check_loose("end_phrase", {"phrase": "That is all."}, "Tea is nice. That is all.\\nHope this helps!")
    True
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping

_WORD = re.compile(r"\w+")


def _has_text(response: str) -> bool:
    return bool(response.strip())


def _keyword(word: str) -> re.Pattern:
    """A whole word, or its plural, any case."""
    return re.compile(rf"\b{re.escape(word)}(?:s|es)?\b", re.IGNORECASE)


def count_words(text: str) -> int:
    """Runs of word characters.

    Example:
        >>> count_words("It's a well-known fact.")
        6
    """
    return len(_WORD.findall(text))


def count_sentences(text: str) -> int:
    """Pieces that end at ".", "!", "?" (then space or the end) or a line break and contain a letter.

    List markers ("1.", "2)", "*", "-") at the start of a line are not sentences.

    Example:
        >>> count_sentences("Tea is hot. Is it 3.5 degrees?\\n* a list item\\n2. Another one")
        4
    """
    text = re.sub(r"^[ \t]*(?:\d+[.)]|[*-])[ \t]+", "", text.strip(), flags=re.MULTILINE)
    pieces = re.split(r"(?<=[.!?])\s+|\n+", text)
    return sum(1 for p in pieces if re.search(r"[^\W\d_]", p))


def paragraphs(text: str) -> list[str]:
    """Blocks of text separated by one or more blank lines."""
    return [p for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]


def bullet_lines(text: str) -> list[str]:
    """Lines that are markdown bullets ("* item" or "- item")."""
    return re.findall(r"^\s*[*-][ \t]+\S.*$", text, flags=re.MULTILINE)


# --------------------------------------------------------------------------------------------------- checks
def lowercase(response: str) -> bool:
    """All letters are lowercase (and there is at least one)."""
    return response.islower()


def uppercase(response: str) -> bool:
    """All letters are capitals (and there is at least one)."""
    return response.isupper()


def max_words(response: str, *, n: int) -> bool:
    return count_words(response) <= n


def min_words(response: str, *, n: int) -> bool:
    return count_words(response) >= n


def sentences(response: str, *, relation: str, n: int) -> bool:
    count = count_sentences(response)
    if relation == "at most":
        return count <= n
    if relation == "at least":
        return count >= n
    raise ValueError(f"relation must be 'at most' or 'at least'; got {relation!r}")


def paragraphs_exactly(response: str, *, n: int) -> bool:
    return len(paragraphs(response)) == n


def include_keywords(response: str, *, words) -> bool:
    return all(_keyword(w).search(response) for w in words)


def exclude_word(response: str, *, word: str) -> bool:
    return not _keyword(word).search(response)


def keyword_frequency(response: str, *, word: str, n: int) -> bool:
    return len(_keyword(word).findall(response)) >= n


def letter_frequency(response: str, *, letter: str, n: int) -> bool:
    return response.lower().count(letter.lower()) >= n


def json_format(response: str) -> bool:
    """The whole response parses as JSON, optionally inside a ``` fence."""
    text = response.strip()
    text = re.sub(r"^```(?:json)?\s*", "", text, flags=re.IGNORECASE)
    text = re.sub(r"\s*```$", "", text)
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def title(response: str) -> bool:
    """A title in double angular brackets, <<like this>>, with some text inside."""
    return any(t.strip() for t in re.findall(r"<<([^\n<>]*)>>", response))


def bullets(response: str, *, n: int) -> bool:
    return len(bullet_lines(response)) == n


def highlights(response: str, *, n: int) -> bool:
    """At least n spans *like this* (or **like this**) with text inside."""
    spans = re.findall(r"\*([^\n*]+)\*", response)
    return sum(1 for s in spans if s.strip()) >= n


def sections(response: str, *, n: int) -> bool:
    """At least n lines start with "Section <number>" (after markdown heading / bold marks)."""
    return len(re.findall(r"^[ \t#*]*Section\s*\d+", response, flags=re.MULTILINE)) >= n


def quotation(response: str) -> bool:
    text = response.strip()
    return len(text) > 1 and text[0] == '"' and text[-1] == '"'


def no_commas(response: str) -> bool:
    return "," not in response


def end_phrase(response: str, *, phrase: str) -> bool:
    """The response ends with the phrase (any case; surrounding white space and double quotes ignored)."""
    return response.strip().strip('"').strip().lower().endswith(phrase.strip().lower())


def start_word(response: str, *, word: str) -> bool:
    """The first word (after any markdown, quotes or punctuation) is `word`, any case."""
    first = _WORD.search(response)
    return first is not None and re.fullmatch(r"[\W_]*", response[: first.start()]) is not None and \
        first.group().lower() == word.lower()


def postscript(response: str) -> bool:
    """A line starts with "P.S." (any case, "P. S." too)."""
    return re.search(r"^[ \t*]*p\.\s?s\.", response, flags=re.IGNORECASE | re.MULTILINE) is not None


CHECKS: dict[str, Callable[..., bool]] = {
    "lowercase": lowercase, "uppercase": uppercase, "max_words": max_words, "min_words": min_words,
    "sentences": sentences, "paragraphs": paragraphs_exactly, "include_keywords": include_keywords,
    "exclude_word": exclude_word, "keyword_frequency": keyword_frequency, "letter_frequency": letter_frequency,
    "json": json_format, "title": title, "bullets": bullets, "highlights": highlights, "sections": sections,
    "quotation": quotation, "no_commas": no_commas, "end_phrase": end_phrase, "start_word": start_word,
    "postscript": postscript,
}


# --------------------------------------------------------------------------------------------------- scoring
def check(kind: str, args: Mapping, response: str) -> bool:
    """Strict: the instruction's check passes on the response itself (an empty response fails).

    Raises:
        KeyError: an unknown kind (the message lists the known ones).
    """
    try:
        fn = CHECKS[kind]
    except KeyError:
        raise KeyError(f"no check for instruction kind {kind!r}; known: {', '.join(CHECKS)}") from None
    return _has_text(response) and bool(fn(response, **args))


def loose_variants(response: str) -> list[str]:
    """The eight texts loose scoring tries: the response without its first and/or last line, +/- asterisks.

    Example:
        >>> loose_variants("Sure!\\n**Tea**\\nBye")[:4]
        ['Sure!\\n**Tea**\\nBye', '**Tea**\\nBye', 'Sure!\\n**Tea**', '**Tea**']
    """
    lines = response.split("\n")
    cut = ["\n".join(lines), "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return cut + [c.replace("*", "") for c in cut]


def check_loose(kind: str, args: Mapping, response: str) -> bool:
    """Loose: the check passes on any of `loose_variants(response)`."""
    return any(check(kind, args, v) for v in loose_variants(response))
