"""A tiny ``KKAPixelDiffusionPipeline`` (Eq. 4's ``G``) for tests and smoke runs.

Real architecture and real MiniLM tokenizer, random weights, small sizes: a 2-level UNet
(8/16 channels), a 2-layer 32-d ``BertModel`` text encoder and 16 x 16 grey images. It builds
in about a second and draws a batch of 4 images with 4 steps in a fraction of a second on
one CPU core. Nothing is downloaded: the tokenizer comes from the installed MiniLM package.
"""

from __future__ import annotations

import logging
from pathlib import Path

from kka_ray.testing import built_once

logger = logging.getLogger(__name__)


@built_once("model_index.json")
def make_tiny_pixel_pipeline(out: Path, image_size: int = 16, channels: int = 1, seed: int = 0) -> None:
    """Save a tiny random pixel drawer to ``out_dir`` (no-op if one is already there) and return the path."""
    from transformers import BertConfig, BertModel

    from kka_ray.generation.build_drawer import build_pixel_pipeline
    from kka_ray.generation.minilm import load_minilm_tokenizer

    tokenizer = load_minilm_tokenizer()
    text_encoder = BertModel(
        BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    pipe = build_pixel_pipeline(
        text_encoder,
        tokenizer,
        image_size=image_size,
        channels=channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        max_text_length=16,
        seed=seed,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    logger.info("tiny pixel drawer saved to %s", out)
