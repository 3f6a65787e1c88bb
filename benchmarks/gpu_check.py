"""GPU throughput check: the drawer at SD-1.5's size and the describer at SmolLM2-135M's, random weights.

Measured on one CUDA device, nothing downloaded:

- **drawer**: a Stable Diffusion pipeline with SD-1.5's full architecture and random weights
  (``kka_ray.testing.tiny_sd.make_sd15_random``: 860M-parameter UNet, CLIP-L text encoder, VAE)
  through the engine's ``DiffusersImageGenerator`` at 512 px in float16: images/s at 25 steps with
  guidance (SD-1.5's recipe) and at 1 step without (SD-Turbo's), per batch size, with
  ``channels_last`` on and off.
- **describer**: SmolLM2-135M's architecture (Llama, 30 layers, width 576) with random weights:
  generated tokens/s with transformers ``generate`` (sampling, a fixed 24 new tokens per sample,
  the describer's batch of prompts x samples) and, when vLLM is installed, with vLLM from token ids.

    python benchmarks/gpu_check.py [--quick] [--out benchmarks/results/gpu_check_<device>.json]

``benchmarks/gpu_check.sh`` runs it after the GPU tests. Random weights draw noise and write
gibberish, but at the real models' cost, which is what sizing a cluster needs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from machine import machine  # benchmarks/machine.py

RESULTS = Path(__file__).resolve().parent / "results"
SMOLLM2_ARCH = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True,
                    rope_theta=100000.0, bos_token_id=1, eos_token_id=2, pad_token_id=2)


def _sync():
    import torch

    torch.cuda.synchronize()


def drawer_rates(root: Path, batch_sizes: list[int], rounds: int) -> list[dict[str, Any]]:
    import torch

    from kka_ray.generation.image import DiffusersImageGenerator
    from kka_ray.testing.tiny_sd import make_sd15_random

    path = make_sd15_random(root / "sd15-random")
    rows = []
    for channels_last in (False, True):
        gen = DiffusersImageGenerator(str(path), root, device="cuda", dtype="float16", num_inference_steps=25,
                                      guidance_scale=7.5, height=512, width=512, channels_last=channels_last)
        for steps, guidance, recipe in ((25, 7.5, "sd15"), (1, 0.0, "turbo")):
            gen.num_inference_steps, gen.guidance_scale = steps, guidance
            for bs in batch_sizes:
                texts = [f"a photo of a thing number {i}" for i in range(bs)]
                gen.generate(texts, list(range(bs)))  # warm-up (cuDNN autotune, allocator)
                _sync()
                t = time.perf_counter()
                for r in range(rounds):
                    gen.generate(texts, [r * bs + i for i in range(bs)])
                _sync()
                sec = time.perf_counter() - t
                rows.append({"recipe": recipe, "steps": steps, "guidance": guidance, "batch": bs,
                             "channels_last": channels_last, "images_per_s": round(rounds * bs / sec, 2),
                             "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)})
                print(json.dumps(rows[-1]), flush=True)
        del gen
        torch.cuda.empty_cache()
    return rows


def describer_rates(root: Path, n_prompts: int, samples: int, new_tokens: int, rounds: int) -> list[dict[str, Any]]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**SMOLLM2_ARCH)
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    prompt_len = 96  # the few-shot list prompt is about this long
    ids = torch.randint(3, cfg.vocab_size, (n_prompts, prompt_len), device="cuda")
    rows = []
    with torch.no_grad():
        kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True, temperature=0.9, top_p=0.95,
                  num_return_sequences=samples, pad_token_id=2)
        model.generate(ids, **kw)
        _sync()
        t = time.perf_counter()
        for _ in range(rounds):
            model.generate(ids, **kw)
        _sync()
        sec = time.perf_counter() - t
    rows.append({"backend": "transformers", "dtype": "bfloat16", "prompts": n_prompts, "samples": samples,
                 "new_tokens": new_tokens, "tokens_per_s": round(rounds * n_prompts * samples * new_tokens / sec, 1),
                 "samples_per_s": round(rounds * n_prompts * samples / sec, 1)})
    print(json.dumps(rows[-1]), flush=True)
    if importlib.util.find_spec("vllm") is None:
        rows.append({"backend": "vllm", "skipped": "vllm is not installed on this machine"})
        return rows
    import vllm

    model_dir = root / "smollm2-arch-random"
    model.save_pretrained(model_dir, safe_serialization=True)
    del model
    torch.cuda.empty_cache()
    llm = vllm.LLM(model=str(model_dir), skip_tokenizer_init=True, dtype="bfloat16", gpu_memory_utilization=0.5,
                   enable_lora=True, max_lora_rank=16, max_model_len=512)
    prompts = [{"prompt_token_ids": row.tolist()} for row in ids.cpu()]
    params = vllm.SamplingParams(n=samples, temperature=0.9, top_p=0.95, max_tokens=new_tokens, min_tokens=new_tokens,
                                 ignore_eos=True, detokenize=False)
    llm.generate(prompts, params, use_tqdm=False)
    t = time.perf_counter()
    for _ in range(rounds):
        llm.generate(prompts, params, use_tqdm=False)
    sec = time.perf_counter() - t
    rows.append({"backend": "vllm", "version": vllm.__version__, "dtype": "bfloat16", "prompts": n_prompts,
                 "samples": samples, "new_tokens": new_tokens,
                 "tokens_per_s": round(rounds * n_prompts * samples * new_tokens / sec, 1),
                 "samples_per_s": round(rounds * n_prompts * samples / sec, 1)})
    print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="batch sizes 1 and 4, one round (a short lease)")
    p.add_argument("--out", default=None, help="default: benchmarks/results/gpu_check_<device>.json")
    p.add_argument("--workdir", default=None, help="where the random models are written (default: a temp dir)")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a GPU machine (bash benchmarks/gpu_check.sh)")
        return 2
    device = torch.cuda.get_device_name(0)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="kka-gpu-check-"))
    rounds = 1 if args.quick else 3
    result: dict[str, Any] = {"device": device, "machine": machine(), "torch": torch.__version__,
                              "cuda": torch.version.cuda}
    t0 = time.perf_counter()
    result["describer"] = describer_rates(root, n_prompts=16, samples=4, new_tokens=24, rounds=rounds)
    result["drawer"] = drawer_rates(root, [1, 4] if args.quick else [1, 4, 8, 16], rounds)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    slug = re.sub(r"[^a-z0-9]+", "_", device.lower()).strip("_")
    out = Path(args.out) if args.out else RESULTS / f"gpu_check_{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
