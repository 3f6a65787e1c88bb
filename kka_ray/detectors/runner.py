"""Fit one detector on a run's normals and anomaly set, and score it on the test split: what the
loop's ``baselines`` and ``detect`` stages and the paper's tables (kka_ray/tables) all run.

The anomaly set after iteration k is split by a hash of each id (``split_members``) into
training anomalies and validation anomalies; the checkpoint is chosen on the validation split
(held-out normals plus those anomalies, never test) and the threshold on held-out normals. The
last epoch's metrics are reported beside the chosen one's.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from kka_ray.detectors.base import DetectorContext, Validation
from kka_ray.detectors.registry import build_detector, input_kind
from kka_ray.metrics import detection_metrics
from kka_ray.rundir import RunInputs, split_members


def detector_context(inputs: RunInputs, storage: Path, seed: int) -> DetectorContext:
    from kka_ray.devices import resolve_device

    cfg = inputs.cfg
    return DetectorContext(storage_path=str(storage), cache_dir=str(cfg.paths.cache_dir()),
                           backbone=cfg.knowledge.backbone, image_size=cfg.knowledge.image_size,
                           device=resolve_device(cfg.run.device), seed=seed)


def fit_and_score(inputs: RunInputs, name: str, iteration: int, seed: int, save_dir: Path | None = None,
                  storage: Path | None = None) -> dict[str, Any]:
    """Fit detector ``name`` on normals + the anomaly set after ``iteration`` (0: none) and score test."""
    section = inputs.cfg.detector
    kind = input_kind(name)
    start, decode_errors = time.perf_counter(), inputs.decode_errors
    members = inputs.members(iteration) if iteration > 0 else []
    train_m, val_m = split_members(members, section.validation_fraction)
    anomalies = inputs.anomalies(train_m, kind) if train_m else None
    val_anomalies = inputs.anomalies(val_m, kind) if val_m else None
    holdout = inputs.normal(kind, "holdout")
    run_name = f"{name}_it{iteration}_s{seed}"
    storage = storage if storage is not None else inputs.dir / "eval" / "ray_train"
    shutil.rmtree(storage / run_name, ignore_errors=True)  # an interrupted fit restarts clean
    split = inputs.split
    det = build_detector(name, section, detector_context(inputs, storage, seed),
                         normal_texts=[caps[0] if caps else "" for caps in split.train.captions],
                         class_names=list(split.normal_class_names))
    det.fit(inputs.normal(kind, "train"), anomalies, Validation(holdout, val_anomalies), name=run_name)
    threshold = det.set_threshold(holdout, section.threshold, section.quantile)
    test = inputs.normal(kind, "test")
    targets = inputs.test_targets
    scores = det.decision_function(test)
    metrics = detection_metrics(targets, scores)
    last = detection_metrics(targets, det.decision_function(test, which="last") if det.has_distinct_last else scores)
    pred = scores > threshold
    if save_dir is not None:
        det.save(save_dir)
    return {
        **metrics,
        "auroc_last": last["auroc"], "aupr_last": last["aupr"], "fpr95_last": last["fpr95"],
        "threshold": threshold,
        "tpr_at_threshold": float(pred[targets == 1].mean()), "fpr_at_threshold": float(pred[targets == 0].mean()),
        "n_anomalies_train": 0 if anomalies is None else int(len(anomalies)),
        "n_anomalies_val": 0 if val_anomalies is None else int(len(val_anomalies)),
        "n_anomaly_set": len(members), "decode_errors": inputs.decode_errors - decode_errors,
        "fit_info": det.fit_info_, "seconds": round(time.perf_counter() - start, 3),
    }
