"""Input checks shared by the numeric code (thresholds, Mahalanobis scores): an array of the
expected rank with no NaN or inf, or one ``ValueError`` that says what it was and what to check."""

from __future__ import annotations

import numpy as np


def finite_array(values: np.ndarray, ndim: int, what: str, shape_hint: str, cause: str) -> np.ndarray:
    """``values`` as float64 with ``ndim`` dimensions (``shape_hint`` describes them) and only
    finite entries; ``cause`` is the likely reason for NaN or inf."""
    a = np.asarray(values, dtype=np.float64)
    if a.ndim != ndim:
        raise ValueError(f"{what} must be {shape_hint}, got shape {a.shape}")
    bad = int((~np.isfinite(a)).sum())
    if bad:
        raise ValueError(f"{what} has {bad} non-finite values (NaN/inf): {cause}")
    return a
