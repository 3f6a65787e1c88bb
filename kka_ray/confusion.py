"""Hard vs easy generated anomalies (method.md Eq. 6, the KKA confusion evaluator's split).

The threshold ``tau`` comes from the Deep SAD distances of held-out normal samples: by
default their maximum (as the authors' released code does), optionally their
``q``-quantile. A generated anomaly with ``d <= tau`` lies inside the normal region and is
*hard*; the others are *easy* (optionally only the ``m`` farthest of them, the clearest
negatives for the DPO pairs). The hard fraction is reported every iteration.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

DEFAULT_QUANTILE = 0.95


def _distances(values: np.ndarray, what: str) -> np.ndarray:
    d = np.asarray(values, dtype=np.float64)
    if d.ndim != 1:
        raise ValueError(f"{what} must be a 1-d array of distances, got shape {d.shape}")
    if not np.isfinite(d).all():
        raise ValueError(f"{what} has {int((~np.isfinite(d)).sum())} non-finite values (NaN/inf): the evaluator diverged")
    return d


def distance_threshold(
    normal_distances: np.ndarray, rule: Literal["max", "quantile"] = "max", q: float = DEFAULT_QUANTILE
) -> float:
    """``tau`` from held-out normal distances: their maximum (``rule='max'``) or ``q``-quantile
    (``rule='quantile'``, numpy's linear interpolation)."""
    d = _distances(normal_distances, "normal_distances")
    if d.size == 0:
        raise ValueError("normal_distances is empty: the threshold needs held-out normal samples")
    if rule == "max":
        return float(d.max())
    if rule == "quantile":
        if not 0.0 < q < 1.0:
            raise ValueError(f"quantile q must be in (0, 1), got {q}")
        return float(np.quantile(d, q))
    raise ValueError(f"unknown threshold rule {rule!r}; use 'max' or 'quantile'")


def split_hard_easy(
    distances: np.ndarray, tau: float, easy_top_m: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(is_hard, is_easy)`` boolean masks: hard ``d <= tau``; easy the rest, or only the
    ``easy_top_m`` farthest of the rest (ties broken by position, earlier first)."""
    d = _distances(distances, "distances")
    if not np.isfinite(tau):
        raise ValueError(f"tau must be finite, got {tau}")
    is_hard = d <= tau
    is_easy = ~is_hard
    if easy_top_m is not None:
        if easy_top_m < 1:
            raise ValueError(f"easy_top_m must be >= 1 or None, got {easy_top_m}")
        easy_idx = np.flatnonzero(is_easy)
        if easy_idx.size > easy_top_m:
            order = np.argsort(-d[easy_idx], kind="stable")  # farthest first
            is_easy = np.zeros_like(is_hard)
            is_easy[easy_idx[order[:easy_top_m]]] = True
    return is_hard, is_easy


def hard_fraction(is_hard: np.ndarray) -> float:
    """Share of hard anomalies (0.0 for an empty set)."""
    h = np.asarray(is_hard, dtype=bool)
    return float(h.mean()) if h.size else 0.0
