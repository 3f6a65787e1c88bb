"""Deep SAD as a PyOD/anomalib-like detector (method.md Eq. 5 and the "SAD" detector).

``DeepSAD(cfg).fit(normal, anomalies)`` trains through Ray Train
(:func:`kka_ray.training.trainer.train_deep_sad`): normals get ``cfg.normal_label`` (0 =
unlabeled, the default, or +1 = known normal), known or generated anomalies get -1.
``decision_function`` returns ``||phi(x) - c||^2`` (higher = more anomalous);
``set_threshold`` fixes ``threshold_`` on validation normals (Eq. 6 rules) and ``predict``
returns 1 for ``score > threshold_``. Fitted attributes end in ``_``.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import uuid
from typing import Literal

import numpy as np

from kka_ray.config import DeepSADSection
from kka_ray.confusion import DEFAULT_QUANTILE, distance_threshold

logger = logging.getLogger(__name__)

DETECTOR_FILE = "detector.json"


class DeepSAD:
    """Deep SAD detector: ``fit`` / ``decision_function`` / ``set_threshold`` / ``predict``."""

    def __init__(self, cfg: DeepSADSection | None = None, storage_path: str | None = None, seed: int = 0) -> None:
        self.cfg = cfg if cfg is not None else DeepSADSection()
        self.storage_path = storage_path
        self.seed = seed

    # -- fitting ---------------------------------------------------------------------------

    def fit(self, normal: np.ndarray, anomalies: np.ndarray | None = None, name: str | None = None) -> "DeepSAD":
        """Train on ``normal`` (label ``cfg.normal_label``) and optional ``anomalies`` (label -1)."""
        from kka_ray.training.trainer import train_deep_sad

        normal = np.asarray(normal, dtype=np.float32)
        if normal.ndim < 2 or len(normal) == 0:
            raise ValueError(f"normal must be a non-empty array shaped (n, ...), got {normal.shape}")
        parts, labels = [normal], [np.full(len(normal), self.cfg.normal_label, dtype=np.int64)]
        if anomalies is not None and len(anomalies):
            anomalies = np.asarray(anomalies, dtype=np.float32)
            if anomalies.shape[1:] != normal.shape[1:]:
                raise ValueError(f"anomalies rows {anomalies.shape[1:]} differ from normal rows {normal.shape[1:]}")
            parts.append(anomalies)
            labels.append(np.full(len(anomalies), -1, dtype=np.int64))
        storage = self.storage_path
        if storage is None:
            storage = tempfile.mkdtemp(prefix="kka_deep_sad_")
            logger.info("DeepSAD: no storage_path given; Ray Train writes its run under %s", storage)
        run_name = name or f"deep_sad-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        state = train_deep_sad(np.concatenate(parts), np.concatenate(labels), self.cfg, storage, run_name, seed=self.seed)
        self._set_state(state)
        self.n_anomalies_ = int(len(parts[1])) if len(parts) > 1 else 0
        return self

    def _set_state(self, state) -> None:
        self.state_ = state
        self.center_ = state.center.numpy().copy()
        self.history_ = list(state.history)
        self.checkpoint_path_ = state.checkpoint_path
        self.in_shape_ = tuple(state.in_shape)

    def _check_fitted(self) -> None:
        if not hasattr(self, "state_"):
            raise RuntimeError("this DeepSAD is not fitted yet: call fit(normal, anomalies) or DeepSAD.load(dir) first")

    # -- scoring ---------------------------------------------------------------------------

    def decision_function(self, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """Anomaly scores ``||phi(x) - c||^2`` (higher = more anomalous)."""
        self._check_fitted()
        return self.state_.score(x, batch_size=batch_size)

    def set_threshold(
        self, validation_x: np.ndarray, rule: Literal["max", "quantile"] = "max", q: float = DEFAULT_QUANTILE
    ) -> float:
        """Set ``threshold_`` from held-out normals' scores (max or q-quantile) and return it."""
        self.threshold_ = distance_threshold(self.decision_function(validation_x), rule=rule, q=q)
        self.threshold_rule_ = {"rule": rule, "q": q}
        return self.threshold_

    def predict(self, x: np.ndarray) -> np.ndarray:
        """1 where ``score > threshold_`` (anomalous), else 0."""
        if not hasattr(self, "threshold_"):
            raise RuntimeError("no threshold_: call set_threshold(validation_normals) after fit")
        return (self.decision_function(x) > self.threshold_).astype(np.int64)

    # -- persistence -----------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> str:
        """Safetensors weights + centre + meta.json, and ``detector.json`` with the threshold."""
        self._check_fitted()
        self.state_.save(directory)
        info = {"seed": self.seed, "threshold": getattr(self, "threshold_", None),
                "threshold_rule": getattr(self, "threshold_rule_", None)}
        with open(os.path.join(directory, DETECTOR_FILE), "w") as fh:
            json.dump(info, fh, indent=1)
        return str(directory)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "DeepSAD":
        from kka_ray.training.trainer import DeepSADState

        state = DeepSADState.load(directory)
        det = cls(state.config)
        det._set_state(state)
        path = os.path.join(directory, DETECTOR_FILE)
        if os.path.isfile(path):
            with open(path) as fh:
                info = json.load(fh)
            det.seed = int(info.get("seed", 0))
            if info.get("threshold") is not None:
                det.threshold_ = float(info["threshold"])
                det.threshold_rule_ = info.get("threshold_rule")
        return det
