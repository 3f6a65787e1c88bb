"""The cluster definitions in cluster/ against the GPU config that places work on them.

Every role of kka_ray/configs/gpu.yaml asks for a custom Ray resource (kka_describer, kka_drawer,
kka_trainer, kka_cpu) and GPUs; these tests check that some node group of the KubeRay RayCluster,
of the RayJob's rayClusterSpec and of the VM autoscaler YAML offers them, in the amounts asked
for, with room for all replicas. The KubeRay groups are read with Ray's own KubeRay parser (the
code the in-tree autoscaler runs), the autoscaler YAML is validated with Ray's schema, and the
manifests are checked against the KubeRay v1 fields (a typo is a test failure, not a silently
pruned field). No network, no cluster: a few seconds.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import pytest
import yaml

from kka_ray.config import KKAConfig, RoleResources, load_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
GPU_CONFIG = ROOT / "kka_ray" / "configs" / "gpu.yaml"
STANDARD = {"CPU", "GPU", "TPU", "memory", "object_store_memory"}


@functools.cache
def _parsed(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _load(path: Path) -> dict:
    """The YAML at ``path``, parsed once per session; each caller gets its own copy to change."""
    return copy.deepcopy(_parsed(path))


def _render_module():
    """cluster/render.py (a script, not a package module), loaded once."""
    name = "kka_cluster_render"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, CLUSTER / "render.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses resolve annotations through sys.modules
        spec.loader.exec_module(mod)
    return sys.modules[name]


# ---------------------------------------------------------------------------------------------
# what the GPU config asks for


def role_demands(cfg: KKAConfig) -> dict[str, dict]:
    """Per role: the resources of one actor/worker ("bundle"), how many, and the placement strategy."""

    def from_role(res: RoleResources, count: int, strategy: str | None = None) -> dict:
        return {"bundle": {"CPU": res.num_cpus, "GPU": res.num_gpus, **res.resources}, "count": count,
                "strategy": strategy}

    def from_train(sec) -> dict:
        rpw = dict(sec.resources_per_worker)
        if sec.use_gpu:
            rpw.setdefault("GPU", 1.0)  # ScalingConfig: use_gpu reserves 1 GPU unless set
        return {"bundle": {"CPU": 0.0, "GPU": 0.0, **rpw}, "count": sec.num_workers, "strategy": None}

    job = cfg.job
    return {
        "driver": {"bundle": {"CPU": job.entrypoint_num_cpus, "GPU": job.entrypoint_num_gpus,
                              **job.entrypoint_resources}, "count": 1, "strategy": None},
        "describer": from_role(cfg.describer.resources, cfg.describer.resources.replicas,
                               cfg.describer.resources.placement_strategy),
        "drawer": from_role(cfg.drawer.resources, cfg.drawer.resources.replicas, cfg.drawer.resources.placement_strategy),
        "knowledge": from_role(cfg.knowledge.resources, cfg.knowledge.resources.replicas),
        "preference": from_role(cfg.preference.resources, 1),
        "evaluator": from_train(cfg.evaluator),
        "detector": from_train(cfg.detector),
    }


def stage_demands(cfg: KKAConfig) -> dict[str, list[tuple[str, dict]]]:
    """What holds resources at the same time in each stage: the job driver and the resident
    describer and drawer pools live for the whole run, next to the stage's own workers."""
    d = role_demands(cfg)
    resident = [(r, d[r]) for r in ("driver", "describer", "drawer")]
    return {stage: resident + [(stage, d[stage])] for stage in ("knowledge", "evaluator", "detector", "preference")}


def custom_of(resources: dict) -> dict:
    return {k: v for k, v in resources.items() if k not in STANDARD and v}


def _fits(free: dict, bundle: dict) -> bool:
    return all(free.get(k, 0) + 1e-9 >= v for k, v in bundle.items())


def _take(free: dict, bundle: dict) -> None:
    for k, v in bundle.items():
        free[k] -= v


def unplaceable(demands: list[tuple[str, dict]], nodes: list[dict]) -> str | None:
    """Why ``demands`` cannot all hold their resources at once on ``nodes`` (one resource dict per
    node at the cluster's maximum size), or None. First fit, strict strategies first: STRICT_PACK
    puts a role's bundles on one node, STRICT_SPREAD each on a different node."""
    free = [dict(n) for n in nodes]
    order = {"STRICT_PACK": 0, "STRICT_SPREAD": 1}
    for role, d in sorted(demands, key=lambda rd: order.get(rd[1]["strategy"], 2)):
        bundle = {k: v for k, v in d["bundle"].items() if v}
        count, strategy = d["count"], d["strategy"]
        if strategy == "STRICT_PACK":
            total = {k: v * count for k, v in bundle.items()}
            node = next((n for n in free if _fits(n, total)), None)
            if node is None:
                return f"{role}: no node holds {count} x {bundle} at once (STRICT_PACK)"
            _take(node, total)
            continue
        used: set[int] = set()
        for i in range(count):
            j = next((j for j, n in enumerate(free) if _fits(n, bundle)
                      and not (strategy == "STRICT_SPREAD" and j in used)), None)
            if j is None:
                return f"{role}: room for {i} of {count} x {bundle}" + (" on distinct nodes" if strategy else "")
            _take(free[j], bundle)
            used.add(j)
    return None


# ---------------------------------------------------------------------------------------------
# node types of each cluster definition


def kuberay_node_types(ray_cluster_spec: dict) -> dict[str, dict]:
    """The node types Ray's in-tree autoscaler derives from a RayCluster spec (its own parser)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    cr = {"apiVersion": "ray.io/v1", "kind": "RayCluster",
          "metadata": {"name": "kka", "namespace": "default"}, "spec": copy.deepcopy(ray_cluster_spec)}
    return _derive_autoscaling_config_from_ray_cr(cr)["available_node_types"]


def autoscaler_node_types() -> dict[str, dict]:
    config = _load(CLUSTER / "autoscaler.yaml")
    return {k: {"resources": v["resources"], "max_workers": v.get("max_workers", 0),
                "head": k == config["head_node_type"]}
            for k, v in config["available_node_types"].items()}


def _kuberay(spec: dict) -> dict[str, dict]:
    return {k: {**v, "head": k == "headgroup"} for k, v in kuberay_node_types(spec).items()}


CLUSTER_DEFINITIONS = {
    "raycluster": lambda: _kuberay(_load(CLUSTER / "kuberay" / "raycluster.yaml")["spec"]),
    "rayjob": lambda: _kuberay(_load(CLUSTER / "kuberay" / "rayjob.yaml")["spec"]["rayClusterSpec"]),
    "autoscaler": autoscaler_node_types,
}


def node_instances(node_types: dict[str, dict]) -> list[dict]:
    """The nodes of a cluster scaled to its maximum: the head once, each worker type max_workers times."""
    return [nt["resources"] for nt in node_types.values() for _ in range(1 if nt["head"] else nt["max_workers"])]


@pytest.fixture(scope="module")
def gpu_cfg() -> KKAConfig:
    return load_config(GPU_CONFIG)


def test_gpu_config_places_every_role_by_a_custom_resource(gpu_cfg):
    demands = role_demands(gpu_cfg)
    for role, d in demands.items():
        assert custom_of(d["bundle"]), f"{role} asks for no custom resource: it could land on any node"
    # the GPU roles ask for GPUs, the feature workers do not
    assert all(demands[r]["bundle"]["GPU"] >= 1 for r in ("describer", "drawer", "evaluator", "detector", "preference"))
    assert demands["knowledge"]["bundle"]["GPU"] == 0
    assert gpu_cfg.run.device == "cuda" and gpu_cfg.ray.address == "auto"


@pytest.mark.parametrize("definition", sorted(CLUSTER_DEFINITIONS))
def test_cluster_definition_has_room_for_every_stage(definition, gpu_cfg):
    node_types = CLUSTER_DEFINITIONS[definition]()
    nodes = node_instances(node_types)
    problems = {stage: why for stage, demands in stage_demands(gpu_cfg).items()
                if (why := unplaceable(demands, nodes)) is not None}
    assert not problems, f"{definition}: {problems} (node types: { {k: v['resources'] for k, v in node_types.items()} })"


@pytest.mark.parametrize("definition", sorted(CLUSTER_DEFINITIONS))
def test_role_resources_live_only_on_their_worker_nodes(definition, gpu_cfg):
    node_types = CLUSTER_DEFINITIONS[definition]()
    (head,) = [nt for nt in node_types.values() if nt["head"]]
    assert head["resources"].get("CPU", 0) == 0 and not custom_of(head["resources"]), "the head runs the driver only"
    assert not head["resources"].get("GPU"), "the head has no GPU: GPU roles must not wait for it"
    asked = {k for d in role_demands(gpu_cfg).values() for k in custom_of(d["bundle"])}
    offered = {k for nt in node_types.values() for k in custom_of(nt["resources"])}
    assert offered == asked, f"{definition} advertises {offered - asked or set()} nobody asks for; misses {asked - offered}"
    for name, nt in node_types.items():
        assert len(custom_of(nt["resources"])) <= 1, f"{definition}/{name}: one role resource per node group"


def test_placement_check_catches_a_mismatch(gpu_cfg):
    """The checks above can fail: a renamed resource, too many GPUs, too many spread replicas,
    and stages whose resident roles crowd out the trainers."""
    nodes = node_instances(CLUSTER_DEFINITIONS["autoscaler"]())
    demands = role_demands(gpu_cfg)
    renamed = copy.deepcopy(demands["drawer"])
    renamed["bundle"] = {**{k: v for k, v in renamed["bundle"].items() if k != "kka_drawer"}, "kka_painter": 1}
    assert "room for 0 of" in unplaceable([("drawer", renamed)], nodes)
    greedy = copy.deepcopy(demands["describer"])
    greedy["bundle"]["GPU"] = 2  # describer nodes have one GPU each
    assert unplaceable([("describer", greedy)], nodes) is not None
    spread = copy.deepcopy(demands["describer"])
    spread.update(count=5, strategy="STRICT_SPREAD")
    assert "distinct nodes" in unplaceable([("describer", spread)], nodes)
    big = copy.deepcopy(demands["evaluator"])
    big["count"] = 8  # two trainer nodes x 4 GPUs, one held by the driver
    assert unplaceable([("driver", demands["driver"]), ("evaluator", big)], nodes) is not None
    big["count"] = 7
    assert unplaceable([("driver", demands["driver"]), ("evaluator", big)], nodes) is None
    packed = copy.deepcopy(demands["evaluator"])
    packed.update(count=4, strategy="STRICT_PACK")  # one 4-GPU node; the driver goes to the other
    assert unplaceable([("driver", demands["driver"]), ("evaluator", packed)], nodes) is None
    packed["count"] = 5
    assert "STRICT_PACK" in unplaceable([("evaluator", packed)], nodes)


# ---------------------------------------------------------------------------------------------
# KubeRay manifests: the shape KubeRay v1 expects


# Fields of the KubeRay v1 API (ray-operator/apis/ray/v1/raycluster_types.go, rayjob_types.go);
# anything else under these objects is a typo that the API server would prune or reject.
RAYCLUSTER_SPEC_FIELDS = {
    "upgradeStrategy", "authOptions", "suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations",
    "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "networkPolicy", "tlsOptions", "headGroupSpec",
    "rayVersion", "workerGroupSpecs",
}
HEAD_GROUP_FIELDS = {"template", "headService", "enableIngress", "ingressOptions", "resources", "labels",
                     "rayStartParams", "serviceType"}
WORKER_GROUP_FIELDS = {"suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
                       "priority", "resources", "labels", "rayStartParams", "template", "scaleStrategy", "numOfHosts"}
AUTOSCALER_OPTIONS_FIELDS = {"resources", "image", "imagePullPolicy", "securityContext", "idleTimeoutSeconds",
                             "upscalingMode", "version", "env", "envFrom", "volumeMounts", "command", "args"}
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata", "clusterSelector",
    "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML", "jobId", "submissionMode",
    "entrypointResources", "entrypointNumCpus", "entrypointNumGpus", "ttlSecondsAfterFinished",
    "shutdownAfterJobFinishes", "suspend",
}
CONTAINER_FIELDS = {"name", "image", "imagePullPolicy", "command", "args", "env", "envFrom", "ports", "resources",
                    "volumeMounts", "securityContext", "lifecycle", "livenessProbe", "readinessProbe", "workingDir"}
_INT = {"type": "integer", "minimum": 0}
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
POD_TEMPLATE = {
    "type": "object", "required": ["spec"],
    "properties": {"spec": {
        "type": "object", "required": ["containers"],
        "properties": {"containers": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["name", "image", "resources"],
            "properties": {"resources": {"type": "object", "required": ["limits"]}},
            "propertyNames": {"enum": sorted(CONTAINER_FIELDS)},
        }}},
    }},
}
RAY_CLUSTER_SPEC_SCHEMA = {
    "type": "object",
    "required": ["headGroupSpec", "workerGroupSpecs", "rayVersion"],
    "propertyNames": {"enum": sorted(RAYCLUSTER_SPEC_FIELDS)},
    "properties": {
        "rayVersion": {"type": "string"},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "autoscalerOptions": {
            "type": "object", "propertyNames": {"enum": sorted(AUTOSCALER_OPTIONS_FIELDS)},
            "properties": {"upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
                           "idleTimeoutSeconds": _INT},
        },
        "headGroupSpec": {
            "type": "object", "required": ["rayStartParams", "template"],
            "propertyNames": {"enum": sorted(HEAD_GROUP_FIELDS)},
            "properties": {"rayStartParams": _STR_MAP, "template": POD_TEMPLATE,
                           "serviceType": {"enum": ["ClusterIP"]}, "enableIngress": {"const": False}},
        },
        "workerGroupSpecs": {"type": "array", "minItems": 1, "items": {
            "type": "object",
            "required": ["groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"],
            "propertyNames": {"enum": sorted(WORKER_GROUP_FIELDS)},
            "properties": {"groupName": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                           "replicas": _INT, "minReplicas": _INT, "maxReplicas": _INT,
                           "rayStartParams": _STR_MAP, "template": POD_TEMPLATE},
        }},
    },
}


def _manifest_schema(kind: str, spec_schema: dict) -> dict:
    return {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": kind},
                       "metadata": {"type": "object", "required": ["name"],
                                    "properties": {"name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}}},
                       "spec": spec_schema},
        "additionalProperties": False,
    }


RAYCLUSTER_SCHEMA = _manifest_schema("RayCluster", RAY_CLUSTER_SPEC_SCHEMA)
RAYJOB_SCHEMA = _manifest_schema("RayJob", {
    "type": "object",
    "required": ["entrypoint", "runtimeEnvYAML", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished", "rayClusterSpec"],
    "propertyNames": {"enum": sorted(RAYJOB_SPEC_FIELDS)},
    "properties": {"entrypoint": {"type": "string"}, "runtimeEnvYAML": {"type": "string"},
                   "shutdownAfterJobFinishes": {"const": True}, "ttlSecondsAfterFinished": _INT,
                   "rayClusterSpec": RAY_CLUSTER_SPEC_SCHEMA},
})


def _cluster_specs() -> list[tuple[str, dict]]:
    return [("raycluster", _load(CLUSTER / "kuberay" / "raycluster.yaml")["spec"]),
            ("rayjob", _load(CLUSTER / "kuberay" / "rayjob.yaml")["spec"]["rayClusterSpec"])]


def test_kuberay_manifests_have_the_kuberay_v1_shape():
    import jsonschema

    jsonschema.validate(_load(CLUSTER / "kuberay" / "raycluster.yaml"), RAYCLUSTER_SCHEMA)
    jsonschema.validate(_load(CLUSTER / "kuberay" / "rayjob.yaml"), RAYJOB_SCHEMA)
    typo = _load(CLUSTER / "kuberay" / "raycluster.yaml")
    typo["spec"]["enableInTreeAutoscalling"] = True
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(typo, RAYCLUSTER_SCHEMA)


@pytest.mark.parametrize("name,spec", _cluster_specs())
def test_kuberay_groups_are_consistent(name, spec):
    import ray

    version = spec["rayVersion"]
    assert version.split(".")[:2] == ray.__version__.split(".")[:2], \
        f"{name}: rayVersion {version} but jobs are submitted with Ray {ray.__version__}; bump cluster/render.py RAY_VERSION"
    assert spec["enableInTreeAutoscaling"] is True
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    assert len({g["groupName"] for g in spec["workerGroupSpecs"]}) == len(spec["workerGroupSpecs"])
    for g in groups:
        pod = g["template"]["spec"]
        c = pod["containers"][0]
        assert c["image"].startswith(f"rayproject/ray:{version}-"), f"{name}: image {c['image']} is not Ray {version}"
        gpus = int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
        assert c["image"].endswith("-gpu") == (gpus > 0), f"{name}: {c['image']} with {gpus} GPUs"
        if gpus:
            assert any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", []))
        assert {m["name"] for m in c.get("volumeMounts", [])} <= {v["name"] for v in pod.get("volumes", [])}
        if "groupName" in g:
            assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], f"{name}/{g['groupName']} replicas"


def test_rayjob_runs_the_gpu_config_and_cleans_up():
    from ray.runtime_env import RuntimeEnv

    spec = _load(CLUSTER / "kuberay" / "rayjob.yaml")["spec"]
    argv = spec["entrypoint"].split()
    assert argv[:2] == ["python", "jobs/kka_run.py"] and (ROOT / argv[1]).is_file()
    config = argv[argv.index("--config") + 1]
    assert (ROOT / config).resolve() == GPU_CONFIG
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    job = load_config(GPU_CONFIG).job  # the driver reserves what `kka submit` would reserve
    assert spec["entrypointNumGpus"] == job.entrypoint_num_gpus and spec["entrypointNumCpus"] == job.entrypoint_num_cpus
    assert json.loads(spec["entrypointResources"]) == job.entrypoint_resources
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    RuntimeEnv(**env)  # Ray's own validation of every field
    assert "://" in env["working_dir"], "a RayJob cannot upload a local working_dir: it needs a URI"
    assert env["env_vars"]["NCCL_CUMEM_ENABLE"] == "0"


def test_rendered_files_are_committed():
    render = _render_module()
    stale = [rel for rel, text in render.render().items() if (ROOT / rel).read_text() != text]
    assert not stale, f"{stale} differ from cluster/render.py's output: run `python cluster/render.py`"


def test_kuberay_resources_param_uses_kuberay_quoting():
    """rayStartParams resources is a quoted JSON string; Ray's KubeRay parser reads it back."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _get_custom_resources

    value = _render_module().ray_start_resources({"kka_trainer": 2, "kka_cpu": 4})
    assert value == '"{\\"kka_cpu\\": 4, \\"kka_trainer\\": 2}"'
    assert _get_custom_resources({}, {"resources": value}, "g") == {"kka_cpu": 4, "kka_trainer": 2}


# ---------------------------------------------------------------------------------------------
# runtime envs and the VM autoscaler


def test_runtime_envs_are_valid_and_gpu_env_installs_the_project_deps():
    from ray.runtime_env import RuntimeEnv

    render = _render_module()
    base = _load(CLUSTER / "runtime_env.yaml")
    gpu = _load(CLUSTER / "runtime_env.gpu.yaml")
    for env in (base, gpu):
        RuntimeEnv(**env)
        assert all(isinstance(v, str) for v in env["env_vars"].values())
        assert env["env_vars"]["TORCH_NCCL_AVOID_RECORD_STREAMS"] == "1"
    assert "pip" not in base, "runtime_env.yaml ships code only (a local cluster must not install vLLM)"
    names = {render.requirement_name(r) for r in gpu["pip"]}
    assert {"torch", "transformers", "diffusers", "trl", "peft", "vllm"} <= names
    assert "ray" not in names, "the image's Ray runs the cluster; a pip-installed Ray would not match it"
    assert gpu["config"]["setup_timeout_seconds"] >= 1200


def test_every_trained_detector_gets_a_gpu_in_gpu_yaml(gpu_cfg):
    from kka_ray.tables.runner import trained_sections

    sections = trained_sections()
    assert {"", "simplenet.", "recontrast."} <= set(sections)
    for prefix in sections:
        sec = gpu_cfg.detector
        for part in filter(None, prefix.split(".")):
            sec = getattr(sec, part)
        assert sec.use_gpu and sec.resources_per_worker.get("GPU", 0) > 0, f"detector.{prefix}use_gpu"
        assert sec.resources_per_worker.get("kka_trainer", 0) > 0, f"detector.{prefix} must land on a trainer node"


def test_the_gpu_cluster_installs_what_gpu_yaml_uses(gpu_cfg):
    """The GPU runtime env (pyproject's dependencies and `gpu` extra) carries DeepSpeed when
    gpu.yaml turns it on for DPO, a vLLM range with an upper bound, and a diffusers that passes
    drawer.dtype on to the pipeline (0.40 and later)."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    gpu = {Requirement(r).name: Requirement(r) for r in _load(CLUSTER / "runtime_env.gpu.yaml")["pip"]}
    if gpu_cfg.preference.deepspeed.enabled:
        assert "deepspeed" in gpu, "gpu.yaml enables DeepSpeed ZeRO but the GPU cluster would not install deepspeed"
    vllm = gpu["vllm"].specifier
    assert any(s.operator == "<" for s in vllm), f"vllm {vllm} has no upper bound"
    assert not vllm.contains("0.33.0")  # moves to torch 2.14 and transformers<5.21
    floor = [Version(s.version) for s in gpu["diffusers"].specifier if s.operator == ">="]
    assert floor and floor[0] >= Version("0.40"), "diffusers before 0.40 ignores drawer.dtype"


def test_autoscaler_yaml_passes_rays_schema_and_checks():
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import validate_config

    config = _load(CLUSTER / "autoscaler.yaml")
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(config)  # the checks `ray up` runs: head type exists, min <= max workers, ...
    bad = copy.deepcopy(config)
    bad["available_node_types"]["drawer_gpu"]["resources"]["kka_drawer"] = 0.5  # schema: integers only
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    assert config["max_workers"] >= sum(t.get("max_workers", 0) for t in config["available_node_types"].values())
    images = [config["docker"]["image"], config["docker"]["head_image"]]
    assert all(i.startswith(f"rayproject/ray:{_render_module().RAY_VERSION}-") for i in images)
    assert any("[gpu]" in c for c in config["setup_commands"]), "nodes install the project with its gpu extra"


def test_dashboard_is_not_exposed():
    config = _load(CLUSTER / "autoscaler.yaml")
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in (CLUSTER / "autoscaler.yaml").read_text()
    for name, spec in _cluster_specs():
        head = spec["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{name}: the head service must stay in-cluster"
        assert not head.get("enableIngress", False), f"{name}: no ingress to the dashboard"
    text = "\n".join(p.read_text() for p in (CLUSTER / "kuberay").glob("*.yaml"))
    assert "NodePort" not in text and "LoadBalancer" not in text


SECRET_PATTERNS = {
    "AWS access key id": r"\bA(KI|SI)A[0-9A-Z]{16}\b",
    "private key": r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    "GitHub token": r"\bgh[pousr]_[A-Za-z0-9]{30,}",
    "Hugging Face token": r"\bhf_[A-Za-z0-9]{30,}",
    "credential value": r"(?i)(secret|password|passwd|token|api[_-]?key|access[_-]?key)[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9/+_\-]{8,}",
    "Kubernetes Secret": r"(?m)^kind:\s*Secret\b",
    "SSH key file": r"ssh_private_key",
}


def _cluster_files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.is_file() and p.suffix in {".yaml", ".yml", ".py", ".json"})


def test_no_secrets_in_cluster_definitions():
    files = _cluster_files() + [GPU_CONFIG]
    assert len(files) >= 6
    found = [(p.name, what) for p in files for what, pat in SECRET_PATTERNS.items()
             if p.name != "render.py" and re.search(pat, p.read_text())]
    assert not found, f"secrets in cluster definitions: {found}"
    # the patterns do fire
    assert re.search(SECRET_PATTERNS["credential value"], "aws_secret_access_key: wJalrXUtnFEMIK7MDENG")
    assert re.search(SECRET_PATTERNS["AWS access key id"], "AKIAIOSFODNN7EXAMPLE")


def test_every_cluster_file_is_checked():
    """A new file in cluster/ must be covered here (or be an obvious non-definition)."""
    known = {"render.py", "runtime_env.yaml", "runtime_env.gpu.yaml", "autoscaler.yaml",
             "raycluster.yaml", "rayjob.yaml", "pvc.yaml"}
    assert {p.name for p in _cluster_files()} <= known
    assert os.path.isfile(CLUSTER / "kuberay" / "pvc.yaml")
    pvc = _load(CLUSTER / "kuberay" / "pvc.yaml")
    assert pvc["metadata"]["name"] == _render_module().SHARED_CLAIM and "ReadWriteMany" in pvc["spec"]["accessModes"]
