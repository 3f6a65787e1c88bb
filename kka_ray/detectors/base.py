"""The interface every detector KKA plugs into (PyOD / anomalib-like).

    det = build_detector("simplenet", cfg.detector, context)       # or SimpleNet(section, ...)
    det.fit(normal, anomalies=None, validation=Validation(holdout_normals, val_anomalies))
    scores = det.decision_function(x)          # higher = more anomalous
    det.set_threshold(holdout_normals)         # method.md Eq. 6 rules: max or quantile
    labels = det.predict(x)                    # 1 = anomaly
    det.save(dir); type(det).load(dir)

``input_kind`` says what rows a detector takes: ``"features"`` (the run's normalised pooled
backbone features, shape (n, d)) or ``"images"`` (uint8 images as the dataset stores them,
(n, H, W) grey or (n, H, W, 3) RGB). Checkpoints are chosen on ``validation`` (held-out normals
plus generated anomalies, never test); ``decision_function(x, which="last")`` scores with the
last epoch's model so both can be reported. ``fit_info_`` records the selected epoch and the
validation AUROC of the selected and the last epoch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
import uuid
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from kka_ray.detectors.threshold import DEFAULT_QUANTILE, distance_threshold

logger = logging.getLogger(__name__)

DETECTOR_META = "detector.json"
InputKind = Literal["features", "images"]


@dataclass
class Validation:
    """Held-out normals and generated anomalies for checkpoint selection (never test data)."""

    normal: np.ndarray
    anomalies: np.ndarray | None = None

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Rows and labels (0 = normal, 1 = anomaly)."""
        parts = [np.asarray(self.normal)]
        labels = [np.zeros(len(self.normal), np.int64)]
        if self.anomalies is not None and len(self.anomalies):
            parts.append(np.asarray(self.anomalies))
            labels.append(np.ones(len(self.anomalies), np.int64))
        return np.concatenate(parts), np.concatenate(labels)

    @property
    def has_anomalies(self) -> bool:
        return self.anomalies is not None and len(self.anomalies) > 0


class FrozenFeatureCache:
    """Features of a frozen network by (extractor settings, content digest of the input rows),
    least recently used out first within a byte budget.

    A detector over frozen features computes the same ones again and again when a run is
    evaluated: the training normals, held-out normals and test images are the same for every
    seed and KKA iteration of a split, and the test images are scored twice (selected and last
    epoch). Cached arrays are read-only; an array larger than the budget is never kept. The
    budget is the caller's: a call with a smaller one trims the shared cache down to it.
    """

    def __init__(self) -> None:
        self._items: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    @staticmethod
    def digest(rows: np.ndarray) -> str:
        rows = np.ascontiguousarray(rows)
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{rows.dtype.str}{rows.shape}".encode())
        h.update(memoryview(rows).cast("B"))
        return h.hexdigest()

    def get(self, settings: tuple, rows: np.ndarray, compute, max_bytes: int) -> np.ndarray:
        """``compute(rows)``, or the array it gave before for equal ``rows`` under ``settings``."""
        if max_bytes <= 0:
            return compute(rows)
        key = (settings, self.digest(rows))
        if key in self._items:
            self._items.move_to_end(key)
            self.hits += 1
            return self._items[key]
        self.misses += 1
        out = compute(rows)
        if out.nbytes <= max_bytes:
            out.flags.writeable = False
            self._items[key] = out
            self.nbytes += out.nbytes
        while self.nbytes > max_bytes:
            _, old = self._items.popitem(last=False)
            self.nbytes -= old.nbytes
        return out

    def clear(self) -> None:
        self._items.clear()
        self.nbytes = self.hits = self.misses = 0


FROZEN_FEATURES = FrozenFeatureCache()  # one per process: shared by every detector instance in it


@dataclass
class DetectorContext:
    """What a detector may need beyond its own config: where Ray Train writes, the model cache,
    the backbone name and input size, the device and the seed. ``feature_cache_bytes`` bounds the
    process-wide cache of frozen-backbone features (:class:`FrozenFeatureCache`; 0 turns it off)."""

    storage_path: str | None = None
    cache_dir: str | None = None
    backbone: str = "efficientnet_lite0"
    image_size: int = 64
    device: str = "cpu"
    seed: int = 0
    feature_cache_bytes: int = 1 << 30

    def storage(self, prefix: str) -> str:
        if self.storage_path is None:
            self.storage_path = tempfile.mkdtemp(prefix=f"kka_{prefix}_")
        return self.storage_path

    @staticmethod
    def run_name(prefix: str) -> str:
        return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"

    def model_cache(self) -> Path:
        """``cache_dir``, or the default model cache (``paths.model_cache``) when it is unset."""
        if self.cache_dir is not None:
            return Path(self.cache_dir).expanduser()
        from kka_ray.config import PathsSection

        return PathsSection().cache_dir()

    def to_meta(self) -> dict[str, Any]:
        """What a saved detector keeps: backbone, input size, model cache and seed (not where
        Ray Train wrote, nor the device: a loaded detector runs where it is loaded)."""
        return {"backbone": self.backbone, "image_size": self.image_size, "cache_dir": self.cache_dir, "seed": self.seed}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> "DetectorContext":
        """The context :meth:`to_meta` saved; a model cache that is not here any more is dropped
        (the default cache is used)."""
        cache = meta.get("cache_dir")
        return cls(backbone=meta.get("backbone", "efficientnet_lite0"), image_size=int(meta.get("image_size", 64)),
                   cache_dir=cache if cache and Path(cache).expanduser().is_dir() else None,
                   seed=int(meta.get("seed", 0)))


class Detector(ABC):
    """Base class: ``fit`` / ``decision_function`` / ``set_threshold`` / ``predict`` / ``save`` / ``load``."""

    name: ClassVar[str] = ""
    input_kind: ClassVar[InputKind] = "features"

    threshold_: float | None = None
    fit_info_: dict[str, Any]

    # -- to implement -----------------------------------------------------------------------
    @abstractmethod
    def fit(self, normal: np.ndarray, anomalies: np.ndarray | None = None,
            validation: Validation | None = None, name: str | None = None) -> "Detector":
        """Train on normal rows and optional (generated or known) anomaly rows."""

    @abstractmethod
    def decision_function(self, x: np.ndarray, which: Literal["selected", "last"] = "selected") -> np.ndarray:
        """Anomaly score per row, higher = more anomalous (float64)."""

    @abstractmethod
    def _save_state(self, directory: Path) -> dict[str, Any]:
        """Write weights (safetensors) into ``directory``; return JSON-ready metadata."""

    @classmethod
    @abstractmethod
    def _load_state(cls, directory: Path, meta: dict[str, Any], context: DetectorContext) -> "Detector":
        """Rebuild a fitted detector from ``directory``, the metadata ``_save_state`` returned and
        the saved context."""

    # -- shared -----------------------------------------------------------------------------
    @property
    def has_distinct_last(self) -> bool:
        """True when ``which="last"`` scores with another model than ``"selected"`` (validation
        chose an earlier epoch); False for detectors without epochs. Callers that report both
        score once when this is False."""
        return False

    def _load_checkpoint(self, directory: Path) -> None:
        """Load the weights a Ray Train fit left in ``directory`` (detectors that train on Ray)."""
        raise NotImplementedError(f"{type(self).__name__} does not train on Ray Train")

    def _fit_on_ray(self, train_loop: Any, loop_config: dict[str, Any], datasets: dict[str, Any],
                    section: Any, validation: "Validation | None", name: str | None) -> str:
        """The Ray Train fit every trained detector shares: say when ``validation`` cannot choose
        an epoch, run ``train_loop`` placed as ``section`` says (:func:`kka_ray.training.ray_fit.fit_section`),
        load the reported checkpoint with :meth:`_load_checkpoint` and return its path."""
        from kka_ray.training import ray_fit

        if validation is not None and not validation.has_anomalies:
            logger.warning("%s: validation has no anomalies, so no AUROC can choose an epoch; the last is kept", self.name)
        result = ray_fit.fit_section(train_loop, loop_config, datasets, section, self.context.storage(self.name),
                                     name or self.context.run_name(self.name))
        with result.checkpoint.as_directory() as directory:
            self._load_checkpoint(Path(directory))
        return str(result.checkpoint.path)

    def _check_fitted(self) -> None:
        if not getattr(self, "fitted_", False):
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit(normal, anomalies) first")

    def set_threshold(self, normal_val: np.ndarray, rule: Literal["max", "quantile"] = "max",
                      q: float = DEFAULT_QUANTILE) -> float:
        """Fix ``threshold_`` from validation normals' scores (method.md Eq. 6 rules: max or q-quantile)."""
        self.threshold_ = float(distance_threshold(self.decision_function(normal_val), rule=rule, q=q))
        return self.threshold_

    def predict(self, x: np.ndarray) -> np.ndarray:
        """1 where the score exceeds ``threshold_`` (set it with :meth:`set_threshold`), else 0."""
        if self.threshold_ is None:
            raise RuntimeError("no threshold: call set_threshold(validation_normals) before predict()")
        return (self.decision_function(x) > self.threshold_).astype(np.int64)

    def save(self, directory: str | os.PathLike) -> str:
        self._check_fitted()
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        meta = {"detector": self.name, "threshold": self.threshold_, "fit_info": self.fit_info_,
                "context": self.context.to_meta(), **self._save_state(d)}
        (d / DETECTOR_META).write_text(json.dumps(meta, indent=1))
        return str(d)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Detector":
        d = Path(directory)
        path = d / DETECTOR_META
        if not path.is_file():
            raise FileNotFoundError(f"{str(d)!r} is not a saved detector: {DETECTOR_META} is missing")
        meta = json.loads(path.read_text())
        if cls.name and meta.get("detector") != cls.name:
            raise ValueError(f"{str(d)!r} holds a {meta.get('detector')!r} detector, not {cls.name!r}")
        # detectors saved before the context had its own entry kept some of its fields at the top
        saved = meta.get("context") or {k: meta[k] for k in ("image_size", "cache_dir", "seed") if k in meta}
        det = cls._load_state(d, meta, DetectorContext.from_meta(saved))
        det.threshold_ = meta.get("threshold")
        det.fit_info_ = meta.get("fit_info", {})
        det.fitted_ = True
        return det


def check_which(which: str) -> str:
    """``which`` of ``decision_function``: the validation-chosen epoch or the last one."""
    if which not in ("selected", "last"):
        raise ValueError(f"which must be 'selected' or 'last', got {which!r}")
    return which


def check_rows(x: np.ndarray, what: str, kind: InputKind) -> np.ndarray:
    """Validate detector input rows; features -> float32 (n, d); images -> uint8 (n, H, W[, 3])."""
    x = np.asarray(x)
    if kind == "features":
        if x.ndim != 2 or len(x) == 0:
            raise ValueError(f"{what} must be a non-empty feature array shaped (n, d), got {x.shape}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not np.isfinite(x).all():
            raise ValueError(f"{what} has {int((~np.isfinite(x)).sum())} non-finite values; drop or fix those rows")
        return x
    if x.ndim not in (3, 4) or len(x) == 0 or (x.ndim == 4 and x.shape[-1] not in (1, 3)):
        raise ValueError(f"{what} must be images shaped (n, H, W) or (n, H, W, 3), got {x.shape}")
    if x.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8 images (0-255), got dtype {x.dtype}")
    return x
