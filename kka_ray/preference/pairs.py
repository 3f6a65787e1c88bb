"""DPO preference pairs from the confusion evaluator's hard/easy split (method.md Eq. 6 -> Eq. 7).

After Eq. 6 every generated anomaly carries its Deep SAD distance ``d`` and a hard flag
(``d <= tau``). Eq. 7 trains the describer to prefer hard descriptions, so a pair is
``(prompt, chosen = a hard description, rejected = an easy description)``.

Pairs come from the same prompt where possible: within each prompt the hardest text
(smallest distance) meets the easiest one (largest distance), the second hardest the second
easiest, and so on. Texts left over on one side (a prompt with more hard than easy texts,
or the reverse) are then paired across prompts, hardest leftover with easiest leftover,
using the hard text's prompt (``same_prompt=False``). No completion is used twice on the
same side. When there are more pairs than ``max_pairs``, same-prompt pairs win, taken
rank by rank across prompts (every prompt's best pair before any prompt's second) in a
seeded prompt order; ties in distance are broken by the seed too.

A non-hard record with distance ``+inf`` is a text that must never be preferred (the loop passes
the rows the normal-likeness guard dropped this way): it ranks before every easy text.

``chosen``/``rejected`` are completions: the describer's answer started with
``answer_prefix`` (it sits at the end of the prompt), so the prefix is stripped from texts
that start with it, keeping the following space so the token boundary matches generation.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from dataclasses import dataclass

logger = logging.getLogger(__name__)

REQUIRED_KEYS = ("prompt_id", "prompt", "text", "distance", "is_hard")


@dataclass(frozen=True)
class PreferencePair:
    """One DPO example: the describer's prompt, a hard (chosen) and an easy (rejected) completion."""

    prompt: str
    chosen: str
    rejected: str
    same_prompt: bool
    prompt_id: object  # the hard text's prompt id (int or str, as in the anomaly store)
    chosen_distance: float = math.nan
    rejected_distance: float = math.nan


@dataclass(frozen=True)
class _Item:
    prompt_id: object
    prompt: str
    completion: str
    distance: float
    tiebreak: float


def _strip_prefix(text: str, answer_prefix: str) -> str:
    if answer_prefix and text.startswith(answer_prefix):
        return text[len(answer_prefix) :]
    return text


def _is_bool(value: object) -> bool:
    # pyarrow/pandas rows give numpy.bool_, which is not a Python bool.
    kind = type(value)
    return isinstance(value, bool) or (kind.__module__ == "numpy" and kind.__name__ in ("bool", "bool_"))


def _clean(records: list[dict], answer_prefix: str, rng: random.Random) -> tuple[list[_Item], list[_Item]]:
    """Validate rows, strip the prefix, and split into hard/easy items; malformed rows are counted."""
    hard: list[_Item] = []
    easy: list[_Item] = []
    skipped: Counter[str] = Counter()
    for row in records:
        if not isinstance(row, dict) or any(k not in row for k in REQUIRED_KEYS):
            skipped["missing keys"] += 1
            continue
        text, prompt, dist, flag = row["text"], row["prompt"], row["distance"], row["is_hard"]
        if not isinstance(text, str) or not isinstance(prompt, str) or not prompt.strip():
            skipped["non-text prompt or text"] += 1
            continue
        if not _is_bool(flag):
            skipped["is_hard not a bool"] += 1
            continue
        try:
            dist = float(dist)
        except (TypeError, ValueError):
            skipped["distance not a number"] += 1
            continue
        if math.isnan(dist) or (math.isinf(dist) and (bool(flag) or dist < 0)):
            skipped["distance not finite"] += 1  # +inf only marks a rejected-only (normal-like) text
            continue
        completion = _strip_prefix(text, answer_prefix)
        if not completion.strip():
            skipped["empty completion"] += 1
            continue
        item = _Item(row["prompt_id"], prompt, completion, dist, rng.random())
        (hard if bool(flag) else easy).append(item)
    if skipped:
        logger.warning("build_pairs skipped %d malformed records: %s", sum(skipped.values()), dict(skipped))
    return hard, easy


def _dedupe(items: list[_Item], side: str, banned: set[str] | None = None) -> list[_Item]:
    """Keep the first occurrence (in hardness order) of each completion; count the rest."""
    seen: set[str] = set(banned or ())
    out = []
    for it in items:
        if it.completion in seen:
            continue
        seen.add(it.completion)
        out.append(it)
    if len(out) < len(items):
        logger.info("build_pairs dropped %d repeated %s completions", len(items) - len(out), side)
    return out


def _pair(h: _Item, e: _Item, same_prompt: bool) -> PreferencePair:
    return PreferencePair(
        prompt=h.prompt,
        chosen=h.completion,
        rejected=e.completion,
        same_prompt=same_prompt,
        prompt_id=h.prompt_id,
        chosen_distance=h.distance,
        rejected_distance=e.distance,
    )


def build_pairs(records: list[dict], max_pairs: int, seed: int, answer_prefix: str = "") -> list[PreferencePair]:
    """Build at most ``max_pairs`` (chosen = hard, rejected = easy) pairs from anomaly-store rows.

    ``records`` are rows with keys ``prompt_id, prompt, text, distance, is_hard``. Returns an
    empty list when there are no hard or no easy texts (the caller skips DPO then). The
    result is deterministic for a given ``seed``; same-prompt pairs come first.
    """
    if max_pairs < 1:
        raise ValueError(f"max_pairs must be >= 1, got {max_pairs} (set preference.max_pairs)")
    rng = random.Random(seed)
    hard, easy = _clean(records, answer_prefix, rng)
    # Hardest first (smallest distance), easiest first (largest distance); seeded tie-break.
    hard = _dedupe(sorted(hard, key=lambda it: (it.distance, it.tiebreak)), "hard")
    # A completion that is both hard and easy somewhere carries no preference: keep it as hard only.
    easy = _dedupe(sorted(easy, key=lambda it: (-it.distance, it.tiebreak)), "easy", {it.completion for it in hard})
    if not hard or not easy:
        logger.info("no preference pairs: %d hard and %d easy texts", len(hard), len(easy))
        return []

    # Group by prompt, keeping first-seen order, then shuffle the prompt order with the seed.
    by_prompt: dict[object, tuple[list[_Item], list[_Item]]] = {}
    for it in hard:
        by_prompt.setdefault(it.prompt_id, ([], []))[0].append(it)
    for it in easy:
        by_prompt.setdefault(it.prompt_id, ([], []))[1].append(it)
    prompt_ids = list(by_prompt)
    rng.shuffle(prompt_ids)

    # Same-prompt pairs, ranked: rank r pairs the r-th hardest with the r-th easiest.
    ranked: list[list[PreferencePair]] = []
    left_hard: list[_Item] = []
    left_easy: list[_Item] = []
    for pid in prompt_ids:
        hs, es = by_prompt[pid]
        n = min(len(hs), len(es))
        for r in range(n):
            if r == len(ranked):
                ranked.append([])
            ranked[r].append(_pair(hs[r], es[r], same_prompt=True))
        left_hard.extend(hs[n:])
        left_easy.extend(es[n:])
    pairs = [p for rank in ranked for p in rank][:max_pairs]

    # Leftovers are one-sided per prompt, so a leftover hard and a leftover easy text always
    # come from different prompts.
    room = max_pairs - len(pairs)
    if room > 0:
        left_hard.sort(key=lambda it: (it.distance, it.tiebreak))
        left_easy.sort(key=lambda it: (-it.distance, it.tiebreak))
        pairs.extend(_pair(h, e, same_prompt=False) for h, e in list(zip(left_hard, left_easy))[:room])

    n_same = sum(p.same_prompt for p in pairs)
    logger.info(
        "built %d preference pairs (%d same-prompt, %d cross-prompt) from %d hard / %d easy texts",
        len(pairs), n_same, len(pairs) - n_same, len(hard), len(easy),
    )
    return pairs
