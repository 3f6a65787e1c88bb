"""Thresholds on distances to a centre (Deep SAD's ``||phi(x) - c||^2``, SSD's Mahalanobis
score): ``tau`` from held-out normals, as the confusion evaluator's Eq. 6 split and every
detector's decision threshold use it (method.md Eq. 6)."""

from __future__ import annotations

from typing import Literal

import numpy as np

from kka_ray.arrays import finite_array

DEFAULT_QUANTILE = 0.95


def check_distances(values: np.ndarray, what: str) -> np.ndarray:
    """``values`` as a finite 1-d float64 array (``what`` names it in the error)."""
    return finite_array(values, 1, what, "a 1-d array of distances", "the evaluator diverged")


def distance_threshold(
    normal_distances: np.ndarray, rule: Literal["max", "quantile"] = "max", q: float = DEFAULT_QUANTILE
) -> float:
    """``tau`` from held-out normal distances: their maximum (``rule='max'``) or ``q``-quantile
    (``rule='quantile'``, numpy's linear interpolation)."""
    d = check_distances(normal_distances, "normal_distances")
    if d.size == 0:
        raise ValueError("normal_distances is empty: the threshold needs held-out normal samples")
    if rule == "max":
        return float(d.max())
    if rule == "quantile":
        if not 0.0 < q < 1.0:
            raise ValueError(f"quantile q must be in (0, 1), got {q}")
        return float(np.quantile(d, q))
    raise ValueError(f"unknown threshold rule {rule!r}; use 'max' or 'quantile'")
