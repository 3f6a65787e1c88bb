"""The confusion evaluator of KKA (arXiv 2502.14880): Deep SAD on the normals and the anomaly set
(method.md Eq. 5) and the hard/easy split of newly generated anomalies (Eq. 6).

:class:`ConfusionEvaluator` is what the loop calls, once per iteration:

1. ``fit``: Deep SAD (Ruff et al., ICLR 2020) through Ray Train on the normal training features
   (semi-label ``evaluator.normal_label``) and the anomaly set D_a as it stood *before* this
   iteration (label -1). A fixed share of D_a (by a hash of each id) and the held-out normals
   are the validation set that chooses the checkpoint; nothing is chosen on test.
2. ``tau`` from the held-out normals' distances: their ``q``-quantile (default) or their maximum
   (``evaluator.threshold: max``, the authors' released code; one outlying normal then makes
   every generated item "hard").
   With ``evaluator.split_reference: first`` iteration 1's evaluator is the fixed yardstick of every
   iteration; ``evaluator.reference_hard_max`` lowers its ``tau`` (:func:`cap_threshold`) where more
   than that share of iteration 1's new anomalies would be hard, so that the split leaves the
   describer room to get harder.
3. ``split``: the new anomalies, which the evaluator has not been trained on, are hard when it
   places them among the normals (``d <= tau``) and easy otherwise (optionally only the ``m``
   farthest). Hard anomalies are what the current evaluator confuses with normal data: the
   boundary samples DPO asks the describer for.

``auroc`` reports how well the evaluator separates held-out normals from generated anomalies
(its own validation anomalies, and the new ones it has not seen).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kka_ray.detectors.threshold import DEFAULT_QUANTILE, check_distances, distance_threshold  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from kka_ray.config import EvaluatorSection

logger = logging.getLogger(__name__)

def split_hard_easy(
    distances: np.ndarray, tau: float, easy_top_m: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(is_hard, is_easy)`` boolean masks: hard ``d <= tau``; easy the rest, or only the
    ``easy_top_m`` farthest of the rest (ties broken by position, earlier first)."""
    d = check_distances(distances, "distances")
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


def cap_threshold(distances: np.ndarray, tau: float, max_share: float) -> float:
    """``tau``, or where more than ``max_share`` of ``distances`` lie at or below it, the largest
    distance that keeps at most ``max_share`` of them hard (``d <= tau``); just below the smallest
    one where not even one may be hard."""
    d = np.sort(check_distances(distances, "distances"))
    if not 0.0 < max_share <= 1.0:
        raise ValueError(f"max_share must be in (0, 1], got {max_share}")
    if d.size == 0 or np.mean(d <= tau) <= max_share:
        return float(tau)
    j = int(np.floor(max_share * d.size + 1e-9))  # at most j of n hard
    while 0 < j < d.size and d[j - 1] == d[j]:  # a tie across the cut: none of the tied ones hard
        j -= 1
    return float(d[j - 1]) if j > 0 else float(np.nextafter(d[0], -np.inf))


def hard_fraction(is_hard: np.ndarray) -> float:
    """Share of hard anomalies (0.0 for an empty set)."""
    h = np.asarray(is_hard, dtype=bool)
    return float(h.mean()) if h.size else 0.0


def separation_auroc(normal_distances: np.ndarray, anomaly_distances: np.ndarray) -> float | None:
    """AUROC of distances, normals 0 and anomalies 1 (None when either side is empty)."""
    if len(normal_distances) == 0 or len(anomaly_distances) == 0:
        return None
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.zeros(len(normal_distances)), np.ones(len(anomaly_distances))]
    return float(roc_auc_score(y, np.r_[normal_distances, anomaly_distances]))


class ConfusionEvaluator:
    """Eq. 5 training, Eq. 6 threshold and split. Fitted attributes end in ``_``."""

    SPLIT_FILE = "evaluator.json"

    def __init__(self, cfg: "EvaluatorSection", seed: int = 0):
        self.cfg = cfg
        self.seed = seed
        self.state_: Any = None  # kka_ray.detectors.deep_sad.train.DeepSADState
        self.tau_: float | None = None
        self.tau_normals_: float | None = None  # tau from the held-out normals, before any cap
        self.heldout_distances_: np.ndarray | None = None
        self.val_auroc_: float | None = None

    def fit(self, normals: np.ndarray, anomalies: np.ndarray, heldout_normals: np.ndarray, *,
            val_anomalies: np.ndarray | None = None, storage_path: str | os.PathLike, name: str) -> "ConfusionEvaluator":
        """Train on ``normals`` (label ``normal_label``) + ``anomalies`` (-1); choose the checkpoint on
        held-out normals vs ``val_anomalies`` (when there are any); set ``tau_`` from the held-out normals."""
        import shutil

        from kka_ray.detectors.deep_sad.train import train_deep_sad

        shutil.rmtree(Path(storage_path) / name, ignore_errors=True)  # a killed stage restarts clean
        normals = np.asarray(normals, np.float32)
        anomalies = np.zeros((0, normals.shape[1]), np.float32) if anomalies is None else np.asarray(anomalies, np.float32)
        x = np.concatenate([normals, anomalies])
        labels = np.r_[np.full(len(normals), self.cfg.normal_label), np.full(len(anomalies), -1)].astype(np.int64)
        val = None
        if val_anomalies is not None and len(val_anomalies):
            vx = np.concatenate([heldout_normals, val_anomalies]).astype(np.float32)
            val = (vx, np.r_[np.zeros(len(heldout_normals)), np.ones(len(val_anomalies))])
        self.state_ = train_deep_sad(x, labels, self.cfg, storage_path=str(storage_path), name=name, seed=self.seed, val=val)
        self.heldout_distances_ = self.score(heldout_normals)
        self.tau_ = self.tau_normals_ = distance_threshold(self.heldout_distances_, self.cfg.threshold, self.cfg.quantile)
        if val is not None:
            self.val_auroc_ = separation_auroc(self.heldout_distances_, self.score(val_anomalies))
        return self

    def score(self, x: np.ndarray) -> np.ndarray:
        """Deep SAD distances ``||phi(x) - c||^2`` (float64)."""
        if self.state_ is None:
            raise RuntimeError("the confusion evaluator is not fitted: call fit() or load() first")
        x = np.asarray(x, np.float32)
        return self.state_.score(x) if len(x) else np.zeros(0)

    def cap(self, distances: np.ndarray, max_share: float) -> bool:
        """Lower ``tau_`` so that at most ``max_share`` of ``distances`` are hard (:func:`cap_threshold`);
        True when it moved."""
        if self.tau_ is None:
            raise RuntimeError("the confusion evaluator has no threshold: call fit() or load() first")
        tau = cap_threshold(distances, self.tau_, max_share)
        moved, self.tau_ = tau != self.tau_, tau
        return moved

    def split(self, distances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(is_hard, is_easy)`` of Eq. 6 with the fitted ``tau_``."""
        if self.tau_ is None:
            raise RuntimeError("the confusion evaluator has no threshold: call fit() or load() first")
        return split_hard_easy(distances, self.tau_, self.cfg.easy_top_m)

    def auroc(self, anomalies: np.ndarray) -> float | None:
        """Separation of the held-out normals from ``anomalies`` (generated ones)."""
        return separation_auroc(self.heldout_distances_, self.score(anomalies))

    def save(self, directory: str | os.PathLike) -> None:
        """Deep SAD weights (safetensors) and ``evaluator.json`` (tau, held-out distances, validation AUROC)."""
        self.state_.save(directory)
        meta = {"tau": self.tau_, "tau_normals": self.tau_normals_, "threshold": self.cfg.threshold, "quantile": self.cfg.quantile,
                "heldout_distances": [float(d) for d in self.heldout_distances_], "val_auroc": self.val_auroc_,
                "easy_top_m": self.cfg.easy_top_m}
        tmp = Path(directory) / (self.SPLIT_FILE + ".tmp")
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, Path(directory) / self.SPLIT_FILE)

    @classmethod
    def load(cls, directory: str | os.PathLike, cfg: "EvaluatorSection") -> "ConfusionEvaluator":
        from kka_ray.detectors.deep_sad.train import DeepSADState

        ev = cls(cfg)
        ev.state_ = DeepSADState.load(directory)
        meta = json.loads((Path(directory) / cls.SPLIT_FILE).read_text())
        ev.tau_, ev.val_auroc_ = float(meta["tau"]), meta.get("val_auroc")
        ev.tau_normals_ = float(meta.get("tau_normals", meta["tau"]))
        ev.heldout_distances_ = np.asarray(meta["heldout_distances"], np.float64)
        return ev
