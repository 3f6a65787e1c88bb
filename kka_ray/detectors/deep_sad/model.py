"""Deep SAD as a PyOD/anomalib-like detector (method.md Eq. 5 and the "SAD" detector).

``DeepSAD(cfg).fit(normal, anomalies)`` trains through Ray Train
(:func:`kka_ray.detectors.deep_sad.train.train_deep_sad`, the same code as the confusion evaluator):
normals get ``cfg.normal_label`` (0 = unlabeled, the default, or +1 = known normal), known or
generated anomalies get -1. With ``validation`` (held-out normals + generated anomalies) the
epoch with the best validation AUROC is kept and the last one stays available
(``decision_function(x, which="last")``). ``decision_function`` returns ``||phi(x) - c||^2``
(higher = more anomalous); ``set_threshold`` fixes ``threshold_`` on validation normals
(Eq. 6 rules) and ``predict`` returns 1 for ``score > threshold_``. Fitted attributes end in ``_``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np

from kka_ray.config import DeepSADSection
from kka_ray.detectors.base import Detector, DetectorContext, Validation, check_rows

logger = logging.getLogger(__name__)


class DeepSAD(Detector):
    """Deep SAD detector: ``fit`` / ``decision_function`` / ``set_threshold`` / ``predict``."""

    name = "sad"
    input_kind = "features"

    def __init__(self, cfg: DeepSADSection | None = None, storage_path: str | None = None, seed: int = 0,
                 context: DetectorContext | None = None) -> None:
        self.cfg = cfg if cfg is not None else DeepSADSection()
        self.context = context or DetectorContext(storage_path=storage_path, seed=seed)
        self.seed = self.context.seed
        self.threshold_ = None
        self.fit_info_ = {}
        self.fitted_ = False

    # -- fitting ---------------------------------------------------------------------------

    def fit(self, normal: np.ndarray, anomalies: np.ndarray | None = None,
            validation: Validation | None = None, name: str | None = None) -> "DeepSAD":
        """Train on ``normal`` (label ``cfg.normal_label``) and optional ``anomalies`` (label -1)."""
        from kka_ray.detectors.deep_sad.train import train_deep_sad

        kind = "features" if self.cfg.input == "features" else "pixels"
        normal = np.asarray(normal, dtype=np.float32)
        if normal.ndim < 2 or len(normal) == 0:
            raise ValueError(f"normal must be a non-empty array shaped (n, ...) of {kind}, got {normal.shape}")
        parts, labels = [normal], [np.full(len(normal), self.cfg.normal_label, dtype=np.int64)]
        if anomalies is not None and len(anomalies):
            anomalies = np.asarray(anomalies, dtype=np.float32)
            if anomalies.shape[1:] != normal.shape[1:]:
                raise ValueError(f"anomalies rows {anomalies.shape[1:]} differ from normal rows {normal.shape[1:]}")
            parts.append(anomalies)
            labels.append(np.full(len(anomalies), -1, dtype=np.int64))
        val = validation.arrays() if validation is not None and validation.has_anomalies else None
        storage = self.context.storage("deep_sad")
        state = train_deep_sad(np.concatenate(parts), np.concatenate(labels), self.cfg, storage,
                               name or self.context.run_name("deep_sad"), seed=self.seed, val=val)
        self._set_state(state)
        self.n_anomalies_ = int(len(parts[1])) if len(parts) > 1 else 0
        return self

    def _set_state(self, state) -> None:
        self.state_ = state
        self.center_ = state.center.numpy().copy()
        self.history_ = list(state.history)
        self.checkpoint_path_ = state.checkpoint_path
        self.in_shape_ = tuple(state.in_shape)
        meta = state.meta or {}
        self.fit_info_ = {"selected_epoch": meta.get("selected_epoch", self.cfg.epochs), "epochs": state.config.epochs,
                          "selected_val_auroc": meta.get("selected_val_auroc"),
                          "last_val_auroc": meta.get("last_val_auroc")}
        self.fitted_ = True

    @property
    def has_distinct_last(self) -> bool:
        return self.state_.last_network is not None

    def _check_fitted(self) -> None:
        if not self.fitted_:
            raise RuntimeError("this DeepSAD is not fitted yet: call fit(normal, anomalies) or DeepSAD.load(dir) first")

    # -- scoring ---------------------------------------------------------------------------

    def decision_function(self, x: np.ndarray, which: Literal["selected", "last"] = "selected",
                          batch_size: int = 1024) -> np.ndarray:
        """Anomaly scores ``||phi(x) - c||^2`` (higher = more anomalous)."""
        self._check_fitted()
        if self.cfg.input == "features":
            x = check_rows(x, "x", "features")
        return self.state_.score(x, batch_size=batch_size, which=which)

    # -- persistence -----------------------------------------------------------------------

    def _save_state(self, directory: Path) -> dict[str, Any]:
        self.state_.save(directory)
        return {}

    @classmethod
    def _load_state(cls, directory: Path, meta: dict[str, Any], context: DetectorContext | None = None) -> "DeepSAD":
        from kka_ray.detectors.deep_sad.train import DeepSADState

        state = DeepSADState.load(directory)
        det = cls(state.config, context=context)
        det._set_state(state)
        return det

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "DeepSAD":
        """A saved detector (``detector.json`` + checkpoint) or a bare Deep SAD checkpoint."""
        from kka_ray.detectors.base import DETECTOR_META

        if (Path(directory) / DETECTOR_META).is_file():
            return super().load(directory)  # type: ignore[return-value]
        return cls._load_state(Path(directory), {})
