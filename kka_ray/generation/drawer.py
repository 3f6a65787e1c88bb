"""The drawer role (Eq. 4, ``x_a = G(t_a)``): a resident text-to-image model turning descriptions into images.

``Drawer`` is a plain class; the engine runs it as a Ray actor (``ray.remote(Drawer)`` or a
Ray Data ``map_batches`` actor pool), so the pipeline is loaded once per actor, not per batch.
``draw`` takes a Ray Data numpy batch with ``text`` and ``seed`` columns (plus any others,
passed through), draws in chunks of ``drawer.batch_size``, drops blank outputs (pixel std
below ``drawer.blank_std_threshold`` on 0-255, e.g. a safety checker's black images) and
counts them, resizes the kept images to the dataset's resolution and mode, and adds their
PNG bytes as the ``image`` column.
"""

from __future__ import annotations

import io
import logging
import os
import time
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

    from kka_ray.config import DrawerSection
    from kka_ray.generation.image import ImageGenerator

logger = logging.getLogger(__name__)

_MODES = ("L", "RGB")


def pixel_std(image: Image.Image) -> float:
    """Standard deviation of all pixel values (0-255) of ``image``; 0 for a uniform (blank) image."""
    return float(np.asarray(image, dtype=np.float32).std())


def encode_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class Drawer:
    """Resident image generator for the engine's drawer actors.

    Args:
        cfg: the ``drawer`` config section.
        cache_dir: the model cache (``paths.cache_dir()``), where ``cfg.model`` names are looked up.
        target_size: the dataset's resolution, ``s`` for ``s x s`` or ``(height, width)``.
        target_mode: "L" (grey) or "RGB", the dataset's image mode.
        device: "cpu", "cuda" or "auto".
        generator: an already-built ``ImageGenerator``; default: ``make_image_generator(cfg, ...)``.
    """

    def __init__(
        self,
        cfg: DrawerSection,
        cache_dir: str | os.PathLike,
        target_size: int | tuple[int, int],
        target_mode: str,
        device: str = "cpu",
        generator: ImageGenerator | None = None,
    ):
        import torch

        if target_mode not in _MODES:
            raise ValueError(f"target_mode must be one of {_MODES}, got {target_mode!r}")
        height, width = (target_size, target_size) if isinstance(target_size, int) else tuple(target_size)
        if height < 1 or width < 1:
            raise ValueError(f"target_size must be positive, got {target_size!r}")
        if cfg.resources.torch_threads:
            torch.set_num_threads(cfg.resources.torch_threads)
        from kka_ray.devices import resolve_device

        device = resolve_device(device)
        self.cfg = cfg
        self.target_hw = (int(height), int(width))
        self.target_mode = target_mode
        self.device = device
        if generator is None:
            from kka_ray.generation.image import make_image_generator

            generator = make_image_generator(cfg, cache_dir, device, resize_to=self.target_hw)
        self.generator = generator
        self.reset()

    def ready(self) -> bool:
        """True once the model is loaded (await it to know the actor is up)."""
        return True

    def reset(self) -> None:
        """Zero the cumulative counters."""
        self._stats = {"drawn": 0, "kept": 0, "blank": 0, "invalid": 0, "seconds": 0.0}

    def stats(self) -> dict[str, float]:
        """Cumulative counts since the last ``reset``: drawn, kept, blank (dropped), invalid texts (skipped), seconds."""
        return dict(self._stats)

    def _to_target(self, image: Image.Image) -> Image.Image:
        from PIL import Image

        height, width = self.target_hw
        image = image.convert(self.target_mode)
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.BICUBIC)
        return image

    def draw(self, batch: dict[str, np.ndarray], ledger: Any = None) -> dict[str, np.ndarray]:
        """Images for a batch of descriptions: kept rows of every input column plus ``image`` (PNG
        bytes). ``ledger``: a GenerationLedger actor that gets this batch's counts."""
        before = dict(self._stats)
        missing = [c for c in ("text", "seed") if c not in batch]
        if missing:
            raise KeyError(f"drawer batch lacks column(s) {missing}; it has {sorted(batch)}")
        texts, seeds = np.asarray(batch["text"], dtype=object), np.asarray(batch["seed"]).astype(np.int64)
        valid = [i for i, t in enumerate(texts) if isinstance(t, str) and t.strip()]
        self._stats["invalid"] += len(texts) - len(valid)
        if len(texts) > len(valid):
            logger.warning("drawer skipped %d empty or non-text descriptions", len(texts) - len(valid))

        start = time.perf_counter()
        kept_rows: list[int] = []
        pngs: list[bytes] = []
        size = self.cfg.batch_size
        for lo in range(0, len(valid), size):
            rows = valid[lo : lo + size]
            images = self.generator.generate([texts[i] for i in rows], [int(seeds[i]) for i in rows])
            if len(images) != len(rows):
                raise RuntimeError(f"image generator returned {len(images)} images for {len(rows)} texts")
            for row, image in zip(rows, images):
                self._stats["drawn"] += 1
                if pixel_std(image) < self.cfg.blank_std_threshold:
                    self._stats["blank"] += 1
                    continue
                kept_rows.append(row)
                pngs.append(encode_png(self._to_target(image)))
        self._stats["kept"] += len(kept_rows)
        self._stats["seconds"] += time.perf_counter() - start
        dropped = len(valid) - len(kept_rows)
        if dropped:
            logger.info("drawer dropped %d blank image(s) of %d", dropped, len(valid))
        if ledger is not None:  # keyed by the batch's rows: a retried batch overwrites its record
            import ray

            key = str(sorted(str(x) for x in batch["id"])) if "id" in batch else str((len(texts), seeds.tolist()))
            ray.get(ledger.record.remote("drawer", key, {k: self._stats[k] - before[k] for k in self._stats}))

        index = np.asarray(kept_rows, dtype=np.int64)
        out = {name: np.asarray(col)[index] for name, col in batch.items()}
        image_col = np.empty(len(pngs), dtype=object)
        image_col[:] = pngs
        out["image"] = image_col
        return out
