"""ReContrast (Guo et al., NeurIPS 2023) as a KKA detector on images (method.md "Detectors").

``ReContrast(cfg, context).fit(normal_images, anomalies, validation)`` resizes uint8 images to
``context.image_size`` (grey copied to RGB, ImageNet normalisation, as the feature extractor
does), trains through the engine's Ray Train path (:func:`kka_ray.training.ray_fit.fit_torch`
running :func:`kka_ray.detectors.recontrast.train_loop.train_loop_per_worker`) and loads the
checkpoint. Normal images learn the contrastive cross-reconstruction; generated anomalies
(KKA) only enter the term that pushes their reconstruction distance above a margin.
``decision_function`` returns the released code's image score: the maximum of the summed,
upsampled, Gaussian-smoothed per-pixel ``1 - cos`` maps (higher = more anomalous);
``anomaly_maps`` gives the maps themselves. With ``validation`` (held-out normals and generated
anomalies) the epoch with the best validation AUROC is kept; ``which="last"`` scores with the
last epoch. Saved state: the trainable parts (E_t, bottleneck, decoder) as safetensors; the
frozen encoder is rebuilt from the model cache and checked against a stored fingerprint.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from kka_ray.config import ReContrastSection
from kka_ray.detectors.base import Detector, DetectorContext, Validation, check_rows, check_which
from kka_ray.knowledge.features import normalize_images

if TYPE_CHECKING:
    from kka_ray.detectors.recontrast.torch_model import ReContrastNet

logger = logging.getLogger(__name__)

# Images preprocessed per chunk (bounds the float copy in memory) and per scoring forward.
PREPROCESS_CHUNK = 512
SCORE_BATCH = 64
MIN_IMAGE_SIZE = 16  # the /16 stage must keep at least one pixel
# Fingerprints of the frozen encoder may differ by float summation order only.
FINGERPRINT_RTOL = 1e-6


def preprocess_images(images: np.ndarray, image_size: int) -> np.ndarray:
    """uint8 (n, H, W[, 1|3]) -> float32 (n, 3, S, S) with ``knowledge.features.normalize_images``
    (the backbone's own preprocessing), a chunk at a time to bound the float copy."""
    out = np.empty((len(images), 3, image_size, image_size), np.float32)
    for i in range(0, len(images), PREPROCESS_CHUNK):
        out[i : i + PREPROCESS_CHUNK] = normalize_images(images[i : i + PREPROCESS_CHUNK], image_size).numpy()
    return out


class ReContrast(Detector):
    """ReContrast on uint8 images: ``fit`` / ``decision_function`` / ``anomaly_maps`` / ``save`` / ``load``."""

    name = "recontrast"
    input_kind = "images"

    def __init__(self, cfg: ReContrastSection | None = None, context: DetectorContext | None = None) -> None:
        self.cfg = cfg if cfg is not None else ReContrastSection()
        self.context = context or DetectorContext()
        from kka_ray.knowledge.backbones import EFFICIENTNET_LITE0_ALIASES

        if self.context.backbone not in EFFICIENTNET_LITE0_ALIASES:
            raise ValueError(f"ReContrast here is built on EfficientNet-Lite0's multi-scale stages; backbone "
                             f"{self.context.backbone!r} is not supported (set knowledge.backbone=efficientnet_lite0)")
        if self.context.image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"ReContrast needs image_size >= {MIN_IMAGE_SIZE}, got {self.context.image_size} (knowledge.image_size)")
        self.threshold_ = None
        self.fit_info_: dict[str, Any] = {}
        self.fitted_ = False
        self.net_: ReContrastNet | None = None
        self.last_net_: ReContrastNet | None = None

    # -- fitting ------------------------------------------------------------------------------
    def fit(self, normal_images: np.ndarray, anomalies: np.ndarray | None = None,
            validation: Validation | None = None, name: str | None = None) -> "ReContrast":
        """Train on normal images and optional generated (or known) anomaly images, both uint8."""
        from kka_ray.detectors.recontrast.train_loop import train_loop_per_worker
        from kka_ray.training import ray_fit

        size, cfg = self.context.image_size, self.cfg
        rows = ray_fit.labelled_datasets(lambda x, what: preprocess_images(check_rows(x, what, "images"), size),
                                         normal_images, anomalies, validation, cfg.num_workers, self.context.seed,
                                         label_dtype=np.float32)
        if rows.n_rows // cfg.num_workers < 2:
            raise ValueError(f"ReContrast needs at least 2 training images per worker (BatchNorm); got {rows.n_rows} "
                             f"for {cfg.num_workers} worker(s)")
        loop_config = {
            "recontrast": cfg.model_dump(mode="json"), "cache_dir": str(self.context.model_cache()), "image_size": size,
            "n_train": rows.n_rows, "n_anomalies": rows.n_anomalies, "seed": int(self.context.seed),
        }
        self.checkpoint_path_ = self._fit_on_ray(train_loop_per_worker, loop_config, rows.datasets, cfg, validation, name)
        self.fit_info_["checkpoint_path"] = self.checkpoint_path_
        logger.info("ReContrast fitted: %d iterations, selected epoch %s (val AUROC %s), last val AUROC %s",
                    self.fit_info_["iterations"], self.fit_info_["selected_epoch"],
                    self.fit_info_["selected_val_auroc"], self.fit_info_["last_val_auroc"])
        return self

    def _load_checkpoint(self, directory: Path) -> None:
        """Rebuild the nets (E_f from the model cache) and load the saved trainable parts."""
        import torch

        from kka_ray.detectors.recontrast.torch_model import build_recontrast_net
        from kka_ray.detectors.recontrast.train_loop import read_checkpoint_files

        state, last_state, meta = read_checkpoint_files(directory)
        cfg = self.cfg
        net = build_recontrast_net(self.context.model_cache(), cfg.encoder_bn_train, cfg.encoder_bn_momentum)
        expected = meta.get("frozen_fingerprint")
        if expected is not None and not math.isclose(net.frozen_fingerprint(), expected, rel_tol=FINGERPRINT_RTOL):
            raise ValueError(f"the EfficientNet-Lite0 weights in {self.context.model_cache()} differ from those this ReContrast "
                             "was trained with (fingerprint mismatch); point context.cache_dir at the original model cache")
        net.load_trainable_state(state)
        last = None
        if last_state is not None:
            last = net.sibling()
            last.load_trainable_state(last_state)
        device = torch.device(self.context.device)
        self.net_ = net.to(device).eval()
        self.last_net_ = last.to(device).eval() if last is not None else None
        self.meta_ = meta
        self.history_ = list(meta.get("history", []))
        self.fit_info_ = {
            "selected_epoch": meta.get("selected_epoch"), "epochs": meta.get("epochs"),
            "selected_val_auroc": meta.get("selected_val_auroc"), "last_val_auroc": meta.get("last_val_auroc"),
            "iterations": meta.get("iterations"), "total_iters": meta.get("total_iters"),
            "n_train": meta.get("n_train"), "n_anomalies": meta.get("n_anomalies"),
            "loop_seconds": meta.get("loop_seconds"), "history": self.history_,
        }
        self.fitted_ = True

    # -- scoring ------------------------------------------------------------------------------
    @property
    def has_distinct_last(self) -> bool:
        return self.last_net_ is not None

    def _net(self, which: str) -> "ReContrastNet":
        self._check_fitted()
        check_which(which)
        assert self.net_ is not None
        return self.last_net_ if which == "last" and self.last_net_ is not None else self.net_

    def anomaly_maps(self, images: np.ndarray, which: Literal["selected", "last"] = "selected",
                     batch_size: int = SCORE_BATCH) -> np.ndarray:
        """Per-pixel anomaly maps, float32 (n, S, S) at ``context.image_size``."""
        return self._run(images, which, batch_size, maps=True)

    def decision_function(self, images: np.ndarray, which: Literal["selected", "last"] = "selected",
                          batch_size: int = SCORE_BATCH) -> np.ndarray:
        """Image anomaly scores (float64, higher = more anomalous) of uint8 images."""
        return self._run(images, which, batch_size, maps=False)

    def _run(self, images: np.ndarray, which: str, batch_size: int, maps: bool) -> np.ndarray:
        import torch

        from kka_ray.detectors.recontrast.torch_model import image_scores, smoothing_sigma

        net = self._net(which)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        images = check_rows(images, "images", "images")
        size = self.context.image_size
        sigma = smoothing_sigma(self.cfg.score_sigma, size)
        device = next(net.decoder.parameters()).device
        out = np.empty((len(images), size, size) if maps else len(images), np.float32 if maps else np.float64)
        net.eval()
        with torch.no_grad():
            for i in range(0, len(images), batch_size):
                x = torch.from_numpy(preprocess_images(images[i : i + batch_size], size)).to(device)
                amap = net.anomaly_map(x, sigma)
                res = amap if maps else image_scores(amap, self.cfg.score_max_ratio).double()
                out[i : i + len(x)] = res.cpu().numpy()
        return out

    # -- persistence --------------------------------------------------------------------------
    def _save_state(self, directory: Path) -> dict[str, Any]:
        from kka_ray.detectors.recontrast.train_loop import write_checkpoint_files

        assert self.net_ is not None
        last = self.last_net_.trainable_state_dict() if self.last_net_ is not None else None
        write_checkpoint_files(directory, self.net_.trainable_state_dict(), last, self.meta_)
        return {"config": self.cfg.model_dump(mode="json")}

    @classmethod
    def _load_state(cls, directory: Path, meta: dict[str, Any], context: DetectorContext) -> "ReContrast":
        det = cls(ReContrastSection.model_validate(meta["config"]), context)
        det._load_checkpoint(directory)
        return det
