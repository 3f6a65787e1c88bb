"""CMDA baseline: cross-modal interpolation of text and image features as extra samples.

A baseline row of the KKA paper's tables (it uses no generated images): texts describing
plausible anomalies of the normal class (``detector.cmda.anomaly_templates``) are embedded with
the text encoder (all-MiniLM-L6-v2 locally), mapped into the image-feature space by a ridge
regression fitted on the normal training pairs (caption embedding -> image feature), and mixed
with normal image features:

    x_tilde = (1 - lambda) * z_i + lambda * W t_j,     lambda ~ U(mix_low, mix_high)

The ``n_samples`` mixtures are the anomalies (-1) of a Deep SAD detector (the SAD settings of
``detector``, with ``detector.cmda.eta`` as its eta) trained with the normals. With a jointly
trained text-image encoder (CLIP) the map would be the identity; the local models have no shared
space, so the ridge map stands in for it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np

from kka_ray.config import CMDASection, DeepSADSection
from kka_ray.detectors.base import Detector, DetectorContext, Validation, check_rows

logger = logging.getLogger(__name__)


def ridge_map(text: np.ndarray, image: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """``W, b`` minimising ``||T W + b - Z||^2 + alpha ||W||^2`` (closed form on centred data)."""
    t_mean, z_mean = text.mean(0), image.mean(0)
    tc, zc = text - t_mean, image - z_mean
    w = np.linalg.solve(tc.T @ tc + alpha * np.eye(text.shape[1]), tc.T @ zc)
    return w, z_mean - t_mean @ w


def interpolate(normal: np.ndarray, mapped: np.ndarray, n: int, low: float, high: float, seed: int) -> np.ndarray:
    """``n`` rows ``(1 - l) z_i + l m_j`` with random i, j and ``l ~ U(low, high)``."""
    rng = np.random.default_rng(seed)
    i = rng.integers(0, len(normal), n)
    j = rng.integers(0, len(mapped), n)
    lam = rng.uniform(low, high, n)[:, None]
    return ((1 - lam) * normal[i] + lam * mapped[j]).astype(np.float32)


class CMDA(Detector):
    """Deep SAD trained on normals + text-image interpolated pseudo-anomalies."""

    name = "cmda"
    input_kind = "features"

    def __init__(self, cfg: CMDASection | None = None, sad: DeepSADSection | None = None,
                 context: DetectorContext | None = None, normal_texts: list[str] | None = None,
                 class_names: list[str] | None = None) -> None:
        self.cfg = cfg if cfg is not None else CMDASection()
        sad = sad if sad is not None else DeepSADSection()
        self.sad_cfg = sad if self.cfg.eta is None else sad.model_copy(update={"eta": self.cfg.eta})
        self.context = context or DetectorContext()
        self.normal_texts = list(normal_texts or [])
        self.class_names = list(class_names or [])
        self.threshold_ = None
        self.fit_info_ = {}
        self.fitted_ = False

    def anomaly_texts(self) -> list[str]:
        names = self.class_names or ["object"]
        return [t.format(name=n) for t in self.cfg.anomaly_templates for n in names]

    def pseudo_anomalies(self, normal: np.ndarray) -> np.ndarray:
        """The interpolated samples for ``normal`` feature rows (needs ``normal_texts``, one per row)."""
        from kka_ray.generation.minilm import embed_sentences

        if len(self.normal_texts) != len(normal):
            raise ValueError(f"CMDA needs one caption per normal row: {len(self.normal_texts)} captions for "
                             f"{len(normal)} rows (pass normal_texts=split.train.captions)")
        cache = str(self.context.model_cache())
        # captions repeat (templates x class names): encode each distinct one once
        # (one encoder load for both kinds of text)
        unique, index = np.unique(np.asarray(self.normal_texts, dtype=object).astype(str), return_inverse=True)
        emb = embed_sentences(unique.tolist() + self.anomaly_texts(), cache)
        t_norm, t_anom = emb[: len(unique)][index], emb[len(unique):]
        w, b = ridge_map(t_norm.astype(np.float64), normal.astype(np.float64), self.cfg.ridge_alpha)
        mapped = t_anom @ w + b
        return interpolate(normal, mapped, self.cfg.n_samples, self.cfg.mix_low, self.cfg.mix_high, self.context.seed)

    def fit(self, normal: np.ndarray, anomalies: np.ndarray | None = None,
            validation: Validation | None = None, name: str | None = None) -> "CMDA":
        from kka_ray.detectors.deep_sad.model import DeepSAD

        normal = check_rows(normal, "normal", "features")
        pseudo = self.pseudo_anomalies(normal)
        extra = pseudo if anomalies is None or not len(anomalies) else np.concatenate(
            [pseudo, check_rows(anomalies, "anomalies", "features")])
        self.sad_ = DeepSAD(self.sad_cfg, context=self.context).fit(normal, extra, validation, name=name)
        self.n_anomalies_ = 0 if anomalies is None else len(anomalies)
        self.fit_info_ = {**self.sad_.fit_info_, "n_pseudo_anomalies": len(pseudo)}
        self.fitted_ = True
        return self

    def decision_function(self, x: np.ndarray, which: Literal["selected", "last"] = "selected") -> np.ndarray:
        self._check_fitted()
        return self.sad_.decision_function(x, which=which)

    @property
    def has_distinct_last(self) -> bool:
        return self.sad_.has_distinct_last

    def _save_state(self, directory: Path) -> dict[str, Any]:
        self.sad_.save(directory / "sad")
        return {"config": self.cfg.model_dump(mode="json")}

    @classmethod
    def _load_state(cls, directory: Path, meta: dict[str, Any], context: DetectorContext) -> "CMDA":
        from kka_ray.detectors.deep_sad.model import DeepSAD

        det = cls(CMDASection.model_validate(meta["config"]), context=context)
        det.sad_ = DeepSAD.load(directory / "sad")
        det.sad_cfg = det.sad_.cfg
        return det
