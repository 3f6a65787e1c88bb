"""Builders of the embedded default drawer ``G`` (Eq. 4): a random-init ``KKAPixelDiffusionPipeline``.

``build_pixel_pipeline`` assembles the pipeline in memory around a given text encoder
(architecture only: the UNet starts from random weights); ``build_pixel_drawer`` does it
around a text encoder directory and saves the result with safetensors; ``prepare_default_drawer``
extracts MiniLM and builds ``<cache>/kka-pixel-drawer/`` once. Until a trained checkpoint
exists the default drawer draws untrained (noise-like) images: the pipeline, actors and
data flow are real, only the weights are not yet learned. The training job will reuse
``build_pixel_pipeline`` to create the model it trains.
"""

from __future__ import annotations

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


def make_pixel_unet(
    *,
    image_size: int,
    channels: int,
    cross_attention_dim: int,
    block_out_channels: Sequence[int] = (32, 64, 64),
    layers_per_block: int = 2,
):
    """A pixel-space ``UNet2DConditionModel``: the first level convolutional, deeper levels cross-attend to text."""
    from diffusers import UNet2DConditionModel

    blocks = tuple(int(c) for c in block_out_channels)
    if len(blocks) < 2:
        raise ValueError(f"block_out_channels needs at least 2 levels, got {blocks}")
    factor = 2 ** (len(blocks) - 1)
    if image_size % factor:
        raise ValueError(f"image_size={image_size} must be a multiple of {factor} for {len(blocks)} UNet levels")
    attn_gcd = math.gcd(*blocks[1:])
    return UNet2DConditionModel(
        sample_size=image_size,
        in_channels=channels,
        out_channels=channels,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(blocks) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(blocks) - 1) + ("UpBlock2D",),
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=blocks,
        layers_per_block=layers_per_block,
        norm_num_groups=min(32, math.gcd(*blocks)),
        cross_attention_dim=cross_attention_dim,
        # diffusers' legacy name: for this UNet "attention_head_dim" is the number of heads.
        attention_head_dim=max(1, attn_gcd // _HEAD_WIDTH),
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
    from transformers import BertModel, BertTokenizerFast

    src = Path(text_encoder_dir)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} is not a transformers model directory (no config.json): run `kka prepare models`")
    pipe = build_pixel_pipeline(
        BertModel.from_pretrained(src),
        BertTokenizerFast.from_pretrained(src),
        image_size=image_size,
        channels=channels,
        block_out_channels=block_out_channels,
        seed=seed,
    )
    out = Path(out_dir)
    pipe.save_pretrained(out, safe_serialization=True)
    logger.info("pixel drawer saved to %s", out)
    return out


def prepare_default_drawer(cache_dir: str | os.PathLike) -> Path:
    """MiniLM + a random-init pixel drawer in ``<cache_dir>/kka-pixel-drawer/`` (idempotent; built in a temp dir, then renamed)."""
    from kka_ray.generation.minilm import prepare_minilm

    cache = Path(cache_dir).expanduser()
    target = cache / DEFAULT_DRAWER_NAME
    if (target / "model_index.json").is_file():
        return target
    if target.exists():
        raise FileExistsError(f"{target} exists but has no model_index.json: delete it and run `kka prepare models` again")
    text_encoder_dir = prepare_minilm(cache)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_DRAWER_NAME}.", dir=cache))
    try:
        build_pixel_drawer(tmp, text_encoder_dir)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "model_index.json").is_file():  # not a concurrent winner: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
