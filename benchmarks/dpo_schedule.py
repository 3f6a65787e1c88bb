"""Benchmark: how DPO's loss at its last step depends on the step count and the seed (Eq. 7).

Rebuilds one iteration's preference pairs from a finished run directory exactly as the loop does
(the Eq. 6 split, the guard's normal-like rows as rejected, the relative fallback), then trains a
fresh LoRA adapter with TRL's DPOTrainer on them under each variant: ``preference.*`` overrides
and a seed (the loop uses ``run.seed + iteration``). Per variant it records the loss at every
step, the last step's loss, the mean training loss, the last step's reward accuracy and the wall
seconds. With batch 4, the last step's loss is one batch's: the seeds show how far that moves.

Writes ``benchmarks/results/dpo_schedule.json`` (rows, the run, the iteration, the number of
pairs, the machine).

    python benchmarks/dpo_schedule.py RUN_DIR [--iteration 1] \
        [--variants '[{"seed": 1}, {"seed": 1, "max_steps": 14}]']
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from machine import machine  # benchmarks/machine.py

RESULTS = Path(__file__).resolve().parent / "results" / "dpo_schedule.json"
DEFAULT_VARIANTS = ('[{"seed": 1}, {"seed": 2}, {"seed": 3}, {"seed": 1, "max_steps": 14}, '
                    '{"seed": 2, "max_steps": 14}]')


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a finished run directory (config.yaml, anomaly store, splits)")
    p.add_argument("--iteration", type=int, default=1)
    p.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help="JSON list of objects: preference.* fields to override, and 'seed'")
    p.add_argument("--output", default=str(RESULTS))
    args = p.parse_args(argv)

    from pydantic import ValidationError

    from kka_ray.config import load_config
    from kka_ray.loop import KKARun
    from kka_ray.preference.dpo import run_dpo
    from kka_ray.rundir import RunLayout

    run_dir = Path(args.run)
    if not RunLayout(run_dir).config.is_file():
        print(f"dpo_schedule: {run_dir} holds no config.yaml: pass a finished run directory", file=sys.stderr)
        return 2
    run = KKARun(load_config(RunLayout(run_dir).config), run_dir)
    cfg = run.cfg
    pairs, relative, skipped = run._dpo_pairs(args.iteration)
    if skipped is not None:
        print(f"dpo_schedule: iteration {args.iteration} of {run_dir} trains no DPO ({skipped})", file=sys.stderr)
        return 2
    variants = json.loads(args.variants)
    try:  # every variant checked before any training
        pcfgs = [type(cfg.preference).model_validate({**cfg.preference.model_dump(), **{k: val for k, val in v.items() if k != "seed"}})
                 for v in variants]
    except ValidationError as e:
        err = e.errors()[0]
        print(f"dpo_schedule: --variants field preference.{'.'.join(map(str, err['loc']))}: {err['msg']}", file=sys.stderr)
        return 2
    base, job = run.dpo_job(args.iteration, prev_adapter=None)  # a fresh adapter, as iteration 1's update
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (v, pcfg) in enumerate(zip(variants, pcfgs)):
            t0 = time.perf_counter()
            m = run_dpo(base, pairs, f"{tmp}/{i}", pcfg, **{**job, "seed": v.get("seed", job["seed"])})
            row = {**v, "steps": m["steps"], "last_loss": m["last_loss"], "train_loss": m["train_loss"],
                   "last_reward_accuracy": m.get("rewards/accuracies"),
                   "losses": [round(h["loss"], 4) for h in m["history"]],
                   "seconds": round(time.perf_counter() - t0, 1)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    out = {"run": str(run_dir), "iteration": args.iteration, "n_pairs": len(pairs), "relative_pairs": relative,
           "preference": cfg.preference.model_dump(mode="json", exclude={"deepspeed", "resources"}),
           "rows": rows, "machine": machine()}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
