"""Benchmark: generation throughput at 1..N describer and drawer replicas, and what the stream costs.

For each replica count n it starts n describer and n drawer actors (the config's resources per
replica, one torch thread each by default) and, on the same prompts:

- **bare**: the actors called directly, the prompt batches spread over the describers, then the
  texts over the drawers (no Ray Data): descriptions/s and images/s of the models alone;
- **stream**: the generation stage as the loop runs it (describe -> draw -> Parquet through Ray
  Data's proxies and the resident pools): descriptions/s, images/s and end-to-end anomalies/s
  over the stream's wall time, and where the time goes (describer and drawer busy seconds summed
  over the replicas, and the rest of n x wall: waiting and the stream's own work).

It reports the stream's efficiency (its rate of described items over the slower bare model's rate,
measured in the same run: 1.0 means Ray Data and the proxies cost nothing) and the scaling
efficiency (end-to-end rate at n over n times the rate at 1). ``--nodes K`` runs on a multi-node
cluster simulated with ``ray.cluster_utils.Cluster`` (K nodes of ``--node-cpus`` CPUs) instead of a
local Ray. Writes ``benchmarks/results/generation_scaling.json`` with the machine. The same script
takes a GPU config on a cluster (``--config kka_ray/configs/gpu.yaml``, ``--address auto``).

    python benchmarks/generation_scaling.py [--replicas 1,2] [--prompts 16] [--nodes K] [key=value ...]

Goals: stream efficiency >= 0.9 at 1 and 2 replicas; scaling efficiency >= 0.9 from 1 to 2
replicas when each replica has its own core.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from machine import machine  # benchmarks/machine.py

RESULTS = Path(__file__).resolve().parent / "results" / "generation_scaling.json"
GOALS = {"stream_efficiency_min": 0.9, "scaling_efficiency_min": 0.9}


def make_prompts(cfg: Any, n: int) -> list[dict[str, Any]]:
    """``n`` describer prompts from the config's template, one normal caption per class name."""
    from kka_ray.data.fashion_mnist import CLASS_NAMES
    from kka_ray.knowledge.prompts import fill_template, resolve_template

    template = resolve_template(cfg.describer)
    domain = cfg.data.domain or "photos of fashion products: clothing, shoes and bags"
    out = []
    for i in range(n):
        name = CLASS_NAMES[i % len(CLASS_NAMES)]
        description = f"a photo of a {name}"
        out.append({"prompt_id": i, "prompt": fill_template(template.text, domain, description, name),
                    "description": description, "cluster": i % len(CLASS_NAMES)})
    return out


def bare_rates(cfg: Any, pools: Any, prompts: list[dict[str, Any]], seed: int) -> dict[str, float]:
    """The models alone: batches spread round-robin over the replicas, called in parallel."""
    import numpy as np
    import ray

    from kka_ray.generation.pipeline import prompt_rows

    rows = prompt_rows(prompts, seed, 1)
    per_call = max(1, min(cfg.describer.batch_size // cfg.describer.samples_per_prompt, -(-len(rows) // len(pools.describers))))
    batches = [rows[i:i + per_call] for i in range(0, len(rows), per_call)]
    cols = lambda b: {k: np.array([r[k] for r in b], dtype=object if isinstance(b[0][k], str) else None) for k in b[0]}  # noqa: E731
    ray.get([a.reset.remote(1) for a in pools.describers] + [a.reset.remote() for a in pools.drawers])
    t0 = time.perf_counter()
    described = ray.get([pools.describers[i % len(pools.describers)].describe.remote(cols(b), pools.adapter)
                         for i, b in enumerate(batches)])
    t_desc = time.perf_counter() - t0
    texts = [t for d in described for t in d["text"]]
    n = len(texts)
    size = cfg.drawer.batch_size
    chunks = [{"text": np.array(texts[i:i + size], dtype=object), "seed": np.arange(i, i + len(texts[i:i + size]))}
              for i in range(0, n, size)]
    t0 = time.perf_counter()
    drawn = ray.get([pools.drawers[i % len(pools.drawers)].draw.remote(c) for i, c in enumerate(chunks)])
    t_draw = time.perf_counter() - t0
    n_images = sum(len(d["image"]) for d in drawn)
    return {"descriptions": n, "describe_wall": t_desc, "descriptions_per_s": n / t_desc if t_desc else 0.0,
            "images": n_images, "draw_wall": t_draw, "images_per_s": n_images / t_draw if t_draw else 0.0}


def measure(cfg: Any, n: int, prompts: list[dict[str, Any]], work: Path) -> dict[str, Any]:
    from kka_ray.generation.pipeline import ResidentPools, run_generation

    cfg = cfg.model_copy(deep=True)
    cfg.describer.resources.replicas = n
    cfg.drawer.resources.replicas = n
    start = time.perf_counter()
    pools = ResidentPools.start(cfg, target_size=28, target_mode="L")
    startup = time.perf_counter() - start
    try:
        run_generation(cfg, pools, prompts[: max(1, len(pools.describers))], 0, "warmup", work / f"warm{n}")
        bare = bare_rates(cfg, pools, prompts, cfg.run.seed)
        stream = run_generation(cfg, pools, prompts, 1, "bench", work / f"gen{n}")
    finally:
        pools.shutdown()
    wall = stream["wall_seconds"]
    busy = stream["describe_seconds"] + stream["draw_seconds"]
    e2e = stream["n_kept"] / wall if wall else 0.0
    through = stream["n_described"] / wall if wall else 0.0
    slower = min(bare["descriptions_per_s"], bare["images_per_s"])
    return {
        "replicas": n, "actor_startup_seconds": round(startup, 2), "bare": bare,
        "stream": {"wall_seconds": wall, "descriptions": stream["n_described"], "images": stream["n_kept"],
                   "descriptions_per_s": through, "images_per_s": e2e, "anomalies_per_s": e2e,
                   "describer_busy_seconds": stream["describe_seconds"], "drawer_busy_seconds": stream["draw_seconds"],
                   # replica-seconds of the stream not spent inside a model call: waiting on the other
                   # role, Ray Data's scheduling, the proxies, the Parquet write
                   "other_replica_seconds": max(0.0, 2 * n * wall - busy)},
        "stream_efficiency": through / slower if slower else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", default="1,2", help="replica counts to measure, e.g. 1,2,4")
    p.add_argument("--prompts", type=int, default=16, help="prompts per measurement (x describer.samples_per_prompt samples)")
    p.add_argument("--config", help="a config file (default: the embedded default)")
    p.add_argument("--address", help="join this Ray cluster instead of starting one")
    p.add_argument("--nodes", type=int, default=0, help="simulate a cluster of this many nodes (ray.cluster_utils)")
    p.add_argument("--node-cpus", type=int, default=2)
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)

    import ray

    from kka_ray.config import load_config

    cfg = load_config(args.config, ["run.progress=false", *args.overrides])
    counts = [int(x) for x in args.replicas.split(",") if x.strip()]
    prompts = make_prompts(cfg, args.prompts)
    cluster = None
    if args.nodes:
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
        for _ in range(args.nodes):
            cluster.add_node(num_cpus=args.node_cpus)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    elif args.address:
        ray.init(address=args.address, logging_level="WARNING", log_to_driver=False)
    else:
        need = max(counts) * (cfg.describer.resources.num_cpus + cfg.drawer.resources.num_cpus)
        ray.init(num_cpus=max(int(need) + 1, 2), include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for n in counts:
                rows.append(measure(cfg, n, prompts, Path(tmp)))
                r = rows[-1]
                print(f"{n} replica(s): {r['stream']['anomalies_per_s']:.2f} anomalies/s end to end, bare describer "
                      f"{r['bare']['descriptions_per_s']:.2f}/s, drawer {r['bare']['images_per_s']:.2f}/s, stream "
                      f"efficiency {r['stream_efficiency']:.2f}", flush=True)
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
    base = next((r for r in rows if r["replicas"] == 1), None)
    for r in rows:
        r["scaling_efficiency"] = (r["stream"]["anomalies_per_s"] / (r["replicas"] * base["stream"]["anomalies_per_s"])
                                   if base and base["stream"]["anomalies_per_s"] else None)
    result = {"machine": machine(), "nodes": args.nodes, "config": args.config, "overrides": args.overrides,
              "prompts": args.prompts, "samples_per_prompt": cfg.describer.samples_per_prompt,
              "describer": cfg.describer.model, "drawer": cfg.drawer.model, "rows": rows, "goals": GOALS,
              "goals_met": {
                  "stream_efficiency": all((r["stream_efficiency"] or 0) >= GOALS["stream_efficiency_min"] for r in rows),
                  "scaling_efficiency": all((r["scaling_efficiency"] or 0) >= GOALS["scaling_efficiency_min"]
                                            for r in rows if r["replicas"] > 1)}}
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({r["replicas"]: {"anomalies_per_s": round(r["stream"]["anomalies_per_s"], 3),
                                      "stream_efficiency": r["stream_efficiency"], "scaling_efficiency": r["scaling_efficiency"]}
                      for r in rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
