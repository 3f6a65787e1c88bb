"""What KKA generates, audited: one iteration of generation on each Fashion-MNIST class.

For every class (normal = that class), with the default config plus any overrides: prep, one
generation (Eq. 3 descriptions -> Eq. 4 images), the normal-likeness guard, the confusion
evaluator's split and the audit (an independent CNN judge trained on the real training images).
Per class it records what was generated, kept, dropped by reason, ``normal_leak`` of the kept set
(beside the judge's own rate of calling real other-class test images normal), ``coverage`` of
the nine other classes and the judged histograms (kept, hard, easy, dropped). It also
re-applies the image rule at other held-out quantiles to the stored scores, so one run answers
what another ``guard.image_quantile`` would give.

Writes ``benchmarks/results/anomaly_audit[_TAG].json`` and a Markdown copy. Run directories go
under ``--root`` and are reused when complete, so an interrupted benchmark resumes.

    python benchmarks/anomaly_audit.py                                  # the default config
    python benchmarks/anomaly_audit.py --tag paper describer.template=paper
    python benchmarks/anomaly_audit.py --classes 0,6 --no-evaluate      # generation + guard + audit only
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from machine import machine  # benchmarks/machine.py

RESULTS = Path(__file__).resolve().parent / "results"
GOALS = {"normal_leak_mean_max": 0.05, "leak_above_judge_max": 0.05, "coverage_mean_min": 5, "kept_share_min": 0.40}
SWEEP_QUANTILES = ("0.5", "0.75", "0.9")
# Fashion-MNIST's classes by silhouette: a hard anomaly should more often share the normal
# class's group (a coat for T-shirt normals) than an easy one (a sneaker).
GROUPS = {"t-shirt/top": "tops", "pullover": "tops", "dress": "tops", "coat": "tops", "shirt": "tops",
          "sandal": "footwear", "sneaker": "footwear", "ankle boot": "footwear", "trouser": "trouser", "bag": "bag"}
logger = logging.getLogger("anomaly_audit")


def run_class(c: int, root: Path, overrides: list[str], evaluate: bool) -> Path:
    from kka_ray.config import load_config
    from kka_ray.loop import KKARun

    run_dir = root / f"class{c}"
    stages = ["prep", "iter1.generate", "iter1.guard"] + (["iter1.evaluate"] if evaluate else []) + ["iter1.audit"]
    cfg = load_config(None, [f"data.normal_classes=[{c}]", "run.progress=false", *overrides])
    run = KKARun.resume(run_dir) if (run_dir / "config.yaml").is_file() else KKARun.create(cfg, str(run_dir))
    if run.cfg.to_dict() != cfg.to_dict():
        raise SystemExit(f"{run_dir} was made with another config: delete it or pick another --root")
    run.execute_stages(stages)
    return run_dir


def image_rule_sweep(run_dir: Path, audit: dict[str, Any], guard: dict[str, Any]) -> dict[str, Any]:
    """What the kept set would be with the image rule at other held-out quantiles (the other rules as run)."""
    import pyarrow.parquet as pq

    table = pq.read_table(run_dir / "anomalies" / "iter_1.parquet", columns=["id", "guard_reason", "normal_score", "is_hard"])
    rows = table.to_pylist()
    items = audit["items"]
    normal = set(audit.get("normal_names", []))
    out = {}
    for q, tau in (guard.get("heldout_quantiles", {}).get("image") or {}).items():
        if q not in SWEEP_QUANTILES:
            continue
        kept = [r for r in rows if r["guard_reason"] in (None, "image_like_normal") and not (r["normal_score"] < tau)]
        judged = [items.get(r["id"]) for r in kept]
        out[q] = {"n_kept": len(kept), "normal_leak": (sum(j in normal for j in judged) / len(judged)) if judged else None}
        # the evaluator split only what the run kept: at a stricter quantile than the run's, the
        # hard share of the smaller set (and how many of the extra drops were hard) is known
        if all(r["guard_reason"] is None for r in kept) and all(r["is_hard"] is not None for r in kept):
            extra = [r for r in rows if r["guard_reason"] is None and r["normal_score"] < tau]
            out[q].update(hard_fraction=(sum(bool(r["is_hard"]) for r in kept) / len(kept)) if kept else None,
                          extra_dropped=len(extra), extra_dropped_hard=sum(bool(r["is_hard"]) for r in extra))
    return out


def class_record(c: int, run_dir: Path) -> dict[str, Any]:
    from kka_ray.data.fashion_mnist import CLASS_NAMES

    stage = lambda s: json.loads((run_dir / "stages" / f"{s}.json").read_text())  # noqa: E731
    g, gd, a = stage("iter1.generate"), stage("iter1.guard"), json.loads((run_dir / "audit" / "iter_1.json").read_text())
    ev = stage("iter1.evaluate") if (run_dir / "stages" / "iter1.evaluate.json").is_file() else {}
    a["normal_names"] = [CLASS_NAMES[c]]
    n_gen = g["n_generated"]
    return {
        "class": c, "name": CLASS_NAMES[c],
        "generated": n_gen, "described": g["n_described"], "drawn": g["n_kept"], "kept": gd["n_kept"],
        "kept_share": gd["n_kept"] / n_gen if n_gen else 0.0,
        "drops": {"describer": {k: v for k, v in g["describer_drops"].items() if v},
                  "drawer": {k: v for k, v in g["drawer_drops"].items() if v}, "guard": gd["drops"]},
        "normal_leak": a["kept"]["normal_leak"], "normal_leak_before_guard": a["all"]["normal_leak"],
        "judge_false_normal_rate": a["judge_false_normal_rate"],
        "coverage": a["kept"]["coverage"], "names_normal_share": a["text"]["names_normal_share"],
        "judged_kept": a["kept"]["histogram"], "judged_hard": a.get("hard", {}).get("histogram"),
        "judged_easy": a.get("easy", {}).get("histogram"), "judged_dropped": a["dropped"]["histogram"],
        "hard_fraction": ev.get("hard_fraction"), "guard_thresholds": gd.get("thresholds"),
        "image_rule_sweep": image_rule_sweep(run_dir, a, gd),
        "seconds": {s: stage(f"iter1.{s}")["wall_seconds"] for s in ("generate", "guard")},
        "examples_kept": _examples(run_dir, kept=True), "examples_dropped": _examples(run_dir, kept=False),
    }


def _examples(run_dir: Path, kept: bool, n: int = 6) -> list[str]:
    import pyarrow.parquet as pq

    rows = pq.read_table(run_dir / "anomalies" / "iter_1.parquet", columns=["text", "guard_reason"]).to_pylist()
    return [r["text"] for r in rows if (r["guard_reason"] is None) == kept][:n]


def same_group_share(record: dict[str, Any], part: str) -> float | None:
    """Share of the judged images of ``part`` (hard or easy; the normal class itself left out)
    whose class shares the normal class's group in ``GROUPS`` (None for a class alone in its group)."""
    hist, group = record.get(f"judged_{part}") or {}, GROUPS.get(record["name"])
    if sum(g == group for g in GROUPS.values()) < 2:
        return None
    others = {k: v for k, v in hist.items() if k != record["name"]}
    n = sum(others.values())
    return sum(v for k, v in others.items() if GROUPS.get(k) == group) / n if n and group else None


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    mean = lambda key: float(np.mean([r[key] for r in records if r[key] is not None]))  # noqa: E731
    leak_gap = [r["normal_leak"] - r["judge_false_normal_rate"] for r in records if r["normal_leak"] is not None]
    means = {"normal_leak": mean("normal_leak"), "normal_leak_before_guard": mean("normal_leak_before_guard"),
             "judge_false_normal_rate": mean("judge_false_normal_rate"), "coverage": mean("coverage"),
             "kept_share": mean("kept_share"), "names_normal_share": mean("names_normal_share"),
             "max_leak_above_judge": float(max(leak_gap)) if leak_gap else None}
    if all(r["hard_fraction"] is not None for r in records):
        means["hard_fraction"] = mean("hard_fraction")
        for r in records:
            r["hard_same_group"], r["easy_same_group"] = same_group_share(r, "hard"), same_group_share(r, "easy")
        means["hard_same_group"], means["easy_same_group"] = mean("hard_same_group"), mean("easy_same_group")
    goals = {
        "normal_leak_mean": means["normal_leak"] <= GOALS["normal_leak_mean_max"],
        "leak_above_judge_every_class": means["max_leak_above_judge"] is not None
        and means["max_leak_above_judge"] <= GOALS["leak_above_judge_max"],
        "coverage_mean": means["coverage"] >= GOALS["coverage_mean_min"],
        "kept_share_mean": means["kept_share"] >= GOALS["kept_share_min"],
    }
    sweep = {}
    for q in SWEEP_QUANTILES:
        per = [(r, r["image_rule_sweep"][q]) for r in records if q in (r.get("image_rule_sweep") or {})]
        if len(per) == len(records):
            avg = lambda vals: float(np.mean(vals)) if vals and None not in vals else None  # noqa: E731
            sweep[q] = {"kept_share": avg([x["n_kept"] / r["generated"] for r, x in per]),
                        "normal_leak": avg([x["normal_leak"] for r, x in per]),
                        "max_leak_above_judge": max(x["normal_leak"] - r["judge_false_normal_rate"] for r, x in per
                                                    if x["normal_leak"] is not None),
                        "hard_fraction": avg([x.get("hard_fraction") for r, x in per]),
                        "extra_dropped": sum(x.get("extra_dropped", 0) for r, x in per),
                        "extra_dropped_hard": sum(x.get("extra_dropped_hard", 0) for r, x in per)}
    return {"means": means, "goals_met": goals, "goals": GOALS, "image_rule_sweep": sweep}


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# Anomaly audit ({result['tag']}): one iteration per Fashion-MNIST class", "",
             f"Overrides: `{' '.join(result['overrides']) or '(default config)'}`. Machine: {result['machine'].get('processor')}, "
             f"{result['machine'].get('cpu_count')} CPUs, torch {result['machine'].get('torch')}.", "",
             "| class | generated | kept | kept share | normal_leak | judge false-normal | leak before guard | coverage | guard drops | hard fraction |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    pct = lambda v: "-" if v is None else f"{100 * v:.1f} %"  # noqa: E731
    for r in result["classes"]:
        lines.append(f"| {r['name']} | {r['generated']} | {r['kept']} | {pct(r['kept_share'])} | {pct(r['normal_leak'])} | "
                     f"{pct(r['judge_false_normal_rate'])} | {pct(r['normal_leak_before_guard'])} | {r['coverage']}/9 | "
                     f"{', '.join(f'{k} {v}' for k, v in r['drops']['guard'].items()) or '-'} | {pct(r['hard_fraction'])} |")
    m = result["summary"]["means"]
    lines.append(f"| **mean** | | | {pct(m['kept_share'])} | {pct(m['normal_leak'])} | {pct(m['judge_false_normal_rate'])} | "
                 f"{pct(m['normal_leak_before_guard'])} | {m['coverage']:.1f}/9 | | {pct(m.get('hard_fraction'))} |")
    lines += ["", "Goals: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in result["summary"]["goals_met"].items()), ""]
    if "hard_same_group" in m:
        lines += [f"Judged hard anomalies of the normal class's own group (tops or footwear; "
                  f"the normal class left out): {pct(m['hard_same_group'])} on average, easy ones {pct(m['easy_same_group'])}. "
                  "Per class, hard / easy: " + ", ".join(f"{r['name']} {pct(r['hard_same_group'])} / {pct(r['easy_same_group'])}"
                                                        for r in result["classes"] if r["hard_same_group"] is not None or r["easy_same_group"] is not None) + ".", ""]
    sweep = result["summary"].get("image_rule_sweep") or {}
    if sweep:
        lines += ["The image rule at other quantiles of the held-out normals' Eq. 1 scores (the other rules as run; "
                  "hard shares only for quantiles stricter than the run's, whose kept sets the evaluator split):", "",
                  "| image quantile | kept share | normal_leak | largest excess over the judge | hard fraction | extra drops (hard) |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for q, x in sweep.items():
            extra = f"{x['extra_dropped']} ({x['extra_dropped_hard']})" if x["hard_fraction"] is not None else "-"
            lines.append(f"| {q} | {pct(x['kept_share'])} | {pct(x['normal_leak'])} | {pct(x['max_leak_above_judge'])} | "
                         f"{pct(x['hard_fraction'])} | {extra} |")
        lines.append("")
    lines += ["Judged classes of the kept set:", ""]
    for r in result["classes"]:
        hist = ", ".join(f"{k} {v}" for k, v in sorted(r["judged_kept"].items(), key=lambda kv: -kv[1]))
        lines.append(f"- {r['name']}: {hist}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="config overrides (key.sub=value) for every class")
    parser.add_argument("--classes", default="0,1,2,3,4,5,6,7,8,9")
    parser.add_argument("--root", default="runs/anomaly_audit", help="run directories go under ROOT/TAG/")
    parser.add_argument("--tag", default="default", help="names the result file and the run directories")
    parser.add_argument("--no-evaluate", action="store_true", help="skip the confusion evaluator (no hard/easy split)")
    parser.add_argument("--from-results", action="store_true",
                        help="recompute the summary and Markdown of the saved results of --tag; run nothing")
    args = parser.parse_args(argv)
    suffix = "" if args.tag == "default" else f"_{args.tag}"
    if args.from_results:
        result = json.loads((RESULTS / f"anomaly_audit{suffix}.json").read_text())
        result["summary"] = summarise(result["classes"])
        (RESULTS / f"anomaly_audit{suffix}.json").write_text(json.dumps(result, indent=1) + "\n")
        (RESULTS / f"anomaly_audit{suffix}.md").write_text(markdown(result))
        print(markdown(result))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name in ("ray", "ray.data", "ray.train", "filelock"):
        logging.getLogger(name).setLevel(logging.WARNING)
    root = Path(args.root) / args.tag
    records = []
    t0 = time.perf_counter()
    for c in [int(x) for x in args.classes.split(",")]:
        run_dir = run_class(c, root, args.overrides, evaluate=not args.no_evaluate)
        records.append(class_record(c, run_dir))
        r = records[-1]
        logger.info("class %d (%s): kept %d of %d, normal_leak %.3f (judge %.3f), coverage %d", c, r["name"], r["kept"],
                    r["generated"], r["normal_leak"] or 0.0, r["judge_false_normal_rate"], r["coverage"])
    result = {"tag": args.tag, "overrides": args.overrides, "classes": records, "summary": summarise(records),
              "wall_seconds": round(time.perf_counter() - t0, 1), "machine": machine()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"anomaly_audit{suffix}.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / f"anomaly_audit{suffix}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
