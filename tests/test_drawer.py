"""Tests of the drawer (Eq. 4, x_a = G(t_a)): the pixel diffusion pipeline, the diffusers image
generator, the Drawer actor class and the MiniLM / default-drawer preparation.

Everything runs the real diffusers/transformers code on a tiny random pipeline
(kka_ray.testing.tiny_drawer). The one fake is at the edge the real model cannot reach on
demand: a generator subclass that blacks out one image, standing in for a safety checker.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from kka_ray.config import DrawerSection
from kka_ray.generation.drawer import Drawer, pixel_std
from kka_ray.generation.image import DiffusersImageGenerator, ImageGenerator, ImageModelError, load_image_pipeline
from kka_ray.testing.tiny_drawer import make_tiny_pixel_pipeline

TEXTS = ["a photo of a sneaker", "a photo of a melted boot", "a photo of a bag with teeth", "a photo of a shirt"]
STEPS = 4


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_pixel_pipeline(tmp_path_factory.mktemp("tiny") / "drawer", image_size=16)


@pytest.fixture(scope="module")
def generator(tiny_dir, tmp_path_factory):
    return DiffusersImageGenerator(str(tiny_dir), tmp_path_factory.mktemp("cache"), num_inference_steps=STEPS, guidance_scale=3.0)


def _cfg(tiny_dir, **kw) -> DrawerSection:
    kw.setdefault("resources", {"num_cpus": 1, "torch_threads": 1})
    return DrawerSection(model=str(tiny_dir), num_inference_steps=STEPS, **kw)


def _arrays(images):
    return [np.asarray(im, dtype=np.int16) for im in images]


# --------------------------------------------------------------------------------------
# pipeline + generator


def test_tiny_pipeline_draws_configured_size_and_mode_deterministically(generator):
    assert isinstance(generator, ImageGenerator)
    first = generator.generate(TEXTS, [0, 1, 2, 3])
    again = generator.generate(TEXTS, [0, 1, 2, 3])
    other = generator.generate(TEXTS, [10, 11, 12, 13])
    assert [(im.mode, im.size) for im in first] == [("L", (16, 16))] * 4
    assert [a.tobytes() for a in first] == [b.tobytes() for b in again]
    assert all(a.tobytes() != b.tobytes() for a, b in zip(first, other))
    # an image depends on its own text and seed, not on its batch neighbours
    alone = generator.generate(TEXTS[2:3], [2])
    assert alone[0].tobytes() == first[2].tobytes()
    # not a constant picture: the drawer would count it as blank
    assert all(pixel_std(im) > 10 for im in first)


def test_text_conditions_the_image(generator):
    a, b = _arrays(generator.generate([TEXTS[0], TEXTS[2]], [7, 7]))
    assert np.abs(a - b).mean() > 1.0


def test_guidance_is_relative_to_the_empty_prompt(tiny_dir):
    """eps = eps("") + w (eps(t) - eps("")): for t = "" every w gives the same image; for other t, w matters."""
    from kka_ray.generation.pixel_pipeline import KKAPixelDiffusionPipeline

    pipe = KKAPixelDiffusionPipeline.from_pretrained(tiny_dir)
    pipe.set_progress_bar_config(disable=True)

    def draw(text, w):
        out = pipe([text], num_inference_steps=STEPS, guidance_scale=w, generator=torch.Generator().manual_seed(3), output_type="np")
        return out.images[0]

    assert np.abs(draw("", 1.0) - draw("", 5.0)).max() < 1e-4
    assert np.abs(draw(TEXTS[1], 1.0) - draw(TEXTS[1], 5.0)).mean() > 1e-3
    arr = draw(TEXTS[1], 3.0)
    assert arr.shape == (16, 16, 1) and arr.dtype == np.float32 and arr.min() >= 0.0 and arr.max() <= 1.0


def test_height_width_override_and_rgb(tmp_path):
    rgb_dir = make_tiny_pixel_pipeline(tmp_path / "rgb", image_size=16, channels=3)
    gen = DiffusersImageGenerator(str(rgb_dir), tmp_path, num_inference_steps=2, height=32, width=24)
    images = gen.generate(TEXTS[:2], [0, 1])
    assert [(im.mode, im.size) for im in images] == [("RGB", (24, 32))] * 2


def test_save_load_round_trip(tiny_dir, tmp_path, generator):
    from kka_ray.generation.pixel_pipeline import KKAPixelDiffusionPipeline

    index = json.loads((tiny_dir / "model_index.json").read_text())
    assert index["_class_name"] == "KKAPixelDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["text_encoder"] == ["transformers", "BertModel"]
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    # transformers 5 spells BertTokenizerFast as BertTokenizer; both names must load
    assert index["tokenizer"][0] == "transformers" and index["tokenizer"][1] in ("BertTokenizer", "BertTokenizerFast")
    assert not list(tiny_dir.rglob("*.bin")) and len(list(tiny_dir.rglob("*.safetensors"))) == 2

    pipe = KKAPixelDiffusionPipeline.from_pretrained(tiny_dir)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert not any(p.requires_grad for p in pipe.text_encoder.parameters())
    pipe.save_pretrained(tmp_path / "copy")
    index["tokenizer"][1] = "BertTokenizerFast"
    (tmp_path / "copy" / "model_index.json").write_text(json.dumps(index))
    loaded = KKAPixelDiffusionPipeline.from_pretrained(tmp_path / "copy")
    assert loaded.config.max_text_length == pipe.config.max_text_length == 16
    for a, b in ((pipe.unet, loaded.unet), (pipe.text_encoder, loaded.text_encoder)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    copy_gen = DiffusersImageGenerator(str(tmp_path / "copy"), tmp_path, num_inference_steps=STEPS, guidance_scale=3.0)
    assert [im.tobytes() for im in copy_gen.generate(TEXTS[:2], [5, 6])] == [
        im.tobytes() for im in generator.generate(TEXTS[:2], [5, 6])
    ]


# --------------------------------------------------------------------------------------
# errors


def test_missing_model_gives_clear_error(tmp_path):
    with pytest.raises(ImageModelError, match="no such directory.*kka prepare models") as err:
        load_image_pipeline(str(tmp_path / "nope"), tmp_path)
    assert str(tmp_path / "nope") in str(err.value)
    with pytest.raises(ImageModelError, match="not-prepared.*model cache.*drawer.model="):
        load_image_pipeline("not-prepared", tmp_path)


def test_directory_without_model_index_gives_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageModelError, match=r"empty is not a diffusers pipeline directory \(no model_index.json\).*kka prepare models"):
        DiffusersImageGenerator(str(tmp_path / "empty"), tmp_path)


def test_missing_component_and_unknown_class_give_clear_errors(tiny_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(ImageModelError, match=r"lacks the component folder\(s\) \['unet'\]"):
        load_image_pipeline(str(broken), tmp_path)
    shutil.copytree(tiny_dir / "unet", broken / "unet")
    index = json.loads((broken / "model_index.json").read_text())
    index["_class_name"] = "SomeRemoteCodePipeline"
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ImageModelError, match="SomeRemoteCodePipeline.*custom code is never loaded"):
        load_image_pipeline(str(broken), tmp_path)


# --------------------------------------------------------------------------------------
# Drawer


def _batch(n: int) -> dict[str, np.ndarray]:
    texts = np.array([TEXTS[i % len(TEXTS)] + f" no. {i}" for i in range(n)], dtype=object)
    return {
        "id": np.array([f"a{i}" for i in range(n)], dtype=object),
        "text": texts,
        "seed": np.arange(100, 100 + n, dtype=np.int64),
        "iteration": np.full(n, 2, dtype=np.int64),
    }


def _decode(png: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(png))
    im.load()
    return im


def test_drawer_draws_in_chunks_resizes_and_passes_columns(tiny_dir, tmp_path):
    drawer = Drawer(_cfg(tiny_dir, batch_size=2), str(tmp_path), target_size=28, target_mode="L")
    assert drawer.ready() is True
    batch = _batch(5)  # chunks of 2, 2, 1
    out = drawer.draw(batch)
    assert set(out) == {"id", "text", "seed", "iteration", "image"}
    assert list(out["id"]) == list(batch["id"]) and list(out["seed"]) == list(batch["seed"])
    assert out["seed"].dtype == np.int64 and list(out["iteration"]) == [2] * 5
    images = [_decode(b) for b in out["image"]]
    assert [(im.format, im.mode, im.size) for im in images] == [("PNG", "L", (28, 28))] * 5
    stats = drawer.stats()
    assert (stats["drawn"], stats["kept"], stats["blank"], stats["invalid"]) == (5, 5, 0, 0)
    # same texts and seeds -> the same PNG bytes, whatever the chunking
    other = Drawer(_cfg(tiny_dir, batch_size=5), str(tmp_path), target_size=28, target_mode="L", generator=drawer.generator)
    assert list(other.draw(batch)["image"]) == list(out["image"])
    drawer.reset()
    assert drawer.stats()["drawn"] == 0


def test_drawer_rgb_target_of_other_shape(tiny_dir, tmp_path):
    drawer = Drawer(_cfg(tiny_dir), str(tmp_path), target_size=(20, 12), target_mode="RGB")
    im = _decode(drawer.draw(_batch(1))["image"][0])
    assert (im.mode, im.size) == ("RGB", (12, 20))


class _BlackForMarkedTexts(DiffusersImageGenerator):
    """The real tiny pipeline, except that texts containing "[nsfw]" come back black.

    A fake only at this edge: SD's safety checker returns all-black images, which the tiny
    model never does on demand.
    """

    def generate(self, texts, seeds):
        images = super().generate(texts, seeds)
        return [Image.new(im.mode, im.size, 0) if "[nsfw]" in t else im for t, im in zip(texts, images)]


def test_drawer_drops_and_counts_blank_images(tiny_dir, generator, tmp_path):
    gen = _BlackForMarkedTexts(str(tiny_dir), tmp_path, num_inference_steps=STEPS)
    drawer = Drawer(_cfg(tiny_dir, batch_size=3), str(tmp_path), target_size=16, target_mode="L", generator=gen)
    batch = _batch(4)
    batch["text"][2] = "a photo of a [nsfw] thing"
    out = drawer.draw(batch)
    assert list(out["id"]) == ["a0", "a1", "a3"]
    assert list(out["text"]) == [batch["text"][i] for i in (0, 1, 3)]
    assert list(out["seed"]) == [100, 101, 103]
    assert len(out["image"]) == 3
    # kept rows keep their own image: row a3's picture is the one its text and seed give
    direct = generator.generate([batch["text"][3]], [103])[0]
    assert _decode(out["image"][2]).tobytes() == direct.tobytes()
    stats = drawer.stats()
    assert (stats["drawn"], stats["kept"], stats["blank"]) == (4, 3, 1)


def test_drawer_threshold_and_invalid_texts(tiny_dir, generator, tmp_path):
    # a threshold above any 0-255 std marks every image blank: all dropped, all counted
    drawer = Drawer(_cfg(tiny_dir, blank_std_threshold=200.0), str(tmp_path), 16, "L", generator=generator)
    batch = _batch(3)
    batch["text"][1] = "   "
    out = drawer.draw(batch)
    assert set(out) == {"id", "text", "seed", "iteration", "image"} and all(len(v) == 0 for v in out.values())
    stats = drawer.stats()
    assert (stats["drawn"], stats["kept"], stats["blank"], stats["invalid"]) == (2, 0, 2, 1)
    with pytest.raises(KeyError, match="seed"):
        drawer.draw({"text": batch["text"]})


def test_pixel_std_by_hand():
    im = Image.fromarray(np.array([[0, 0], [0, 4]], dtype=np.uint8))
    # mean 1, squared deviations 1, 1, 1, 9 -> var 3
    assert pixel_std(im) == pytest.approx(3**0.5)
    assert pixel_std(Image.new("RGB", (4, 4), (9, 9, 9))) == 0.0


# --------------------------------------------------------------------------------------
# preparation


def test_prepare_minilm_extracts_once(tmp_path):
    from safetensors import safe_open
    from transformers import BertConfig, BertTokenizerFast

    from kka_ray.generation.minilm import prepare_minilm

    path = prepare_minilm(tmp_path)
    assert path == tmp_path / "all-minilm-l6-v2"
    assert BertConfig.from_pretrained(path).hidden_size == 384
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert "encoder.layer.5.output.dense.weight" in set(f.keys())
    tok = BertTokenizerFast.from_pretrained(path)
    assert tok("A Photo")["input_ids"] == [101, 1037, 6302, 102]
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert prepare_minilm(tmp_path) == path and (path / "model.safetensors").stat().st_mtime_ns == mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all-minilm-l6-v2"]  # no temp dir left


def test_build_pixel_drawer_around_a_text_encoder_dir(tiny_dir, tmp_path):
    import shutil

    from kka_ray.generation.build_drawer import build_pixel_drawer, make_pixel_unet

    te = tmp_path / "te"
    shutil.copytree(tiny_dir / "text_encoder", te)
    for f in (tiny_dir / "tokenizer").iterdir():
        shutil.copy(f, te / f.name)
    out = build_pixel_drawer(tmp_path / "built", te, image_size=8, block_out_channels=(8, 16), seed=1)
    unet_cfg = json.loads((out / "unet" / "config.json").read_text())
    assert (unet_cfg["cross_attention_dim"], unet_cfg["sample_size"], unet_cfg["in_channels"]) == (32, 8, 1)
    images = DiffusersImageGenerator(str(out), tmp_path, num_inference_steps=2).generate(TEXTS[:1], [0])
    assert images[0].size == (8, 8)
    with pytest.raises(ValueError, match="multiple of 4"):
        make_pixel_unet(image_size=30, channels=1, cross_attention_dim=32, block_out_channels=(8, 16, 16))


def test_drawer_dtype_reaches_the_pipeline(tiny_dir):
    """drawer.dtype is passed as diffusers' `dtype` (ignored before diffusers 0.40)."""
    pipe = load_image_pipeline(str(tiny_dir), str(tiny_dir.parent), dtype="bfloat16")
    dtypes = {p.dtype for name in ("unet", "text_encoder") if getattr(pipe, name, None) is not None
              for p in getattr(pipe, name).parameters()}
    assert dtypes == {torch.bfloat16}


# ------------------------------------------------------------------ Stable Diffusion through the drawer


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from kka_ray.testing.tiny_sd import make_tiny_stable_diffusion

    root = tmp_path_factory.mktemp("sd")
    return {"sd15": make_tiny_stable_diffusion(root / "tiny-sd15"), "turbo": make_tiny_stable_diffusion(root / "tiny-sd-turbo", turbo=True)}


@pytest.mark.parametrize("kind, steps, guidance", [("sd15", 3, 5.0), ("turbo", 1, 0.0)])
def test_a_stable_diffusion_directory_draws_through_the_drawer(tiny_sd, kind, steps, guidance):
    """A real StableDiffusionPipeline (SD-1.5's PNDM with guidance, SD-Turbo's Euler without),
    loaded from its saved directory as a user's would be: images resized on the pipeline's device
    to the detector's resolution and mode, the same for the same seed, blank ones dropped."""
    path = tiny_sd[kind]
    cfg = DrawerSection(model=str(path), num_inference_steps=steps, guidance_scale=guidance, batch_size=3)
    d = Drawer(cfg, str(path.parent), target_size=28, target_mode="L")
    assert type(d.generator.pipeline).__name__ == "StableDiffusionPipeline"
    assert d.generator.resize_to == (28, 28)
    batch = {"text": np.array(["a red shoe", "a small bag", "a coat"], dtype=object), "seed": np.array([1, 2, 3]),
             "id": np.array(["a", "b", "c"], dtype=object)}
    out = d.draw(batch)
    images = [Image.open(io.BytesIO(b)) for b in out["image"]]
    assert len(images) == 3 and {im.size for im in images} == {(28, 28)} and {im.mode for im in images} == {"L"}
    again = d.draw(batch)
    assert list(again["image"]) == list(out["image"])  # seeded
    assert len({bytes(b) for b in out["image"]}) == 3
    blank = Drawer(cfg.model_copy(update={"blank_std_threshold": 1e9}), str(path.parent), target_size=28, target_mode="L",
                   generator=d.generator)
    assert len(blank.draw(batch)["image"]) == 0 and blank.stats()["blank"] == 3


def test_gpu_options_are_applied_to_the_pipeline(tiny_sd):
    path = tiny_sd["turbo"]
    cfg = DrawerSection(model=str(path), num_inference_steps=1, guidance_scale=0.0, batch_size=4, channels_last=True,
                        vae_slicing=True, compile_unet=True, compile_backend="eager")
    d = Drawer(cfg, str(path.parent), target_size=16, target_mode="RGB")
    pipe = d.generator.pipeline
    assert type(pipe.unet).__name__ == "OptimizedModule"  # torch.compile'd
    unet = pipe.unet._orig_mod
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert pipe.vae.use_slicing
    seen = []
    unet.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    out = d.draw({"text": np.array(["a hat", "a sock"], dtype=object), "seed": np.array([4, 5])})
    assert len(out["image"]) == 2  # two images back, drawn in a batch padded to 4 (a fixed shape for the compiled UNet)
    assert seen and set(seen) == {4}
