"""Algorithm 1 of KKA (arXiv 2502.14880): the whole loop of one run, stage by stage, on Ray.

    prep        normal features (f), Eq. 1 scores, Eq. 2 representative descriptions, prompts
    baselines   SSD and Deep SAD without generated anomalies, scored once on the test split
    for k in 1..iterations:
      generate    Eq. 3/8 + Eq. 4 through Ray Data with the resident describer/drawer pools
      evaluate    Eq. 5 Deep SAD confusion evaluator (Ray Train) on D_n + D_a + new; Eq. 6 split
      update      D_a <- add | rep (method.md step 9)
      detect      the detector (Deep SAD as SAD) on D_n + D_a, AUROC on the test split
      preference  Eq. 7 pairs -> DPO with LoRA (a Ray task) -> adapter k -> resident describer

Every stage writes its outputs atomically and is then recorded in ``state.json``; ``resume``
skips recorded stages, so a crash or a kill loses at most the stage in flight. Nothing is
selected on the test split: thresholds come from held-out normals.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from kka_ray.config import ConfigError, KKAConfig, load_config
from kka_ray.data.store import (
    AnomalyStore, Member, save_anomaly_set, update_anomaly_set, write_json_atomic,
)
from kka_ray.evaluation.inputs import RunInputs
from kka_ray.metrics import resource_seconds

logger = logging.getLogger(__name__)

ITERATION_STAGES = ("generate", "evaluate", "update", "detect", "preference")


def relative_hardness(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Relabel rows by rank: the closest third is "hard", the farthest third "easy" (rest dropped)."""
    ranked = sorted(rows, key=lambda r: r["distance"])
    third = max(1, len(ranked) // 3)
    return [{**r, "is_hard": True} for r in ranked[:third]] + [{**r, "is_hard": False} for r in ranked[-third:]]


class RunState:
    """Which stages of a run are complete (``state.json``), written atomically."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "state.json"
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() else {
            "completed": [], "adapter_version": 0, "adapter_path": None, "finished": False,
        }

    def done(self, stage: str) -> bool:
        return stage in self.data["completed"]

    def mark(self, stage: str, **fields: Any) -> None:
        if stage not in self.data["completed"]:
            self.data["completed"].append(stage)
        self.data.update(fields)
        write_json_atomic(self.data, self.path)


def new_run_dir(cfg: KKAConfig, output: str | None) -> Path:
    if output:
        return Path(output)
    if cfg.run.output_dir:
        return Path(cfg.run.output_dir)
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


def init_ray(cfg: KKAConfig) -> bool:
    """Join the configured cluster or start a local one; returns True if this call started Ray."""
    import ray

    if ray.is_initialized():
        return False
    level = getattr(logging, cfg.run.log_level)
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=level, log_to_driver=level <= logging.INFO)
    else:
        # "local": a fresh cluster of this config's size, even when `ray start` left one running
        # on this machine (ray.init() would join that one instead).
        ray.init(
            address="local",
            num_cpus=cfg.ray.num_cpus,
            include_dashboard=cfg.ray.include_dashboard,
            dashboard_host=cfg.ray.dashboard_host,
            object_store_memory=cfg.ray.object_store_memory,
            logging_level=level,
            log_to_driver=level <= logging.INFO,
        )
    # Ray Data re-reads its log level from the environment whenever it configures its loggers.
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", logging.getLevelName(level))
    import ray.data

    for name in ("ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(level)
    ctx = ray.data.DataContext.get_current()
    # Off a terminal Ray Data turns bars into periodic log lines: keep those quiet.
    ctx.enable_progress_bars = cfg.run.progress and sys.stderr.isatty()
    ctx.print_on_execution_start = False
    return True


class KKARun:
    """One KKA run: its directory, config, state, and the resident generator pools."""

    def __init__(self, cfg: KKAConfig, run_dir: Path):
        self.cfg = cfg
        self.dir = Path(run_dir).resolve()
        self.name = self.dir.name
        self.state = RunState(self.dir)
        self.store = AnomalyStore(self.dir / "anomalies")
        self.pools = None
        self._inputs: RunInputs | None = None
        # called with a stage's name once it is recorded (kka_ray/storage.py uploads the run there)
        self.on_stage_done = None

    # ------------------------------------------------------------------ entry points
    @classmethod
    def create(cls, cfg: KKAConfig, output: str | None = None) -> "KKARun":
        run_dir = new_run_dir(cfg, output)
        if (run_dir / "state.json").is_file():
            raise FileExistsError(f"{run_dir} already holds a run: use `kka run --resume {run_dir}` or another --output")
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        return cls(cfg, run_dir)

    @classmethod
    def resume(cls, run_dir: str | os.PathLike) -> "KKARun":
        run_dir = Path(run_dir)
        if not (run_dir / "config.yaml").is_file():
            raise FileNotFoundError(f"{run_dir} has no config.yaml: it is not a kka run directory")
        return cls(load_config(run_dir / "config.yaml"), run_dir)

    @contextlib.contextmanager
    def _session(self, total: int, done: int = 0):
        """Models checked, Ray joined or started, a progress bar; pools and Ray released after."""
        from tqdm.auto import tqdm

        from kka_ray.prepare import ensure_default_models

        ensure_default_models(self.cfg)
        started = init_ray(self.cfg)
        bar = tqdm(total=total, initial=done, desc="kka", disable=not self.cfg.run.progress, unit="stage")
        try:
            yield bar
        finally:
            bar.close()
            if self.pools is not None:
                self.pools.shutdown()
                self.pools = None
            if started:
                import ray

                ray.shutdown()

    def execute(self) -> Path:
        """Run (or continue) every stage not yet complete; returns the run directory."""
        cfg = self.cfg
        total = 2 + cfg.run.iterations * len(ITERATION_STAGES)
        done = len([s for s in self.state.data["completed"] if s in ("prep", "baselines") or s.startswith("iter")])
        with self._session(total, done) as bar:
            self._stage("prep", self.prep, bar)
            self._stage("baselines", self.baselines, bar)
            for k in range(1, cfg.run.iterations + 1):
                for stage in ITERATION_STAGES:
                    self._stage(f"iter{k}.{stage}", lambda k=k, s=stage: getattr(self, s)(k), bar)
                self._write_metrics()
            self.state.mark("finished", finished=True)
            from kka_ray.report import write_report

            write_report(self.dir)
        return self.dir

    def execute_stages(self, names: list[str]) -> Path:
        """Run only the named stages, in order, skipping completed ones; returns the run directory.

        For jobs that do one part of a run (jobs/generate.py: ``["prep", "iter1.generate"]``;
        jobs/preference.py: ``["iterK.preference"]``); the caller checks that their inputs exist.
        ``kka run --resume`` continues such a run with the stages still missing.
        """
        fns = {}
        for name in names:
            it, _, stage = name.partition(".")
            if name in ("prep", "baselines"):
                fns[name] = getattr(self, name)
            elif it.startswith("iter") and it[4:].isdigit() and stage in ITERATION_STAGES:
                fns[name] = lambda k=int(it[4:]), s=stage: getattr(self, s)(k)
            else:
                raise ConfigError(f"unknown stage {name!r}: prep, baselines or iter<k>.<{'|'.join(ITERATION_STAGES)}>")
        with self._session(len(names)) as bar:
            for name in names:
                self._stage(name, fns[name], bar)
            self._write_metrics()
        return self.dir

    def _stage(self, name: str, fn, bar) -> None:
        if self.state.done(name):
            return
        bar.set_postfix_str(name)
        start = time.perf_counter()
        result = fn() or {}
        result["wall_seconds"] = round(time.perf_counter() - start, 3)
        write_json_atomic(result, self.dir / "stages" / f"{name}.json")
        self.state.mark(name)
        if self.on_stage_done is not None:
            self.on_stage_done(name)
        bar.update(1)
        logger.info("stage %s done in %.1f s", name, result["wall_seconds"])

    def stage_result(self, name: str) -> dict[str, Any]:
        path = self.dir / "stages" / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    # ------------------------------------------------------------------ shared data
    def inputs(self) -> RunInputs:
        """The run's split, prep features and anomaly rows, read once and shared by every stage."""
        if self._inputs is None:
            self._inputs = RunInputs(self.dir, cfg=self.cfg)
        return self._inputs

    @property
    def split(self):
        return self.inputs().split

    def features(self) -> dict[str, np.ndarray]:
        """Normalised backbone features of train / holdout / test normals (computed in prep)."""
        return self.inputs().features()

    def normalizer(self):
        return self.inputs().normalizer()

    def ensure_pools(self):
        if self.pools is None:
            from kka_ray.generation.pipeline import ResidentPools

            images = self.split.train.images
            mode = "L" if images.ndim == 3 else "RGB"
            self.pools = ResidentPools.start(self.cfg, target_size=int(images.shape[1]), target_mode=mode)
            if self.state.data.get("adapter_path"):
                self.pools.load_adapter(self.state.data["adapter_path"], int(self.state.data["adapter_version"]))
        return self.pools

    # ------------------------------------------------------------------ stages
    def prep(self) -> dict[str, Any]:
        """Normal features, Eq. 1 scores, Eq. 2 representatives and the prompts."""
        from safetensors.numpy import save_file

        from kka_ray.knowledge.features import FeatureNormalizer, extractor_for
        from kka_ray.knowledge.mahalanobis import MahalanobisScorer
        from kka_ray.knowledge.prompts import build_prompts, resolve_template
        from kka_ray.knowledge.selection import select_representatives

        cfg, split = self.cfg, self.split
        extractor = extractor_for(cfg)
        raw = {name: extractor(getattr(split, name).images) for name in ("train", "holdout", "test")}
        normalizer = FeatureNormalizer().fit(raw["train"])
        feats = {name: normalizer.transform(z).astype(np.float32) for name, z in raw.items()}
        scorer = MahalanobisScorer(cfg.knowledge.n_clusters, cfg.knowledge.covariance, seed=cfg.run.seed).fit(feats["train"])
        scores = scorer.score(feats["train"])
        reps = select_representatives(scores, scorer.labels_, split.train.captions, cfg.knowledge.n_representatives)
        prompts = build_prompts(resolve_template(cfg.describer), split.domain, reps, cfg.describer.num_prompts, cfg.run.seed)
        out = self.dir / "prep"
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: np.ascontiguousarray(v) for k, v in feats.items()}, str(out / "features.safetensors"))
        save_file({k: np.ascontiguousarray(v) for k, v in normalizer.state_dict().items()}, str(out / "normalizer.safetensors"))
        write_json_atomic([r.__dict__ for r in reps], out / "representatives.json")
        write_json_atomic(prompts, out / "prompts.json")
        self.inputs().remember_prep(feats, normalizer)
        return {"split": split.name, "n_train": len(split.train), "n_holdout": len(split.holdout),
                "n_test": len(split.test), "n_prompts": len(prompts), "feature_dim": int(feats["train"].shape[1])}

    def baselines(self) -> dict[str, Any]:
        """Each ``detector.baselines`` detector without generated anomalies, once."""
        from kka_ray.evaluation.runner import fit_and_score

        out: dict[str, Any] = {}
        for name in self.cfg.detector.baselines:
            result = fit_and_score(self.inputs(), name, 0, self.cfg.run.seed, save_dir=self.dir / "detector" / f"baseline_{name}",
                                   storage=self.dir / "ray_train")
            out[name] = {k: result[k] for k in ("auroc", "aupr", "fpr95", "auroc_last", "seconds")}
        write_json_atomic(out, self.dir / "baselines.json")
        return out

    def _train_deep_sad(self, section, normals: np.ndarray, anomalies: np.ndarray | None, name: str):
        from kka_ray.training.trainer import train_deep_sad

        import shutil

        shutil.rmtree(self.dir / "ray_train" / name, ignore_errors=True)  # a killed stage restarts clean
        x = normals if anomalies is None or len(anomalies) == 0 else np.concatenate([normals, anomalies])
        labels = np.full(len(normals), section.normal_label, dtype=np.int64)
        if anomalies is not None and len(anomalies):
            labels = np.concatenate([labels, np.full(len(anomalies), -1, dtype=np.int64)])
        return train_deep_sad(x.astype(np.float32), labels, section, storage_path=str(self.dir / "ray_train"),
                              name=name, seed=self.cfg.run.seed)

    def _prompts(self) -> list[dict[str, Any]]:
        return json.loads((self.dir / "prep" / "prompts.json").read_text())

    def generate(self, k: int) -> dict[str, Any]:
        from kka_ray.generation.pipeline import run_generation

        pools = self.ensure_pools()
        result = run_generation(self.cfg, pools, self._prompts(), k, self.name, self.dir / "generated" / f"iter_{k}")
        return {**result, "adapter_version": int(self.state.data.get("adapter_version", 0))}

    def _anomaly_features(self, table) -> np.ndarray:
        """Backbone features of PNG images in ``table`` through a Ray Data actor pool."""
        import ray
        from ray.data import ActorPoolStrategy

        from kka_ray.generation.pipeline import role_options
        from kka_ray.knowledge.features import FeatureBatchExtractor

        k = self.cfg.knowledge
        ds = ray.data.from_arrow(table.select(["id", "image"])).map_batches(
            FeatureBatchExtractor,
            fn_constructor_kwargs={"backbone": k.backbone, "image_size": k.image_size,
                                   "cache_dir": str(self.cfg.paths.cache_dir()),
                                   "torch_threads": k.resources.torch_threads},
            compute=ActorPoolStrategy(size=k.resources.replicas), batch_size=k.batch_size,
            batch_format="numpy", **role_options(k.resources),
        )
        rows = ds.select_columns(["id", "features"]).take_all()
        by_id = {r["id"]: np.asarray(r["features"], dtype=np.float32) for r in rows}
        ids = table.column("id").to_pylist()
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise RuntimeError(f"{len(missing)} generated images could not be decoded, e.g. {missing[0]}")
        return np.stack([by_id[i] for i in ids]) if ids else np.zeros((0, 1), np.float32)

    def evaluate(self, k: int) -> dict[str, Any]:
        """Eq. 5: Deep SAD on D_n + D_a + the new anomalies; Eq. 6: hard/easy split of the new ones."""
        import pyarrow as pa

        from kka_ray.confusion import distance_threshold, hard_fraction, split_hard_easy
        from kka_ray.generation.pipeline import read_generated

        cfg, f = self.cfg, self.features()
        new = read_generated(self.dir / "generated" / f"iter_{k}")
        prev = self.inputs().members(k - 1)
        n_new = 0 if new is None else new.num_rows
        if n_new:
            new = new.sort_by("id")
            raw = self._anomaly_features(new)
            z_new = self.normalizer().transform(raw).astype(np.float32)
        else:
            raw = z_new = np.zeros((0, f["train"].shape[1]), np.float32)
        z_prev = self.inputs().anomalies(prev, "features")
        anomalies = np.concatenate([z_prev, z_new])
        state = self._train_deep_sad(cfg.evaluator, f["train"], anomalies, f"evaluator_iter_{k}")
        state.save(self.dir / "evaluator" / f"iter_{k}")
        tau = distance_threshold(state.score(f["holdout"]), cfg.evaluator.threshold, cfg.evaluator.quantile)
        d_prev = state.score(z_prev) if len(z_prev) else np.zeros(0)
        d_new = state.score(z_new) if n_new else np.zeros(0)
        is_hard, is_easy = split_hard_easy(d_new, tau, cfg.evaluator.easy_top_m)
        prev_hard, _ = split_hard_easy(d_prev, tau, None)
        if n_new:
            table = new.append_column("distance", pa.array(d_new, pa.float64()))
            table = table.append_column("is_hard", pa.array(is_hard, pa.bool_()))
            table = table.append_column("features", pa.array(list(raw.astype(np.float32)), pa.list_(pa.float32())))
            self.store.write(k, table)
        easy_ids = [i for i, e in zip(new.column("id").to_pylist(), is_easy) if e] if n_new else []
        rescored = [Member(m.id, float(d), bool(h)) for m, d, h in zip(prev, d_prev, prev_hard)]
        write_json_atomic({"easy_ids": easy_ids, "previous": [m.__dict__ for m in rescored]},
                          self.dir / "evaluator" / f"iter_{k}" / "split.json")
        return {"tau": float(tau), "n_new": n_new, "n_hard": int(is_hard.sum()), "n_easy": int(is_easy.sum()),
                "hard_fraction": hard_fraction(is_hard), "evaluator_final_loss": state.history[-1] if state.history else None}

    def update(self, k: int) -> dict[str, Any]:
        split = json.loads((self.dir / "evaluator" / f"iter_{k}" / "split.json").read_text())
        previous = [Member(**m) for m in split["previous"]]
        new_table = self.store.read([k], columns=["id", "distance", "is_hard"]) if self.store.path(k).is_file() else None
        new = [] if new_table is None else [
            Member(i, float(d), bool(h)) for i, d, h in zip(*(new_table.column(c).to_pylist() for c in ("id", "distance", "is_hard")))
        ]
        target = self.state.data.get("rep_size")
        members = update_anomaly_set(previous, new, self.cfg.run.mode, target_size=target)
        if self.cfg.run.mode == "rep" and target is None and members:
            self.state.data["rep_size"] = len(members)
        save_anomaly_set(members, self.dir / "sets" / f"iter_{k}.json")
        return {"n_anomalies": len(members), "n_hard_in_set": int(sum(m.is_hard for m in members))}

    def detect(self, k: int) -> dict[str, Any]:
        """The configured detector on normals + the anomaly set after iteration k; test metrics."""
        from kka_ray.evaluation.runner import fit_and_score

        name = self.cfg.detector.name
        result = fit_and_score(self.inputs(), name, k, self.cfg.run.seed, save_dir=self.dir / "detector" / f"iter_{k}",
                               storage=self.dir / "ray_train")
        return {"detector": name, **{key: v for key, v in result.items() if key != "fit_info"},
                "selected_epoch": result["fit_info"].get("selected_epoch")}

    def preference(self, k: int) -> dict[str, Any]:
        """Eq. 7: DPO pairs from this iteration's hard/easy split -> LoRA adapter k."""
        import ray

        from kka_ray.generation.pipeline import role_options
        from kka_ray.generation.text import resolve_model_path
        from kka_ray.preference.dpo import dpo_remote_entry
        from kka_ray.preference.pairs import build_pairs

        cfg = self.cfg
        if k == cfg.run.iterations and not cfg.preference.final_iteration:
            return {"n_pairs": 0, "skipped": True, "reason": "preference.final_iteration is false"}
        table = self.store.read([k], columns=["id", "prompt_id", "prompt", "text", "distance", "is_hard"]) \
            if self.store.path(k).is_file() else None
        easy = set(json.loads((self.dir / "evaluator" / f"iter_{k}" / "split.json").read_text())["easy_ids"])
        records = [] if table is None else [r for r in table.to_pylist() if r["is_hard"] or r["id"] in easy]
        pairs = build_pairs(records, cfg.preference.max_pairs, cfg.run.seed + k, answer_prefix=cfg.describer.answer_prefix)
        relative = False
        if not pairs and cfg.preference.relative_fallback and table is not None and table.num_rows >= 2:
            records = relative_hardness(table.to_pylist())
            pairs = build_pairs(records, cfg.preference.max_pairs, cfg.run.seed + k, answer_prefix=cfg.describer.answer_prefix)
            relative = bool(pairs)
            logger.warning("iteration %d: the threshold split gave no hard/easy pairs; using %d relative pairs", k, len(pairs))
        if not pairs:
            logger.warning("iteration %d: no hard/easy pairs (hard %d of %d): DPO skipped, the adapter stays",
                           k, sum(r["is_hard"] for r in records), len(records))
            return {"n_pairs": 0, "skipped": True}
        out = self.dir / "adapters" / f"iter_{k}"
        base = resolve_model_path(cfg.describer.model, str(cfg.paths.cache_dir()))
        task = ray.remote(dpo_remote_entry).options(**role_options(cfg.preference.resources), max_retries=0)
        from kka_ray.devices import resolve_device

        metrics = ray.get(task.remote(
            base_model=base, pairs=pairs, out_dir=str(out), cfg=cfg.preference,
            prev_adapter=self.state.data.get("adapter_path"), answer_prefix=cfg.describer.answer_prefix,
            seed=cfg.run.seed + k, device=resolve_device(cfg.run.device),
        ))
        if self.pools is not None:  # else the next ensure_pools() loads it from the state
            self.pools.load_adapter(str(out), k)
        self.state.data.update(adapter_path=str(out), adapter_version=k)
        return {"n_pairs": len(pairs), "relative_pairs": relative,
                "n_same_prompt": int(sum(p.same_prompt for p in pairs)), **metrics}

    # ------------------------------------------------------------------ metrics
    def metrics_row(self, k: int) -> dict[str, Any]:
        g, e, u, d, p = (self.stage_result(f"iter{k}.{s}") for s in ITERATION_STAGES)
        row = {
            "iteration": k, "mode": self.cfg.run.mode,
            "n_generated": g.get("n_generated", 0), "n_described": g.get("n_described", 0),
            "n_kept": g.get("n_kept", 0), "describer_drops": g.get("describer_drops", {}),
            "drawer_drops": g.get("drawer_drops", {}),
            "n_hard": e.get("n_hard", 0), "n_easy": e.get("n_easy", 0), "hard_fraction": e.get("hard_fraction", 0.0),
            "tau": e.get("tau"), "n_anomalies": u.get("n_anomalies", 0),
            "auroc": d.get("auroc"), "aupr": d.get("aupr"), "fpr95": d.get("fpr95"),
            "n_pairs": p.get("n_pairs", 0), "relative_pairs": p.get("relative_pairs", False), "dpo_loss": p.get("train_loss"),
            "adapter_version": g.get("adapter_version", 0),
            "stage_seconds": {s: r.get("wall_seconds") for s, r in zip(ITERATION_STAGES, (g, e, u, d, p))},
        }
        row["resource_seconds"] = resource_seconds(self.cfg, row["stage_seconds"])
        # what one kept anomaly and one hard anomaly cost in CPU-seconds this iteration
        row["cpu_seconds_per_anomaly"] = row["resource_seconds"]["cpu"] / row["n_kept"] if row["n_kept"] else None
        row["cpu_seconds_per_hard_anomaly"] = row["resource_seconds"]["cpu"] / row["n_hard"] if row["n_hard"] else None
        return row

    def _write_metrics(self) -> None:
        """Rebuild metrics.jsonl from the completed iterations' stage records (idempotent)."""
        rows = [self.metrics_row(k) for k in range(1, self.cfg.run.iterations + 1)
                if self.state.done(f"iter{k}.preference")]
        path = self.dir / "metrics.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, path)
