"""One validated config tree for a KKA run (YAML file + dotted ``key.sub=value`` overrides).

Every section is a pydantic model that forbids unknown keys, so a typo is an error that
names the field (``describer.temprature: unknown field``). The embedded default lives in
``kka_ray/configs/default.yaml`` and is what ``kka run`` uses with no arguments.

Defaults follow ../design/method.md: eta = 1, eps = 1e-6, beta = 0.1, the max-normal-distance
threshold, the paper's prompt wording.
"""

from __future__ import annotations

import copy
import os
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

DEFAULT_CONFIG_NAME = "default.yaml"


class ConfigError(ValueError):
    """A config value is wrong; the message names the field and what to do."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RoleResources(_Section):
    """Where and how a role runs: the Ray resources its actors or workers ask for."""

    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    replicas: int = Field(1, ge=1, description="actors in the pool (describer, drawer)")
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources")
    torch_threads: int | None = Field(None, ge=1, description="torch.set_num_threads in the actor")


class RunSection(_Section):
    name: str = "kka"
    output_dir: str | None = None  # default: runs/<timestamp>
    seed: int = 0
    iterations: int = Field(3, ge=1)
    mode: Literal["add", "rep"] = "add"
    device: Literal["auto", "cpu", "cuda"] = "cpu"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"
    progress: bool = True


class PathsSection(_Section):
    # Where `kka prepare` puts converted models; $KKA_CACHE overrides the default.
    model_cache: str = "~/.cache/kka_ray"

    def cache_dir(self) -> Path:
        env = os.environ.get("KKA_CACHE")
        return Path(env if env and self.model_cache == "~/.cache/kka_ray" else self.model_cache).expanduser()


class RaySection(_Section):
    address: str | None = None  # None: start a local cluster (or join RAY_ADDRESS if set)
    # Logical CPUs of the local cluster. Stages run one after another, so resident actors
    # and the trainer may declare more CPUs in total than the machine has cores.
    num_cpus: int | None = 8
    include_dashboard: bool = False
    dashboard_host: str = "127.0.0.1"
    object_store_memory: int | None = 512 * 1024**2


class DataSection(_Section):
    dataset: Literal["fashion_mnist", "cifar10", "cifar100", "folder"] = "fashion_mnist"
    path: str | None = None
    preset: Literal[
        None, "cifar100_superclass", "cifar100_fine", "oxford102", "ucm_caption"
    ] = None
    # Class indices or names; None: the dataset's default ([0]; ucm_caption: [0, 1]).
    normal_classes: list[int | str] | None = Field(None, min_length=1)
    holdout_fraction: float = Field(0.1, gt=0, lt=1)
    max_normal_train: int | None = Field(None, ge=2)
    max_test: int | None = Field(None, ge=2)
    caption_templates: list[str] = Field(
        default_factory=lambda: ["a photo of a {name}.", "a picture of a {name}.", "an image of a {name}."]
    )
    # What the images show, for the describer's prompt; None: the dataset's default
    # ("photos of clothing items", "photos of flowers", "aerial images of land use", ...).
    domain: str | None = None
    # Common side length for datasets of variable-size images (folder, oxford102, ucm_caption);
    # None keeps the first image's size. Fashion-MNIST and CIFAR keep their native 28/32 px.
    image_size: int | None = Field(128, ge=8)
    captions_file: str = "captions.jsonl"  # folder: the JSONL inside data.path
    test_fraction: float = Field(0.2, gt=0, lt=1)  # folder without "split" fields: share held out as test
    download: bool = True  # fashion_mnist: fetch from the canonical URL when no local copy exists


class KnowledgeSection(_Section):
    backbone: str = "efficientnet_lite0"
    image_size: int = Field(64, ge=16)
    batch_size: int = Field(32, ge=1)
    n_clusters: int = Field(1, ge=1)
    covariance: Literal["pinv", "ledoit_wolf"] = "pinv"
    n_representatives: int = Field(4, ge=1, description="typical normals per cluster (Eq. 2)")
    resources: RoleResources = Field(default_factory=lambda: RoleResources(num_cpus=1))


class DescriberSection(_Section):
    backend: Literal["transformers", "vllm"] = "transformers"
    model: str = "smollm2-135m-instruct"  # name in the model cache, a local dir, or a hub id
    template: str = "paper"
    templates: dict[str, str] = Field(
        default_factory=lambda: {
            "paper": (
                "Please generate new sentences that describe {domain}. The sentences should "
                "follow the exact structure and style of the example below, but describe a "
                "different, unusual item: {description}"
            ),
            "contrast": (
                "Here is a description of a normal item: {description} Write one new sentence "
                "in the same style that describes a different kind of item."
            ),
        }
    )
    answer_prefix: str = "a photo of a"
    num_prompts: int = Field(16, ge=1)
    samples_per_prompt: int = Field(4, ge=1)
    max_new_tokens: int = Field(40, ge=1)
    temperature: float = Field(0.9, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    batch_size: int = Field(64, ge=1)
    max_chars: int = Field(200, ge=8)
    first_sentence_only: bool = True
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    max_lora_rank: int = 16  # vLLM
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)  # vLLM
    resources: RoleResources = Field(default_factory=lambda: RoleResources(num_cpus=1, torch_threads=2))


class DrawerSection(_Section):
    backend: Literal["diffusers"] = "diffusers"
    model: str = "kka-pixel-drawer"  # name in the model cache, a local dir, or a hub id
    # The shipped drawer at 10 DDIM steps, guidance 3: 91 % class-prompt and 83.5 % held-out
    # paraphrase accuracy (benchmarks/results/drawer_quality.json). SD-Turbo wants 1-4 steps, 0.
    num_inference_steps: int = Field(10, ge=1)
    guidance_scale: float = Field(3.0, ge=0)
    height: int | None = None  # None: the pipeline's default
    width: int | None = None
    batch_size: int = Field(16, ge=1)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    blank_std_threshold: float = Field(2.0, ge=0, description="images with pixel std below this (0-255) are blank")
    resources: RoleResources = Field(default_factory=lambda: RoleResources(num_cpus=1, torch_threads=2))


class DeepSADSection(_Section):
    network: Literal["mlp", "cnn"] = "mlp"
    input: Literal["features", "pixels"] = "features"
    # On L2-normalised, standardised EfficientNet-Lite0 features (Fashion-MNIST one-class,
    # class 0, no anomalies) a bias-free linear map to 256-d scored 89.8 AUROC after 10 epochs
    # at lr 1e-4; one hidden layer of 512 scored 87.0, and [256, 64] at lr 1e-3 fell from 81 to
    # 66 as training went on. For pixel inputs (network: cnn) use the LeNet encoder instead.
    hidden_dims: list[int] = Field(default_factory=list)
    rep_dim: int = Field(256, ge=1)
    eta: float = Field(1.0, gt=0)
    eps: float = Field(1e-6, gt=0)
    normal_label: Literal[0, 1] = 0
    epochs: int = Field(10, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-6, ge=0)
    batch_size: int = Field(128, ge=1)
    lr_milestones: list[int] = Field(
        default_factory=list, description="epochs after which the LR is multiplied by 0.1 (paper: 50 or 40)"
    )
    pretrain_autoencoder: bool = False
    ae_epochs: int = Field(10, ge=1)
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = Field(default_factory=lambda: {"CPU": 1})


class EvaluatorSection(DeepSADSection):
    threshold: Literal["max", "quantile"] = "max"
    quantile: float = Field(0.95, gt=0, lt=1)
    easy_top_m: int | None = Field(None, ge=1)


class DetectorSection(DeepSADSection):
    name: Literal["sad"] = "sad"
    baselines: list[Literal["ssd", "sad"]] = Field(default_factory=lambda: ["ssd", "sad"])


class DeepSpeedSection(_Section):
    enabled: bool = False
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False


class PreferenceSection(_Section):
    beta: float = Field(0.1, gt=0)
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | str = Field(default_factory=lambda: ["q_proj", "v_proj"])
    learning_rate: float = Field(5e-5, gt=0)
    max_pairs: int = Field(32, ge=1)
    max_steps: int = Field(8, ge=1)
    batch_size: int = Field(4, ge=1)
    max_length: int = Field(256, ge=16)
    gradient_checkpointing: bool = False
    # When the Eq. 6 threshold leaves no hard (or no easy) anomaly in an iteration, pair the
    # closest third against the farthest third instead, so DPO still moves the describer
    # toward harder texts (recorded as "relative_pairs" in metrics). Off = the paper's rule only.
    relative_fallback: bool = True
    # "base": L_ref is the base LLM with the adapter off (method.md Eq. 7). "previous_adapter":
    # L_ref is the adapter this iteration starts from (TRL's default for a loaded adapter).
    reference: Literal["base", "previous_adapter"] = "base"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    resources: RoleResources = Field(default_factory=lambda: RoleResources(num_cpus=1, torch_threads=2))


class ReportSection(_Section):
    grid_size: int = Field(16, ge=1)


class KKAConfig(_Section):
    run: RunSection = Field(default_factory=RunSection)
    paths: PathsSection = Field(default_factory=PathsSection)
    ray: RaySection = Field(default_factory=RaySection)
    data: DataSection = Field(default_factory=DataSection)
    knowledge: KnowledgeSection = Field(default_factory=KnowledgeSection)
    describer: DescriberSection = Field(default_factory=DescriberSection)
    drawer: DrawerSection = Field(default_factory=DrawerSection)
    evaluator: EvaluatorSection = Field(default_factory=EvaluatorSection)
    preference: PreferenceSection = Field(default_factory=PreferenceSection)
    detector: DetectorSection = Field(default_factory=DetectorSection)
    report: ReportSection = Field(default_factory=ReportSection)

    @field_validator("describer")
    @classmethod
    def _template_exists(cls, v: DescriberSection) -> DescriberSection:
        if v.template not in v.templates and "{description}" not in v.template:
            raise ValueError(
                f"template {v.template!r} is neither a name in describer.templates "
                f"({sorted(v.templates)}) nor a template text containing '{{description}}'"
            )
        return v

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------------------
# loading


def _parse_value(text: str) -> Any:
    """Parse an override's value with YAML rules (``3`` -> int, ``[1,2]`` -> list, ``null``)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested dict (returns a new dict)."""
    tree = copy.deepcopy(tree)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, _, raw = item.partition("=")
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"override {item!r} has an empty key")
        node = tree
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} is not a section")
            node = child
        node[parts[-1]] = _parse_value(raw)
    return tree


def _format_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = "unknown field (check its spelling against `kka config`)" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"config field '{field}': {msg}")
    return "; ".join(lines)


def from_dict(tree: dict[str, Any]) -> KKAConfig:
    try:
        return KKAConfig.model_validate(tree or {})
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def default_config_text() -> str:
    return resources.files("kka_ray.configs").joinpath(DEFAULT_CONFIG_NAME).read_text()


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> KKAConfig:
    """Load the embedded default (``path=None``) or a YAML file, then apply overrides."""
    if path is None:
        text, origin = default_config_text(), "embedded default"
    else:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist (omit it to use the embedded default)")
        text, origin = p.read_text(), str(p)
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config {origin} is not valid YAML: {err}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config {origin} must be a mapping of sections, got {type(tree).__name__}")
    return from_dict(apply_overrides(tree, overrides or []))
