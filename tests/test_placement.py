"""Role placement on a multi-node Ray cluster simulated on one machine.

The nodes are the worker groups of cluster/kuberay/raycluster.yaml, read with Ray's own KubeRay
parser: each advertises its CPUs and its role's custom resource (kka_describer, kka_drawer,
kka_trainer, kka_cpu), with the GPUs left out (none here). The roles use kka_ray/configs/gpu.yaml's
resources with num_gpus set to 0 and tiny real models, and each resident actor, task and trainer
worker bundle must land on a node of its own group. Placement groups: STRICT_SPREAD puts replicas
on distinct nodes, and a pool that cannot be placed fails with an error naming the role.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from kka_ray.config import RoleResources, load_config

from conftest import tiny_overrides

ROOT = Path(__file__).resolve().parent.parent
GPU_CONFIG = ROOT / "kka_ray" / "configs" / "gpu.yaml"
# worker groups started as simulated nodes, one each
NODES = ["describer-gpu", "drawer-gpu", "trainer-gpu", "cpu"]
NODE_OBJECT_STORE = 80 * 1024**2

pytestmark = pytest.mark.slow


def _group_resources() -> dict[str, dict[str, float]]:
    """CPUs and custom resources of each RayCluster worker group, as Ray's autoscaler reads them."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    cr = yaml.safe_load((ROOT / "cluster" / "kuberay" / "raycluster.yaml").read_text())
    cr["metadata"]["namespace"] = "default"
    types = _derive_autoscaling_config_from_ray_cr(cr)["available_node_types"]
    return {name: {k: v for k, v in t["resources"].items() if k not in ("GPU", "memory")} for name, t in types.items()}


@pytest.fixture(scope="module")
def cluster():
    """A head without CPUs (it runs the driver only, as in the manifests) and one node per group."""
    import ray
    from ray.cluster_utils import Cluster

    os.environ.pop("RAY_ADDRESS", None)
    groups = _group_resources()
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "object_store_memory": NODE_OBJECT_STORE, "include_dashboard": False,
        "_system_config": {"enable_worker_prestart": False, "prestart_worker_first_driver": False},
    })
    nodes: dict[str, list[str]] = {}
    try:
        for group in NODES:
            res = dict(groups[group])
            try:
                node = c.add_node(num_cpus=int(res.pop("CPU")), resources=res, object_store_memory=NODE_OBJECT_STORE)
            except Exception as err:  # Ray gives a node 30 s (hard-coded) to register with the GCS
                if "timed out during startup" not in str(err):
                    raise
                pytest.skip(f"a simulated node did not start within Ray's 30 s window (machine overloaded): {err}")
            nodes.setdefault(group, []).append(node.node_id)
        c.wait_for_nodes(timeout=120)
        ray.init(address=c.address, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
        yield nodes
    finally:
        ray.shutdown()
        c.shutdown()


def _node_of(actor) -> str:
    import ray

    return ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))


def _gpu_config_on_cpu(cache: Path, extra: list[str] = ()):
    """gpu.yaml's placement (custom resources, CPUs, strategies, env vars) with no GPUs and tiny models."""
    overrides = [o for o in tiny_overrides(cache) if not o.startswith("ray.")] + [
        "run.device=cpu", "describer.backend=transformers", "describer.dtype=float32", "drawer.dtype=float32",
        "drawer.num_inference_steps=2", "drawer.guidance_scale=3.0",
        *(f"{r}.resources.num_gpus=0" for r in ("describer", "drawer", "preference", "knowledge")),
        *(f"{r}.resources.torch_threads=1" for r in ("describer", "drawer")),
        *extra,
    ]
    return load_config(GPU_CONFIG, overrides)


def test_resident_pools_land_on_their_role_nodes(cluster, tiny_cache):
    import ray
    from ray.util.placement_group import placement_group_table

    from kka_ray.generation.pipeline import ResidentPools

    # one node per group here, so one actor per pool (gpu.yaml: two, one per node)
    cfg = _gpu_config_on_cpu(tiny_cache, ["describer.resources.replicas=1", "drawer.resources.replicas=1"])
    assert cfg.describer.resources.placement_strategy == "SPREAD"
    assert cfg.describer.resources.resources == {"kka_describer": 1.0}
    assert cfg.drawer.resources.resources == {"kka_drawer": 1.0}
    pools = ResidentPools.start(cfg, target_size=28, target_mode="L")
    try:
        assert [_node_of(a) for a in pools.describers] == cluster["describer-gpu"]
        assert [_node_of(a) for a in pools.drawers] == cluster["drawer-gpu"]
        # gpu.yaml's per-role env vars reach the actors
        env = ray.get(pools.describers[0].__ray_call__.remote(lambda self: os.environ.get("NCCL_CUMEM_ENABLE")))
        assert env == "0"
        assert len(pools.placement_groups) == 2
        table = placement_group_table()
        assert {table[pg.id.hex()]["strategy"] for pg in pools.placement_groups} == {"SPREAD"}
    finally:
        pgs = list(pools.placement_groups)
        pools.shutdown()
    table = placement_group_table()
    assert all(table[pg.id.hex()]["state"] == "REMOVED" for pg in pgs)


def test_trainer_and_feature_roles_land_on_their_nodes(cluster, tiny_cache):
    """preference (a Ray task with role_options, as loop.py runs DPO), knowledge (role_options as
    Ray Data remote args) and the evaluator/detector workers: the PACK placement group of
    ``num_workers`` x ``resources_per_worker`` that Ray Train's ScalingConfig reserves."""
    import ray
    from ray.train import ScalingConfig
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from kka_ray.cluster import role_options

    cfg = _gpu_config_on_cpu(tiny_cache)

    @ray.remote
    def where() -> str:
        return ray.get_runtime_context().get_node_id()

    assert ray.get(where.options(**role_options(cfg.preference.resources)).remote()) in cluster["trainer-gpu"]
    assert ray.get(where.options(**role_options(cfg.knowledge.resources)).remote()) in cluster["cpu"]

    for sec in (cfg.evaluator, cfg.detector):
        rpw = {k: v for k, v in sec.resources_per_worker.items() if k != "GPU"}  # no GPUs here
        assert rpw.get("kka_trainer") == 1.0
        scaling = ScalingConfig(num_workers=sec.num_workers, use_gpu=False, resources_per_worker=rpw)
        pg = placement_group([rpw] * scaling.num_workers, strategy=scaling.placement_strategy)
        try:
            ray.get(pg.ready(), timeout=60)
            nodes = ray.get([
                where.options(num_cpus=0, scheduling_strategy=PlacementGroupSchedulingStrategy(pg, i)).remote()
                for i in range(scaling.num_workers)
            ])
        finally:
            remove_placement_group(pg)
        assert len(nodes) == 2 and set(nodes) == set(cluster["trainer-gpu"])


def _probe_class() -> type:
    """A tiny actor class, defined in a function so Ray ships it by value (tests/ is no package)."""

    class NodeProbe:
        def node(self) -> str:
            import ray

            return ray.get_runtime_context().get_node_id()

    return NodeProbe


def test_strict_spread_pool_uses_distinct_nodes(cluster):
    import ray

    from kka_ray.cluster import start_pool

    workers = [n for ids in cluster.values() for n in ids]
    res = RoleResources(num_cpus=1, replicas=len(workers), placement_strategy="STRICT_SPREAD")
    actors, pg = start_pool("drawer", _probe_class(), res)
    try:
        nodes = ray.get([a.node.remote() for a in actors])
        assert sorted(nodes) == sorted(workers), "one actor on each node"
        assert ray.util.placement_group_table(pg)["strategy"] == "STRICT_SPREAD"
    finally:
        for a in actors:
            ray.kill(a)
        ray.util.remove_placement_group(pg)

    # no strategy: plain actors placed by their custom resource, no placement group
    plain = RoleResources(num_cpus=1, replicas=1, resources={"kka_drawer": 1})
    actors, pg = start_pool("drawer", _probe_class(), plain)
    try:
        assert pg is None and ray.get(actors[0].node.remote()) in cluster["drawer-gpu"]
    finally:
        ray.kill(actors[0])


def test_unplaceable_pool_fails_naming_the_role(cluster):
    import ray

    from kka_ray.cluster import start_pool

    # one node advertises kka_describer: two describers cannot be spread over distinct nodes
    res = RoleResources(num_cpus=1, replicas=2, resources={"kka_describer": 1}, placement_strategy="STRICT_SPREAD")
    with pytest.raises(RuntimeError, match=r"describer: the cluster could not place 2 x .*STRICT_SPREAD"):
        start_pool("describer", _probe_class(), res, ready_timeout_s=3)
    states = [v["state"] for v in ray.util.placement_group_table().values() if v["name"] == "kka-describer"]
    assert "PENDING" not in states and "REMOVED" in states, "the unplaceable group is removed, not left pending"
    with pytest.raises(ValueError, match="placement_strategy needs"):
        start_pool("drawer", _probe_class(), RoleResources(num_cpus=0, placement_strategy="PACK"))


def test_one_shot_tasks_get_a_fresh_worker_process_each(cluster):
    """DPO's task runs with max_calls=1: a reused worker would keep a stale CUDA context."""
    import ray

    from kka_ray.cluster import one_shot_task

    def _pid() -> int:  # defined here so that Ray ships it by value
        import os

        return os.getpid()

    res = RoleResources(num_cpus=1, resources={"kka_trainer": 1})
    task = one_shot_task(_pid, res)
    first, second = ray.get(task.remote()), ray.get(task.remote())
    assert first != second
    plain = ray.remote(_pid).options(num_cpus=1, resources={"kka_trainer": 1})
    assert ray.get(plain.remote()) == ray.get(plain.remote()), "a plain task reuses its worker (the control)"


def test_two_describers_share_a_generation_whose_prompts_fit_one_call(cluster, tiny_cache, tmp_path):
    """All prompts fit one describer call (as with gpu.yaml): each of two replicas still describes."""
    import ray

    from kka_ray.generation.pipeline import ResidentPools, read_generated, run_generation

    cfg = load_config(None, [*tiny_overrides(tiny_cache), "describer.resources.replicas=2", "describer.batch_size=64",
                             "describer.resources.num_cpus=1", "drawer.resources.num_cpus=1"])
    assert cfg.describer.batch_size // cfg.describer.samples_per_prompt >= cfg.describer.num_prompts
    prompts = [{"prompt_id": i, "prompt": f"Describe item {i}:", "description": f"item {i}", "cluster": 0}
               for i in range(cfg.describer.num_prompts)]
    pools = ResidentPools.start(cfg, target_size=16, target_mode="L")
    try:
        result = run_generation(cfg, pools, prompts, 1, "t", tmp_path / "gen")
        per_replica = [s["iteration_counts"]["generated"] for s in ray.get([a.stats.remote() for a in pools.describers])]
    finally:
        pools.shutdown()
    assert sum(per_replica) == result["n_generated"] == cfg.describer.num_prompts * cfg.describer.samples_per_prompt
    assert all(n > 0 for n in per_replica), per_replica
    table = read_generated(tmp_path / "gen")
    keys = list(zip(table.column("prompt_id").to_pylist(), table.column("sample_idx").to_pylist()))
    assert len(keys) == len(set(keys))


def test_a_storage_uri_is_refused_on_a_multi_node_cluster(cluster, tiny_cache, tmp_path):
    from kka_ray.config import ConfigError
    from kka_ray.loop import KKARun
    from kka_ray.preflight import RunLock

    run = KKARun.create(load_config(None, tiny_overrides(tiny_cache)), str(tmp_path / "staging"))
    run.staging_for = "s3://bucket/kka/run"
    with pytest.raises(ConfigError, match=r"s3://bucket/kka/run is a URI.*other 4 node\(s\)"):
        run.execute()
    RunLock(run.dir).acquire().release()  # the refused driver let go of the run directory
    assert not (run.dir / "state.json").exists()
