"""Train and score detectors on a run's anomaly sets: the rows of the KKA paper's tables.

For a run directory and a detector, :func:`evaluate_run` fits

- variant ``none``: normals only (iteration 0), and
- variant ``kka_<mode>`` (``kka_add`` / ``kka_rep``, the run's ``run.mode``): normals plus the
  anomaly set after each completed iteration k (the KKA(0..k) ablation),

for each detector seed, and scores the test split. Checkpoints are chosen on the validation
split (held-out normals plus a hash-chosen share of the anomaly set, never test) and the
threshold on held-out normals; the last epoch's AUROC is reported beside the chosen one.
Without generated anomalies there is nothing to validate against, so the last epoch is used.

Each result is written to ``<run>/eval/results/<detector>__<variant>__it<k>__s<seed>.json``
before the next fit starts, so an interrupted evaluation resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from kka_ray.config import ConfigError
from kka_ray.data.store import write_json_atomic
from kka_ray.detectors.base import DetectorContext, Validation
from kka_ray.detectors.registry import TAKES_ANOMALIES, build_detector, input_kind
from kka_ray.evaluation.inputs import RunInputs, split_members
from kka_ray.metrics import detection_metrics

logger = logging.getLogger(__name__)

DEFAULT_SEEDS = 3


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


EVAL_OVERRIDABLE = ("detector.", "run.device=", "ray.")
PLACEMENT_FIELDS = ("use_gpu", "resources_per_worker")


def settings_hash(section, name: str) -> str:
    """A short hash of the settings detector ``name`` trains with, so cached results of other
    settings are never mistaken for these."""
    import hashlib

    from kka_ray.config import DeepSADSection

    dump = section.model_dump(mode="json")
    common = {k: dump[k] for k in ("validation_fraction", "threshold", "quantile")}
    sad = {k: dump[k] for k in DeepSADSection.model_fields}
    own = {"sad": sad, "cmda": {**sad, "cmda": dump["cmda"]}}.get(name, dump.get(name, {}))
    # Where the fit runs is not a setting: a result computed on a GPU answers for the same
    # settings on CPU. These fields are hashed as their defaults so both share one cache key.
    defaults = DeepSADSection().model_dump(mode="json")  # every trained section has the same defaults
    own = {**own, **{k: defaults[k] for k in PLACEMENT_FIELDS if k in own}}
    return hashlib.sha1(json.dumps([common, own], sort_keys=True).encode()).hexdigest()[:8]


def result_path(out_dir: Path, detector: str, variant: str, iteration: int, seed: int, settings: str) -> Path:
    """Where one fit's result row is cached (``<run>/eval/results/``)."""
    return Path(out_dir) / f"{detector}__{variant}__it{iteration}__s{seed}__{settings}.json"


def variant_of(inputs: RunInputs, iteration: int) -> str:
    return "none" if iteration == 0 else f"kka_{inputs.cfg.run.mode}"


def evaluate_run(run_dir: str | Path, detectors: list[str], seeds: int = DEFAULT_SEEDS,
                 iterations: str = "all", include_none: bool = True,
                 overrides: list[str] | None = None) -> list[dict[str, Any]]:
    """Result rows for ``detectors`` x (none, kka per iteration) x ``seeds`` on one run (cached).

    ``include_none=False`` skips the no-anomaly rows (another run of the same split has them),
    so a detector that takes no anomalies (CMDA) gets no rows at all.
    ``overrides`` (``detector.<...>=value``) change the detectors' settings from the run's own."""
    inputs = RunInputs(run_dir, cfg=run_config(run_dir, overrides))
    done = inputs.completed_iterations()
    if iterations not in ("all", "last"):
        raise ConfigError(f"iterations must be 'all' or 'last', got {iterations!r}")
    kka_iters = done if iterations == "all" else done[-1:]
    if not done:
        logger.warning("%s has no completed iteration: only the no-anomaly rows can be evaluated", inputs.dir)
    out_dir = inputs.dir / "eval" / "results"
    base_seed = inputs.cfg.run.seed
    split = inputs.split
    rows = []
    for name in detectors:
        input_kind(name)
        its = ([0] if include_none else []) + (kka_iters if name in TAKES_ANOMALIES else [])
        for k in its:
            for s in range(seeds):
                seed = base_seed * 1000 + s
                tag = settings_hash(inputs.cfg.detector, name)
                path = result_path(out_dir, name, variant_of(inputs, k), k, seed, tag)
                if path.is_file():
                    rows.append(json.loads(path.read_text()))
                    continue
                logger.info("evaluating %s on %s, iteration %d, seed %d", name, inputs.dir.name, k, seed)
                result = fit_and_score(inputs, name, k, seed)
                row = {"run": str(inputs.dir), "split": split.name, "dataset": inputs.cfg.data.dataset,
                       "normal_classes": list(split.normal_class_names), "mode": inputs.cfg.run.mode,
                       "detector": name, "variant": variant_of(inputs, k), "iteration": k, "seed": seed,
                       "settings": tag, "device": device_label(inputs.cfg, name),
                       "n_generated": inputs.n_generated(k), "set_digest": inputs.set_digest(k), **result}
                write_json_atomic(row, path)
                rows.append(row)
    return rows


def run_config(run_dir: str | Path, overrides: list[str] | None = None):
    """A run's own config with evaluation overrides: ``detector.*`` (the detectors' settings),
    ``run.device`` and ``ray.*`` (where evaluation runs); the rest of a run is fixed."""
    from kka_ray.config import load_config

    bad = [o for o in overrides or [] if not o.startswith(EVAL_OVERRIDABLE)]
    if bad:
        raise ConfigError(f"evaluation overrides may only change detector.*, run.device or ray.* "
                          f"(the rest of a run is fixed), got {bad}")
    return load_config(Path(run_dir) / "config.yaml", overrides or [])


def device_label(cfg, name: str) -> str:
    """Where detector ``name``'s fit ran: ``cpu``, or the GPU's name for Ray Train workers with one."""
    from kka_ray.devices import resolve_device

    if name == "ssd":  # fitted by the driver itself
        gpu = resolve_device(cfg.run.device).startswith("cuda")
    else:
        gpu = (cfg.detector if name in ("sad", "cmda") else getattr(cfg.detector, name)).use_gpu
    if not gpu:
        return "cpu"
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "gpu"


def trained_sections() -> list[str]:
    """Override prefixes (under ``detector.``) of the sections that train on Ray Train, i.e. have
    ``use_gpu``: the detector section itself (Deep SAD, CMDA) and its sub-sections."""
    from pydantic import BaseModel

    from kka_ray.config import DetectorSection

    fields = DetectorSection.model_fields
    subs = [name for name, f in fields.items()
            if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel) and "use_gpu" in f.annotation.model_fields]
    return ([""] if "use_gpu" in fields else []) + [f"{name}." for name in subs]


def device_overrides(device: str) -> list[str]:
    """``kka eval --device``: where the driver extracts and scores, and, for ``cuda``, a GPU for
    every detector's Ray Train workers."""
    gpu = "true" if device.startswith("cuda") else "false"
    return [f"run.device={device}", *(f"detector.{s}use_gpu={gpu}" for s in trained_sections())]


def cached_rows(run_dir: str | Path, detectors: list[str], overrides: list[str] | None = None) -> list[dict[str, Any]]:
    """The cached result rows of a run for ``detectors`` at the settings the overrides give
    (what ``kka eval --no-fit`` tabulates)."""
    out = Path(run_dir) / "eval" / "results"
    if not out.is_dir():
        return []
    section = run_config(run_dir, overrides).detector
    tags = {d: settings_hash(section, d) for d in detectors}
    rows = (json.loads(p.read_text()) for p in sorted(out.glob("*.json")))
    return [r for r in rows if r["detector"] in tags and r.get("settings") == tags[r["detector"]]]
