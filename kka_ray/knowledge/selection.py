"""Eq. 2 of KKA (arXiv 2502.14880): representative descriptions of the normal data.

For each of the k clusters of Eq. 1, take the normal images with the lowest normality score
``s(x)`` (the most typical ones) and collect their descriptions (captions), deduplicated
within the cluster, in order of typicality. These fill the describer's prompts (Eq. 3).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Representative:
    """One representative description: from image ``index`` (its Eq. 1 ``score``) in ``cluster``."""

    cluster: int
    index: int
    score: float
    description: str


def _dedup_key(text: str) -> str:
    return " ".join(text.split()).casefold()


def select_representatives(
    scores: Sequence[float] | np.ndarray,
    cluster_ids: Sequence[int] | np.ndarray,
    captions: Sequence[Sequence[str]],
    n_per_cluster: int,
) -> list[Representative]:
    """Eq. 2: the descriptions of the ``n_per_cluster`` most typical images of every cluster.

    ``scores[i]``, ``cluster_ids[i]`` and ``captions[i]`` (a list of strings) describe normal
    image i. Per cluster, images are taken in increasing score; an image without any usable
    caption is skipped (and counted) so the cluster still gets ``n_per_cluster`` images where it
    has them. Each image contributes all its captions; a caption already taken in that cluster
    (ignoring case and spacing) is not repeated. The result is ordered by cluster, then
    typicality.
    """
    scores = np.asarray(scores, dtype=np.float64)
    cluster_ids = np.asarray(cluster_ids)
    if n_per_cluster < 1:
        raise ValueError(f"n_per_cluster must be >= 1, got {n_per_cluster} (knowledge.n_representatives)")
    if scores.ndim != 1 or cluster_ids.shape != scores.shape or len(captions) != len(scores):
        raise ValueError(
            f"scores {scores.shape}, cluster_ids {cluster_ids.shape} and captions ({len(captions)}) "
            "must describe the same images, one entry each"
        )
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or inf; check the Mahalanobis scorer's input features")
    if len(scores) == 0:
        raise ValueError("no normal images to select representatives from")

    reps: list[Representative] = []
    bad_captions = 0
    uncaptioned = 0
    for cluster in np.unique(cluster_ids):
        members = np.flatnonzero(cluster_ids == cluster)
        members = members[np.argsort(scores[members], kind="stable")]
        seen: set[str] = set()
        taken = 0
        for i in members:
            if taken >= n_per_cluster:
                break
            caps = captions[i]
            if isinstance(caps, str):
                raise TypeError(f"captions[{i}] is a string; each image needs a list of captions, e.g. [{caps!r}]")
            usable = []
            for cap in caps or []:
                if not isinstance(cap, str) or not cap.strip():
                    bad_captions += 1
                    continue
                usable.append(" ".join(cap.split()))
            if not usable:
                uncaptioned += 1
                continue
            taken += 1
            for text in usable:
                key = _dedup_key(text)
                if key in seen:
                    continue
                seen.add(key)
                reps.append(Representative(int(cluster), int(i), float(scores[i]), text))
        if taken < n_per_cluster:
            logger.warning("cluster %s has only %d captioned images (wanted %d)", cluster, taken, n_per_cluster)
    if bad_captions or uncaptioned:
        logger.warning(
            "Eq. 2 selection skipped %d empty/non-text captions and %d images without any caption",
            bad_captions,
            uncaptioned,
        )
    return reps
