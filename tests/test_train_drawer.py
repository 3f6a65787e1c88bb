"""Tests of the drawer training job (Eq. 4, ``x_a = G(t_a)``) and of the trained default drawer's assembly.

Real diffusers/transformers code on tiny models (a random 2-layer BERT with MiniLM's tokenizer,
an 8/16-channel UNet) and, for the shipped assets, the real MiniLM from its package.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kka_ray.generation.build_drawer import (
    assemble_pixel_drawer,
    make_pixel_scheduler,
    make_pixel_unet,
    prepare_default_drawer,
    read_drawer_info,
    shipped_drawer_assets,
)
from kka_ray.generation.image import DiffusersImageGenerator
from kka_ray.generation.train_drawer import (
    DrawerTrainingConfig,
    build_captions,
    encode_captions,
    images_to_tensor,
    save_drawer_assets,
    train_unet_steps,
)

CLASSES = ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
TEXTS = ["a photo of a sneaker", "a pair of high leather boots with laces", "a melted bag"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    """A random 2-layer BERT (hidden 32) with MiniLM's real tokenizer, saved as a model directory."""
    from transformers import BertConfig, BertModel

    from kka_ray.generation.minilm import load_minilm_tokenizer

    tok = load_minilm_tokenizer()
    torch.manual_seed(0)
    enc = BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=64, pad_token_id=tok.pad_token_id)).eval()  # fmt: skip
    out = tmp_path_factory.mktemp("te")
    enc.save_pretrained(out)
    tok.save_pretrained(out)
    return enc, tok, out


def _tiny_unet(seed: int = 0):
    torch.manual_seed(seed)
    return make_pixel_unet(image_size=16, channels=1, cross_attention_dim=32, block_out_channels=(8, 16), layers_per_block=1, cross_attention_levels=(1,))


def test_captions_cover_every_class_with_distinct_paraphrases():
    caps = build_captions(CLASSES, max_per_class=40)
    assert len(caps) == 10 and all(len(c) == 40 for c in caps)
    flat = [c for cs in caps for c in cs]
    assert len(set(flat)) == len(flat)  # distinct, and no caption shared by two classes
    assert caps[9][0] == "a photo of an ankle boot" and caps[8][0] == "a photo of a bag"
    assert "a handbag with a strap" in caps[8] and "a long-sleeved pullover" in caps[2]
    assert not any(" a a" in c or "a ankle" in c or "a old" in c for c in flat)  # articles agree
    with pytest.raises(ValueError, match="no caption vocabulary"):
        build_captions(["giraffe"])


def test_images_to_tensor_scales_and_pads():
    img = np.array([[[0, 255], [255, 0]]], dtype=np.uint8)
    x = images_to_tensor(img, 4)
    assert x.shape == (1, 1, 4, 4)
    assert x[0, 0, 1, 1] == -1 and x[0, 0, 1, 2] == 1 and x[0, 0, 0, 0] == -1  # padding is black (-1)


def _fixed_batch_loss(unet, scheduler, x0, ctx, mask) -> float:
    g = torch.Generator().manual_seed(123)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.linspace(50, 950, len(x0)).long()
    with torch.no_grad():
        pred = unet.eval()(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=ctx, encoder_attention_mask=mask).sample
    return float((pred - scheduler.get_velocity(x0, noise, t)).pow(2).mean())


def test_training_loop_reduces_the_loss(tiny_encoder):
    enc, tok, _ = tiny_encoder
    rng = np.random.default_rng(0)
    # two "classes" of 12x12 images: a bright square or a bright bar, zero-padded to 16x16
    imgs = np.zeros((32, 12, 12), dtype=np.uint8)
    imgs[:16, 3:9, 3:9] = 255
    imgs[16:, :, 5:7] = 255
    imgs = np.clip(imgs.astype(int) + rng.integers(0, 20, imgs.shape), 0, 255).astype(np.uint8)
    x, y = images_to_tensor(imgs, 16), torch.tensor([0] * 16 + [1] * 16)
    captions = ["a square", "a photo of a square", "a bar", "a photo of a bar"]
    states, masks = encode_captions(enc, tok, captions, 8)
    empty_s, empty_m = encode_captions(enc, tok, [""], 8)
    unet, sched = _tiny_unet(), make_pixel_scheduler()
    ctx, m = states[[0] * 16 + [2] * 16], masks[[0] * 16 + [2] * 16]
    before = _fixed_batch_loss(unet, sched, x, ctx, m)
    cfg = DrawerTrainingConfig(steps=40, batch_size=16, lr=3e-3, warmup_steps=5, ema_decay=0.0, log_every=0, seed=0)
    out = train_unet_steps(unet, sched, x, y, states, masks, [[0, 1], [2, 3]], empty_s, empty_m, cfg, device=torch.device("cpu"))
    assert out["steps_done"] == 40 and len(out["losses"]) == 40
    after = _fixed_batch_loss(unet, sched, x, ctx, m)
    assert after < 0.7 * before, (before, after)


def test_assembled_tiny_drawer_loads_and_draws_deterministically(tiny_encoder, tmp_path):
    _, _, te_dir = tiny_encoder
    unet = _tiny_unet(seed=1)
    assets = save_drawer_assets(tmp_path / "assets", unet, unet.state_dict(), {"format": "test"})
    info = read_drawer_info(assets)
    assert len(info["unet_sha256"]) == 64
    out = assemble_pixel_drawer(assets, te_dir, tmp_path / "drawer")
    gen = DiffusersImageGenerator(str(out), tmp_path, num_inference_steps=3, guidance_scale=2.0)
    first = gen.generate(TEXTS, [0, 1, 2])
    again = gen.generate(TEXTS[::-1], [2, 1, 0])[::-1]
    assert [(im.mode, im.size) for im in first] == [("L", (16, 16))] * 3
    assert [a.tobytes() for a in first] == [b.tobytes() for b in again]
    arr = gen.pipeline(TEXTS[:1], num_inference_steps=2, output_type="np", generator=[torch.Generator().manual_seed(0)]).images
    assert arr.dtype == np.float32 and arr.shape == (1, 16, 16, 1)


def test_training_encodes_captions_as_the_pipeline_conditions_on_them(tiny_encoder, tmp_path):
    """The drawer learns on the token states the pipeline later draws from: same padding, same mask."""
    _, _, te_dir = tiny_encoder
    unet = _tiny_unet(seed=1)
    assets = save_drawer_assets(tmp_path / "assets", unet, unet.state_dict(), {"format": "test"})
    gen = DiffusersImageGenerator(str(assemble_pixel_drawer(assets, te_dir, tmp_path / "drawer")), tmp_path)
    pipe = gen.pipeline
    states, masks = encode_captions(pipe.text_encoder, pipe.tokenizer, TEXTS, pipe.config.max_text_length, batch_size=2)
    with torch.no_grad():
        ref_states, ref_masks = pipe.encode_prompt(TEXTS, torch.device("cpu"))
    assert states.shape == ref_states.shape and torch.equal(masks, ref_masks)
    torch.testing.assert_close(states, ref_states.float(), rtol=1e-5, atol=1e-6)
    assert masks[0].sum() < masks[1].sum()  # a short caption is padded, not truncated to the longest


def test_missing_or_wrong_weights_give_clear_errors(tiny_encoder, tmp_path):
    _, _, te_dir = tiny_encoder
    with pytest.raises(FileNotFoundError, match="not a trained-drawer assets directory"):
        read_drawer_info(tmp_path / "nowhere")
    unet = _tiny_unet()
    assets = save_drawer_assets(tmp_path / "assets", unet, unet.state_dict(), {})
    with pytest.raises(FileNotFoundError, match="no config.json"):
        assemble_pixel_drawer(assets, tmp_path / "no-encoder", tmp_path / "out1")
    (assets / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(FileNotFoundError, match="cannot load the drawer UNet"):
        assemble_pixel_drawer(assets, te_dir, tmp_path / "out2")
    with pytest.raises(FileNotFoundError, match="not a trained-drawer assets directory"):
        prepare_default_drawer(tmp_path / "cache", assets_dir=tmp_path / "nowhere")


@pytest.mark.skipif(not (shipped_drawer_assets() / "drawer_info.json").is_file(), reason="no trained drawer shipped yet")
def test_shipped_drawer_assembles_with_minilm_and_replaces_a_stale_cache(tmp_path):
    from kka_ray.testing.tiny_drawer import make_tiny_pixel_pipeline

    info = read_drawer_info(shipped_drawer_assets())
    weights = sum(f.stat().st_size for f in shipped_drawer_assets().rglob("*") if f.is_file())
    assert weights < 20e6
    stale = make_tiny_pixel_pipeline(tmp_path / "kka-pixel-drawer")  # e.g. the old random-init drawer
    target = prepare_default_drawer(tmp_path)
    assert target == stale and json.loads((target / "drawer_info.json").read_text())["unet_sha256"] == info["unet_sha256"]
    mtime = (target / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert prepare_default_drawer(tmp_path) == target  # idempotent: nothing rebuilt
    assert (target / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all-minilm-l6-v2", "kka-pixel-drawer"]
    gen = DiffusersImageGenerator("kka-pixel-drawer", tmp_path, num_inference_steps=2, guidance_scale=3.0)
    a = gen.generate(TEXTS[:2], [5, 6])
    b = gen.generate(TEXTS[:2], [5, 6])
    size = info["config"]["image_size"]
    assert [(im.mode, im.size) for im in a] == [("L", (size, size))] * 2
    assert [im.tobytes() for im in a] == [im.tobytes() for im in b]
