"""Benchmark: which evaluator should split the new anomalies (``evaluator.split_reference``).

Eq. 6 splits iteration k's new anomalies into hard and easy with a Deep SAD confusion evaluator.
``first`` (the default) uses iteration 1's normals-only evaluator in every iteration: hard means
close to the normal data, whatever the set already holds. ``current`` uses iteration k's
evaluator, trained on the normals and the anomaly set so far (Eq. 5): an anomaly like an earlier
one turns easy once the set holds it. The split decides DPO's pairs (and, in ``rep``, which
anomalies are replaced), so the two choices make different runs.

For each class it takes the default reference's run from ``fmnist_table.py``'s archive
(``benchmarks/results/fmnist_runs``, or runs it when missing) and runs KKA with the other
reference, everything else the same: per iteration the hard share under each evaluator, the
describer shift, ``normal_leak``, the CPU-seconds per hard anomaly and what the judge calls the
hard and the easy anomalies; and Deep SAD without anomalies and after the last iteration over
``--seeds`` detector seeds. Writes ``benchmarks/results/split_reference.{json,md}``; the other
reference's runs are packed into ``benchmarks/results/split_reference_runs/``.

    python benchmarks/split_reference.py [--classes 0,5] [--mode add] [--iterations 3] [--seeds 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from fmnist_table import RESULTS, compute_seconds, kka_ablation, parse_classes, restore_run, run_kka  # benchmarks/
from machine import machine

REFERENCES = ("current", "first")


def per_iteration(run: Path, key: str) -> list:
    """One metric of every iteration, from the run's ``metrics.jsonl``."""
    path = run / "metrics.jsonl"
    return [json.loads(line).get(key) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def sad_seeds(run: Path, seeds: int) -> dict[str, float]:
    """Deep SAD's mean test AUROC over ``seeds`` detector seeds, without anomalies and after the
    last iteration (the run's own settings)."""
    from kka_ray.tables.runner import evaluate_run

    rows = evaluate_run(run, ["sad"], seeds=seeds, iterations="last", include_none=True)
    out: dict[str, list[float]] = {}
    for r in rows:
        out.setdefault("none" if r["iteration"] == 0 else "kka", []).append(r["auroc"])
    return {k: round(100 * sum(v) / len(v), 2) for k, v in out.items()} | {"n_seeds": seeds}


def falls(values: list) -> bool:
    """The last iteration's figure below the first's (an iteration without a hard anomaly: no figure,
    counted as infinite)."""
    inf = float("inf")
    return bool(values) and (values[-1] if values[-1] is not None else inf) < (values[0] if values[0] is not None else inf)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", default="0,5")
    p.add_argument("--mode", default="add", choices=["add", "rep"])
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--seeds", type=int, default=3, help="Deep SAD seeds for the none / last-iteration figures")
    p.add_argument("--root", default="/tmp/kka_split_reference")
    p.add_argument("--table-archive", default=str(RESULTS / "fmnist_runs"),
                   help="the table's packed runs (the default reference)")
    p.add_argument("--archive", default=str(RESULTS / "split_reference_runs"),
                   help="packed runs of the other reference")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kka_ray").setLevel(logging.INFO)

    from kka_ray.cluster import init_ray
    from kka_ray.config import EvaluatorSection, load_config

    start = time.perf_counter()
    root = Path(args.root)
    runs: dict[str, list[tuple[Path, str]]] = {ref: [] for ref in REFERENCES}
    default = EvaluatorSection.model_fields["split_reference"].default
    for c in parse_classes(args.classes):
        for ref in REFERENCES:
            if ref == default:  # the table's own run
                run = restore_run(root / ref, c, args.mode, Path(args.table_archive))
                if not (run / "config.yaml").is_file():
                    run = run_kka(root / ref, c, args.mode, args.iterations, [], None)
            else:
                run = run_kka(root / ref, c, args.mode, args.iterations, [f"evaluator.split_reference={ref}"],
                              Path(args.archive))
            runs[ref].append((run, args.mode))
    other = next(ref for ref in REFERENCES if ref != default)
    started = init_ray(load_config(runs[other][0][0] / "config.yaml"))
    try:
        sad = {ref: {run.name: sad_seeds(run, args.seeds) for run, _ in rs} for ref, rs in runs.items()}
    finally:
        if started:
            import ray

            ray.shutdown()
    out = {"machine": machine(), "mode": args.mode, "iterations": args.iterations, "seeds": args.seeds,
           # the other reference's KKA time from its stage records (holds when resumed or restored)
           "seconds": {f"{other}_runs": compute_seconds(runs[other], [])["kka_runs"],
                       "this_invocation": round(time.perf_counter() - start, 1)}, "references": {}}
    lines = [f"# Which evaluator splits the new anomalies (`{args.mode}`, {args.iterations} iterations)", "",
             "hard = share of iteration k's new anomalies the splitting evaluator places among the normals; "
             "ref = under iteration 1's (normals-only) evaluator; cur = under iteration k's. "
             f"SAD: Deep SAD test AUROC, mean of {args.seeds} detector seeds, without anomalies and after the last iteration "
             "(KKA(k) in-loop: one seed).", "",
             "| reference | class | hard (split) | ref | cur | normal_leak | DPO shift (hard %) | CPU-s per hard anomaly | KKA(0..k) in-loop | SAD none | SAD KKA |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    pct = lambda v: "-" if v is None else f"{100 * v:.0f}"  # noqa: E731
    for ref, rs in runs.items():
        ab = kka_ablation(rs)
        for row, (run, _) in zip(ab["rows"], rs):
            # per iteration, the judge's histograms of the hard and of the easy anomalies
            row["judged"] = [{"hard": h, "easy": e} for h, e in zip(per_iteration(run, "judged_hard"),
                                                                    per_iteration(run, "judged_easy"))]
            row["sad_seeds"] = sad[ref][run.name]
            row["cpu_seconds_per_hard_anomaly"] = per_iteration(run, "cpu_seconds_per_hard_anomaly")
            row["coverage"] = per_iteration(run, "coverage")
            lines.append(" | ".join([
                f"| {ref}", run.name, " / ".join(pct(v) for v in row["hard_fraction"]),
                " / ".join(pct(v) for v in row["hard_fraction_ref"]), " / ".join(pct(v) for v in row["hard_fraction_current"]),
                " / ".join(pct(v) for v in row["normal_leak"]),
                " / ".join(f"{pct(b)}->{pct(a)}" for b, a in row["shift_hard_share"]) or "-",
                " / ".join("-" if v is None else f"{v:.1f}" for v in row["cpu_seconds_per_hard_anomaly"]),
                " / ".join("-" if v is None else f"{100 * v:.1f}" for v in row["auroc"]),
                str(row["sad_seeds"].get("none")), str(row["sad_seeds"].get("kka")) + " |"]))
        m, g = ab["mean"][args.mode], ab["goals"][args.mode]
        cur_mean = [sum(r["hard_fraction_current"][i] or 0 for r in ab["rows"]) / len(ab["rows"]) for i in range(len(m["hard_fraction"]))]
        sad_mean = {v: round(sum(sad[ref][r["run"]][v] for r in ab["rows"]) / len(ab["rows"]), 2) for v in ("none", "kka")}
        lines.append(" | ".join([
            f"| **{ref}, mean** ({g['hard_share_rises']} of {g['n_full']} rising, {g['hard_fraction_within_0.1_0.9']} within 0.1-0.9)",
            "", " / ".join(pct(v) for v in m["hard_fraction"]), " / ".join(pct(v) for v in m["hard_fraction_ref"]),
            " / ".join(pct(v) for v in cur_mean), " / ".join(pct(v) for v in m["normal_leak"]),
            " / ".join(f"{pct(b)}->{pct(a)}" for b, a in m["shift_hard_share"]) + f" ({g['dpo_updates_raising_hard_share']} of {g['dpo_updates']} up)",
            f"falls on {sum(falls(r['cpu_seconds_per_hard_anomaly']) for r in ab['rows'])}",
            " / ".join("-" if v is None else f"{100 * v:.1f}" for v in m["auroc"]), str(sad_mean["none"]), f"{sad_mean['kka']} |"]))
        ab["sad_seeds_mean"] = sad_mean
        out["references"][ref] = ab
    lines += ["", f"Machine: {out['machine']}. KKA time of the `{other}` runs {out['seconds'][f'{other}_runs']:.0f} s "
              f"(from their stage records; the `{default}` runs, the default, are the table's)."]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "split_reference.json").write_text(json.dumps(out, indent=1))
    (RESULTS / "split_reference.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
