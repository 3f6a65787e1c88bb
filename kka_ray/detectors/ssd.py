"""SSD (Sehwag et al., ICLR 2021) as a detector: k-means + Mahalanobis on backbone features.

Without anomalies the score is method.md Eq. 1 alone, ``s(x; normals) = min_m (z - mu_m)^T
P_m (z - mu_m)``. Given anomalies (known or generated) it is few-shot SSD:

    s(x) = s(x; normals) - s(x; anomalies)

so a row close to a known anomaly scores higher. Anomalies are few, so their covariance is
always Ledoit-Wolf shrunk. There is nothing to train by gradient, so no Ray Train run and no
epochs: ``fit_info_`` says so and ``which="last"`` is the same model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np

from kka_ray.config import SSDSection
from kka_ray.detectors.base import Detector, DetectorContext, Validation, check_rows
from kka_ray.knowledge.mahalanobis import MahalanobisScorer

logger = logging.getLogger(__name__)

# Fewer anomalies than this: few-shot SSD falls back to normals only (a covariance of 1 row is 0).
MIN_ANOMALIES = 2


class SSD(Detector):
    """SSD and few-shot SSD on feature rows (n, d)."""

    name = "ssd"
    input_kind = "features"

    def __init__(self, cfg: SSDSection | None = None, context: DetectorContext | None = None) -> None:
        self.cfg = cfg if cfg is not None else SSDSection()
        self.context = context or DetectorContext()
        self.threshold_ = None
        self.fit_info_ = {}
        self.fitted_ = False
        self.normal_: MahalanobisScorer | None = None
        self.anomaly_: MahalanobisScorer | None = None

    def fit(self, normal: np.ndarray, anomalies: np.ndarray | None = None,
            validation: Validation | None = None, name: str | None = None) -> "SSD":
        normal = check_rows(normal, "normal", "features")
        self.normal_ = MahalanobisScorer(self.cfg.n_clusters, self.cfg.covariance, seed=self.context.seed).fit(normal)
        self.anomaly_ = None
        n_anom = 0
        if anomalies is not None and len(anomalies) and self.cfg.few_shot:
            anomalies = check_rows(anomalies, "anomalies", "features")
            if anomalies.shape[1] != normal.shape[1]:
                raise ValueError(f"anomalies have {anomalies.shape[1]} dims, normal rows {normal.shape[1]}")
            k = min(self.cfg.anomaly_clusters, max(1, len(anomalies) // 2))
            if len(anomalies) >= MIN_ANOMALIES:
                self.anomaly_ = MahalanobisScorer(k, "ledoit_wolf", seed=self.context.seed).fit(anomalies)
                n_anom = len(anomalies)
            else:
                logger.warning("few-shot SSD needs >= %d anomalies, got %d: scoring with normals only",
                               MIN_ANOMALIES, len(anomalies))
        self.n_anomalies_ = n_anom
        self.fit_info_ = {"few_shot": self.anomaly_ is not None, "n_anomalies": n_anom, "selected_epoch": None}
        self.fitted_ = True
        if validation is not None and validation.has_anomalies:
            from kka_ray.training.ray_fit import validation_auroc

            vx, vy = validation.arrays()
            auroc = validation_auroc(self.decision_function(vx), vy)
            self.fit_info_.update(selected_val_auroc=auroc, last_val_auroc=auroc)
        return self

    def decision_function(self, x: np.ndarray, which: Literal["selected", "last"] = "selected") -> np.ndarray:
        """``s(x; normals)``, minus ``s(x; anomalies)`` in the few-shot form."""
        self._check_fitted()
        x = check_rows(x, "x", "features")
        score = self.normal_.score(x)
        if self.anomaly_ is not None:
            score = score - self.anomaly_.score(x)
        return score

    def _save_state(self, directory: Path) -> dict[str, Any]:
        from safetensors.numpy import save_file

        save_file(self.normal_.state_dict(), str(directory / "normal.safetensors"))
        if self.anomaly_ is not None:
            save_file(self.anomaly_.state_dict(), str(directory / "anomaly.safetensors"))
        return {"config": self.cfg.model_dump(mode="json")}

    @classmethod
    def _load_state(cls, directory: Path, meta: dict[str, Any], context: DetectorContext) -> "SSD":
        from safetensors.numpy import load_file

        det = cls(SSDSection.model_validate(meta["config"]), context)
        det.normal_ = MahalanobisScorer.from_state_dict(load_file(str(directory / "normal.safetensors")))
        if (directory / "anomaly.safetensors").is_file():
            det.anomaly_ = MahalanobisScorer.from_state_dict(load_file(str(directory / "anomaly.safetensors")))
        return det
