"""In-memory labelled image sets: the one container every dataset loader returns.

An :class:`ImageSet` holds decoded uint8 images (``(N, H, W)`` grey or ``(N, H, W, 3)`` RGB),
int64 class labels indexing ``class_names``, and optionally one or more text descriptions per
image (the ``t`` of the KKA paper, arXiv 2502.14880, that Eq. 2 collects for the prompts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass
class ImageSet:
    """Images, their class labels and (optionally) their descriptions.

    Attributes:
        images: uint8 array, ``(N, H, W)`` grey or ``(N, H, W, 3)`` RGB.
        labels: int64 array ``(N,)``; ``labels[i]`` indexes ``class_names``.
        class_names: every class of the dataset (not only those present).
        captions: ``captions[i]`` lists one or more descriptions of image ``i``; ``None`` when
            the dataset has none (see :func:`kka_ray.data.captions.template_captions`).
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    captions: list[list[str]] | None = None

    def __post_init__(self) -> None:
        images = np.asarray(self.images)
        if images.dtype != np.uint8:
            raise ValueError(f"ImageSet.images must be uint8, got {images.dtype}; convert with np.clip(x, 0, 255).astype(np.uint8)")
        if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
            raise ValueError(f"ImageSet.images must be (N, H, W) grey or (N, H, W, 3) RGB, got shape {images.shape}")
        labels = np.asarray(self.labels)
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"ImageSet.labels must have shape ({images.shape[0]},), got {labels.shape}")
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"ImageSet.labels must be integers, got {labels.dtype}")
        labels = labels.astype(np.int64, copy=False)
        if labels.size and (labels.min() < 0 or labels.max() >= len(self.class_names)):
            raise ValueError(
                f"ImageSet.labels must lie in [0, {len(self.class_names)}) (the class_names), "
                f"got range [{labels.min()}, {labels.max()}]"
            )
        if self.captions is not None and len(self.captions) != images.shape[0]:
            raise ValueError(f"ImageSet.captions has {len(self.captions)} entries for {images.shape[0]} images")
        self.images, self.labels, self.class_names = images, labels, list(self.class_names)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def is_rgb(self) -> bool:
        return self.images.ndim == 4

    def subset(self, idx: Sequence[int] | np.ndarray) -> "ImageSet":
        """A new ImageSet with the images at ``idx`` (integer indices or a boolean mask), in order."""
        idx = np.asarray(idx)
        if idx.dtype == bool:
            if idx.shape != (len(self),):
                raise ValueError(f"boolean mask has shape {idx.shape}, expected ({len(self)},)")
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64, copy=False).reshape(-1)
        captions = None if self.captions is None else [list(self.captions[i]) for i in idx]
        return ImageSet(self.images[idx], self.labels[idx], list(self.class_names), captions)

    def class_counts(self) -> dict[str, int]:
        """Number of images per class name (classes with no images are left out)."""
        counts = np.bincount(self.labels, minlength=len(self.class_names))
        return {self.class_names[i]: int(c) for i, c in enumerate(counts) if c}


def concat_imagesets(parts: Sequence[ImageSet]) -> ImageSet:
    """Concatenate ImageSets that share ``class_names`` and image shape."""
    if not parts:
        raise ValueError("concat_imagesets needs at least one ImageSet")
    names = parts[0].class_names
    for p in parts[1:]:
        if p.class_names != names:
            raise ValueError("concat_imagesets: the ImageSets have different class_names")
        if p.images.shape[1:] != parts[0].images.shape[1:]:
            raise ValueError(f"concat_imagesets: image shapes differ ({p.images.shape[1:]} vs {parts[0].images.shape[1:]})")
    with_captions = [p.captions is not None for p in parts]
    captions = None
    if any(with_captions):
        captions = [list(c) for p in parts for c in (p.captions if p.captions is not None else [[]] * len(p))]
    return ImageSet(
        np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]), list(names), captions
    )
