"""Benchmark the embedded default run: wall time per stage and peak memory.

Runs ``kka run`` (the embedded default: 3 iterations, Fashion-MNIST, SmolLM2-135M-Instruct, the
project's diffusion drawer) in a subprocess, samples the resident set size of the whole process
tree (driver, raylet, Ray workers and actors) every half second, and writes
``benchmarks/results/default_run.json`` with keys ``wall_seconds``, ``peak_rss_mb``,
``iterations``, ``stages`` (stage name -> seconds), ``machine`` and the run's metrics.

Goal: the whole default run within 10 minutes on 2 CPU cores.

    python benchmarks/default_run.py [--output DIR] [key.sub=value ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import machine  # benchmarks/machine.py (the script's own directory is on sys.path)

RESULTS = Path(__file__).resolve().parent / "results" / "default_run.json"


def tree_rss_mb(pid: int) -> float:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", help="run directory (default: a temporary directory)")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    out = Path(args.output or tempfile.mkdtemp(prefix="kka-bench-")) / "run"
    cmd = [sys.executable, "-m", "kka_ray.cli", "run", "--output", str(out), *args.overrides]
    print("running:", " ".join(cmd), flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, tree_rss_mb(proc.pid))
        time.sleep(0.5)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(f"kka run failed with exit code {proc.returncode}", file=sys.stderr)
        return proc.returncode
    stages = {p.stem: json.loads(p.read_text()).get("wall_seconds") for p in sorted((out / "stages").glob("*.json"))}
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    per_kind: dict[str, float] = {}
    for name, sec in stages.items():
        kind = name.split(".")[-1]
        per_kind[kind] = round(per_kind.get(kind, 0.0) + (sec or 0.0), 2)
    result = {
        "wall_seconds": round(wall, 1), "peak_rss_mb": round(peak, 1), "iterations": len(metrics),
        "stages": stages, "stage_totals": per_kind, "machine": machine(),
        "overrides": args.overrides,
        **{key: [m.get(key) for m in metrics] for key in (
            "auroc", "hard_fraction", "hard_fraction_ref", "hard_fraction_current", "tau", "tau_normals", "n_kept", "n_generated", "normal_leak", "coverage",
            "judge_false_normal_rate", "evaluator_new_auroc", "evaluator_val_auroc", "dpo_last_loss",
            "dpo_reward_accuracy", "cpu_seconds_per_anomaly", "cpu_seconds_per_hard_anomaly", "judged_hard", "judged_easy")},
        "describer_shift": [m.get("describer_shift") for m in metrics],
        "baselines": json.loads((out / "baselines.json").read_text()),
        "goal_seconds": 600,
    }
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("wall_seconds", "peak_rss_mb", "iterations", "stage_totals")}, indent=2))
    print(f"saved {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
