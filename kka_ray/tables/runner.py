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
from pathlib import Path
from typing import Any

from kka_ray.config import ConfigError
from kka_ray.data.store import write_json_atomic
from kka_ray.detectors.registry import DETECTORS, TAKES_ANOMALIES, input_kind, placement_section, settings_of
from kka_ray.detectors.runner import fit_and_score
from kka_ray.rundir import RunInputs, RunLayout, require_run_dir

logger = logging.getLogger(__name__)

DEFAULT_SEEDS = 3


EVAL_OVERRIDABLE = ("detector.", "run.device=", "ray.")
PLACEMENT_FIELDS = ("use_gpu", "resources_per_worker")
# How a fit runs, left out of the hash altogether (added after results were cached under it).
HOW_NOT_WHAT = ("in_process",)


def settings_hash(section, name: str) -> str:
    """A short hash of the settings detector ``name`` trains with, so cached results of other
    settings are never mistaken for these."""
    import hashlib

    from kka_ray.config import DeepSADSection

    dump = section.model_dump(mode="json")
    common = {k: dump[k] for k in ("validation_fraction", "threshold", "quantile")}
    own = settings_of(name, section)
    # Where the fit runs is not a setting: a result computed on a GPU answers for the same
    # settings on CPU. These fields are hashed as their defaults so both share one cache key.
    defaults = DeepSADSection().model_dump(mode="json")  # every trained section has the same defaults
    own = {**own, **{k: defaults[k] for k in PLACEMENT_FIELDS if k in own}}
    own = {k: v for k, v in own.items() if k not in HOW_NOT_WHAT}
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
    return load_config(RunLayout(require_run_dir(run_dir)).config, overrides or [])


def device_label(cfg, name: str) -> str:
    """Where detector ``name``'s fit ran: ``cpu``, or the GPU's name for Ray Train workers with one."""
    from kka_ray.devices import resolve_device

    placed = placement_section(name, cfg.detector)
    if placed is None:  # fitted by the driver itself
        gpu = resolve_device(cfg.run.device).startswith("cuda")
    else:
        gpu = placed.use_gpu
    if not gpu:
        return "cpu"
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "gpu"


def trained_sections() -> list[str]:
    """Override prefixes (under ``detector.``) of the sections that train on Ray Train, i.e. have
    ``use_gpu``: the detector section itself (Deep SAD, CMDA) and its sub-sections."""
    from kka_ray.config import DetectorSection

    section, prefixes = DetectorSection(), []
    for name, spec in DETECTORS.items():
        placed = placement_section(name, section)
        if placed is not None:
            prefix = "" if placed is section else f"{spec.section}."
            prefixes += [] if prefix in prefixes else [prefix]
    return prefixes


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
