"""Image features for Eq. 1 of KKA (arXiv 2502.14880): ``z = normalise(f(x))``.

- ``FeatureExtractor``: uint8 images -> pooled backbone features (grey copied to 3 channels,
  bilinear resize, ImageNet normalisation, channels_last, small batches).
- ``FeatureNormalizer``: L2-normalise each row, then standardise with the training mean/std
  (the statistics are stored with the model as safetensors-ready arrays).
- ``FeatureBatchExtractor``: the same extractor as a Ray Data callable class over PNG bytes.

torch is imported inside functions so that importing this module stays cheap.
"""

from __future__ import annotations

import io
import logging
import os
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from kka_ray.config import KnowledgeSection

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Small batches: on a 2-core CPU, batches of 16-32 run 2-3x faster per image than large ones
# (method.md, "Reference figures"); GPUs may use larger ones through the config.
DEFAULT_BATCH_SIZE = 32
# Rows with a smaller norm are left unscaled by the L2 step (avoids 0/0).
_NORM_EPS = 1e-12
# Dimensions whose training std is below this are constant: they are centred, not scaled
# (as sklearn's StandardScaler does), so they cannot blow up at test time.
_STD_EPS = 1e-8


def _default_cache_dir() -> str:
    from kka_ray.config import PathsSection

    return str(PathsSection().cache_dir())


def as_uint8_rgb(images: np.ndarray) -> np.ndarray:
    """Validate images and return them as uint8 (N, H, W, 3); grey is copied to 3 channels."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"images must be uint8 (0-255), got {images.dtype}; convert with .astype(np.uint8) after scaling")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must have shape (N, H, W) or (N, H, W, 1|3), got {images.shape}")
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return images


def normalize_images(images: np.ndarray, image_size: int, device: Any = "cpu") -> Any:
    """uint8 (N, H, W[, C]) -> float tensor (N, 3, S, S) on ``device``: grey copied to RGB,
    bilinear resize (antialiased when shrinking), ImageNet mean/std normalisation."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(as_uint8_rgb(images))).to(device)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-2:] != (image_size, image_size):
        # antialias only acts when shrinking; upscaling (28 -> 64 px) is plain bilinear
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class FeatureExtractor:
    """Pooled features of a frozen pretrained backbone: ``f`` in Eq. 1.

    ``extractor(images)`` takes uint8 (N, H, W) or (N, H, W, 3) and returns float32 (N, D).
    """

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        image_size: int = 64,
        cache_dir: str | os.PathLike | None = None,
        device: str = "cpu",
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        import torch

        from kka_ray.knowledge.backbones import load_backbone

        if image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {image_size} (knowledge.image_size)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size} (knowledge.batch_size)")
        self.backbone_name = backbone
        self.image_size = int(image_size)
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self.model = load_backbone(backbone, cache_dir if cache_dir is not None else _default_cache_dir(), self.device)
        self.model = self.model.to(memory_format=torch.channels_last)
        self._feature_dim: int | None = getattr(self.model, "feature_dim", None)

    @property
    def feature_dim(self) -> int:
        if self._feature_dim is None:  # torchvision heads: find out once with a dummy image
            self._feature_dim = int(self(np.zeros((1, self.image_size, self.image_size, 3), np.uint8)).shape[1])
        return self._feature_dim

    def preprocess(self, images: np.ndarray) -> Any:
        """uint8 (N, H, W[, C]) -> normalised float tensor (N, 3, S, S), channels_last, on the device."""
        import torch

        return normalize_images(images, self.image_size, self.device).contiguous(memory_format=torch.channels_last)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        import torch

        images = as_uint8_rgb(images)
        if len(images) == 0:
            return np.zeros((0, self.feature_dim), np.float32)
        out = []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                feats = self.model(self.preprocess(images[start : start + self.batch_size]))
                out.append(feats.float().cpu().numpy())
        return np.concatenate(out).astype(np.float32, copy=False)


class FeatureNormalizer:
    """L2-normalise rows, then standardise with the training mean/std (Eq. 1's ``z``)."""

    def __init__(self) -> None:
        self.mean_: np.ndarray | None = None
        self.std_: np.ndarray | None = None

    @staticmethod
    def l2_normalize(z: np.ndarray) -> np.ndarray:
        z = np.asarray(z, dtype=np.float64)
        if z.ndim != 2:
            raise ValueError(f"features must be 2-D (N, D), got shape {z.shape}")
        norms = np.linalg.norm(z, axis=1, keepdims=True)
        return z / np.maximum(norms, _NORM_EPS)

    def fit(self, z: np.ndarray) -> "FeatureNormalizer":
        zn = self.l2_normalize(z)
        if len(zn) < 2:
            raise ValueError(f"FeatureNormalizer.fit needs at least 2 rows, got {len(zn)}")
        if not np.isfinite(zn).all():
            raise ValueError("FeatureNormalizer.fit got non-finite features (NaN/inf); check the extractor's input")
        std = zn.std(axis=0)
        self.mean_ = zn.mean(axis=0)
        self.std_ = np.where(std < _STD_EPS, 1.0, std)
        return self

    def transform(self, z: np.ndarray) -> np.ndarray:
        if self.mean_ is None or self.std_ is None:
            raise RuntimeError("FeatureNormalizer is not fitted: call fit(train_features) first")
        zn = self.l2_normalize(z)
        if zn.shape[1] != self.mean_.shape[0]:
            raise ValueError(f"features have {zn.shape[1]} dims, the normalizer was fitted on {self.mean_.shape[0]}")
        return ((zn - self.mean_) / self.std_).astype(np.float32)

    def fit_transform(self, z: np.ndarray) -> np.ndarray:
        return self.fit(z).transform(z)

    def state_dict(self) -> dict[str, np.ndarray]:
        if self.mean_ is None or self.std_ is None:
            raise RuntimeError("FeatureNormalizer is not fitted: nothing to save")
        return {"mean": self.mean_.copy(), "std": self.std_.copy()}

    @classmethod
    def from_state_dict(cls, state: dict[str, np.ndarray]) -> "FeatureNormalizer":
        missing = {"mean", "std"} - set(state)
        if missing:
            raise KeyError(f"normalizer state lacks {sorted(missing)}")
        norm = cls()
        norm.mean_ = np.asarray(state["mean"], dtype=np.float64)
        norm.std_ = np.asarray(state["std"], dtype=np.float64)
        return norm


def extractor_for(cfg) -> FeatureExtractor:
    """The backbone feature extractor a run's config (``knowledge.*``, ``run.device``) describes."""
    from kka_ray.devices import resolve_device

    k = cfg.knowledge
    return FeatureExtractor(k.backbone, k.image_size, cfg.paths.cache_dir(),
                            device=resolve_device(cfg.run.device), batch_size=k.batch_size)


def decode_image(data: Any) -> np.ndarray:
    """PNG/JPEG bytes -> uint8 (H, W, 3). Raises on anything that is not a decodable image."""
    from PIL import Image

    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"expected encoded image bytes, got {type(data).__name__}")
    with Image.open(io.BytesIO(bytes(data))) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


class FeatureBatchExtractor:
    """Ray Data callable class: ``ds.map_batches(FeatureBatchExtractor, fn_constructor_kwargs=...,
    batch_format="numpy", compute=ActorPoolStrategy(...))``.

    Reads the column ``"image"`` (encoded PNG bytes), adds ``"features"`` (float32 (B, D)).
    Rows whose image does not decode are dropped from every column and counted
    (``self.decode_errors``; each batch with drops logs ``decode_errors=<n>``).
    """

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        image_size: int = 64,
        cache_dir: str | os.PathLike | None = None,
        torch_threads: int | None = None,
        device: str = "cpu",
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        if torch_threads is not None:
            import torch

            torch.set_num_threads(int(torch_threads))
        self.extractor = FeatureExtractor(backbone, image_size, cache_dir, device, batch_size)
        self.decode_errors = 0
        self.rows_seen = 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "image" not in batch:
            raise KeyError(f"FeatureBatchExtractor needs an 'image' column of PNG bytes; the batch has {sorted(batch)}")
        raw = batch["image"]
        decoded: list[np.ndarray | None] = []
        for item in raw:
            try:
                decoded.append(decode_image(item))
            except Exception as err:  # noqa: BLE001 - any decoder failure means 'undecodable'
                logger.debug("undecodable image: %s", err)
                decoded.append(None)
        keep = np.array([d is not None for d in decoded], dtype=bool)
        n_bad = int((~keep).sum())
        self.rows_seen += len(decoded)
        if n_bad:
            self.decode_errors += n_bad
            logger.warning(
                "decode_errors=%d of %d images in this batch were dropped (total %d)", n_bad, len(decoded), self.decode_errors
            )
        good = [d for d in decoded if d is not None]
        features = np.zeros((len(good), self.extractor.feature_dim), np.float32)
        # images of different sizes are extracted per size group (all are resized to one size)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, img in enumerate(good):
            by_shape.setdefault(img.shape, []).append(i)
        for idx in by_shape.values():
            features[idx] = self.extractor(np.stack([good[i] for i in idx]))
        out = {k: np.asarray(v)[keep] for k, v in batch.items()}
        out["features"] = features
        return out



def extract_image_features(table: Any, k: "KnowledgeSection", cache_dir: str) -> dict[str, np.ndarray]:
    """Backbone features of the PNG images in ``table`` (columns ``id``, ``image``), by id, through
    a Ray Data pool of ``k.resources.replicas`` :class:`FeatureBatchExtractor` actors. An actor that
    dies is restarted and its batch retried (Ray Data's actor pools restart without limit), so each
    id appears once; ids whose image does not decode are absent."""
    import ray
    from ray.data import ActorPoolStrategy

    from kka_ray.cluster import role_options

    ds = ray.data.from_arrow(table.select(["id", "image"])).map_batches(
        FeatureBatchExtractor,
        fn_constructor_kwargs={"backbone": k.backbone, "image_size": k.image_size, "cache_dir": cache_dir,
                               "torch_threads": k.resources.torch_threads},
        compute=ActorPoolStrategy(size=k.resources.replicas), batch_size=k.batch_size, batch_format="numpy",
        **role_options(k.resources),
    )
    rows = ds.select_columns(["id", "features"]).take_all()
    return {r["id"]: np.asarray(r["features"], dtype=np.float32) for r in rows}
