"""Shared fixtures: a model cache with tiny real models (random weights, real architectures and
tokenizers) and the real EfficientNet-Lite0 backbone, for end-to-end runs of the loop."""

from __future__ import annotations

from pathlib import Path

import pytest

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def tiny_overrides(cache: Path) -> list[str]:
    """Config overrides that make a whole KKA run take about a minute on 2 CPU cores."""
    return [
        f"paths.model_cache={cache}",
        "describer.model=tiny-lm", "drawer.model=tiny-drawer",
        "data.max_normal_train=300", "data.max_test=300",
        "knowledge.image_size=32", "knowledge.batch_size=64",
        "describer.num_prompts=4", "describer.samples_per_prompt=3", "describer.max_new_tokens=12",
        "drawer.num_inference_steps=2", "drawer.batch_size=8",
        "evaluator.epochs=2", "evaluator.hidden_dims=[32]", "evaluator.rep_dim=8",
        "detector.epochs=2", "detector.hidden_dims=[32]", "detector.rep_dim=8",
        "detector.simplenet.epochs=2", "detector.simplenet.embed_dim=32", "detector.simplenet.dsc_hidden=32",
        "detector.recontrast.epochs=1", "detector.recontrast.total_iters=4", "detector.cmda.n_samples=32",
        "preference.max_steps=1", "preference.batch_size=2", "preference.max_pairs=4", "preference.min_pairs=1",
        "audit.judge_per_class=30", "audit.judge_epochs=1", "preference.shift_prompts=2",
        "run.iterations=2", "run.progress=false", "ray.num_cpus=4",
    ]


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    if not FMNIST_DIR.is_dir():
        pytest.skip(f"Fashion-MNIST not installed at {FMNIST_DIR} (apt-get install dataset-fashion-mnist)")
    from kka_ray.knowledge.backbones import prepare_efficientnet_lite0
    from kka_ray.testing.tiny_drawer import make_tiny_pixel_pipeline
    from kka_ray.testing.tiny_lm import make_tiny_causal_lm

    cache = tmp_path_factory.mktemp("model-cache")
    make_tiny_causal_lm(cache / "tiny-lm")
    make_tiny_pixel_pipeline(cache / "tiny-drawer", image_size=16)
    prepare_efficientnet_lite0(cache)
    return cache


@pytest.fixture(scope="module")
def ray_two_cpus():
    """A local Ray cluster of two CPUs for a test module (or the one already running)."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(autouse=True)
def _quiet_ray(monkeypatch):
    monkeypatch.setenv("RAY_DEDUP_LOGS", "0")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    yield


def own_ray_pids(marker: str) -> set[int]:
    """Processes of this test process's own Ray cluster (its descendants) whose command line names
    ``marker`` (e.g. "RayTrainWorker"): another Ray session on the machine is never touched."""
    import psutil

    pids = set()
    for proc in psutil.Process().children(recursive=True):
        try:
            if any(marker in part for part in proc.cmdline()):
                pids.add(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return pids


def wait_for_own_ray_pid(marker: str, exclude: set[int] = frozenset(), timeout_s: float = 120.0) -> int | None:
    """The first process of ``own_ray_pids(marker)`` not in ``exclude`` to appear (None after
    ``timeout_s``): a process of an earlier pass that is still exiting is never chosen."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        fresh = own_ray_pids(marker) - set(exclude)
        if fresh:
            return min(fresh)
        time.sleep(0.1)
    return None


def start_background(fn):
    """Start ``fn()`` in a thread; returns (thread, result): ``result["value"]`` holds what it
    returned, ``result["error"]`` what it raised (for the test to assert on)."""
    import threading

    result: dict = {}

    def body():
        try:
            result["value"] = fn()
        except Exception as err:  # surfaced by the caller's assertions
            result["error"] = err

    thread = threading.Thread(target=body)
    thread.start()
    return thread, result
