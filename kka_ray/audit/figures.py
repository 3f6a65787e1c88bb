"""The audit's figures of one generated set (method.md step 3): how much of it is the normal class,
which other classes it covers, and what its descriptions name.

- ``normal_leak``: share of images the judge labels a normal class.
- ``histogram``: judged class -> count.
- ``coverage``: how many of the non-normal classes appear at least once.
- ``names_normal_share``: share of descriptions that name the normal class (or a synonym).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def judged_figures(pred: np.ndarray, normal: Sequence[int], class_names: Sequence[str]) -> dict[str, Any]:
    """Figures of one judged set: ``n``, ``normal_leak``, ``coverage``, ``n_other_classes``, ``histogram``."""
    pred = np.asarray(pred, dtype=np.int64)
    normal_set = {int(c) for c in normal}
    counts = np.bincount(pred, minlength=len(class_names)) if pred.size else np.zeros(len(class_names), np.int64)
    others = [c for c in range(len(class_names)) if c not in normal_set]
    return {
        "n": int(pred.size),
        "normal_leak": float(np.isin(pred, list(normal_set)).mean()) if pred.size else None,
        "coverage": int(sum(counts[c] > 0 for c in others)),
        "n_other_classes": len(others),
        "histogram": {class_names[c]: int(counts[c]) for c in range(len(class_names)) if counts[c]},
    }


def text_figures(texts: Sequence[str], matcher: Any) -> dict[str, Any]:
    """Share of descriptions that name the normal class, and the terms they used."""
    matched = [matcher.match(t) for t in texts]
    named = [m for m in matched if m is not None]
    terms: dict[str, int] = {}
    for m in named:
        terms[m] = terms.get(m, 0) + 1
    return {"n": len(texts), "names_normal_share": len(named) / len(texts) if texts else None,
            "normal_terms_used": dict(sorted(terms.items(), key=lambda kv: -kv[1]))}
