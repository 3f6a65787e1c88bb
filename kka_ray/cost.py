"""What a run cost: resource-seconds and money by stage, per kept and per hard anomaly.

A stage's resource-seconds are the Ray resources its roles declare times its wall seconds
(kka_ray/metrics.py); money is those at the ``cost`` section's prices per hour (CPU, GPU, or the
GPU's accelerator type). ``kka cost RUN [RUN ...]`` puts finished (or partial) runs side by side,
and ``--prices FILE`` reprices them without rerunning: the file is a YAML mapping of the ``cost``
section's fields (``cpu_per_hour``, ``gpu_per_hour``, ``accelerators``, ``currency``), at the top
level or under ``cost:``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from kka_ray.rundir import RunLayout, is_run_dir, require_run_dir
from pathlib import Path
from typing import Any

STAGE_ORDER = ("prep", "baselines", "generate", "guard", "evaluate", "audit", "update", "detect", "preference")


def load_prices(path: str | Path | None, base: Any = None) -> Any:
    """The ``cost`` section from ``path`` (over ``base``, a CostSection, or the defaults)."""

    from kka_ray.config import ConfigError, CostSection, load_yaml_mapping

    if path is None:
        return base if base is not None else CostSection()
    data = load_yaml_mapping(path, "--prices", "a YAML mapping of cpu_per_hour, gpu_per_hour, accelerators, currency")
    data = data.get("cost", data)
    merged = {**(base.model_dump() if base is not None else {}), **data}
    try:
        return CostSection.model_validate(merged)
    except Exception as err:  # pydantic's ValidationError: name the field
        from pydantic import ValidationError

        if isinstance(err, ValidationError):
            e = err.errors()[0]
            raise ConfigError(f"--prices {path}: field '{'.'.join(map(str, e['loc']))}': {e['msg']}") from None
        raise


def stage_costs(cfg: Any, stage_seconds: dict[str, float | None], prices: Any) -> dict[str, dict[str, float]]:
    """Per stage kind: wall seconds, CPU- and GPU-seconds and money (summed over iterations)."""
    from kka_ray.metrics import stage_money, stage_resources

    out: dict[str, dict[str, float]] = {}
    for name, sec in stage_seconds.items():
        kind = name.split(".")[-1]
        c, g = stage_resources(cfg, kind)
        d = out.setdefault(kind, {"seconds": 0.0, "cpu_seconds": 0.0, "gpu_seconds": 0.0, "money": 0.0})
        d["seconds"] += sec or 0.0
        d["cpu_seconds"] += c * (sec or 0.0)
        d["gpu_seconds"] += g * (sec or 0.0)
        d["money"] += stage_money(cfg, kind, sec, prices)
    return {k: out[k] for k in sorted(out, key=lambda k: STAGE_ORDER.index(k) if k in STAGE_ORDER else len(STAGE_ORDER))}


def iteration_cost(cfg: Any, stage_seconds: dict[str, float | None], n_kept: int, n_hard: int) -> dict[str, Any]:
    """One iteration's money (metrics.jsonl): total, by stage, per kept and per hard anomaly."""
    by_stage = stage_costs(cfg, stage_seconds, cfg.cost)
    total = sum(d["money"] for d in by_stage.values())
    return {"currency": cfg.cost.currency, "cost": total,
            "cost_by_stage": {k: round(d["money"], 6) for k, d in by_stage.items()},
            "cost_per_anomaly": total / n_kept if n_kept else None,
            "cost_per_hard_anomaly": total / n_hard if n_hard else None}


def run_costs(run_dir: str | Path, prices: Any = None) -> dict[str, Any]:
    """A run's cost summary from its stage records and metrics, at ``prices`` (default: the
    prices in the run's own config)."""
    from kka_ray.config import load_config

    run_dir = Path(run_dir)
    layout = RunLayout(require_run_dir(run_dir))
    cfg = load_config(layout.config)
    prices = prices if prices is not None else cfg.cost
    seconds = {p.stem: float(json.loads(p.read_text()).get("wall_seconds") or 0.0)
               for p in sorted(layout.stages.glob("*.json"))}
    metrics_path = layout.metrics
    metrics = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()] if metrics_path.is_file() else []
    kept, hard = sum(int(m.get("n_kept") or 0) for m in metrics), sum(int(m.get("n_hard") or 0) for m in metrics)
    stages = stage_costs(cfg, seconds, prices)
    cpu = sum(d["cpu_seconds"] for d in stages.values())
    gpu = sum(d["gpu_seconds"] for d in stages.values())
    money = sum(d["money"] for d in stages.values())
    per = lambda v, n: v / n if n else None  # noqa: E731
    return {
        "run": run_dir.name, "path": str(run_dir), "iterations": len(metrics), "kept": kept, "hard": hard,
        "wall_seconds": sum(seconds.values()), "cpu_seconds": cpu, "gpu_seconds": gpu,
        "money": money, "currency": prices.currency,
        "money_per_anomaly": per(money, kept), "money_per_hard_anomaly": per(money, hard),
        "cpu_seconds_per_anomaly": per(cpu, kept), "cpu_seconds_per_hard_anomaly": per(cpu, hard),
        "gpu_seconds_per_anomaly": per(gpu, kept), "gpu_seconds_per_hard_anomaly": per(gpu, hard),
        "stages": stages,
        "prices": {"cpu_per_hour": prices.cpu_per_hour, "gpu_per_hour": prices.gpu_per_hour,
                   "accelerators": dict(prices.accelerators)},
    }


SUMMARY_COLUMNS = ("run", "iterations", "kept", "hard", "wall_seconds", "cpu_seconds", "gpu_seconds", "money",
                   "money_per_anomaly", "money_per_hard_anomaly", "cpu_seconds_per_hard_anomaly",
                   "gpu_seconds_per_hard_anomaly")
STAGE_COLUMNS = ("run", "stage", "seconds", "cpu_seconds", "gpu_seconds", "money")


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1 else f"{v:,.2f}" if abs(v) < 1e6 else f"{v:.3e}"
    return str(v)


def _stage_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"run": r["run"], "stage": k, **d} for r in rows for k, d in r["stages"].items()]


def cost_markdown(rows: list[dict[str, Any]]) -> str:
    currency = ", ".join(sorted({r["currency"] for r in rows}))
    lines = [f"Money in {currency}; resource-seconds are declared Ray resources x wall seconds.", "",
             "| " + " | ".join(SUMMARY_COLUMNS) + " |", "|" + " --- |" * len(SUMMARY_COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in SUMMARY_COLUMNS) + " |" for r in rows]
    lines += ["", "By stage:", "", "| " + " | ".join(STAGE_COLUMNS) + " |", "|" + " --- |" * len(STAGE_COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in STAGE_COLUMNS) + " |" for r in _stage_rows(rows)]
    return "\n".join(lines)


def cost_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    stage_kinds = list(dict.fromkeys(k for r in rows for k in r["stages"]))
    cols = [*SUMMARY_COLUMNS, "currency", *(f"money_{k}" for k in stage_kinds), *(f"seconds_{k}" for k in stage_kinds)]
    w = csv.writer(buf)
    w.writerow(cols)
    for r in rows:
        flat = {**r, **{f"money_{k}": d["money"] for k, d in r["stages"].items()},
                **{f"seconds_{k}": d["seconds"] for k, d in r["stages"].items()}}
        w.writerow(["" if flat.get(c) is None else flat.get(c) for c in cols])
    return buf.getvalue()


def add_parser(sub: Any) -> None:
    p = sub.add_parser("cost", help="side-by-side cost of runs: anomalies kept and hard, resource-seconds and "
                       "money by stage, cost per anomaly and per hard anomaly")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    p.add_argument("--prices", help="YAML of cost fields (cpu_per_hour, gpu_per_hour, accelerators, currency) to "
                   "reprice the runs with (default: each run's own cost section)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--csv", action="store_true", help="CSV, one row per run, money and seconds by stage as columns")
    fmt.add_argument("--json", action="store_true", help="JSON, everything")


def cost_main(args: argparse.Namespace) -> int:
    from kka_ray.config import load_config

    rows = []
    for run in args.runs:
        base = load_config(RunLayout(run).config).cost if is_run_dir(run) else None
        rows.append(run_costs(run, load_prices(args.prices, base) if args.prices else None))
    if args.json:
        print(json.dumps(rows, indent=1))
    elif args.csv:
        print(cost_csv(rows), end="")
    else:
        print(cost_markdown(rows))
    return 0
