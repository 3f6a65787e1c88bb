"""The image-generator interface of the drawer (Eq. 4, ``x_a = G(t_a)``) and its diffusers backend.

``ImageGenerator`` is the one interface the engine uses: texts + seeds in, one PIL image per
text out, deterministic per seed. ``DiffusersImageGenerator`` loads any diffusers text-to-image
pipeline directory or hub id (SD-1.5, SD-Turbo, SDXL: ``DiffusionPipeline.from_pretrained``,
never ``trust_remote_code``) or the project's own ``KKAPixelDiffusionPipeline``, chosen by the
``_class_name`` in ``model_index.json``. Each image gets its own ``torch.Generator`` seeded
with its seed, so an image depends on its text and seed, not on which batch it ran in.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from PIL import Image

    from kka_ray.config import DrawerSection

logger = logging.getLogger(__name__)

PIXEL_PIPELINE_CLASS = "KKAPixelDiffusionPipeline"
_FIX = "run `kka prepare models` (it builds the default drawer) or set drawer.model=<pipeline dir or hub id>"
# "owner/name" as the Hugging Face hub spells repository ids.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ImageModelError(FileNotFoundError):
    """The drawer's model cannot be found or is not a loadable diffusers pipeline."""


@runtime_checkable
class ImageGenerator(Protocol):
    """Texts + seeds in, one image per text out (same text and seed -> same image)."""

    def generate(self, texts: list[str], seeds: list[int]) -> list[Image.Image]: ...


def _resolve_model_path(name_or_path: str, cache_dir: str | os.PathLike) -> str:
    """The shared resolver (local dir, cache name, hub id); a miss is left to the index check below."""
    from kka_ray.generation.resolve import ModelNotFoundError, resolve_model_path

    try:
        return resolve_model_path(name_or_path, cache_dir)
    except ModelNotFoundError:
        return name_or_path


def _read_model_index(path: str, model: str, cache_dir: str | os.PathLike) -> dict[str, Any]:
    """``model_index.json`` of a local pipeline directory or a hub id, with a clear error when it is not one."""
    local = Path(path)
    if local.is_dir():
        index = local / "model_index.json"
        if not index.is_file():
            raise ImageModelError(f"{local} is not a diffusers pipeline directory (no model_index.json): {_FIX}")
        config = json.loads(index.read_text())
        missing = [
            name
            for name, spec in config.items()
            if not name.startswith("_") and isinstance(spec, list) and spec[0] is not None and not (local / name).is_dir()
        ]
        if missing:
            raise ImageModelError(f"pipeline directory {local} lacks the component folder(s) {missing} listed in model_index.json: {_FIX}")
        return config
    if not _HUB_ID.match(path):
        cached = "" if Path(model).is_absolute() else f", no {Path(cache_dir).expanduser() / model} in the model cache"
        raise ImageModelError(f"drawer model {model!r}: no such directory{cached}, and not a hub id: {_FIX}")
    from diffusers import DiffusionPipeline

    try:
        return dict(DiffusionPipeline.load_config(path))
    except Exception as err:  # network, auth, missing repo: all end here
        raise ImageModelError(f"cannot fetch model_index.json of hub model {path!r} ({type(err).__name__}: {err}): {_FIX}") from None


def load_image_pipeline(model: str, cache_dir: str | os.PathLike, *, dtype: str = "float32"):
    """Load the text-to-image pipeline named by ``model`` (local dir, cache name or hub id)."""
    import torch
    import diffusers

    path = _resolve_model_path(model, cache_dir)
    class_name = _read_model_index(path, model, cache_dir).get("_class_name")
    torch_dtype = getattr(torch, dtype)
    if class_name == PIXEL_PIPELINE_CLASS:
        from kka_ray.generation.pixel_pipeline import KKAPixelDiffusionPipeline

        pipeline_cls = KKAPixelDiffusionPipeline
    else:
        pipeline_cls = getattr(diffusers, str(class_name), None)
        if not (isinstance(pipeline_cls, type) and issubclass(pipeline_cls, diffusers.DiffusionPipeline)):
            raise ImageModelError(
                f"{path}: model_index.json names pipeline class {class_name!r}, which is neither a diffusers "
                f"pipeline nor {PIXEL_PIPELINE_CLASS} (custom code is never loaded): {_FIX}"
            )
        pipeline_cls = diffusers.DiffusionPipeline
    try:
        # safetensors only: weights are never unpickled.
        pipe = pipeline_cls.from_pretrained(path, dtype=torch_dtype, use_safetensors=True)
    except (OSError, ValueError) as err:
        raise ImageModelError(f"cannot load the pipeline at {path} ({type(err).__name__}: {err}): {_FIX}") from None
    logger.info("drawer model %s loaded from %s (%s, %s)", model, path, type(pipe).__name__, dtype)
    return pipe


class DiffusersImageGenerator:
    """``ImageGenerator`` over a diffusers text-to-image pipeline, resident on one device."""

    def __init__(
        self,
        model: str,
        cache_dir: str | os.PathLike,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        num_inference_steps: int = 20,
        guidance_scale: float = 3.0,
        height: int | None = None,
        width: int | None = None,
        channels_last: bool = False,
        vae_slicing: bool = False,
        compile_unet: bool = False,
        compile_backend: str = "inductor",
        fixed_batch: int | None = None,
        resize_to: tuple[int, int] | None = None,
    ):
        import torch

        from kka_ray.generation.pixel_pipeline import KKAPixelDiffusionPipeline

        self.model = model
        self.device = device
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.height = height
        self.width = width
        self.pipeline = load_image_pipeline(model, cache_dir, dtype=dtype).to(device)
        self.pipeline.set_progress_bar_config(disable=True)
        pipe = self.pipeline
        if channels_last:
            for name in ("unet", "vae"):
                if getattr(pipe, name, None) is not None:
                    getattr(pipe, name).to(memory_format=torch.channels_last)
        if vae_slicing and getattr(pipe, "vae", None) is not None and hasattr(pipe.vae, "enable_slicing"):
            pipe.vae.enable_slicing()
        # with a compiled UNet every call has the same batch (padded, extras dropped): no recompiles
        self.fixed_batch = fixed_batch if compile_unet else None
        if compile_unet:
            pipe.unet = torch.compile(pipe.unet, backend=compile_backend, dynamic=False)
        # a latent pipeline's images are resized on its device before they leave it; the pixel
        # drawer draws at the dataset's own resolution
        self.resize_to = None if (resize_to is None or isinstance(pipe, KKAPixelDiffusionPipeline)) else tuple(resize_to)

    def generate(self, texts: list[str], seeds: list[int]) -> list[Image.Image]:
        """One image per text; image ``i`` is drawn from noise seeded with ``seeds[i]``."""
        import torch

        texts, seeds = list(texts), [int(s) for s in seeds]
        if len(texts) != len(seeds):
            raise ValueError(f"got {len(texts)} texts and {len(seeds)} seeds: pass one seed per text")
        if not texts:
            return []
        n = len(texts)
        if self.fixed_batch is not None:
            if n > self.fixed_batch:
                return [im for lo in range(0, n, self.fixed_batch)
                        for im in self.generate(texts[lo:lo + self.fixed_batch], seeds[lo:lo + self.fixed_batch])]
            texts, seeds = texts + [texts[-1]] * (self.fixed_batch - n), seeds + [seeds[-1]] * (self.fixed_batch - n)
        # CPU generators: the same seed gives the same starting noise on every device.
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        out = self.pipeline(
            prompt=texts,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            generator=generators,
            height=self.height,
            width=self.width,
            output_type="pil" if self.resize_to is None else "pt",
        )
        if self.resize_to is None:
            return list(out.images)[:n]
        return _to_pil(_resize(out.images[:n], self.resize_to))


def _resize(images: Any, size: tuple[int, int]) -> Any:
    """(B, C, H, W) in [0, 1] on any device -> uint8 (B, h, w, C) on the CPU, resized where it is."""
    import torch
    import torch.nn.functional as F

    x = images.float()
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bicubic", antialias=True, align_corners=False)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _to_pil(arrays: Any) -> list[Image.Image]:
    from PIL import Image

    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arrays]  # uint8: "L" or "RGB"


def make_image_generator(cfg: DrawerSection, cache_dir: str | os.PathLike, device: str = "cpu",
                         resize_to: tuple[int, int] | None = None) -> ImageGenerator:
    """The image generator that ``cfg`` (the ``drawer`` config section) names; ``resize_to``:
    the (height, width) the images are wanted at."""
    if cfg.backend == "diffusers":
        return DiffusersImageGenerator(
            cfg.model,
            cache_dir,
            device=device,
            dtype=cfg.dtype,
            num_inference_steps=cfg.num_inference_steps,
            guidance_scale=cfg.guidance_scale,
            height=cfg.height,
            width=cfg.width,
            channels_last=cfg.channels_last,
            vae_slicing=cfg.vae_slicing,
            compile_unet=cfg.compile_unet,
            compile_backend=cfg.compile_backend,
            fixed_batch=cfg.batch_size,
            resize_to=resize_to if cfg.resize_on_device else None,
        )
    raise ValueError(f"unknown drawer.backend {cfg.backend!r}: use 'diffusers'")
