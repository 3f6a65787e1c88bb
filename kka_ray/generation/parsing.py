"""Turn raw LLM outputs into anomaly descriptions (the parsing half of Eq. 3 / Eq. 8).

One description per output: the first non-empty line, cut at the first sentence end, with
list numbering, bullets and quotes stripped and whitespace normalised. Outputs that are
empty, duplicates (of earlier ones in the iteration, case-insensitive, or within the call),
too long, not text, or not a description of one object (commentary about the task, a list of
several items, a fragment cut mid-phrase) are dropped AND counted by reason; the result stays
aligned with the input (``None`` where dropped) so sample positions are stable.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

DROP_REASONS = ("empty", "duplicate", "too_long", "non_text", "not_a_description")

# Minimum letters a description needs, and the minimum share of letters among its
# non-space characters: "a photo of a" plus a word passes, "1. 2. 3." or "$$%#" does not.
MIN_LETTERS = 3
MIN_LETTER_SHARE = 0.5
# Letters needed beyond the answer prefix ("a photo of a" alone says nothing).
MIN_LETTERS_BEYOND_PREFIX = 2

_LEADING_LABEL = re.compile(
    r"^\s*(?:(?:new\s+)?(?:sentence|description|example|answer|output)\s*\d*\s*:\s*)", re.IGNORECASE
)
# "1." "2)" "(3)" "- " "* " "• " "#" bullets, possibly repeated ("1. - ").
_LEADING_MARKER = re.compile(r"^\s*(?:\(?\d{1,3}[.):]\s+|[-*•·–—#>]+\s*)")
_QUOTES = "\"'`“”‘’«»*_"
_SENTENCE_END = re.compile(r"[.!?](?=[\s\"'”’)]|$)")
_BAD_CATEGORIES = {"Cc", "Co", "Cs", "Cn"}
# Commentary about the task rather than a description ("Here are more captions:", "Example 2").
_COMMENTARY = re.compile(
    r":|\b(?:captions?|sentences?|examples?|descriptions?|here (?:is|are)|the list|this list|each line)\b", re.IGNORECASE
)
# A list of several items in one line: two or more ", a ..." / "; the ..." continuations.
_LIST_ITEM = re.compile(r"[,;]\s*(?:and\s+)?(?:a|an|the)\s", re.IGNORECASE)
# A description cut mid-phrase ends with one of these words.
_DANGLING = frozenset(
    "a an the of with and or in on at to for from by that which who its their his her this these my your "
    "our some".split()
)


def description_key(text: str) -> str:
    """The duplicate key of a description: lower case, single spaces, no trailing punctuation."""
    return " ".join(text.lower().split()).rstrip(" .!?;,")


def _first_line(raw: str) -> str:
    for line in raw.splitlines():
        if line.strip():
            return line
    return ""


def clean_description(raw: str, *, first_sentence_only: bool = True) -> str:
    """The cleaned candidate description of one raw output (may be empty)."""
    text = _first_line(raw)
    for _ in range(3):  # "1. - 'text'" peels in a few rounds
        before = text
        text = _LEADING_LABEL.sub("", text)
        text = _LEADING_MARKER.sub("", text)
        text = text.strip().strip(_QUOTES).strip()
        if text == before:
            break
    text = " ".join(text.split())
    if first_sentence_only:
        m = _SENTENCE_END.search(text)
        if m:
            text = text[: m.end()]
    return text.strip().strip(_QUOTES).strip()


def _is_non_text(text: str, answer_prefix: str) -> bool:
    if any(unicodedata.category(ch) in _BAD_CATEGORIES or ch == "\ufffd" for ch in text):
        return True
    visible = [ch for ch in text if not ch.isspace()]
    letters = sum(ch.isalpha() for ch in visible)
    if letters < MIN_LETTERS or letters < MIN_LETTER_SHARE * len(visible):
        return True
    prefix = " ".join(answer_prefix.split()).lower()
    if prefix and text.lower().startswith(prefix):
        beyond = text[len(prefix) :]
        if sum(ch.isalpha() for ch in beyond) < MIN_LETTERS_BEYOND_PREFIX:
            return True
    return False


def _is_not_a_description(text: str) -> bool:
    if _COMMENTARY.search(text) or len(_LIST_ITEM.findall(text)) >= 2:
        return True
    words = text.rstrip(" .!?;,").split()
    return bool(words) and words[-1].lower() in _DANGLING


def parse_descriptions(
    raw: list[str],
    *,
    max_chars: int,
    first_sentence_only: bool = True,
    answer_prefix: str = "",
    seen: set[str] | None = None,
) -> tuple[list[str | None], Counter]:
    """Parse raw outputs into descriptions; return them aligned with ``raw`` and the drop counts.

    ``seen`` holds :func:`description_key` values of descriptions already kept (this
    iteration); kept ones are added to it. The Counter has one entry per drop reason in
    :data:`DROP_REASONS` that occurred.
    """
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    seen = set() if seen is None else seen
    drops: Counter = Counter()
    out: list[str | None] = []
    for item in raw:
        if item is None or (isinstance(item, str) and not item.strip()):
            drops["empty"] += 1
            out.append(None)
            continue
        if not isinstance(item, str):
            drops["non_text"] += 1
            out.append(None)
            continue
        text = clean_description(item, first_sentence_only=first_sentence_only)
        if not text:
            reason = "empty"
        elif _is_non_text(text, answer_prefix):
            reason = "non_text"
        elif _is_not_a_description(text):
            reason = "not_a_description"
        elif len(text) > max_chars:
            reason = "too_long"
        elif description_key(text) in seen:
            reason = "duplicate"
        else:
            seen.add(description_key(text))
            out.append(text)
            continue
        drops[reason] += 1
        out.append(None)
    return out, drops
