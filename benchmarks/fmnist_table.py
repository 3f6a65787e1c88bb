"""Benchmark: the KKA paper's Fashion-MNIST table (one-class, each class normal in turn).

For every class and mode (``add``, ``rep``) it runs KKA (``kka run`` with the embedded default
plus the overrides below), then ``kka eval`` trains each detector without anomalies (``none``)
and with the run's final anomaly set (``kka_add`` / ``kka_rep``) over ``--seeds`` detector
seeds, and writes

    benchmarks/results/fmnist_table.csv   detector, variant, auroc_mean, auroc_std, ... (mean over classes)
    benchmarks/results/fmnist_table.md    the same as Markdown, per-class rows, wall time, goals
    benchmarks/results/fmnist_table_per_class.csv

Runs and results are cached under ``--root``: run it again and it only does what is missing.
They are also kept in the repository, so a fresh machine resumes instead of starting over:
every finished KKA run is packed (``kka pack --drop-features``, tens of KB per iteration) into
``benchmarks/results/fmnist_runs/`` and unpacked from there when ``--root`` lacks it, and every
detector fit's result is a line of ``benchmarks/results/fmnist_fits.jsonl``, restored into its
run before evaluating (only onto a run whose anomaly set has the recorded digest).
Goals (mean over the ten classes): Deep SAD without anomalies 89.2 AUROC and with 10 % real
labelled anomalies of one class 91.3 (Ruff et al., 2020); SAD+KKA with only generated
anomalies should beat 91.3, and KKA should lift every detector above its own no-anomaly row.

    python benchmarks/fmnist_table.py [--classes 0-9] [--modes add,rep] [--iterations 1]
        [--seeds 3] [--detectors ssd,sad,simplenet,recontrast,cmda] [--root DIR] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from machine import machine  # benchmarks/machine.py

RESULTS = Path(__file__).resolve().parent / "results"
FITS = RESULTS / "fmnist_fits.jsonl"
GOALS = {"sad_none_ruff2020": 89.2, "sad_10pct_real_anomalies_ruff2020": 91.3}
# A CPU budget: one KKA iteration of 64 descriptions and images per class and mode, no DPO
# after the last iteration (nothing is drawn with that adapter in the run).
DEFAULT_OVERRIDES = ["run.progress=false", "preference.final_iteration=false", "detector.baselines=[ssd,sad]"]


def parse_classes(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        if "-" in part:
            a, b = part.split("-")
            out += list(range(int(a), int(b) + 1))
        elif part.strip():
            out.append(int(part))
    return out


def restore_run(root: Path, cls: int, mode: str, archive: Path | None) -> Path:
    """``<root>/class<cls>_<mode>``, unpacked from ``archive`` when only the archive has it."""
    from kka_ray.archive import unpack_run

    out = root / f"class{cls}_{mode}"
    packed = archive / f"{out.name}.tar.gz" if archive is not None else None
    if not (out / "state.json").is_file() and packed is not None and packed.is_file():
        unpack_run(packed, out)
    return out


def run_kka(root: Path, cls: int, mode: str, iterations: int, overrides: list[str], archive: Path | None) -> Path:
    from kka_ray.archive import pack_run
    from kka_ray.config import load_config
    from kka_ray.loop import KKARun

    out = restore_run(root, cls, mode, archive)
    if (out / "state.json").is_file():
        if not json.loads((out / "state.json").read_text()).get("finished"):
            KKARun.resume(out).execute()
    else:
        cfg = load_config(overrides=[*DEFAULT_OVERRIDES, f"data.normal_classes=[{cls}]", f"run.mode={mode}",
                                     f"run.iterations={iterations}", f"run.name=fmnist{cls}{mode}", *overrides])
        KKARun.create(cfg, str(out)).execute()
    loop_baseline(out)
    if archive is not None and not (archive / f"{out.name}.tar.gz").is_file():
        pack_run(out, archive / f"{out.name}.tar.gz", include_eval=False, drop_features=True)
    return out


def loop_baseline(run: Path) -> None:
    """KKA(0): the loop's own detector without anomalies in ``baselines.json``, fitted by the loop's
    baselines stage (same inputs, seed and settings as its KKA(k) fits) where the run lacks it."""
    from kka_ray.cluster import init_ray
    from kka_ray.config import load_config
    from kka_ray.data.store import write_json_atomic
    from kka_ray.loop import KKARun

    path = run / "baselines.json"
    base = json.loads(path.read_text()) if path.is_file() else {}
    det = load_config(run / "config.yaml").detector.name
    if det in base:
        return
    cfg = load_config(run / "config.yaml", overrides=[f"detector.baselines=[{det}]"])
    started = init_ray(cfg)  # the fit's Ray Data inputs need Ray; released here if this started it
    try:
        added = KKARun(cfg, run).baselines()
    finally:
        if started:
            import ray

            ray.shutdown()
    write_json_atomic({**base, **added}, path)


# A fit's record in FITS: what the tables need, where the fit ran, and the anomaly set it saw.
FIT_KEYS = ("split", "mode", "detector", "variant", "iteration", "seed", "settings", "device", "n_generated",
            "set_digest", "auroc", "aupr", "fpr95", "auroc_last", "aupr_last", "fpr95_last", "threshold",
            "n_anomalies_train", "n_anomalies_val", "seconds")


def _fit_key(rec: dict) -> tuple:
    return rec["run"], rec["detector"], rec["variant"], rec["iteration"], rec["seed"], rec["settings"]


def load_fits(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def save_fits(path: Path, rows: list[dict]) -> int:
    """Merge the evaluation ``rows`` into the records at ``path`` (one JSON line per fit, keyed by
    run name, detector, variant, iteration, seed and settings); returns the number of records."""
    records = {_fit_key(r): r for r in load_fits(path)}
    for row in rows:
        rec = {"run": Path(row["run"]).name, **{k: row[k] for k in FIT_KEYS if k in row}}
        records[_fit_key(rec)] = rec
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for _, r in sorted(records.items(), key=lambda kv: str(kv[0]))))
    tmp.replace(path)
    return len(records)


def restore_fits(run: Path, records: list[dict]) -> tuple[int, int]:
    """Write the recorded fits of ``run`` (by its directory name) into ``<run>/eval/results`` where
    missing, so evaluation reads them instead of fitting again. A record whose anomaly-set digest
    differs from the run's (another run under the same name) is not restored. Returns
    (restored, refused)."""
    from kka_ray.data.store import write_json_atomic
    from kka_ray.rundir import RunInputs
    from kka_ray.tables.runner import result_path

    mine = [r for r in records if r["run"] == run.name]
    if not mine:
        return 0, 0
    inputs, digests, restored, refused = RunInputs(run), {}, 0, 0
    for rec in mine:
        path = result_path(run / "eval" / "results", rec["detector"], rec["variant"], rec["iteration"], rec["seed"], rec["settings"])
        if path.is_file():
            continue
        k = rec["iteration"]
        if k not in digests:
            try:
                digests[k] = inputs.set_digest(k)
            except FileNotFoundError:  # the run has no such iteration
                digests[k] = None
        if rec.get("set_digest", "") != digests[k]:
            refused += 1
            continue
        write_json_atomic({**rec, "run": str(run)}, path)
        restored += 1
    if refused:
        logging.getLogger("fmnist_table").warning("%s: %d recorded fits were made on another anomaly set; not restored", run, refused)
    return restored, refused


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", default="0-9")
    p.add_argument("--modes", default="add,rep")
    p.add_argument("--iterations", type=int, default=1)
    p.add_argument("--iterations-for", action="append", default=[], metavar="MODE=N",
                   help="KKA iterations for one mode, e.g. rep=2 (rep equals add after one iteration)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--detectors", default="ssd,sad,simplenet,recontrast,cmda")
    p.add_argument("--root", default="runs/fmnist_table")
    p.add_argument("--archive", default=str(RESULTS / "fmnist_runs"),
                   help="where finished runs are packed and unpacked from ('' for nowhere)")
    p.add_argument("--fits", default=str(FITS), help="the per-fit records, restored and extended ('' for none)")
    p.add_argument("--eval-only", action="store_true", help="evaluate runs already under --root; run no KKA")
    p.add_argument("--tabulate", action="store_true",
                   help="write the results from the cached evaluation rows only (fit nothing)")
    p.add_argument("--detector-set", action="append", default=[], metavar="detector.KEY=VALUE",
                   help="detector settings for the evaluation (repeatable), e.g. detector.simplenet.epochs=8")
    p.add_argument("--seeds-for", action="append", default=[], metavar="DETECTOR=N",
                   help="fewer (or more) seeds for one detector, e.g. recontrast=1")
    p.add_argument("overrides", nargs="*", help="config overrides for every run, e.g. describer.num_prompts=8")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kka_ray").setLevel(logging.INFO)

    from kka_ray.config import load_config
    from kka_ray.tables.runner import evaluate_run
    from kka_ray.cluster import init_ray

    classes, modes = parse_classes(args.classes), [m.strip() for m in args.modes.split(",") if m.strip()]
    args.iterations = {m: args.iterations for m in modes} | {k: int(v) for k, v in (i.split("=") for i in args.iterations_for)}
    detectors = [d.strip() for d in args.detectors.split(",") if d.strip()]
    root = Path(args.root)
    archive = Path(args.archive) if args.archive else None
    fits = Path(args.fits) if args.fits else None
    records = load_fits(fits) if fits is not None else []
    start = time.perf_counter()
    runs: list[tuple[Path, str]] = []
    for c in classes:
        for mode in modes:
            if args.eval_only or args.tabulate:
                run = restore_run(root, c, mode, archive)
                if not (run / "config.yaml").is_file():
                    continue
                args.iterations[mode] = load_config(run / "config.yaml").run.iterations  # as the kept run was made
            else:
                run = run_kka(root, c, mode, args.iterations[mode], args.overrides, archive)
            restored, _ = restore_fits(run, records)
            if restored:
                print(f"{run.name}: {restored} fits restored from {fits}", flush=True)
            runs.append((run, mode))
    seeds_for = {d: args.seeds for d in detectors}
    seeds_for.update({k: int(v) for k, v in (item.split("=") for item in args.seeds_for)})
    rows: list[dict] = []
    if args.tabulate:
        from kka_ray.tables.runner import cached_rows

        for run, mode in runs:
            rows += [r for r in cached_rows(run, detectors, args.detector_set) if mode == modes[0] or r["variant"] != "none"]
        write_results(rows, runs, args, classes, modes, seeds_for, root)
        return 0
    started = init_ray(load_config(runs[0][0] / "config.yaml"))
    try:
        # detector by detector, cheapest first as listed: the tables are rewritten after each,
        # the fit records after each run (an interrupted session keeps what it fitted)
        for det in detectors:
            for run, mode in runs:
                rows += evaluate_run(run, [det], seeds=seeds_for[det], iterations="last",
                                     include_none=(mode == modes[0]), overrides=args.detector_set)
                if fits is not None:
                    save_fits(fits, rows)
            write_results(rows, runs, args, classes, modes, seeds_for, root)
    finally:
        if started:
            import ray

            ray.shutdown()
    print(f"session wall time {time.perf_counter() - start:.0f} s; results in {RESULTS}")
    return 0


def fitted_on(rows: list[dict]) -> dict[str, str]:
    """Per detector, the devices its fits ran on with their counts and seconds per fit (mean,
    min-max; rows from before the ``device`` field were fitted on this CPU)."""
    per: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        per.setdefault(r["detector"], {}).setdefault(r.get("device", "cpu"), []).append(float(r.get("seconds", 0.0)))
    return {d: ", ".join(f"{dev} ({len(s)} fits, {sum(s) / len(s):.0f} s per fit, {min(s):.0f}-{max(s):.0f})"
                         for dev, s in sorted(devices.items(), key=lambda kv: -len(kv[1])))
            for d, devices in per.items()}


def compute_seconds(runs: list[tuple[Path, str]], rows: list[dict]) -> dict[str, float]:
    """Seconds spent, read back from the runs (stage records) and the evaluation rows, so the
    figure holds across interrupted and resumed sessions."""
    kka = 0.0
    for run, _ in runs:
        for f in (run / "stages").glob("*.json"):
            kka += float(json.loads(f.read_text()).get("wall_seconds", 0.0))
    per_detector: dict[str, float] = {}
    for r in rows:
        per_detector[r["detector"]] = per_detector.get(r["detector"], 0.0) + float(r.get("seconds", 0.0))
    return {"kka_runs": round(kka, 1), **{f"eval_{k}": round(v, 1) for k, v in per_detector.items()},
            "total": round(kka + sum(per_detector.values()), 1)}


def like_for_like(per_class: list[dict]) -> list[dict]:
    """Per detector whose variants cover different classes: every variant's mean AUROC over the
    classes all of them cover, so a variant run on fewer classes is compared on those alone."""
    by_det: dict[str, dict[str, dict[str, float]]] = {}
    for r in per_class:
        by_det.setdefault(r["detector"], {}).setdefault(r["variant"], {})[r["split"]] = r["auroc_mean"]
    out = []
    for det, variants in by_det.items():
        splits = [set(v) for v in variants.values()]
        common = set.intersection(*splits)
        if common and any(s != common for s in splits):
            for variant, per in variants.items():
                out.append({"detector": det, "variant": variant, "n_splits": len(common),
                            "auroc_mean": round(sum(per[c] for c in common) / len(common), 1)})
    return out


def _mean(values: list) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return round(sum(vals) / len(vals), 6) if vals else None


def kka_ablation(runs: list[tuple[Path, str]]) -> dict:
    """KKA(0..K) from the runs' own records: the loop's detector without anomalies
    (``baselines.json``, KKA(0)) and after each iteration (``metrics.jsonl``), beside what each
    iteration generated (hard share under the adapting evaluator and under iteration 1's,
    ``normal_leak``), DPO's last loss and the describer shift (hard share before and after)."""
    from kka_ray.config import load_config

    rows = []
    for run, mode in runs:
        metrics_path = run / "metrics.jsonl"
        if not metrics_path.is_file():
            continue
        metrics = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
        det = load_config(run / "config.yaml").detector.name
        base = json.loads((run / "baselines.json").read_text()) if (run / "baselines.json").is_file() else {}
        row = {"run": run.name, "mode": mode, "detector": det,
               "auroc": [base.get(det, {}).get("auroc"), *[m.get("auroc") for m in metrics]]}
        for key in ("hard_fraction", "hard_fraction_ref", "normal_leak", "n_kept", "dpo_last_loss"):
            row[key] = [m.get(key) for m in metrics]
        # runs from before evaluator.split_reference were split by each iteration's own evaluator
        row["hard_fraction_current"] = [m.get("hard_fraction_current", m.get("hard_fraction")) for m in metrics]
        row["split_reference"] = metrics[0].get("split_reference", "current") if metrics else "current"
        row["shift_hard_share"] = [[(m.get("describer_shift") or {}).get(side, {}).get("hard_share") for side in ("before", "after")]
                                   for m in metrics if m.get("describer_shift")]
        rows.append(row)
    if not rows:
        return {"rows": []}
    n_iter = max(len(r["hard_fraction"]) for r in rows)
    mean, goals = {}, {}
    for mode in dict.fromkeys(r["mode"] for r in rows):  # one mean row and one set of counts per mode
        of_mode = [r for r in rows if r["mode"] == mode]
        mean[mode] = {key: [_mean([r[key][i] for r in of_mode if i < len(r[key])]) for i in range(n_iter + (key == "auroc"))]
                      for key in ("auroc", "hard_fraction", "hard_fraction_ref", "normal_leak", "dpo_last_loss")}
        n_updates = max(len(r["shift_hard_share"]) for r in of_mode)
        mean[mode]["shift_hard_share"] = [[_mean([r["shift_hard_share"][u][side] for r in of_mode if u < len(r["shift_hard_share"])])
                                           for side in (0, 1)] for u in range(n_updates)]
        full = [r for r in of_mode if len(r["auroc"]) == n_iter + 1 and None not in r["auroc"]]
        shifts = [s for r in of_mode for s in r["shift_hard_share"] if None not in s]
        goals[mode] = {
            "n_runs": len(of_mode), "n_full": len(full),
            "kka_last_above_none": sum(r["auroc"][-1] > r["auroc"][0] for r in full),
            "kka_last_above_kka1": sum(r["auroc"][-1] > r["auroc"][1] for r in full),
            "hard_share_rises": sum((r["hard_fraction"][-1] or 0) > (r["hard_fraction"][0] or 0) for r in full),
            "hard_share_ref_rises": sum((r["hard_fraction_ref"][-1] or 0) > (r["hard_fraction_ref"][0] or 0) for r in full),
            "hard_fraction_within_0.1_0.9": sum(all(h is not None and 0.1 <= h <= 0.9 for h in r["hard_fraction"]) for r in full),
            "dpo_updates": len(shifts), "dpo_updates_raising_hard_share": sum(a > b for b, a in shifts),
        }
    return {"rows": rows, "mean": mean, "goals": goals}


def ablation_markdown(ab: dict) -> str:
    if not ab["rows"]:
        return "(no finished runs)"
    pct = lambda v: "-" if v is None else f"{100 * v:.0f}"  # noqa: E731
    auc = lambda v: "-" if v is None else f"{100 * v:.1f}" if v <= 1 else f"{v:.1f}"  # noqa: E731
    n = max(len(r["auroc"]) for r in ab["rows"])
    head = (["run"] + [f"KKA({k})" for k in range(n)] + [f"hard {k}" for k in range(1, n)]
            + [f"hard ref {k}" for k in range(1, n)] + [f"leak {k}" for k in range(1, n)] + ["DPO last loss", "DPO shift"])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    means = [{"run": f"**mean {mode}**", **m} for mode, m in ab["mean"].items()]
    for r in [*ab["rows"], *means]:
        cells = ([r["run"]] + [auc(v) for v in r["auroc"]] + [pct(v) for v in r["hard_fraction"]]
                 + [pct(v) for v in r["hard_fraction_ref"]] + [pct(v) for v in r["normal_leak"]]
                 + [" / ".join("-" if v is None else f"{v:.2f}" for v in r["dpo_last_loss"])]
                 + [" / ".join(f"{pct(b)}->{pct(a)}" for b, a in r["shift_hard_share"]) or "-"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(rows: list[dict], runs: list[tuple[Path, str]], args: argparse.Namespace, classes: list[int],
                  modes: list[str], seeds_for: dict[str, int], root: Path) -> None:
    from kka_ray.tables.paper import MAIN_COLUMNS, main_table, to_csv, to_markdown, write_tables

    seconds = compute_seconds(runs, rows)
    write_tables(rows, root / "eval_tables")
    table = main_table(rows)
    summary = [r for r in table if r["split"] == "mean"] or table
    per_class = [r for r in table if r["split"] != "mean"]
    matched = like_for_like(per_class)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fmnist_table.csv").write_text(to_csv(summary, ["detector", *MAIN_COLUMNS[2:], "n_splits"]))
    (RESULTS / "fmnist_table_per_class.csv").write_text(to_csv(per_class, MAIN_COLUMNS))
    lines = [
        "# Fashion-MNIST one-class table (kka_ray)", "",
        f"Classes {classes}, modes {modes}, KKA iterations per mode {args.iterations}, detector seeds "
        f"{'as cached (the seeds column; the mean rows show the fewest of any class)' if args.tabulate else seeds_for}, run overrides {DEFAULT_OVERRIDES + args.overrides}, detector settings {args.detector_set}.",
        f"Machine: {machine()}.", "",
        f"Compute wall time {seconds['total']:.0f} s on it (KKA runs {seconds['kka_runs']:.0f} s; "
        "evaluation per detector below), summed from the stage records, so it holds across resumed sessions.", "",
        "## Mean over classes" if len(classes) > 1 else f"## Class {classes[0]}", "",
        to_markdown(summary, ["detector", *MAIN_COLUMNS[2:], "n_splits"]),
        *(["## Like for like", "", "Variants run on fewer classes (see n_splits) against the others on the same classes:", "",
            to_markdown(matched, ["detector", "variant", "auroc_mean", "n_splits"])] if matched else []),
        "## Per class", "", to_markdown(per_class, MAIN_COLUMNS),
        "## Goals", "",
        f"- Deep SAD without anomalies, reported: {GOALS['sad_none_ruff2020']} AUROC; with 10 % real labelled "
        f"anomalies of one class: {GOALS['sad_10pct_real_anomalies_ruff2020']} (Ruff et al., 2020).",
        "- SAD+KKA with generated anomalies only should beat 91.3; KKA should lift every detector above its "
        "own `none` row.", "",
        "## Seconds", "", "\n".join(f"- {k}: {v}" for k, v in seconds.items()), "",
        "## Where the fits ran", "", "\n".join(f"- {d}: {where}" for d, where in fitted_on(rows).items()), "",
    ]
    ablation = kka_ablation(runs)
    lines += ["## KKA(k): the loop's detector after each iteration", "",
              "From each run's own records: KKA(0) is the loop's detector without anomalies (`baselines.json`), "
              "KKA(k) after iteration k (`metrics.jsonl`); hard = share of iteration k's new anomalies on the hard "
              "side of that iteration's evaluator, hard ref = the same under iteration 1's evaluator; leak = "
              "`normal_leak` of the kept set (the audit's judge); DPO shift = hard share (%) of what the describer "
              "writes for the held-out shift prompts before -> after each DPO update, both scored by that "
              "iteration's evaluator (`describer_shift`).", "",
              ablation_markdown(ablation), "", f"Counts over runs with every iteration: {ablation.get('goals', {})}", ""]
    (RESULTS / "fmnist_table.md").write_text("\n".join(lines))
    (RESULTS / "fmnist_table.json").write_text(json.dumps({
        "machine": machine(), "seconds": seconds, "classes": classes, "modes": modes, "iterations": args.iterations, "seeds": seeds_for,
        "detector_set": args.detector_set, "fitted_on": fitted_on(rows), "summary": summary,
        "like_for_like": matched, "kka_ablation": ablation}, indent=1))
    print(to_markdown(summary, ["detector", *MAIN_COLUMNS[2:], "n_splits"]), flush=True)


if __name__ == "__main__":
    sys.exit(main())
