"""A tiny real ``StableDiffusionPipeline`` (SD-1.5's architecture) for tests and smoke runs.

The components are the ones an SD-1.5 or SD-Turbo directory holds, at toy sizes and with random
weights, built from configs as diffusers' own tests build theirs: a latent ``UNet2DConditionModel``
with cross-attention, an ``AutoencoderKL`` (scale factor 2), a ``CLIPTextModel`` and a
``CLIPTokenizer`` whose BPE vocabulary is written here (characters and end-of-word characters, no
merges), and a PNDM scheduler, or, with ``turbo=True``, SD-Turbo's Euler scheduler with trailing
timesteps (1-4 steps, guidance 0). Nothing is downloaded. Saved with ``save_pretrained`` it is a
diffusers directory the drawer loads exactly as it loads a user's SD-1.5 / SD-Turbo directory.
"""

from __future__ import annotations

import json
import os
import string
import tempfile
from pathlib import Path


def _clip_tokenizer(max_length: int):
    from transformers import CLIPTokenizer

    chars = list(string.ascii_lowercase + string.digits + ".,'-!?")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        tok = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=max_length,
                            pad_token="<|endoftext|>")
        tok.model_max_length = max_length
        return tok


def _pndm_scheduler():
    from diffusers import PNDMScheduler

    return PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                         steps_offset=1)


def _build_and_save(out_dir: str | os.PathLike, seed: int, build, dtype: str | None = None) -> Path:
    """Save the pipeline of the components ``build()`` returns (weights drawn after seeding torch
    with ``seed``) to ``out_dir``; a no-op when a pipeline is already there."""
    import torch
    from diffusers import StableDiffusionPipeline

    out = Path(out_dir)
    if (out / "model_index.json").is_file():
        return out
    torch.manual_seed(seed)
    pipe = StableDiffusionPipeline(**build(), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if dtype is not None:
        pipe.to(getattr(torch, dtype))
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def make_tiny_stable_diffusion(out_dir: str | os.PathLike, turbo: bool = False, sample_size: int = 16, seed: int = 0) -> Path:
    """Save a tiny random Stable Diffusion pipeline to ``out_dir`` (no-op if one is there); images
    are ``2 * sample_size`` pixels square, RGB."""
    def build():
        from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        tokenizer = _clip_tokenizer(max_length=32)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            bos_token_id=0, eos_token_id=1, pad_token_id=1, vocab_size=len(tokenizer.get_vocab()), hidden_size=32,
            intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=32,
            projection_dim=32, layer_norm_eps=1e-5))
        unet = UNet2DConditionModel(
            sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=32, sample_size=2 * sample_size)
        if turbo:  # SD-Turbo's scheduler config
            scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                               timestep_spacing="trailing", prediction_type="epsilon", steps_offset=1)
        else:  # SD-1.5's
            scheduler = _pndm_scheduler()
        return dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)

    return _build_and_save(out_dir, seed, build)


def make_sd15_random(out_dir: str | os.PathLike, dtype: str = "float16", seed: int = 0) -> Path:
    """Save a Stable Diffusion pipeline with SD-1.5's full architecture and random weights to
    ``out_dir`` (no-op if one is there): the 860M-parameter UNet (320/640/1280/1280 channels,
    cross-attention width 768), the 12-layer CLIP text encoder, the VAE at 512 px. It draws
    noise, but at SD-1.5's cost, which is what the GPU throughput check measures. About 2 GB in
    float16; build it on the machine that measures."""
    def build():
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        tokenizer = _clip_tokenizer(max_length=77)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            bos_token_id=0, eos_token_id=1, pad_token_id=1, vocab_size=len(tokenizer.get_vocab()), hidden_size=768,
            intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, max_position_embeddings=77,
            projection_dim=768, hidden_act="quick_gelu"))
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # diffusers' defaults are SD-1.5's UNet
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)
        return dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=_pndm_scheduler())

    return _build_and_save(out_dir, seed, build, dtype)
