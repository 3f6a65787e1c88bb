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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_CONFIG_NAME = "default.yaml"


class ConfigError(ValueError):
    """A config value is wrong; the message names the field and what to do."""


# What a command reports as one ``kka: error: ...`` line (exit 2) instead of a traceback:
# wrong input (config, arguments), missing files, a run directory that already exists.
USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, FileNotFoundError, FileExistsError)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RoleResources(_Section):
    """Where and how a role runs: the Ray resources its actors or workers ask for."""

    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    replicas: int = Field(1, ge=1, description="actors in the pool (describer, drawer)")
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources")
    torch_threads: int | None = Field(None, ge=1, description="torch.set_num_threads in the actor")
    # describer, drawer: reserve the whole pool as one placement group of `replicas` bundles
    # (gang scheduling) with this strategy; STRICT_SPREAD puts each actor on its own node.
    # None: each actor is scheduled on its own. The cluster definitions in cluster/ provide the nodes.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] | None = None
    env_vars: dict[str, str] = Field(
        default_factory=dict, description="environment variables of the role's actors and tasks (runtime_env)"
    )
    max_restarts: int = Field(3, ge=0, description="describer, drawer: times Ray restarts a resident actor that "
                              "dies (it reloads its model and the current adapter); the batch in flight is retried")

    @model_validator(mode="after")
    def _bundle_not_empty(self) -> "RoleResources":
        if self.placement_strategy and not (self.num_cpus > 0 or self.num_gpus > 0 or any(v > 0 for v in self.resources.values())):
            raise ValueError("a role with placement_strategy needs num_cpus, num_gpus or a custom resource > 0")
        return self


class RunSection(_Section):
    name: str = "kka"
    output_dir: str | None = None  # default: runs/<timestamp>
    seed: int = 0
    iterations: int = Field(3, ge=1)
    mode: Literal["add", "rep"] = "add"
    device: Literal["auto", "cpu", "cuda"] = "cpu"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"
    progress: bool = True
    # Where run directories go: a local directory or a pyarrow filesystem URI (file://, s3://,
    # gs://). The run directory is <storage_path>/<--output or run.output_dir or the Ray job's
    # submission id or a timestamp>. With a URI the run works in a local staging directory and
    # uploads it after every completed stage (kka_ray/storage.py). None: runs/<timestamp>, or
    # ~/kka_runs/<submission id> inside a Ray job (its working directory is deleted with it).
    storage_path: str | None = None


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


class PromptTemplate(_Section):
    """An Eq. 3 prompt: ``text`` with ``{description}`` (a representative normal description,
    Eq. 2) and optionally ``{domain}`` and ``{normal}`` (the normal class names). ``chat``: sent
    through the tokenizer's chat template as a user turn; false: a plain completion prompt that
    the answer prefix continues (base models, few-shot lists)."""

    text: str
    chat: bool = True

    @field_validator("text")
    @classmethod
    def _has_description(cls, v: str) -> str:
        if "{description}" not in v:
            raise ValueError("a prompt template must contain {description} (where the representative description goes)")
        return v


def _default_templates() -> dict[str, PromptTemplate]:
    return {
        # A few-shot list completion, no chat template: the normal caption is the first line and
        # the model continues the list with other items. Measured best on the ten Fashion-MNIST
        # classes (benchmarks/results/anomaly_audit.json, README "Generated anomalies").
        "list": PromptTemplate(
            text="Captions of {domain}, a different kind of item on each line:\n- {description}\n- ", chat=False),
        # The same list, told which item not to repeat.
        "list_not_normal": PromptTemplate(
            text="Captions of {domain}, a different kind of item on each line, none of them a {normal}:\n- {description}\n- ",
            chat=False),
        # The paper's wording (Eq. 3), through the chat template.
        "paper": PromptTemplate(
            text="Please generate new sentences that describe {domain}. The sentences should follow the exact "
                 "structure and style of the example below: {description}"),
        # The paper's wording asking for a different item, through the chat template.
        "paper_different": PromptTemplate(
            text="Please generate new sentences that describe {domain}. The sentences should follow the exact "
                 "structure and style of the example below, but describe a different, unusual item: {description}"),
        "contrast": PromptTemplate(
            text="Here is a description of a normal item: {description} Write one new sentence in the same style "
                 "that describes a different kind of item, not a {normal}."),
    }


# The LoRA ranks vLLM's engine accepts for max_lora_rank (vllm.config.lora.LoRAConfig).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class DescriberSection(_Section):
    backend: Literal["transformers", "vllm"] = "transformers"
    model: str = "smollm2-135m-instruct"  # name in the model cache, a local dir, or a hub id
    template: str = "list"
    templates: dict[str, PromptTemplate] = Field(default_factory=_default_templates)

    @field_validator("max_lora_rank")
    @classmethod
    def _vllm_rank(cls, v: int) -> int:
        if v not in VLLM_LORA_RANKS:
            raise ValueError(f"vLLM accepts a max LoRA rank in {list(VLLM_LORA_RANKS)}, got {v}")
        return v

    @field_validator("templates", mode="before")
    @classmethod
    def _plain_text_templates(cls, v: Any) -> Any:
        # a bare string is a chat template's text
        if isinstance(v, dict):
            return {k: ({"text": t} if isinstance(t, str) else t) for k, t in v.items()}
        return v

    answer_prefix: str = "a photo of a"
    num_prompts: int = Field(16, ge=1)
    samples_per_prompt: int = Field(4, ge=1)
    max_new_tokens: int = Field(24, ge=1)  # a description is one short line (about 8-15 tokens)
    temperature: float = Field(0.9, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    batch_size: int = Field(64, ge=1)
    max_chars: int = Field(200, ge=8)
    first_sentence_only: bool = True
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    max_lora_rank: int = 16  # vLLM: one of VLLM_LORA_RANKS, at least preference.lora_r
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)  # vLLM
    # vLLM: more keyword arguments of vllm.LLM (engine args), e.g. {enforce_eager: true, max_model_len: 512,
    # tensor_parallel_size: 2}; the CPU build also wants VLLM_CPU_KVCACHE_SPACE in resources.env_vars.
    engine_args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("engine_args")
    @classmethod
    def _engine_args_not_fields(cls, v: dict[str, Any]) -> dict[str, Any]:
        own = {"model": "model", "enable_lora": None, "max_lora_rank": "max_lora_rank", "dtype": "dtype",
               "gpu_memory_utilization": "gpu_memory_utilization", "trust_remote_code": "trust_remote_code"}
        for key in v:
            if key in own:
                raise ValueError(f"{key!r} is set by the describer itself" +
                                 (f": use describer.{own[key]}" if own[key] else " (LoRA is always on)"))
        return v
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
    # GPU options (diffusers pipelines such as SD-1.5 / SD-Turbo; the pixel drawer ignores the VAE ones)
    channels_last: bool = Field(False, description="UNet and VAE in channels_last memory format")
    vae_slicing: bool = Field(False, description="decode the latents one image at a time (less memory)")
    compile_unet: bool = Field(False, description="torch.compile the UNet; batches are padded to batch_size so "
                               "its input shape never changes")
    compile_backend: str = Field("inductor", description="torch.compile backend for compile_unet")
    resize_on_device: bool = Field(True, description="resize to the detector's resolution on the pipeline's device "
                                   "before the images leave it")
    resources: RoleResources = Field(default_factory=lambda: RoleResources(num_cpus=1, torch_threads=2))


class GuardSection(_Section):
    """The normal-likeness guard (kka_ray/guard.py): generated items that are really the normal
    class never enter the anomaly set. Each rule is calibrated on held-out normals."""

    enabled: bool = True
    # text: the description names a normal class, a known synonym, one of normal_terms, or a word
    # in at least caption_term_share of the normal captions (template and domain words excluded)
    names_normal: bool = True
    normal_terms: list[str] = Field(default_factory=list, description="more words that name the normal class")
    caption_term_share: float = Field(0.3, ge=0, le=1, description="0 turns caption-word mining off")
    # text: all-MiniLM-L6-v2 similarity to the normal captions >= this quantile of held-out captions'
    text_similarity: bool = True
    text_quantile: float = Field(0.5, gt=0, lt=1)
    text_encoder: str = "all-minilm-l6-v2"
    # image: Eq. 1 Mahalanobis score below this quantile of the held-out normals' scores
    image_similarity: bool = True
    image_quantile: float = Field(0.75, gt=0, lt=1)


class AuditSection(_Section):
    """The audit of every generated set (kka_ray/audit/): an independent judge trained on the
    dataset's real training images labels the generated images. Nothing in the loop reads it."""

    enabled: bool = True
    # auto: a small CNN for grey images (Fashion-MNIST), a logistic probe on backbone features for RGB
    judge: Literal["auto", "cnn", "probe"] = "auto"
    judge_epochs: int = Field(3, ge=1, description="CNN epochs")
    judge_per_class: int | None = Field(None, ge=1, description="training images per class; None: all (CNN), 500 (probe)")
    judge_seed: int = 0


class DeepSADSection(_Section):
    network: Literal["mlp", "cnn"] = "mlp"
    input: Literal["features", "pixels"] = "features"
    # Chosen on validation data only (benchmarks/results/evaluator_schedule.json: held-out normals
    # against generated anomalies the model was not trained on, ten Fashion-MNIST classes): a
    # bias-free linear map to 256-d on the L2-normalised, standardised EfficientNet-Lite0 features,
    # rescaled so training distances start at 1 (init_scale: unit), lr 3e-6, 20 epochs, eta 1000:
    # 0.979 AUROC with anomalies in training. At PyTorch's scale (lr 1e-4, 10 epochs, eta 1) the
    # anomalies' 1/d gradient vanishes and training on them changes nothing (0.934, as without);
    # higher lrs or a hidden layer of 512 collapse towards the centre (0.69-0.95). For pixel inputs
    # (network: cnn) use the LeNet encoder instead.
    hidden_dims: list[int] = Field(default_factory=list)
    rep_dim: int = Field(256, ge=1)
    eta: float = Field(1000.0, gt=0)
    eps: float = Field(1e-6, gt=0)
    normal_label: Literal[0, 1] = 0
    epochs: int = Field(20, ge=1)
    lr: float = Field(3e-6, gt=0)
    weight_decay: float = Field(1e-6, ge=0)
    batch_size: int = Field(128, ge=1)
    lr_milestones: list[int] = Field(
        default_factory=list, description="epochs after which the LR is multiplied by 0.1 (paper: 50 or 40)"
    )
    pretrain_autoencoder: bool = False
    ae_epochs: int = Field(10, ge=1)
    # "unit": after the centre pass phi's last layer is rescaled so the mean squared distance of the
    # normal training rows is 1, where the anomalies' eta/(d+eps) term has a gradient that counts;
    # "default": PyTorch's initialisation (distances in the hundreds on standardised features)
    init_scale: Literal["default", "unit"] = "unit"
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = Field(default_factory=lambda: {"CPU": 1})
    # One CPU worker (num_workers 1, use_gpu false) runs its loop in the calling process: Ray Train's
    # local mode (ScalingConfig(num_workers=0)), no controller or worker actor to start (about 15 s
    # less per fit on 2 cores). A crash then fails the stage (`kka run --resume` reruns it) instead
    # of restarting the worker. false: a Ray Train worker actor, restarted if it dies.
    in_process: bool = True


class EvaluatorSection(DeepSADSection):
    # Eq. 6's tau: a quantile of the held-out normals' distances (hard: an anomaly the evaluator
    # would pass as normal at a 2 % false-alarm rate). The maximum (the released code's rule) made
    # every generated item "hard" in every iteration of the default run: one outlying held-out
    # normal sets it. Measured on unseen generated anomalies (benchmarks/results/evaluator_schedule.json,
    # ten classes): hard share 0.47 without anomalies in training (iteration 1) and 0.16 with them
    # at q = 0.98; 0.32 / 0.12 at q = 0.95; 0.76 / 0.68 with the maximum.
    threshold: Literal["max", "quantile"] = "quantile"
    quantile: float = Field(0.98, gt=0, lt=1)
    easy_top_m: int | None = Field(None, ge=1)
    # which evaluator splits iteration k's new anomalies. "first" (the default): iteration 1's,
    # trained on the normals only, in every iteration: hard = close to the normal data, a fixed
    # yardstick for what DPO moves; iteration k's evaluator is still trained and its split reported
    # (hard_fraction_current). "current": iteration k's, trained on D_n and the anomaly set before k
    # (Eq. 5): hard = what it has not learned to separate yet, so anomalies like earlier ones turn
    # easy as D_a grows. Measured on the ten Fashion-MNIST classes (benchmarks/results/
    # split_reference.md): hard share 45 / 50 / 62 % over three iterations with "first" (rising on
    # nine classes), 45 / 17 / 14 % with "current" (rising on one); Deep SAD+KKA 94.8 vs 94.7.
    split_reference: Literal["current", "first"] = "first"
    # With "first": where more than this share of iteration 1's new anomalies would be hard, tau is
    # lowered to the largest distance that keeps at most this share hard (recorded as tau_capped, the
    # normals' tau as tau_normals), so the fixed yardstick leaves room for DPO to raise the hard
    # share. On T-shirt, 86 % of iteration 1's anomalies were hard at q = 0.98 and 98 % by iteration
    # 3; re-thresholding the ten classes' stored distances, a cap of 0.6 gives a split within 0.1-0.9
    # in every iteration on 8 classes (7 without). None: the normals' quantile alone.
    reference_hard_max: float | None = Field(0.6, gt=0, le=1)
    # share of the anomaly set held out (with the held-out normals) to choose the checkpoint
    validation_fraction: float = Field(0.2, ge=0, lt=1)


DetectorName = Literal["sad", "ssd", "simplenet", "recontrast"]
BaselineName = Literal["sad", "ssd", "simplenet", "recontrast", "cmda"]


class SSDSection(_Section):
    """SSD (Sehwag et al., ICLR 2021): k-means + Mahalanobis on backbone features (Eq. 1 alone).

    With anomalies it is few-shot SSD: ``s(x; normals) - s(x; anomalies)``."""

    n_clusters: int = Field(1, ge=1)
    covariance: Literal["pinv", "ledoit_wolf"] = "pinv"
    few_shot: bool = True
    # anomalies are few: their covariance is always shrunk (Ledoit-Wolf) and clustered coarser
    anomaly_clusters: int = Field(1, ge=1)


class SimpleNetSection(_Section):
    """SimpleNet (Liu et al., CVPR 2023); defaults are the released code's unless noted."""

    # stage k = the last block output at stride 2**k; EfficientNet-Lite0: 3 -> block 4 (40 ch),
    # 4 -> block 10 (112 ch). [3, 4] are strides 8 and 16, as the reference WideResNet-50 layer2+layer3.
    layers: list[int] = Field(default_factory=lambda: [3, 4], min_length=1,
                              description="backbone stages (stride 2**k) whose maps are used")
    patch_size: int = Field(3, ge=1, description="local neighbourhood aggregation")
    embed_dim: int = Field(256, ge=8, description="adapted feature size (reference 1536 on WideResNet-50)")
    # reference 0.015 on raw WideResNet-50 features; here patch features are standardised per
    # channel first (EfficientNet-Lite0 maps have std ~5), where 0.015 is too small to learn from
    noise_std: float = Field(0.1, gt=0, description="std of the Gaussian negatives (reference 0.015)")
    margin: float = Field(0.5, gt=0, description="truncated L1 margin th")
    dsc_hidden: int = Field(1024, ge=1)
    dsc_layers: int = Field(2, ge=1)
    adaptor_lr: float = Field(1e-4, gt=0)
    dsc_lr: float = Field(2e-4, gt=0)
    epochs: int = Field(40, ge=1, description="meta epochs (reference 40); validation after each")
    gan_epochs: int = Field(4, ge=1, description="passes over the training data per meta epoch (reference 4)")
    batch_size: int = Field(8, ge=1, description="images per step (each gives all its patches)")
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = Field(default_factory=lambda: {"CPU": 1})
    in_process: bool = True  # as DeepSADSection.in_process


class ReContrastSection(_Section):
    """ReContrast (Guo et al., NeurIPS 2023); defaults are the released code's unless noted."""

    epochs: int = Field(20, ge=1)
    total_iters: int | None = Field(None, ge=1, description="caps the iterations (released code: 2000 MVTec, 3000 VisA)")
    batch_size: int = Field(16, ge=1)
    decoder_lr: float = Field(2e-3, gt=0)
    encoder_lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    alpha_start: float = Field(-3.0, description="hook threshold = mean + alpha * std, alpha ramps from here")
    alpha_end: float = Field(1.0)
    ramp_fraction: float = Field(0.1, gt=0, le=1, description="share of iterations over which alpha ramps")
    hook_factor: float = Field(0.0, ge=0, le=1, description="gradient kept on easy points (0 = dropped)")
    anomaly_weight: float = Field(0.1, ge=0, description="weight of the term pushing generated anomalies' error up")
    anomaly_margin: float = Field(
        2.0, ge=0, description="KKA term: weight * mean(max(0, margin - d)), d = the anomaly's reconstruction "
        "distance on the loss's scale (0-6; trained normals reach about 0.4-1.4, so 0.5 would never act)")
    encoder_bn_train: bool = Field(True, description="trainable encoder's BatchNorm in train mode (released code)")
    encoder_bn_momentum: float | None = Field(
        0.1, gt=0, le=1, description="trainable encoder's BN momentum; 0.1 = the reference ResNet's (PyTorch default), "
        "EfficientNet-Lite0 ships 0.01; None keeps the backbone's")
    score_sigma: float = Field(4.0, ge=0, description="anomaly-map Gaussian sigma in pixels of a 256 px image "
                               "(released code: 4 at 256 px), scaled to the image size; 0 = no smoothing")
    score_max_ratio: float = Field(0.0, ge=0, lt=1, description="image score: 0 = map maximum (released code), "
                                   "else the mean of the top share of pixels")
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = Field(default_factory=lambda: {"CPU": 1})
    in_process: bool = True  # as DeepSADSection.in_process


class CMDASection(_Section):
    """CMDA baseline: pseudo-anomalies interpolated between image features and text features
    mapped into the image feature space; Deep SAD (the detector's SAD settings) trains on them."""

    anomaly_templates: list[str] = Field(default_factory=lambda: [
        "a photo of something that is not a {name}.", "a photo of a damaged {name}.",
        "a photo of an unusual object.", "a photo of a {name} with a strange shape.",
    ])
    n_samples: int = Field(512, ge=1)
    mix_low: float = Field(0.3, ge=0, le=1)
    mix_high: float = Field(0.7, ge=0, le=1)
    ridge_alpha: float = Field(1.0, gt=0)
    # Deep SAD's eta for the pseudo-anomalies (None: SAD's own, detector.eta). Deep SAD's published
    # default is 1; at SAD's 1000 (chosen for the few generated anomalies of the loop) the 512
    # interpolations, half normal by construction, outweigh the normals: mean AUROC 73.0 over the
    # ten Fashion-MNIST classes (bag 39.2), against 86.7 and 86.5 on bag and T-shirt at 1.
    eta: float | None = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _mix_range(self) -> "CMDASection":
        if self.mix_low > self.mix_high:
            raise ValueError(f"mix_low ({self.mix_low}) must not exceed mix_high ({self.mix_high})")
        return self


class DetectorSection(DeepSADSection):
    """The detector inside the loop (``name``), the rows without anomalies (``baselines``), and
    each detector's settings. The top-level Deep SAD fields are SAD's."""

    name: DetectorName = "sad"
    baselines: list[BaselineName] = Field(default_factory=lambda: ["ssd", "sad"])
    # share of the anomaly set held out (with the held-out normals) to choose checkpoints
    validation_fraction: float = Field(0.2, ge=0, lt=1)
    threshold: Literal["max", "quantile"] = "max"
    quantile: float = Field(0.95, gt=0, lt=1)
    ssd: SSDSection = Field(default_factory=SSDSection)
    simplenet: SimpleNetSection = Field(default_factory=SimpleNetSection)
    recontrast: ReContrastSection = Field(default_factory=ReContrastSection)
    cmda: CMDASection = Field(default_factory=CMDASection)


class DeepSpeedSection(_Section):
    enabled: bool = False
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False


class PreferenceSection(_Section):
    beta: float = Field(0.1, gt=0)
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    # Every linear layer of the attention and MLP blocks: on SmolLM2-135M with real pairs the loss fell
    # from log 2 to 0.13 in 16 steps at lr 5e-4 (q, v only: 0.51; lr 5e-5 as the authors' code: 0.685
    # after 8 steps, nothing learned).
    target_modules: list[str] | str = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    learning_rate: float = Field(5e-4, gt=0)
    max_pairs: int = Field(32, ge=1)
    max_steps: int = Field(10, ge=1)
    batch_size: int = Field(4, ge=1)
    max_length: int = Field(128, ge=16)
    gradient_checkpointing: bool = False
    # When the Eq. 6 threshold gives fewer than min_pairs pairs in an iteration (no hard or no easy
    # anomaly, or a far class where only one or two pass as normal), pair the closest third against
    # the farthest third instead, so DPO still moves the describer toward harder texts (recorded as
    # "relative_pairs" in metrics). Off = the paper's rule only.
    relative_fallback: bool = True
    # "base": L_ref is the base LLM with the adapter off (method.md Eq. 7). "previous_adapter":
    # L_ref is the adapter this iteration starts from (TRL's default for a loaded adapter).
    reference: Literal["base", "previous_adapter"] = "base"
    # The rows the normal-likeness guard dropped as normal-like are rejected completions too
    # (ranked before every easy one): DPO learns to avoid writing the normal class.
    reject_normal_like: bool = True
    # The describer shift: held-out prompts the describer writes for (samples_per_prompt each, fixed
    # seeds) before and after each update, scored by the evaluator and the judge; 0 turns it off.
    shift_prompts: int = Field(8, ge=0)
    # Fewer pairs than this: DPO is skipped and the adapter stays. On Fashion-MNIST, 10 steps on one
    # or two pairs drove the loss to 0.01 and the describer to one text (31 of 32 samples duplicates).
    min_pairs: int = Field(4, ge=1)
    # An update after which the describer keeps less than this share of what it kept before (on the
    # shift prompts: parsed, new, drawn and past the guard) is rolled back: the previous adapter is
    # served again and the rollback recorded. 0 turns the check off.
    rollback_below: float = Field(0.5, ge=0, le=1)
    # DPO after the last iteration only yields an adapter for later use (no image is drawn with
    # it in this run); false skips that stage when only the detector's numbers matter.
    final_iteration: bool = False
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    # Ray Train workers of the DPO job (data parallel; batch_size is per worker). 1: one Ray task.
    # Each worker reserves `resources` (num_cpus, num_gpus, custom); >1 on GPUs uses NCCL.
    num_workers: int = Field(1, ge=1)
    resources: RoleResources = Field(default_factory=lambda: RoleResources(num_cpus=1, torch_threads=2))


class JobSection(_Section):
    """`kka submit`: which Ray job server gets the job and what its driver process reserves."""

    # Job server (dashboard) address; None: $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS, then
    # http://127.0.0.1:8265. `kka submit --address` wins over all.
    address: str | None = None
    # Resources reserved for the driver itself (Ray's defaults: none). The driver extracts the
    # normal features and scores them: with run.device=cuda give it a GPU.
    entrypoint_num_cpus: float = Field(0.0, ge=0)
    entrypoint_num_gpus: float = Field(0.0, ge=0)
    entrypoint_memory: int | None = Field(None, ge=0, description="bytes")
    entrypoint_resources: dict[str, float] = Field(default_factory=dict)
    python: str = "python"  # the interpreter the entrypoint runs on the cluster (the head's PATH)
    # Environment of the job (runtime_env env_vars): values given here, plus the submitter's
    # variables named in forward_env. Nothing else is copied; names that look like credentials
    # (KEY, SECRET, TOKEN, PASSWORD, ...) are refused: give the cluster its own credentials.
    env_vars: dict[str, str] = Field(default_factory=lambda: {"TOKENIZERS_PARALLELISM": "false"})
    forward_env: list[str] = Field(default_factory=list)
    excludes: list[str] = Field(default_factory=list, description="more paths kept out of the upload")


class CostSection(_Section):
    """Prices that turn resource-seconds into money (kka_ray/cost.py, `kka cost`). They are inputs,
    not facts: the defaults are round example figures of on-demand cloud list prices, to be set to
    what your cluster costs. A role's GPUs are priced by its accelerator type when its Ray resources
    name one (``accelerator_type:H100``), else at ``gpu_per_hour``."""

    currency: str = "USD"
    cpu_per_hour: float = Field(0.05, ge=0, description="one CPU (vCPU) for an hour")
    gpu_per_hour: float = Field(2.0, ge=0, description="one GPU of an unnamed type for an hour")
    accelerators: dict[str, float] = Field(
        default_factory=lambda: {"H100": 4.0, "H200": 5.0, "A100": 2.5, "A10G": 1.0, "L4": 0.8, "T4": 0.4},
        description="one GPU of this Ray accelerator type for an hour")

    def gpu_price(self, accelerator: str | None) -> float:
        if accelerator is None:
            return self.gpu_per_hour
        return self.accelerators.get(accelerator, self.gpu_per_hour)


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
    guard: GuardSection = Field(default_factory=GuardSection)
    audit: AuditSection = Field(default_factory=AuditSection)
    evaluator: EvaluatorSection = Field(default_factory=EvaluatorSection)
    preference: PreferenceSection = Field(default_factory=PreferenceSection)
    detector: DetectorSection = Field(default_factory=DetectorSection)
    report: ReportSection = Field(default_factory=ReportSection)
    cost: CostSection = Field(default_factory=CostSection)
    job: JobSection = Field(default_factory=JobSection)

    @field_validator("describer")
    @classmethod
    def _template_exists(cls, v: DescriberSection) -> DescriberSection:
        if v.template not in v.templates and "{description}" not in v.template:
            raise ValueError(
                f"template {v.template!r} is neither a name in describer.templates "
                f"({sorted(v.templates)}) nor a chat template text containing '{{description}}'"
            )
        return v

    @model_validator(mode="after")
    def _adapter_fits_vllm(self) -> "KKAConfig":
        if self.describer.backend == "vllm" and self.preference.lora_r > self.describer.max_lora_rank:
            raise ValueError(f"preference.lora_r {self.preference.lora_r} is above describer.max_lora_rank "
                             f"{self.describer.max_lora_rank}: vLLM could not load the adapter; raise "
                             "describer.max_lora_rank or lower preference.lora_r")
        return self

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
        field = ".".join(str(p) for p in e["loc"])
        msg = "unknown field (check its spelling against `kka config`)" if e["type"] == "extra_forbidden" else e["msg"]
        # a check across sections names its fields in the message itself
        lines.append(f"config field '{field}': {msg}" if field else f"config: {msg.removeprefix('Value error, ')}")
    return "; ".join(lines)


def from_dict(tree: dict[str, Any]) -> KKAConfig:
    try:
        return KKAConfig.model_validate(tree or {})
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


DEFAULT_CONFIG_HEADER = """\
# The embedded default config (`kka run` with no --config): every field at its default in
# kka_ray/config.py, the one place defaults are stated. Generated, not edited:
#   python -m kka_ray.config > kka_ray/configs/default.yaml
# tests/test_config.py checks that this file and the code agree.
"""


def load_yaml_mapping(path: str | os.PathLike, what: str, expected: str) -> dict[str, Any]:
    """The mapping in the YAML file ``path``; ``what`` names it in errors (``--prices FILE``) and
    ``expected`` says what it should hold."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} {p}: no such file ({expected})")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} {p}: not valid YAML ({err.__class__.__name__}: {err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {p}: expected {expected}, got {type(data).__name__}")
    return data


def default_config_text() -> str:
    return resources.files("kka_ray.configs").joinpath(DEFAULT_CONFIG_NAME).read_text()


def generated_default_text() -> str:
    """What ``configs/default.yaml`` must hold: the header and every default, as YAML."""
    return DEFAULT_CONFIG_HEADER + KKAConfig().to_yaml()


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


if __name__ == "__main__":
    print(generated_default_text(), end="")
