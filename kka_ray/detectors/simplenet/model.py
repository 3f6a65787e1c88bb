"""SimpleNet as a KKA detector (Liu et al., CVPR 2023; method.md "Detectors").

    det = SimpleNet(cfg.detector.simplenet, DetectorContext(cache_dir=..., image_size=64))
    det.fit(normal_images, anomalies=generated_images, validation=Validation(held_normals, held_anoms))
    scores = det.decision_function(test_images)        # max over patches of -D(adaptor(features))

``fit`` computes the frozen backbone's patch features once, in this process (batched,
``torch.inference_mode``; :class:`~kka_ray.detectors.simplenet.torch_model.PatchFeatureExtractor`
over EfficientNet-Lite0 from the model cache, images prepared as
:meth:`kka_ray.knowledge.features.FeatureExtractor.preprocess` does: grey -> 3 channels,
bilinear resize to ``context.image_size``, ImageNet normalisation). The rows become Ray
Datasets and the adaptor + discriminator train through the engine's one Ray Train path
(:func:`kka_ray.training.ray_fit.fit_torch`, worker loop
:mod:`kka_ray.detectors.simplenet.train_loop`). Generated anomalies join SimpleNet's Gaussian
negatives (KKA); the validation AUROC chooses the kept meta epoch, and ``which="last"`` scores
with the last one. Weights are safetensors, metadata JSON; nothing is pickled.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np

from kka_ray.config import SimpleNetSection
from kka_ray.detectors.base import FROZEN_FEATURES, Detector, DetectorContext, Validation, check_rows, check_which

logger = logging.getLogger(__name__)

FEATURE_BATCH = 32  # images per backbone forward on CPU (see knowledge.features.DEFAULT_BATCH_SIZE)
SCORE_BATCH = 64  # images per head forward when scoring
SCORE_CHUNK = 1024  # images whose patch features are held at once when scoring


def channel_stats(feats: np.ndarray, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std over all patches of ``feats`` (n, P, C), in float64 chunks."""
    c = feats.shape[-1]
    total, total_sq, count = np.zeros(c), np.zeros(c), 0
    for i in range(0, len(feats), chunk):
        rows = feats[i : i + chunk].reshape(-1, c).astype(np.float64)
        total += rows.sum(0)
        total_sq += (rows * rows).sum(0)
        count += len(rows)
    mean = total / count
    return mean, np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))


class SimpleNet(Detector):
    """SimpleNet: frozen patch features -> linear adaptor -> MLP discriminator (image score = max -D)."""

    name = "simplenet"
    input_kind = "images"

    def __init__(self, cfg: SimpleNetSection | None = None, context: DetectorContext | None = None) -> None:
        self.cfg = cfg if cfg is not None else SimpleNetSection()
        self.context = context if context is not None else DetectorContext()
        from kka_ray.knowledge.backbones import EFFICIENTNET_LITE0_ALIASES

        if self.context.backbone not in EFFICIENTNET_LITE0_ALIASES:
            raise ValueError(f"SimpleNet needs the efficientnet_lite0 backbone's intermediate maps; "
                             f"{self.context.backbone!r} gives only pooled features (set knowledge.backbone=efficientnet_lite0)")
        self.fit_info_: dict[str, Any] = {}
        self.fitted_ = False
        self._extractor: Any = None  # (FeatureExtractor, PatchFeatureExtractor), built on first use
        self._heads: dict[str, Any] = {}

    # -- patch features ---------------------------------------------------------------------

    def _feature_modules(self) -> tuple[Any, Any]:
        if self._extractor is None:
            from kka_ray.detectors.simplenet.torch_model import PatchFeatureExtractor
            from kka_ray.knowledge.features import FeatureExtractor

            fe = FeatureExtractor(self.context.backbone, self.context.image_size, self.context.cache_dir,
                                  self.context.device, FEATURE_BATCH)
            self._extractor = (fe, PatchFeatureExtractor(fe.model.net, self.cfg.layers, self.cfg.patch_size))
        return self._extractor

    def patch_features(self, images: np.ndarray, what: str = "images") -> np.ndarray:
        """Frozen-backbone patch features, float32 ``(n, P, sum C_l)`` (P patches per image, row-major).

        Read-only: equal images give the array computed before, from the process-wide
        :data:`~kka_ray.detectors.base.FROZEN_FEATURES` (``context.feature_cache_bytes``)."""
        images = check_rows(images, what, "images")
        ctx = self.context
        settings = ("simplenet", ctx.backbone, ctx.image_size, str(ctx.cache_dir), ctx.device,
                    tuple(self.cfg.layers), self.cfg.patch_size)
        return FROZEN_FEATURES.get(settings, images, self._compute_patch_features, ctx.feature_cache_bytes)

    def _compute_patch_features(self, images: np.ndarray) -> np.ndarray:
        import torch

        fe, patches = self._feature_modules()
        out = []
        with torch.inference_mode():
            for i in range(0, len(images), FEATURE_BATCH):
                out.append(patches(fe.preprocess(images[i : i + FEATURE_BATCH])).float().cpu().numpy())
        return np.concatenate(out).astype(np.float32, copy=False)

    # -- fitting ----------------------------------------------------------------------------

    def fit(self, normal: np.ndarray, anomalies: np.ndarray | None = None,
            validation: Validation | None = None, name: str | None = None) -> "SimpleNet":
        """Train adaptor + discriminator on ``normal`` images and optional generated ``anomalies``
        (uint8 ``(n, H, W)`` or ``(n, H, W, 3)``); ``validation`` picks the kept meta epoch."""
        from kka_ray.detectors.simplenet.train_loop import train_loop_per_worker
        from kka_ray.training import ray_fit

        t0 = time.perf_counter()
        rows = ray_fit.labelled_datasets(self.patch_features, normal, anomalies, validation,
                                         self.cfg.num_workers, self.context.seed)
        feats, n_anom = rows.normal, rows.n_anomalies
        feature_seconds = time.perf_counter() - t0
        _, patches = self._feature_modules()
        mean, std = channel_stats(feats)
        loop_config = {"simplenet": self.cfg.model_dump(mode="json"), "layer_channels": patches.layer_channels,
                       "feature_mean": mean.tolist(), "feature_std": std.tolist(),
                       "n_patches": int(feats.shape[1]), "seed": int(self.context.seed)}
        self.checkpoint_path_ = self._fit_on_ray(train_loop_per_worker, loop_config, rows.datasets, self.cfg,
                                                 validation, name)
        meta = self.meta_
        self.fit_info_ = {
            "selected_epoch": meta["selected_epoch"],
            "selected_val_auroc": meta["selected_val_auroc"],
            "last_val_auroc": meta["last_val_auroc"],
            "epochs": self.cfg.epochs,
            "seconds": time.perf_counter() - t0,
            "feature_seconds": feature_seconds,
            "n_normal": int(len(feats)),
            "n_anomalies": int(n_anom),
            "n_patches": int(feats.shape[1]),
            "history": meta["history"],
        }
        self.fitted_ = True
        logger.info("SimpleNet fitted: %d normals, %d anomalies, %d patches/image, selected epoch %s (val AUROC %s), %.1f s",
                    len(feats), n_anom, feats.shape[1], meta["selected_epoch"], meta["selected_val_auroc"],
                    self.fit_info_["seconds"])
        return self

    def _load_checkpoint(self, directory: Path) -> None:
        from kka_ray.detectors.simplenet.train_loop import read_checkpoint_files

        selected, last, meta = read_checkpoint_files(directory)
        self._set_heads(selected, last, meta)

    def _set_heads(self, selected: dict, last: dict, meta: dict[str, Any]) -> None:
        from kka_ray.detectors.simplenet.train_loop import head_from_config

        self.layer_channels_ = [int(c) for c in meta["layer_channels"]]
        self.meta_ = meta
        self._heads = {}
        for which, state in (("selected", selected), ("last", last)):
            head = head_from_config(self.cfg, self.layer_channels_)
            head.load_state_dict(state, strict=True)
            self._heads[which] = head.eval().to(self.context.device)

    # -- scoring ----------------------------------------------------------------------------

    @property
    def has_distinct_last(self) -> bool:
        return self.meta_["selected_epoch"] != self.meta_["history"][-1]["epoch"]

    def patch_scores(self, images: np.ndarray, which: Literal["selected", "last"] = "selected") -> np.ndarray:
        """Per-patch anomaly scores ``-D`` (float64 ``(n, h, w)``, the finest used stage's grid)."""
        import torch

        self._check_fitted()
        check_which(which)
        images = check_rows(images, "images", "images")
        head = self._heads[which]
        parts = []
        for start in range(0, len(images), SCORE_CHUNK):  # features of one chunk at a time: bounded memory
            feats = self.patch_features(images[start : start + SCORE_CHUNK])
            if feats.shape[2] != sum(self.layer_channels_):
                raise ValueError(f"patch features have {feats.shape[2]} channels, the model was trained on "
                                 f"{sum(self.layer_channels_)}; use the same backbone and simplenet.layers")
            with torch.inference_mode():
                for i in range(0, len(feats), SCORE_BATCH):
                    xb = torch.from_numpy(feats[i : i + SCORE_BATCH].copy()).to(self.context.device)  # cached rows are read-only
                    parts.append((-head(xb.flatten(0, 1))).view(len(xb), -1).double().cpu().numpy())
        out = np.concatenate(parts)
        side = int(round(np.sqrt(out.shape[1])))
        return out.reshape(len(out), side, -1) if side * side == out.shape[1] else out

    def decision_function(self, x: np.ndarray, which: Literal["selected", "last"] = "selected") -> np.ndarray:
        """Image anomaly score: max over patches of ``-D(adaptor(patch features))`` (float64 ``(n,)``)."""
        scores = self.patch_scores(x, which)
        return scores.reshape(len(scores), -1).max(axis=1)

    # -- persistence ------------------------------------------------------------------------

    def _save_state(self, directory: Path) -> dict[str, Any]:
        from kka_ray.detectors.simplenet.train_loop import write_checkpoint_files

        write_checkpoint_files(directory, self._heads["selected"].state_dict(), self._heads["last"].state_dict(), self.meta_)
        return {"config": self.cfg.model_dump(mode="json")}

    @classmethod
    def _load_state(cls, directory: Path, meta: dict[str, Any], context: DetectorContext) -> "SimpleNet":
        from kka_ray.detectors.simplenet.train_loop import read_checkpoint_files

        selected, last, ckpt_meta = read_checkpoint_files(directory)
        det = cls(SimpleNetSection.model_validate(meta["config"]), context)
        det._set_heads(selected, last, ckpt_meta)
        return det
