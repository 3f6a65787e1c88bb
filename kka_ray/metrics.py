"""Detection metrics (AUROC, AUPR, FPR at 95 % TPR) and per-stage cost accounting.

Scores follow the PyOD convention (higher = more anomalous); targets are 0 normal, 1 anomaly,
as in method.md step 10 (sklearn's ``roc_auc_score``). Each stage's wall seconds and
resource-seconds (declared CPUs/GPUs x wall) are recorded so a price table can turn a run into
cost per anomaly and cost per hard anomaly.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def detection_metrics(targets: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """AUROC, AUPR (anomaly = positive) and FPR at 95 % TPR."""
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    targets = np.asarray(targets).astype(int)
    scores = np.asarray(scores, dtype=np.float64)
    if targets.shape != scores.shape:
        raise ValueError(f"targets {targets.shape} and scores {scores.shape} differ in shape")
    if len(np.unique(targets)) != 2:
        raise ValueError("detection metrics need both normal (0) and anomalous (1) targets")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{int((~np.isfinite(scores)).sum())} scores are not finite")
    fpr, tpr, _ = roc_curve(targets, scores)
    fpr95 = float(fpr[np.searchsorted(tpr, 0.95, side="left")])
    return {
        "auroc": float(roc_auc_score(targets, scores)),
        "aupr": float(average_precision_score(targets, scores)),
        "fpr95": fpr95,
    }


def _accelerator(resources: dict[str, float]) -> str | None:
    """The accelerator type a role asks Ray for (``accelerator_type:H100`` in its resources)."""
    for key in resources:
        if key.startswith("accelerator_type:"):
            return key.split(":", 1)[1]
    return None


def stage_holdings(cfg: Any, stage: str) -> list[tuple[float, float, str | None]]:
    """What a stage of the loop holds, role by role: (CPUs, GPUs, accelerator type or None),
    from the roles' declared Ray resources."""
    if stage == "generate":
        return [(r.num_cpus * r.replicas, r.num_gpus * r.replicas, _accelerator(r.resources))
                for r in (cfg.describer.resources, cfg.drawer.resources)]
    if stage in ("evaluate", "detect"):
        # the detector's own section (SimpleNet, ReContrast); Deep SAD's fields sit on the detector itself
        sec = cfg.evaluator if stage == "evaluate" else getattr(cfg.detector, cfg.detector.name, cfg.detector)
        if not hasattr(sec, "num_workers"):  # SSD: no Ray Train run, the driver scores it
            return [(1.0, 0.0, None)]
        rpw = sec.resources_per_worker
        return [(sec.num_workers * rpw.get("CPU", 1.0), sec.num_workers * (rpw.get("GPU", 1.0) if sec.use_gpu else 0.0),
                 _accelerator(rpw))]
    if stage == "guard":  # the feature-extractor pool; the guard's rules run on the driver
        k = cfg.knowledge.resources
        return [(k.num_cpus * k.replicas, k.num_gpus * k.replicas, _accelerator(k.resources))]
    if stage == "preference":  # one task, or num_workers Ray Train workers each holding `resources`
        r, n = cfg.preference.resources, cfg.preference.num_workers
        return [(n * r.num_cpus, n * r.num_gpus, _accelerator(r.resources))]
    return [(1.0, 0.0, None)]  # driver-side stages (prep, baselines, audit, update)


def stage_resources(cfg: Any, stage: str) -> tuple[float, float]:
    """(CPUs, GPUs) a stage of the loop holds, from the roles' declared Ray resources."""
    held = stage_holdings(cfg, stage)
    return sum(h[0] for h in held), sum(h[1] for h in held)


def stage_money(cfg: Any, stage: str, seconds: float | None, prices: Any) -> float:
    """What ``seconds`` of ``stage`` cost at ``prices`` (a CostSection): each role's CPUs at the
    CPU price, its GPUs at its accelerator type's price (or the generic GPU price)."""
    per_hour = sum(c * prices.cpu_per_hour + g * prices.gpu_price(acc) for c, g, acc in stage_holdings(cfg, stage))
    return per_hour * (seconds or 0.0) / 3600.0


def resource_seconds(cfg: Any, stage_seconds: dict[str, float | None]) -> dict[str, float]:
    """CPU- and GPU-seconds of a set of stages: declared resources x wall seconds."""
    cpu = gpu = 0.0
    for stage, sec in stage_seconds.items():
        c, g = stage_resources(cfg, stage)
        cpu += c * (sec or 0.0)
        gpu += g * (sec or 0.0)
    return {"cpu": round(cpu, 3), "gpu": round(gpu, 3)}


def cost_per_anomaly(resource_seconds: dict[str, float], prices_per_hour: dict[str, float],
                     n_anomalies: int, n_hard: int) -> dict[str, float | None]:
    """Turn resource-seconds (e.g. {"cpu": s, "gpu": s}) into cost per (hard) anomaly."""
    total = sum(resource_seconds.get(k, 0.0) / 3600.0 * p for k, p in prices_per_hour.items())
    return {
        "cost": total,
        "cost_per_anomaly": total / n_anomalies if n_anomalies else None,
        "cost_per_hard_anomaly": total / n_hard if n_hard else None,
    }
