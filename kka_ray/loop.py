"""Algorithm 1 of KKA (arXiv 2502.14880): the whole loop of one run, stage by stage, on Ray.

    prep        normal features (f), Eq. 1 scores, Eq. 2 representative descriptions, prompts
    baselines   SSD and Deep SAD without generated anomalies, scored once on the test split
    for k in 1..iterations:
      generate    Eq. 3/8 + Eq. 4 through Ray Data with the resident describer/drawer pools
      guard       backbone features of the new images; the normal-likeness guard drops (and keeps
                  in the store, with the reason) descriptions and images of the normal class
      evaluate    Eq. 5 Deep SAD confusion evaluator (Ray Train) on D_n + D_a; Eq. 6 split of the
                  new anomalies (by it, or by iteration 1's with evaluator.split_reference: first)
      audit       an independent judge labels what was kept, hard, easy and dropped (read by
                  nothing in the loop)
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
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from kka_ray.cluster import init_ray
from kka_ray.config import ConfigError, KKAConfig, load_config
from kka_ray.data.store import (
    AnomalyStore, Member, kept_mask, save_anomaly_set, update_anomaly_set, write_json_atomic,
)
from kka_ray.rundir import RunInputs, RunLayout, RunState, require_run_dir
from kka_ray.metrics import resource_seconds

logger = logging.getLogger(__name__)

ITERATION_STAGES = ("generate", "guard", "evaluate", "audit", "update", "detect", "preference")


def relative_hardness(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Relabel rows by rank: the closest third is "hard", the farthest third "easy" (rest dropped)."""
    ranked = sorted(rows, key=lambda r: r["distance"])
    third = max(1, len(ranked) // 3)
    return [{**r, "is_hard": True} for r in ranked[:third]] + [{**r, "is_hard": False} for r in ranked[-third:]]


def new_run_dir(cfg: KKAConfig, output: str | None) -> Path:
    if output:
        return Path(output)
    if cfg.run.output_dir:
        return Path(cfg.run.output_dir)
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


class KKARun:
    """One KKA run: its directory, config, state, and the resident generator pools."""

    def __init__(self, cfg: KKAConfig, run_dir: Path):
        self.cfg = cfg
        self.dir = Path(run_dir).resolve()
        self.name = self.dir.name
        self.layout = RunLayout(self.dir)
        self.state = RunState.load(self.dir)
        self.store = AnomalyStore(self.layout.store)
        self.pools = None
        self._inputs: RunInputs | None = None
        self._guard_cache = None
        # called with a stage's name once it is recorded (kka_ray/storage.py uploads the run there)
        self.on_stage_done = None
        # the storage URI this directory is a staging copy of (kka_ray/storage.py), else None
        self.staging_for: str | None = None

    # ------------------------------------------------------------------ entry points
    @classmethod
    def create(cls, cfg: KKAConfig, output: str | None = None) -> "KKARun":
        run_dir = new_run_dir(cfg, output)
        layout = RunLayout(run_dir)
        if layout.state.is_file():
            raise FileExistsError(f"{run_dir} already holds a run: use `kka run --resume {run_dir}` or another --output")
        run_dir.mkdir(parents=True, exist_ok=True)
        layout.config.write_text(cfg.to_yaml())
        return cls(cfg, run_dir)

    @classmethod
    def resume(cls, run_dir: str | os.PathLike) -> "KKARun":
        run_dir = require_run_dir(run_dir)
        return cls(load_config(RunLayout(run_dir).config), run_dir)

    @contextlib.contextmanager
    def _session(self, total: int, done: int = 0):
        """Models checked, Ray joined or started, a progress bar; pools and Ray released after."""
        from tqdm.auto import tqdm

        from kka_ray.preflight import RunLock
        from kka_ray.prepare import ensure_default_models

        ensure_default_models(self.cfg)
        lock = RunLock(self.dir).acquire()  # one driver per run directory
        started = False
        try:
            started = init_ray(self.cfg)
            if self.staging_for is not None:
                import ray

                from kka_ray.storage import check_staging_cluster

                check_staging_cluster(self.staging_for, sum(bool(n.get("Alive")) for n in ray.nodes()))
        except BaseException:
            if started:
                import ray

                ray.shutdown()
            lock.release()
            raise
        bar = tqdm(total=total, initial=done, desc="kka", disable=not self.cfg.run.progress, unit="stage")
        try:
            yield bar
        finally:
            try:
                bar.close()
                if self.pools is not None:
                    self.pools.shutdown()
                    self.pools = None
                if started:
                    import ray

                    ray.shutdown()
            finally:
                lock.release()

    def execute(self) -> Path:
        """Run (or continue) every stage not yet complete; returns the run directory."""
        cfg = self.cfg
        total = 2 + cfg.run.iterations * len(ITERATION_STAGES)
        done = len([s for s in self.state.completed if s in ("prep", "baselines") or s.startswith("iter")])
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
        write_json_atomic(result, self.layout.stage_record(name))
        self.state.mark(name)
        if self.on_stage_done is not None:
            self.on_stage_done(name)
        bar.update(1)
        logger.info("stage %s done in %.1f s", name, result["wall_seconds"])

    def stage_result(self, name: str) -> dict[str, Any]:
        path = self.layout.stage_record(name)
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
            if self.state.adapter_path:
                self.pools.load_adapter(self.state.adapter_path, self.state.adapter_version)
        return self.pools

    # ------------------------------------------------------------------ stages
    def prep(self) -> dict[str, Any]:
        """Normal features, Eq. 1 scores, Eq. 2 representatives and the prompts."""
        from safetensors.numpy import save_file

        from kka_ray.knowledge.features import FeatureNormalizer, extractor_for
        from kka_ray.knowledge.mahalanobis import MahalanobisScorer
        from kka_ray.knowledge.prompts import build_prompts, normal_concept, resolve_template
        from kka_ray.knowledge.selection import select_representatives

        cfg, split = self.cfg, self.split
        extractor = extractor_for(cfg)
        raw = {name: extractor(getattr(split, name).images) for name in ("train", "holdout", "test")}
        normalizer = FeatureNormalizer().fit(raw["train"])
        feats = {name: normalizer.transform(z).astype(np.float32) for name, z in raw.items()}
        scorer = MahalanobisScorer(cfg.knowledge.n_clusters, cfg.knowledge.covariance, seed=cfg.run.seed).fit(feats["train"])
        scores = scorer.score(feats["train"])
        reps = select_representatives(scores, scorer.labels_, split.train.captions, cfg.knowledge.n_representatives)
        prompts = build_prompts(resolve_template(cfg.describer).text, split.domain, reps, cfg.describer.num_prompts,
                                cfg.run.seed, normal=normal_concept(split.normal_class_names))
        out = self.layout
        out.prep.mkdir(parents=True, exist_ok=True)
        save_file({k: np.ascontiguousarray(v) for k, v in feats.items()}, str(out.features))
        save_file({k: np.ascontiguousarray(v) for k, v in normalizer.state_dict().items()}, str(out.normalizer))
        write_json_atomic([r.__dict__ for r in reps], out.representatives)
        write_json_atomic(prompts, out.prompts)
        self.inputs().remember_prep(feats, normalizer)
        return {"split": split.name, "n_train": len(split.train), "n_holdout": len(split.holdout),
                "n_test": len(split.test), "n_prompts": len(prompts), "feature_dim": int(feats["train"].shape[1])}

    def baselines(self) -> dict[str, Any]:
        """Each ``detector.baselines`` detector without generated anomalies, once."""
        from kka_ray.detectors.runner import fit_and_score

        out: dict[str, Any] = {}
        for name in self.cfg.detector.baselines:
            result = fit_and_score(self.inputs(), name, 0, self.cfg.run.seed, save_dir=self.layout.detector(f"baseline_{name}"),
                                   storage=self.layout.ray_train)
            out[name] = {k: result[k] for k in ("auroc", "aupr", "fpr95", "auroc_last", "seconds")}
        write_json_atomic(out, self.layout.baselines)
        return out

    def _prompts(self) -> list[dict[str, Any]]:
        return json.loads(self.layout.prompts.read_text())

    def generate(self, k: int) -> dict[str, Any]:
        from kka_ray.generation.pipeline import run_generation

        pools = self.ensure_pools()
        result = run_generation(self.cfg, pools, self._prompts(), k, self.name, self.layout.generated(k))
        return {**result, "adapter_version": self.state.adapter_version}

    def _anomaly_features(self, table) -> tuple[np.ndarray, np.ndarray]:
        """Backbone features of PNG images in ``table`` through a Ray Data actor pool, and which
        rows decoded (an undecodable image gets zeros and ``False``)."""
        from kka_ray.knowledge.features import extract_image_features

        by_id = extract_image_features(table, self.cfg.knowledge, str(self.cfg.paths.cache_dir()))
        ids = table.column("id").to_pylist()
        dim = self.features()["train"].shape[1]
        decoded = np.array([i in by_id for i in ids], dtype=bool)
        if not decoded.all():
            logger.warning("%d generated images could not be decoded (e.g. %s): dropped as undecodable",
                           int((~decoded).sum()), ids[int(np.argmin(decoded))])
        feats = np.stack([by_id.get(i, np.zeros(dim, np.float32)) for i in ids]) if ids else np.zeros((0, dim), np.float32)
        return feats, decoded

    def _guard(self):
        """The run's normal-likeness guard and text encoder, calibrated once per process."""
        if self._guard_cache is None:
            from kka_ray.guard import guard_for_run

            self._guard_cache = guard_for_run(self.cfg, self.split, self.features())
        return self._guard_cache

    def _screen(self, new) -> tuple[Any, dict[str, Any]]:
        """Backbone features and the guard's verdict for generated rows: the rows with the store's
        columns (distance NaN, not hard) and a summary (kept, drops by reason, thresholds)."""
        import pyarrow as pa

        from kka_ray.guard import UNDECODABLE

        new = new.sort_by("id")
        raw, decoded = self._anomaly_features(new)
        z = self.normalizer().transform(raw).astype(np.float32)
        texts = new.column("text").to_pylist()
        n = new.num_rows
        reasons: list[str | None] = [None] * n
        t_scores = i_scores = np.full(n, np.nan)
        thresholds: dict[str, Any] = {}
        calibration: dict[str, Any] = {}
        if self.cfg.guard.enabled:
            guard, embed = self._guard()
            verdicts = guard.screen(texts, embed(texts) if guard.text_rule is not None else None, guard.image_scores(z))
            reasons, t_scores, i_scores = list(verdicts.reasons), verdicts.text_scores, verdicts.image_scores
            thresholds, calibration = verdicts.thresholds, guard.calibration()
        reasons = [UNDECODABLE if not ok else r for r, ok in zip(reasons, decoded)]
        table = new.append_column("distance", pa.array(np.full(n, np.nan), pa.float64()))
        table = table.append_column("is_hard", pa.array(np.zeros(n, bool), pa.bool_()))
        table = table.append_column("features", pa.array(list(raw.astype(np.float32)), pa.list_(pa.float32())))
        table = table.append_column("guard_reason", pa.array(reasons, pa.string()))
        table = table.append_column("normal_score", pa.array(np.asarray(i_scores, np.float64), pa.float64()))
        table = table.append_column("text_similarity", pa.array(np.asarray(t_scores, np.float64), pa.float64()))
        drops: dict[str, int] = {}
        for r in reasons:
            if r is not None:
                drops[r] = drops.get(r, 0) + 1
        n_kept = sum(r is None for r in reasons)
        return table, {"n_in": n, "n_kept": n_kept, "kept_fraction": n_kept / n if n else 0.0, "drops": drops,
                       "thresholds": thresholds, "heldout_quantiles": calibration, "enabled": self.cfg.guard.enabled}

    def guard(self, k: int) -> dict[str, Any]:
        """Features of the new images; the normal-likeness guard's verdict on every new item."""
        from kka_ray.generation.pipeline import read_generated

        new = read_generated(self.layout.generated(k))
        if new is None or new.num_rows == 0:
            return {"n_in": 0, "n_kept": 0, "drops": {}, "enabled": self.cfg.guard.enabled}
        table, summary = self._screen(new)
        self.store.write(k, table)
        logger.info("iteration %d guard: kept %d of %d, dropped %s", k, summary["n_kept"], summary["n_in"], summary["drops"])
        return summary

    def evaluate(self, k: int) -> dict[str, Any]:
        """Eq. 5: the confusion evaluator on D_n + D_a (the set before this iteration); Eq. 6: hard/easy
        split of the new anomalies the guard kept, which the evaluator has not been trained on."""
        import pyarrow as pa

        from kka_ray.rundir import split_members
        from kka_ray.evaluator import ConfusionEvaluator, hard_fraction, split_hard_easy

        cfg, f = self.cfg, self.features()
        table = self.store.read([k]) if self.store.path(k).is_file() else None
        prev = self.inputs().members(k - 1)
        kept = np.zeros(0, bool) if table is None else kept_mask(table)
        n_new = int(kept.sum())
        if n_new:
            raw = np.stack([np.asarray(v, np.float32) for v in table.filter(kept).column("features").to_pylist()])
            z_new = self.normalizer().transform(raw).astype(np.float32)
        else:
            z_new = np.zeros((0, f["train"].shape[1]), np.float32)
        prev_train, prev_val = split_members(prev, cfg.evaluator.validation_fraction)
        inputs = self.inputs()
        evaluator = ConfusionEvaluator(cfg.evaluator, seed=self.cfg.run.seed).fit(
            f["train"], inputs.anomalies(prev_train, "features"), f["holdout"],
            val_anomalies=inputs.anomalies(prev_val, "features"), storage_path=self.layout.ray_train,
            name=f"evaluator_iter_{k}")
        d_current = evaluator.score(z_new)
        if k == 1 and cfg.evaluator.split_reference == "first" and cfg.evaluator.reference_hard_max is not None and n_new:
            # the fixed yardstick of every iteration: not already saturated by the first round
            evaluator.cap(d_current, cfg.evaluator.reference_hard_max)
        evaluator.save(self.layout.evaluator(k))
        current_hard = hard_fraction(evaluator.split(d_current)[0])
        splitter = evaluator if self._split_iteration(k) == k else self._split_evaluator(k)
        z_prev = inputs.anomalies(prev, "features")
        d_prev = splitter.score(z_prev)
        d_new = d_current if splitter is evaluator else splitter.score(z_new)
        is_hard, is_easy = splitter.split(d_new)
        prev_hard, _ = split_hard_easy(d_prev, splitter.tau_, None)
        easy_ids: list[str] = []
        if table is not None:
            distance = np.full(table.num_rows, np.nan)
            hard = np.zeros(table.num_rows, bool)
            distance[kept], hard[kept] = d_new, is_hard
            table = table.set_column(table.schema.get_field_index("distance"), "distance", pa.array(distance, pa.float64()))
            table = table.set_column(table.schema.get_field_index("is_hard"), "is_hard", pa.array(hard, pa.bool_()))
            self.store.write(k, table)
            kept_ids = table.filter(kept).column("id").to_pylist()
            easy_ids = [i for i, e in zip(kept_ids, is_easy) if e]
        rescored = [Member(m.id, float(d), bool(h)) for m, d, h in zip(prev, d_prev, prev_hard)]
        write_json_atomic({"easy_ids": easy_ids, "previous": [m.__dict__ for m in rescored]},
                          self.layout.split(k))
        history = evaluator.state_.history
        # the same anomalies against the fixed reference of iteration 1's (one-class) evaluator: what the
        # describer's shift alone did, apart from this evaluator having learned the earlier anomalies
        ref_hard = hard_fraction(is_hard)  # already iteration 1's split in iteration 1 or with split_reference first
        if self._split_iteration(k) != 1 and n_new and (self.layout.evaluator(1) / ConfusionEvaluator.SPLIT_FILE).is_file():
            ref = ConfusionEvaluator.load(self.layout.evaluator(1), cfg.evaluator)
            ref_hard = hard_fraction(ref.split(ref.score(z_new))[0])
        return {"tau": float(splitter.tau_), "tau_normals": float(splitter.tau_normals_), "tau_capped": splitter.tau_ != splitter.tau_normals_,
                "threshold": cfg.evaluator.threshold, "n_new": n_new,
                "split_reference": cfg.evaluator.split_reference, "split_iteration": self._split_iteration(k),
                "hard_fraction_ref": ref_hard, "hard_fraction_current": current_hard,
                "n_hard": int(is_hard.sum()), "n_easy": int(is_easy.sum()), "hard_fraction": hard_fraction(is_hard),
                "n_trained_anomalies": len(prev_train), "n_val_anomalies": len(prev_val),
                # separation of held-out normals from generated anomalies: its validation ones, and the new
                # ones it has not been trained on
                "evaluator_val_auroc": evaluator.val_auroc_, "evaluator_new_auroc": evaluator.auroc(z_new) if n_new else None,
                "evaluator_final_loss": history[-1] if history else None}

    def _split_iteration(self, k: int) -> int:
        """The iteration whose evaluator splits iteration k's anomalies (``evaluator.split_reference``)."""
        return 1 if self.cfg.evaluator.split_reference == "first" else k

    def _split_evaluator(self, k: int):
        """The saved evaluator that splits iteration k's anomalies (and scores its describer shift)."""
        from kka_ray.evaluator import ConfusionEvaluator

        path = self.layout.evaluator(self._split_iteration(k))
        if not (path / ConfusionEvaluator.SPLIT_FILE).is_file():
            raise RuntimeError(f"evaluator.split_reference is {self.cfg.evaluator.split_reference!r} but {path} holds no "
                               "evaluator: start the run again in a new output directory")
        return ConfusionEvaluator.load(path, self.cfg.evaluator)

    def audit(self, k: int) -> dict[str, Any]:
        """The judge's and the text audit's figures of iteration k (read by nothing in the loop)."""
        from kka_ray.audit.stage import audit_iteration

        if not self.cfg.audit.enabled:
            return {"enabled": False}
        result = audit_iteration(self.cfg, self.split, self.store, k)
        write_json_atomic(result, self.layout.audit(k))
        return {"enabled": True, **{key: v for key, v in result.items() if key != "items"}}

    def update(self, k: int) -> dict[str, Any]:
        split = json.loads((self.layout.split(k)).read_text())
        previous = [Member(**m) for m in split["previous"]]
        new_table = self.store.read_kept([k], columns=["id", "distance", "is_hard"]) if self.store.path(k).is_file() else None
        new = [] if new_table is None else [
            Member(i, float(d), bool(h)) for i, d, h in zip(*(new_table.column(c).to_pylist() for c in ("id", "distance", "is_hard")))
        ]
        target = self.state.rep_size
        members = update_anomaly_set(previous, new, self.cfg.run.mode, target_size=target)
        if self.cfg.run.mode == "rep" and target is None and members:
            self.state.rep_size = len(members)
        save_anomaly_set(members, self.layout.anomaly_set(k))
        return {"n_anomalies": len(members), "n_hard_in_set": int(sum(m.is_hard for m in members))}

    def detect(self, k: int) -> dict[str, Any]:
        """The configured detector on normals + the anomaly set after iteration k; test metrics."""
        from kka_ray.detectors.runner import fit_and_score

        name = self.cfg.detector.name
        result = fit_and_score(self.inputs(), name, k, self.cfg.run.seed, save_dir=self.layout.detector(f"iter_{k}"),
                               storage=self.layout.ray_train)
        return {"detector": name, **{key: v for key, v in result.items() if key != "fit_info"},
                "selected_epoch": result["fit_info"].get("selected_epoch")}

    def _preference_records(self, k: int) -> tuple[list[dict[str, Any]], Any]:
        """Eq. 6 -> Eq. 7 inputs: hard kept rows (chosen side), easy kept rows and, with
        ``preference.reject_normal_like``, the rows the guard dropped as normal-like (rejected side,
        ranked before every easy one); and the kept rows for the relative fallback."""
        easy = set(json.loads((self.layout.split(k)).read_text())["easy_ids"])
        if not self.store.path(k).is_file():
            return [], None
        cols = ["id", "prompt_id", "prompt", "text", "distance", "is_hard", "guard_reason"]
        rows = self.store.read([k], columns=cols).to_pylist()
        records = [r for r in rows if not r["guard_reason"] and (r["is_hard"] or r["id"] in easy)]
        if self.cfg.preference.reject_normal_like:
            from kka_ray.guard import GUARD_REASONS

            records += [{**r, "distance": float("inf"), "is_hard": False} for r in rows if r["guard_reason"] in GUARD_REASONS]
        kept = [r for r in rows if not r["guard_reason"]]
        return records, kept

    def preference(self, k: int) -> dict[str, Any]:
        """Eq. 7: DPO pairs from this iteration's hard/easy split -> LoRA adapter k; the describer
        shift it caused, measured on fixed held-out prompts and seeds."""
        cfg = self.cfg
        if k == cfg.run.iterations and not cfg.preference.final_iteration:
            return {"n_pairs": 0, "skipped": True, "reason": "preference.final_iteration is false"}
        pairs, relative, skipped = self._dpo_pairs(k)
        if skipped is not None:
            return skipped
        prev_path, prev_version = self.state.adapter_path, self.state.adapter_version
        shift_before = self._shift_set(prev_version) if cfg.preference.shift_prompts else None
        out = self.layout.adapter(k)
        metrics = self._train_adapter(k, pairs, out, prev_path)
        if self.pools is not None:  # else the next ensure_pools() loads it from the state
            self.pools.load_adapter(str(out), k)
        self.state.adapter_path, self.state.adapter_version = str(out), k
        result = {"n_pairs": len(pairs), "relative_pairs": relative,
                  "n_same_prompt": int(sum(p.same_prompt for p in pairs)),
                  "n_rejected_normal_like": int(sum(p.rejected_distance == float("inf") for p in pairs)), **metrics}
        if shift_before is not None:
            shift = result["describer_shift"] = self._describer_shift(k, shift_before, self._shift_set(k))
            before, after = shift["before"]["kept_share"], shift["after"]["kept_share"]
            if cfg.preference.rollback_below and after < cfg.preference.rollback_below * before:
                logger.warning("iteration %d: after DPO the describer keeps %.0f %% of its samples (before: %.0f %%); "
                               "rolled back to adapter v%d", k, 100 * after, 100 * before, prev_version)
                if self.pools is not None:
                    self.pools.load_adapter(prev_path, prev_version)
                self.state.adapter_path, self.state.adapter_version = prev_path, prev_version
                result["rolled_back"] = True
        return result

    def _dpo_pairs(self, k: int) -> tuple[list, bool, dict[str, Any] | None]:
        """(pairs, relative, None), or the stage result when DPO is skipped: no pairs, or fewer than
        ``preference.min_pairs`` (the relative fallback tried first where configured)."""
        from kka_ray.preference.pairs import build_pairs

        cfg = self.cfg
        records, kept = self._preference_records(k)
        pairs = build_pairs(records, cfg.preference.max_pairs, cfg.run.seed + k, answer_prefix=cfg.describer.answer_prefix)
        relative = False
        # Too few threshold pairs (none, or a far class where one or two anomalies pass as normal): rank
        # instead, so the describer still moves toward its closer texts rather than not at all.
        if len(pairs) < cfg.preference.min_pairs and cfg.preference.relative_fallback and kept is not None and len(kept) >= 2:
            ranked = build_pairs(relative_hardness(kept), cfg.preference.max_pairs, cfg.run.seed + k,
                                 answer_prefix=cfg.describer.answer_prefix)
            if len(ranked) > len(pairs):
                logger.warning("iteration %d: the threshold split gave %d hard/easy pairs; using %d relative pairs",
                               k, len(pairs), len(ranked))
                pairs, relative = ranked, True
        if not pairs:
            logger.warning("iteration %d: no hard/easy pairs (hard %d of %d): DPO skipped, the adapter stays",
                           k, sum(bool(r["is_hard"]) for r in records), len(records))
            return pairs, relative, {"n_pairs": 0, "skipped": True}
        if len(pairs) < cfg.preference.min_pairs:
            logger.warning("iteration %d: %d DPO pairs, fewer than preference.min_pairs=%d: DPO skipped, the adapter stays",
                           k, len(pairs), cfg.preference.min_pairs)
            return pairs, relative, {"n_pairs": len(pairs), "skipped": True, "reason": "fewer pairs than preference.min_pairs"}
        return pairs, relative, None

    def dpo_job(self, k: int, prev_adapter: str | None) -> tuple[str, dict[str, Any]]:
        """The describer's base model and :func:`~kka_ray.preference.dpo.run_dpo`'s keyword
        arguments for iteration ``k``'s update (the device is resolved where the job runs)."""
        from kka_ray.generation.text import resolve_model_path
        from kka_ray.knowledge.prompts import resolve_template

        cfg = self.cfg
        base = resolve_model_path(cfg.describer.model, str(cfg.paths.cache_dir()))
        return base, dict(prev_adapter=prev_adapter, answer_prefix=cfg.describer.answer_prefix, seed=cfg.run.seed + k,
                          device=cfg.run.device, chat=resolve_template(cfg.describer).chat,
                          trust_remote_code=cfg.describer.trust_remote_code)

    def _train_adapter(self, k: int, pairs: list, out: Path, prev_adapter: str | None) -> dict[str, Any]:
        """The DPO job (one Ray task, or a Ray Train job of ``preference.num_workers``) from the
        current adapter to adapter ``k`` at ``out``; returns its metrics."""
        import ray

        from kka_ray.cluster import one_shot_task
        from kka_ray.preference.dpo import dpo_remote_entry, run_dpo_ray_train

        cfg = self.cfg
        base, job = self.dpo_job(k, prev_adapter)
        if cfg.preference.num_workers > 1:
            return run_dpo_ray_train(base, pairs, str(out), cfg.preference, storage_path=str(self.layout.ray_train),
                                     name=f"dpo_iter_{k}", **job)
        task = one_shot_task(dpo_remote_entry, cfg.preference.resources)
        return ray.get(task.remote(base_model=base, pairs=pairs, out_dir=str(out), cfg=cfg.preference, **job))

    def _shift_set(self, version: int):
        """The describer's outputs for the fixed held-out prompts and seeds with adapter ``version``,
        drawn and screened (cached in ``shift/v<version>.parquet``); the pools must hold that version."""
        import pyarrow.parquet as pq

        from kka_ray.data.store import write_table_atomic
        from kka_ray.generation.pipeline import read_generated, run_generation
        from kka_ray.preference.shift import shift_prompts

        path = self.layout.shift(version)
        if path.is_file():
            return pq.read_table(path)
        pools = self.ensure_pools()
        if pools.adapter_version() != version:
            raise RuntimeError(f"the describer holds adapter v{pools.adapter_version()}, not v{version}")
        gen_dir = self.layout.shift_generated(version)
        run_generation(self.cfg, pools, shift_prompts(self.cfg, self.split), 0, f"{self.name}-shift", gen_dir)
        new = read_generated(gen_dir)
        if new is None:
            return None
        table, _ = self._screen(new)
        write_table_atomic(table, path)
        import shutil

        shutil.rmtree(gen_dir, ignore_errors=True)
        return pq.read_table(path)

    def _describer_shift(self, k: int, before, after) -> dict[str, Any]:
        """``describer_shift`` of update k: both sides scored by the evaluator that split iteration k
        (``evaluator.split_reference``) and the judge."""
        from kka_ray.data.store import kept_mask
        from kka_ray.rundir import decode_like
        from kka_ray.guard import NormalTermMatcher, normal_terms
        from kka_ray.data.protocols import dataset_key
        from kka_ray.preference.shift import changed_share, shift_figures

        cfg = self.cfg
        n_samples = cfg.preference.shift_prompts * cfg.describer.samples_per_prompt
        evaluator = self._split_evaluator(k)
        judge = None
        if cfg.audit.enabled:
            from kka_ray.audit.stage import _judge

            judge = _judge(cfg)
        matcher = NormalTermMatcher(normal_terms(self.split.normal_class_names, dataset_key(cfg.data), cfg.guard.normal_terms))
        shape = self.split.train.images.shape[1:]
        sides = {}
        for name, table in (("before", before), ("after", after)):
            if table is None or table.num_rows == 0:
                sides[name] = {"n_samples": n_samples, "n_drawn": 0, "n_kept": 0, "kept_share": 0.0, "hard_per_sample": 0.0}
                continue
            kept_rows = table.filter(kept_mask(table))
            distances, judged = np.zeros(0), (np.zeros(0, np.int64) if judge else None)
            if kept_rows.num_rows:
                raw = np.stack([np.asarray(v, np.float32) for v in kept_rows.column("features").to_pylist()])
                distances = evaluator.score(self.normalizer().transform(raw).astype(np.float32))
                if judge is not None:
                    judged = judge.predict(np.stack([decode_like(b, shape) for b in kept_rows.column("image").to_pylist()]))
            normal = [judge.class_names.index(n) for n in self.split.normal_class_names] if judge else []
            sides[name] = shift_figures(table, n_samples, distances, evaluator.tau_, judged, normal,
                                        judge.class_names if judge else [], matcher)
        sides["changed_texts"] = changed_share(before, after, n_samples)
        return sides

    # ------------------------------------------------------------------ metrics
    def metrics_row(self, k: int) -> dict[str, Any]:
        r = {s: self.stage_result(f"iter{k}.{s}") for s in ITERATION_STAGES}
        g, gd, e, a, u, d, p = (r[s] for s in ITERATION_STAGES)
        kept_audit = a.get("kept") or {}
        row = {
            "iteration": k, "mode": self.cfg.run.mode,
            "n_generated": g.get("n_generated", 0), "n_described": g.get("n_described", 0),
            "n_drawn": g.get("n_kept", 0), "n_kept": gd.get("n_kept", g.get("n_kept", 0)),
            "describer_drops": g.get("describer_drops", {}), "drawer_drops": g.get("drawer_drops", {}),
            "guard_drops": gd.get("drops", {}), "guard_thresholds": gd.get("thresholds", {}),
            "n_hard": e.get("n_hard", 0), "n_easy": e.get("n_easy", 0), "hard_fraction": e.get("hard_fraction", 0.0),
            "hard_fraction_ref": e.get("hard_fraction_ref"), "hard_fraction_current": e.get("hard_fraction_current"),
            "split_reference": e.get("split_reference", "current"),
            "tau": e.get("tau"), "tau_normals": e.get("tau_normals", e.get("tau")), "tau_capped": bool(e.get("tau_capped", False)),
            "n_anomalies": u.get("n_anomalies", 0),
            # the audit (an independent judge; nothing in the loop reads it)
            "normal_leak": kept_audit.get("normal_leak"), "coverage": kept_audit.get("coverage"),
            "judged_kept": kept_audit.get("histogram"), "judged_hard": (a.get("hard") or {}).get("histogram"),
            "judged_easy": (a.get("easy") or {}).get("histogram"),
            "judge_false_normal_rate": a.get("judge_false_normal_rate"),
            "names_normal_share": (a.get("text") or {}).get("names_normal_share"),
            "auroc": d.get("auroc"), "aupr": d.get("aupr"), "fpr95": d.get("fpr95"),
            "evaluator_val_auroc": e.get("evaluator_val_auroc"), "evaluator_new_auroc": e.get("evaluator_new_auroc"),
            "n_pairs": p.get("n_pairs", 0), "relative_pairs": p.get("relative_pairs", False), "dpo_loss": p.get("train_loss"),
            "dpo_last_loss": p.get("last_loss"), "dpo_reward_accuracy": p.get("rewards/accuracies"),
            "dpo_reward_margin": p.get("rewards/margins"), "dpo_workers": p.get("world_size"),
            "dpo_rolled_back": bool(p.get("rolled_back", False)),
            "describer_shift": p.get("describer_shift"),
            "adapter_version": g.get("adapter_version", 0),
            "stage_seconds": {s: r[s].get("wall_seconds") for s in ITERATION_STAGES},
        }
        row["resource_seconds"] = resource_seconds(self.cfg, row["stage_seconds"])
        # what one kept anomaly and one hard anomaly cost in CPU-seconds this iteration
        row["cpu_seconds_per_anomaly"] = row["resource_seconds"]["cpu"] / row["n_kept"] if row["n_kept"] else None
        row["cpu_seconds_per_hard_anomaly"] = row["resource_seconds"]["cpu"] / row["n_hard"] if row["n_hard"] else None
        row["gpu_seconds_per_anomaly"] = row["resource_seconds"]["gpu"] / row["n_kept"] if row["n_kept"] else None
        row["gpu_seconds_per_hard_anomaly"] = row["resource_seconds"]["gpu"] / row["n_hard"] if row["n_hard"] else None
        # the same in money at the cost section's prices (kka_ray/cost.py; `kka cost` reprices)
        from kka_ray.cost import iteration_cost

        row.update(iteration_cost(self.cfg, row["stage_seconds"], row["n_kept"], row["n_hard"]))
        return row

    def _write_metrics(self) -> None:
        """Rebuild metrics.jsonl from the completed iterations' stage records (idempotent)."""
        rows = [self.metrics_row(k) for k in range(1, self.cfg.run.iterations + 1)
                if self.state.done(f"iter{k}.preference")]
        path = self.layout.metrics
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, path)
