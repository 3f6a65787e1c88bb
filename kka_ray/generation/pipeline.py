"""The generation stream of one iteration (method.md Eq. 3, 4, 8) on Ray Data.

prompts -> descriptions -> images -> Parquet, as one streaming Ray Data dataset:

    ray.data.from_items(prompts)
      .map_batches(DescriberProxy, compute=ActorPoolStrategy(size=describer replicas))
      .map_batches(DrawerProxy,    compute=ActorPoolStrategy(size=drawer replicas))
      .write_parquet(<run>/generated/iter_<k>)

The models live in *resident* actors (``ResidentPools``) created once per run, so loading a
model is paid once and the describer takes each new LoRA adapter without a restart. The Ray
Data actor pools hold light proxies that forward each batch to a resident actor, so every
stage is scheduled, batched and back-pressured by Ray Data, not by a loop on the driver.

Placement: each role's actors ask for the resources of its config section, and a pool may be
reserved as one placement group (kka_ray/cluster.py: ``role_options``, ``start_pool``).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kka_ray.cluster import start_pool
from kka_ray.config import KKAConfig
from kka_ray.data.store import anomaly_id, item_seed

logger = logging.getLogger(__name__)

# Proxies only forward batches; they must not hold CPUs the resident actors need.
PROXY_NUM_CPUS = 0.01


class ProxyCounter:
    """Hands out 0, 1, 2, ...: each Ray Data proxy of a pool takes the next number at start."""

    def __init__(self) -> None:
        self.n = -1

    def next(self) -> int:
        self.n += 1
        return self.n


class _RoundRobinProxy:
    """Forwards batches to the resident actors. Ray Data runs as many proxies as there are actors;
    proxy ``i`` (numbered by a shared counter) sends every batch to actor ``i``, so each actor has
    its own proxy and Ray Data's balancing across proxies is balancing across actors (a random
    start let two proxies queue on one actor while another idled). Without a counter a proxy
    cycles through the actors."""

    method = ""

    def __init__(self, handles: list[Any], counter: Any = None, call_kwargs: dict[str, Any] | None = None):
        import ray

        self.handles = list(handles)
        self.next = int(ray.get(counter.next.remote())) if counter is not None else 0
        self.stride = 0 if counter is not None else 1
        self.call_kwargs = dict(call_kwargs or {})

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import ray

        handle = self.handles[self.next % len(self.handles)]
        self.next += self.stride
        return ray.get(getattr(handle, self.method).remote(batch, **self.call_kwargs))


class GenerationLedger:
    """The counts of one generation, batch by batch, kept outside the resident actors: a batch
    retried on a restarted actor overwrites its own record (keyed by the batch's rows), so the
    drops are counted once, also across a crash that lost the actor's own counters."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, Any], tuple[dict[str, float], list[str]]] = {}  # (role, batch) -> (counts, texts)

    def record(self, role: str, key: Any, counts: dict[str, float], texts: list[str] | None = None) -> None:
        self.records[(role, key)] = (dict(counts), list(texts or []))

    def kept_texts(self, role: str) -> list[str]:
        """The texts kept so far (a restarted describer's duplicate filter starts from them)."""
        return [t for (r, _), (_, texts) in self.records.items() if r == role for t in texts]

    def totals(self, role: str) -> dict[str, float]:
        return _sum_stats([counts for (r, _), (counts, _) in self.records.items() if r == role])

    def n_batches(self, role: str) -> int:
        return sum(r == role for r, _ in self.records)

    def reset(self) -> None:
        self.records = {}


class DescriberProxy(_RoundRobinProxy):
    method = "describe"


class DrawerProxy(_RoundRobinProxy):
    method = "draw"


@dataclass
class ResidentPools:
    """The resident describer and drawer actors of a run."""

    describers: list[Any]
    drawers: list[Any]
    placement_groups: list[Any] = field(default_factory=list)
    # the adapter the describers hold (path, version); sent with every batch, so an actor that
    # was restarted (with the base model) loads it again before describing
    adapter: tuple[str | None, int] = (None, 0)
    ledger: Any = None  # a GenerationLedger actor

    @classmethod
    def start(cls, cfg: KKAConfig, target_size: int, target_mode: str) -> "ResidentPools":
        import ray

        from kka_ray.generation.describer import Describer
        from kka_ray.generation.drawer import Drawer

        cache = str(cfg.paths.cache_dir())
        device = cfg.run.device  # resolved inside each actor: the driver's node may have no GPU
        describers, d_pg = start_pool("describer", Describer, cfg.describer.resources, (cfg.describer, cache, device))
        try:
            drawers, w_pg = start_pool(
                "drawer", Drawer, cfg.drawer.resources, (cfg.drawer, cache, target_size, target_mode, device)
            )
        except BaseException:
            cls(describers, [], [d_pg] if d_pg else []).shutdown()
            raise
        pools = cls(describers, drawers, [pg for pg in (d_pg, w_pg) if pg is not None])
        try:
            pools.ledger = ray.remote(GenerationLedger).options(num_cpus=0).remote()
            ray.get([a.ready.remote() for a in describers + drawers])
        except BaseException:
            pools.shutdown()
            raise
        return pools

    def load_adapter(self, path: str, version: int) -> None:
        import ray

        ray.get([a.load_adapter.remote(path, version) for a in self.describers])
        self.adapter = (None if version == 0 else path, int(version))

    def adapter_version(self) -> int:
        """The adapter version the describers hold (they always hold the same one)."""
        import ray

        versions = set(ray.get([a.adapter_version.remote() for a in self.describers]))
        if len(versions) != 1:
            raise RuntimeError(f"the describer replicas hold different adapter versions: {sorted(versions)}")
        return versions.pop()

    def reset(self, iteration: int) -> None:
        import ray

        ray.get([a.reset.remote(iteration) for a in self.describers] + [a.reset.remote() for a in self.drawers]
                + ([self.ledger.reset.remote()] if self.ledger is not None else []))

    def describer_call(self) -> dict[str, Any]:
        """What every describe call carries: the current adapter and the ledger."""
        return {"adapter": self.adapter, "ledger": self.ledger}

    def stats(self) -> dict[str, dict[str, int]]:
        """This iteration's counts: from the ledger (complete across actor restarts), else from the actors."""
        import ray

        if self.ledger is not None:
            d, w = ray.get([self.ledger.totals.remote("describer"), self.ledger.totals.remote("drawer")])
            return {"describer": d, "drawer": w}
        return {
            # the describer keeps cumulative counts and this iteration's under "iteration_counts"
            "describer": _sum_stats([s.get("iteration_counts", s) for s in ray.get([a.stats.remote() for a in self.describers])]),
            "drawer": _sum_stats(ray.get([a.stats.remote() for a in self.drawers])),
        }

    def shutdown(self) -> None:
        import ray

        from ray.util.placement_group import remove_placement_group

        for a in self.describers + self.drawers + ([self.ledger] if self.ledger is not None else []):
            ray.kill(a)
        for pg in self.placement_groups:
            remove_placement_group(pg)
        self.placement_groups = []


def _sum_stats(items: list[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in items:
        for k, v in d.items():
            if isinstance(v, (int, float)):
                out[k] = out.get(k, 0) + v
    return out


def prompt_rows(prompts: list[dict[str, Any]], seed: int, iteration: int) -> list[dict[str, Any]]:
    """Prompt rows for the stream with the iteration's sampling seed.

    One seed for all rows of an iteration: the describer samples rows that share a seed in one
    batched call (batch 64 is about 3x faster than batch 4 on CPU), and batches are fixed by the
    prompt order, so the texts stay reproducible.
    """
    s = item_seed(seed, iteration, 0)
    return [{**p, "seed": s} for p in prompts]


class _AddIds:
    """Adds the stable id, run, iteration and the drawing seed to each described row."""

    def __init__(self, run: str, iteration: int, seed: int):
        self.run, self.iteration, self.seed = run, iteration, seed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pids, sids = batch["prompt_id"], batch["sample_idx"]
        batch["id"] = np.array([anomaly_id(self.run, self.iteration, p, s) for p, s in zip(pids, sids)], dtype=object)
        batch["run"] = np.array([self.run] * len(pids), dtype=object)
        batch["iteration"] = np.full(len(pids), self.iteration, dtype=np.int64)
        batch["seed"] = np.array(
            [item_seed(self.seed, self.iteration, p, s + 1) for p, s in zip(pids, sids)], dtype=np.int64
        )
        return batch


def run_generation(
    cfg: KKAConfig,
    pools: ResidentPools,
    prompts: list[dict[str, Any]],
    iteration: int,
    run_name: str,
    out_dir: str | os.PathLike,
) -> dict[str, Any]:
    """Stream prompts through the describer and drawer pools into Parquet at ``out_dir``.

    Writes to a temp directory and renames it, so a crash leaves no half-written iteration.
    Returns counts (generated, kept, dropped by reason) and the wall time.
    """
    import ray
    from ray.data import ActorPoolStrategy

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.perf_counter()
    pools.reset(iteration)
    rows = prompt_rows(prompts, cfg.run.seed, iteration)
    # A batch of describer rows is all prompts of one describer call: the describer batches
    # prompts x samples itself, so hand it as many prompts as fit its batch size.
    # At least one call per describer replica, so none idles while another describes everything.
    prompts_per_call = max(1, min(cfg.describer.batch_size // cfg.describer.samples_per_prompt,
                                  -(-len(rows) // len(pools.describers))))
    ds = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // prompts_per_call)))
    counter = ray.remote(ProxyCounter).options(num_cpus=0)
    ds = ds.map_batches(
        DescriberProxy,
        fn_constructor_kwargs={"handles": pools.describers, "counter": counter.remote(), "call_kwargs": pools.describer_call()},
        # one block at a time per proxy: a proxy that started first must not queue every block
        compute=ActorPoolStrategy(size=len(pools.describers), max_tasks_in_flight_per_actor=1),
        batch_size=prompts_per_call,
        batch_format="numpy",
        num_cpus=PROXY_NUM_CPUS,
    )
    ds = ds.map_batches(_AddIds, fn_constructor_kwargs={"run": run_name, "iteration": iteration, "seed": cfg.run.seed},
                        compute=ActorPoolStrategy(size=1), batch_format="numpy", num_cpus=PROXY_NUM_CPUS)
    ds = ds.map_batches(
        DrawerProxy,
        fn_constructor_kwargs={"handles": pools.drawers, "counter": counter.remote(), "call_kwargs": {"ledger": pools.ledger}},
        compute=ActorPoolStrategy(size=len(pools.drawers), max_tasks_in_flight_per_actor=1),
        batch_size=cfg.drawer.batch_size,
        batch_format="numpy",
        num_cpus=PROXY_NUM_CPUS,
    )
    ds.write_parquet(str(tmp))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.mkdir(parents=True, exist_ok=True)  # an all-dropped iteration still leaves a directory
    os.replace(tmp, out_dir)
    stats = pools.stats()
    wall = time.perf_counter() - start
    d, w = stats["describer"], stats["drawer"]
    result = {
        "n_generated": int(d.get("generated", 0)),
        "n_described": int(d.get("kept", 0)),
        "n_kept": int(w.get("kept", 0)),
        "describer_drops": {k.removeprefix("dropped_"): v for k, v in d.items() if k.startswith("dropped_")},
        "drawer_drops": {k: v for k, v in w.items() if k in ("blank", "invalid")},
        "describe_seconds": round(d.get("generate_seconds", 0.0), 3),
        "draw_seconds": round(w.get("seconds", 0.0), 3),
        "wall_seconds": wall,
    }
    logger.info("iteration %d generation: %s", iteration, result)
    return result


def read_generated(out_dir: str | os.PathLike) -> Any:
    """The generated rows of one iteration as a pyarrow table (None when nothing was kept)."""
    import pyarrow.dataset as pads

    files = sorted(Path(out_dir).glob("*.parquet"))
    if not files:
        return None
    return pads.dataset([str(f) for f in files], format="parquet").to_table()
