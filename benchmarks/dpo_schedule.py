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

    import yaml

    from kka_ray.config import KKAConfig
    from kka_ray.generation.text import resolve_model_path
    from kka_ray.knowledge.prompts import resolve_template
    from kka_ray.loop import KKARun
    from kka_ray.preference.dpo import run_dpo

    run_dir = Path(args.run)
    if not (run_dir / "config.yaml").is_file():
        print(f"dpo_schedule: {run_dir} holds no config.yaml: pass a finished run directory", file=sys.stderr)
        return 2
    cfg = KKAConfig.model_validate(yaml.safe_load((run_dir / "config.yaml").read_text()))
    pairs, relative, skipped = KKARun(cfg, run_dir)._dpo_pairs(args.iteration)
    if skipped is not None:
        print(f"dpo_schedule: iteration {args.iteration} of {run_dir} trains no DPO ({skipped})", file=sys.stderr)
        return 2
    base = resolve_model_path(cfg.describer.model, str(cfg.paths.cache_dir()))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, v in enumerate(json.loads(args.variants)):
            pcfg = cfg.preference.model_copy(update={k: val for k, val in v.items() if k != "seed"})
            t0 = time.perf_counter()
            m = run_dpo(base, pairs, f"{tmp}/{i}", pcfg, seed=v.get("seed", cfg.run.seed + args.iteration),
                        device="cpu", answer_prefix=cfg.describer.answer_prefix,
                        chat=resolve_template(cfg.describer).chat)
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
