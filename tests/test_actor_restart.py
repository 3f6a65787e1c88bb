"""Resident actors survive a crash: a describer or drawer process killed in the middle of a
generation is restarted by Ray (max_restarts), reloads its model and the pool's adapter, and the
call in flight is retried (max_task_retries). The iteration's store is then what an uninterrupted
generation writes: every (prompt, sample) once, the adapter version right, the drops counted."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from conftest import own_ray_pids, tiny_overrides, wait_for_own_ray_pid
from kka_ray.config import load_config

pytestmark = pytest.mark.slow


def _make_adapter(base_dir, out_dir):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 1.0)
    model.save_pretrained(out_dir)
    return out_dir


def _pid(actor) -> int:
    import ray

    return ray.get(actor.__ray_call__.remote(lambda self: __import__("os").getpid()))


def _rows(path):
    from kka_ray.generation.pipeline import read_generated

    t = read_generated(path)
    return {(p, s): (text, v) for p, s, text, v in zip(t.column("prompt_id").to_pylist(), t.column("sample_idx").to_pylist(),
                                                        t.column("text").to_pylist(), t.column("adapter_version").to_pylist())}


@pytest.mark.parametrize("role", ["describer", "drawer"])
def test_a_resident_actor_killed_mid_generation_is_restarted_and_nothing_is_lost(role, tiny_cache, tmp_path):
    import ray

    from kka_ray.generation.pipeline import ResidentPools, run_generation

    cfg = load_config(None, [*tiny_overrides(tiny_cache), "describer.batch_size=3", "describer.num_prompts=8",
                             "drawer.batch_size=2"])  # one prompt per describer call, two texts per drawer call
    prompts = [{"prompt_id": i, "prompt": f"Describe item {i}:", "description": f"item {i}", "cluster": 0}
               for i in range(8)]
    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    pools = None
    try:
        pools = ResidentPools.start(cfg, target_size=16, target_mode="L")
        pools.load_adapter(str(_make_adapter(tiny_cache / "tiny-lm", tmp_path / "adapter")), 1)
        reference = run_generation(cfg, pools, prompts, 1, "t", tmp_path / "ref")
        expected = _rows(tmp_path / "ref")
        victim = (pools.describers if role == "describer" else pools.drawers)[0]
        before = _pid(victim)
        killed = threading.Event()

        def kill_after_first_batch():
            deadline = time.time() + 120
            while time.time() < deadline:
                if ray.get(pools.ledger.n_batches.remote(role)) >= 1:
                    os.kill(before, signal.SIGKILL)
                    killed.set()
                    return
                time.sleep(0.02)

        killer = threading.Thread(target=kill_after_first_batch)
        killer.start()
        result = run_generation(cfg, pools, prompts, 1, "t", tmp_path / "gen")
        killer.join()
        assert killed.is_set()
        after = _pid(victim)  # the same handle answers from a new process
        rows = _rows(tmp_path / "gen")
    finally:
        if pools is not None:
            pools.shutdown()
        ray.shutdown()
    assert after != before
    assert rows == expected  # every (prompt, sample) once, same texts, the adapter (v1) reloaded
    assert {v for _, v in rows.values()} == {1}
    for key in ("n_generated", "n_described", "n_kept", "describer_drops", "drawer_drops"):
        assert result[key] == reference[key], key  # counted once, also the batch that was retried


def test_a_stable_diffusion_drawer_runs_in_the_resident_pool_and_the_stream(tiny_cache, tmp_path):
    """A user's SD directory (here a tiny real StableDiffusionPipeline) as the resident drawer
    actor, fed by the Ray Data stream: every described text drawn at the detector's size and mode."""
    import io

    import ray
    from PIL import Image

    from kka_ray.generation.pipeline import ResidentPools, read_generated, run_generation
    from kka_ray.testing.tiny_sd import make_tiny_stable_diffusion

    sd = make_tiny_stable_diffusion(tmp_path / "tiny-sd")
    cfg = load_config(None, [*tiny_overrides(tiny_cache), f"drawer.model={sd}", "drawer.num_inference_steps=2",
                             "drawer.guidance_scale=4.0"])
    prompts = [{"prompt_id": i, "prompt": f"Describe item {i}:", "description": f"item {i}", "cluster": 0} for i in range(4)]
    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        pools = ResidentPools.start(cfg, target_size=28, target_mode="L")
        try:
            result = run_generation(cfg, pools, prompts, 1, "t", tmp_path / "gen")
        finally:
            pools.shutdown()
    finally:
        ray.shutdown()
    table = read_generated(tmp_path / "gen")
    assert result["n_kept"] == result["n_described"] == table.num_rows > 0
    images = [Image.open(io.BytesIO(b)) for b in table.column("image").to_pylist()]
    assert {im.size for im in images} == {(28, 28)} and {im.mode for im in images} == {"L"}


def test_a_feature_extractor_actor_killed_mid_pass_is_restarted_and_every_image_is_featured_once(tiny_cache, tmp_path):
    """The guard's feature pass (a Ray Data pool of FeatureBatchExtractor actors): the actor is
    killed after it has started, Ray Data restarts it and retries the
    batch in flight; every image gets its features once, equal to those of an uninterrupted pass."""
    import io

    import numpy as np
    import pyarrow as pa
    import ray
    from PIL import Image

    from kka_ray.knowledge.features import extract_image_features

    cfg = load_config(None, [*tiny_overrides(tiny_cache), "knowledge.batch_size=4"])
    rng = np.random.default_rng(0)

    def png(i):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(buf, format="PNG")
        return buf.getvalue()

    table = pa.table({"id": [f"a{i}" for i in range(400)], "image": [png(i) for i in range(400)]})
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(feats=extract_image_features(table, cfg.knowledge, str(tiny_cache))))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        clean = extract_image_features(table, cfg.knowledge, str(tiny_cache))
        first_pass = own_ray_pids("FeatureBatchExtractor")  # may linger a moment after their pass
        thread.start()
        pid = wait_for_own_ray_pid("FeatureBatchExtractor", exclude=first_pass)
        assert pid is not None, "no feature-extractor actor process appeared"
        time.sleep(1.5)  # into the pass
        assert thread.is_alive(), "the pass ended before the kill"
        os.kill(pid, signal.SIGKILL)
    finally:
        if thread.is_alive():  # a pass left running after Ray stops would bring the test process down
            thread.join(timeout=600)
        ray.shutdown()
    feats = out["feats"]
    assert sorted(feats) == sorted(clean) == sorted(table.column("id").to_pylist())
    for i in clean:
        np.testing.assert_allclose(feats[i], clean[i], rtol=1e-5, atol=1e-6)
