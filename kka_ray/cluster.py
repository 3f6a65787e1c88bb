"""Ray set-up, in one place: starting or joining a cluster, and placing each role's actors.

- :func:`init_ray`: join ``ray.address`` (or the ``RAY_ADDRESS`` a Ray job sets) or start a
  local cluster of the config's size; the engine's entry points call it once.
  :func:`ensure_ray` starts a small local cluster for library use when nobody has.
- :func:`role_options`: Ray actor/task options for a role from its config section: CPUs, GPUs,
  and custom resources such as ``kka_describer`` that only the role's nodes of the cluster
  definitions in ``cluster/`` advertise (also valid ``map_batches`` remote args).
- :func:`start_pool`: a role's resident actors, restarted by Ray after a crash; with
  ``resources.placement_strategy`` reserved as one placement group (e.g. STRICT_SPREAD for one
  actor per node). :func:`one_shot_task`: a function as a one-off task with a role's resources
  (the DPO job).

Nothing else in the engine calls ``ray.init``.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kka_ray.config import KKAConfig, RoleResources

logger = logging.getLogger(__name__)

# Local Ray cluster started when the caller has none (tests, notebooks).
LOCAL_RAY_CPUS = 2

# How long a role's placement group may wait for its nodes before the run stops with an error
# naming the role: an autoscaler takes several minutes to bring up a GPU node.
PLACEMENT_READY_TIMEOUT_S = 900.0


def role_options(res: RoleResources) -> dict[str, Any]:
    """Ray actor/task options for a role from its config section (also valid ``map_batches``
    remote args): CPUs, GPUs, custom resources (which pick the role's nodes, see cluster/) and
    the role's environment variables (merged into the job's runtime_env by Ray)."""
    opts: dict[str, Any] = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus}
    if res.resources:
        opts["resources"] = dict(res.resources)
    if res.env_vars:
        opts["runtime_env"] = {"env_vars": dict(res.env_vars)}
    return opts


def role_bundle(res: RoleResources) -> dict[str, float]:
    """One placement-group bundle: the resources one actor of the role holds."""
    bundle = {"CPU": res.num_cpus, "GPU": res.num_gpus, **res.resources}
    return {k: float(v) for k, v in bundle.items() if v > 0}  # never empty: RoleResources checks it


def start_pool(
    role: str,
    actor_cls: type,
    res: RoleResources,
    args: tuple = (),
    ready_timeout_s: float = PLACEMENT_READY_TIMEOUT_S,
) -> tuple[list[Any], Any]:
    """Start ``res.replicas`` actors of ``actor_cls`` for ``role``; returns (actors, placement group).

    With ``res.placement_strategy`` the pool is reserved as one placement group of ``replicas``
    bundles (all or nothing) and actor ``i`` is pinned to bundle ``i``; without it each actor is
    scheduled on its own and the placement group is None. A placement group that cannot be
    reserved within ``ready_timeout_s`` is removed and raises an error naming the role.
    """
    import ray

    # a resident actor that dies is restarted by Ray and the call in flight retried on it
    opts = {**role_options(res), "max_restarts": res.max_restarts, "max_task_retries": res.max_restarts}
    remote_cls = ray.remote(actor_cls)
    if res.placement_strategy is None:
        return [remote_cls.options(**opts).remote(*args) for _ in range(res.replicas)], None

    from ray.exceptions import GetTimeoutError
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    bundles = [role_bundle(res)] * res.replicas
    pg = placement_group(bundles, strategy=res.placement_strategy, name=f"kka-{role}")
    try:
        ray.get(pg.ready(), timeout=ready_timeout_s)
    except GetTimeoutError:
        remove_placement_group(pg)
        raise RuntimeError(
            f"{role}: the cluster could not place {res.replicas} x {bundles[0]} with strategy "
            f"{res.placement_strategy} within {ready_timeout_s:.0f} s. Check that enough nodes advertise "
            f"these resources (cluster/ and `ray status`), or lower {role}.resources.replicas or relax "
            f"{role}.resources.placement_strategy"
        ) from None
    logger.info("%s: placement group of %d x %s (%s) ready", role, res.replicas, bundles[0], res.placement_strategy)
    actors = [
        remote_cls.options(
            **opts,
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=i),
        ).remote(*args)
        for i in range(res.replicas)
    ]
    return actors, pg


def one_shot_task(fn: Any, res: RoleResources) -> Any:
    """``fn`` as a Ray task with the role's resources, run in a fresh worker process each time
    (``max_calls=1``: a reused worker would keep a stale CUDA context and process group) and not
    retried by Ray (a failed stage is rerun by ``--resume``)."""
    import ray

    return ray.remote(max_calls=1)(fn).options(**role_options(res), max_retries=0)


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
        # on this machine (ray.init() would join that one instead). Ray turns token authentication
        # on for a new local cluster and says so on every start; the mode stays Ray's choice
        # (RAY_AUTH_MODE=disabled opts out), the notice is kept off the user's terminal.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
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


def ensure_ray() -> None:
    """Start a small local Ray cluster if the caller has not initialised Ray."""
    import ray

    if not ray.is_initialized():
        logger.warning(
            "Ray is not initialised: starting a local cluster (num_cpus=%d, no dashboard); "
            "call ray.init(...) first to use an existing cluster", LOCAL_RAY_CPUS,
        )
        ray.init(address="local", num_cpus=LOCAL_RAY_CPUS, include_dashboard=False)
