"""Benchmark: what a one-worker Ray Train fit costs besides training, actor vs in process.

Every trained model (the confusion evaluator, SAD, SimpleNet, ReContrast) goes through
``kka_ray.training.ray_fit.fit_torch``. With one CPU worker it can run as a Ray Train worker
actor (``in_process: false``) or in Ray Train's local mode (``in_process: true``, the default),
the loop in the calling process. This script fits the same trivial loop (reads the default run's
5,400 x 1,280 feature rows ``--epochs`` times, writes a one-file checkpoint) both ways
``--repeats`` times and splits each fit's wall time into: until the loop starts, the loop, and
after the loop (checkpoint upload, controller shutdown). Writes
``benchmarks/results/train_startup.json`` with the machine.

    python benchmarks/train_startup.py [--repeats 3] [--epochs 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from machine import machine  # benchmarks/machine.py

RESULTS = Path(__file__).resolve().parent / "results" / "train_startup.json"


def loop(config: dict) -> None:
    import ray.train

    from kka_ray.training.ray_fit import report_final

    start = time.time()
    shard = ray.train.get_dataset_shard("train")
    rows = 0
    for _ in range(int(config["epochs"])):
        for batch in shard.iter_torch_batches(batch_size=128):
            rows += len(batch["x"])
    end = time.time()

    def write(directory: str) -> None:
        Path(directory, "done").write_text(str(rows))

    report_final({"loop_start": start, "loop_end": end, "rows": rows}, ray.train.get_context().get_world_rank(),
                 write, "final")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args()

    from kka_ray.cluster import init_ray
    from kka_ray.config import load_config
    from kka_ray.training.ray_fit import arrays_to_dataset, fit_torch

    init_ray(load_config(None))
    x = np.random.default_rng(0).random((5400, 1280), dtype=np.float32)
    storage = tempfile.mkdtemp(prefix="kka-train-startup-")
    fits: dict[str, list[dict]] = {"actor": [], "in_process": []}
    for i in range(args.repeats):
        for mode in fits:
            datasets = {"train": arrays_to_dataset({"x": x, "label": np.zeros(len(x), np.int64)}, 1, 0)}
            t0 = time.time()
            result = fit_torch(loop, {"epochs": args.epochs}, datasets, num_workers=1, use_gpu=False,
                               resources_per_worker={"CPU": 1}, storage_path=storage, name=f"{mode}_{i}",
                               in_process=mode == "in_process")
            t1 = time.time()
            m = result.metrics
            assert os.path.isfile(os.path.join(result.checkpoint.path, "done"))
            fits[mode].append({"wall": t1 - t0, "until_loop": m["loop_start"] - t0,
                               "loop": m["loop_end"] - m["loop_start"], "after_loop": t1 - m["loop_end"]})
            print(mode, {k: round(v, 2) for k, v in fits[mode][-1].items()}, flush=True)
    summary = {mode: {k: round(statistics.median(f[k] for f in runs), 2) for k in runs[0]} for mode, runs in fits.items()}
    out = {"what": "one-worker Ray Train fit of a trivial loop, median seconds", "epochs": args.epochs,
           "rows": len(x), "repeats": args.repeats, "median": summary, "fits": fits, "machine": machine()}
    Path(args.results).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(summary), "->", args.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
