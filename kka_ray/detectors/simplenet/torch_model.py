"""SimpleNet's networks (Liu et al., "SimpleNet: A Simple Network for Image Anomaly Detection
and Localization", CVPR 2023), in plain torch.

- :class:`PatchFeatureExtractor` (frozen): the maps of the chosen backbone *stages*, each
  locally aggregated (``avg_pool2d``, kernel ``patch_size``, stride 1, same size) and
  bilinearly upsampled to the finest used map, concatenated per patch: ``(N, P, sum C_l)``.
  A stage ``k`` is the last block output at stride ``2**k``; on EfficientNet-Lite0 (stem
  stride 2, blocks 0-15) stage 1 = block 0 (16 ch), 2 = block 2 (24 ch), 3 = block 4 (40 ch),
  4 = block 10 (112 ch), 5 = block 15 (320 ch). The default ``[3, 4]`` (strides 8 and 16)
  matches the reference's WideResNet-50 ``layer2`` + ``layer3``; at 64 px input the maps are
  8x8 and 4x4, so an image gives 64 patches.
- :class:`FeatureStandardizer` (buffers, not trained): per-channel ``(x - mean) / std`` with the
  training normals' statistics. Not in the released code: EfficientNet-Lite0's block outputs
  (no activation, per-channel std ~5) are far larger than the reference's post-ReLU
  WideResNet-50 features, so a fixed noise level means nothing without a common scale (with
  raw features and noise 0.015 the loss stays at ``2 * th`` and AUROC drifts to chance).
- :class:`LayerProjection` (no parameters): the released code's ``MeanMapper`` per stage
  (adaptive average pooling of the stage's channels to ``embed_dim``) and ``Aggregator``
  (adaptive average pooling of the stacked stages to ``embed_dim``), so every stage weighs
  the same whatever its channel count. It runs inside :class:`SimpleNetHead`, so the training
  datasets hold the smaller ``sum C_l`` channels per patch.
- :class:`FeatureAdaptor`: one linear layer (the reference ``Projection``, ``pre_proj=1``).
- :class:`Discriminator`: ``dsc_layers - 1`` blocks of Linear + BatchNorm1d + LeakyReLU(0.2),
  then a bias-free Linear to one score (the reference ``Discriminator``); Xavier-normal init.
- :class:`SimpleNetHead`: standardiser -> projection -> adaptor -> discriminator. ``forward(x)`` gives D's
  score per patch row; ``forward(x, n_normal=n, noise_std=s)`` is the training pass: the first
  ``n`` rows are normal, their adapted features plus Gaussian noise join the batch as
  negatives, and one discriminator call scores ``[adapted rows, perturbed normals]`` (so DDP
  sees one forward, and BatchNorm sees normal and negative rows together, as in the reference).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kka_ray.detectors.simplenet.loss import perturb

LEAKY_SLOPE = 0.2  # reference Discriminator


def _init_weight(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_normal_(module.weight)


# ---------------------------------------------------------------------------------------
# frozen patch features


def _block_stride(block: nn.Module) -> int:
    stride = block._block_args.stride
    return int(stride[0] if isinstance(stride, (list, tuple)) else stride)


def efficientnet_stage_blocks(net: nn.Module) -> dict[int, int]:
    """Stage ``k`` -> index of the last block whose output is at stride ``2**k``."""
    stride = int(net._conv_stem.stride[0])
    last: dict[int, int] = {}
    for i, block in enumerate(net._blocks):
        stride *= _block_stride(block)
        last[int(round(math.log2(stride)))] = i
    return last


class PatchFeatureExtractor(nn.Module):
    """Locally aggregated patch features of a frozen EfficientNet(-Lite)'s stage maps.

    ``forward(x)``: normalised images (N, 3, S, S) -> (N, P, sum C_l) with ``P = h * w`` of the
    finest used stage map (row-major). ``layer_channels`` and ``grid(S)`` describe the output.
    """

    def __init__(self, net: nn.Module, layers: Sequence[int], patch_size: int = 3) -> None:
        super().__init__()
        if not all(hasattr(net, a) for a in ("_conv_stem", "_bn0", "_blocks", "_swish")):
            raise ValueError(
                "SimpleNet's patch features need an EfficientNet(-Lite) trunk (_conv_stem/_bn0/_blocks); "
                f"got {type(net).__name__}. Use knowledge.backbone=efficientnet_lite0"
            )
        if patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}")
        stages = efficientnet_stage_blocks(net)
        layers = [int(k) for k in layers]
        bad = [k for k in layers if k not in stages]
        if not layers or bad or len(set(layers)) != len(layers):
            raise ValueError(
                f"simplenet.layers must be distinct stages from {sorted(stages)} (stage k = stride 2**k), got {layers}"
            )
        self.net = net
        self.layers = sorted(layers)
        self.block_of = {k: stages[k] for k in self.layers}
        self.patch_size = int(patch_size)
        self.layer_channels = [int(net._blocks[self.block_of[k]]._block_args.output_filters) for k in self.layers]
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "PatchFeatureExtractor":
        return super().train(False)  # frozen: BatchNorm statistics never move

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(x)))
        maps: dict[int, torch.Tensor] = {}
        last_block = max(self.block_of.values())
        for idx, block in enumerate(net._blocks[: last_block + 1]):
            x = block(x)  # always eval mode: extract_features' drop connect would be a no-op
            for k, b in self.block_of.items():
                if b == idx:
                    maps[k] = x
        pad = self.patch_size // 2  # even sizes give one extra row/column, cropped below
        size = maps[self.layers[0]].shape[-2:]
        out = []
        for k in self.layers:
            m = maps[k].float()
            h, w = m.shape[-2:]
            if self.patch_size > 1:
                m = F.avg_pool2d(m, self.patch_size, stride=1, padding=pad, count_include_pad=True)[..., :h, :w]
            if m.shape[-2:] != size:
                m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
            out.append(m)
        feats = torch.cat(out, dim=1)  # (N, sum C, h, w)
        return feats.flatten(2).transpose(1, 2).contiguous()  # (N, P, sum C)


# ---------------------------------------------------------------------------------------
# trained head

STD_FLOOR = 1e-6  # channels with a smaller training std are centred, not scaled


class FeatureStandardizer(nn.Module):
    """``(x - mean) / std`` per channel; the statistics are buffers (saved with the head)."""

    def __init__(self, channels: int, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        super().__init__()
        m = torch.zeros(channels) if mean is None else torch.as_tensor(mean, dtype=torch.float32)
        s = torch.ones(channels) if std is None else torch.as_tensor(std, dtype=torch.float32)
        if m.shape != (channels,) or s.shape != (channels,):
            raise ValueError(f"standardiser statistics must have {channels} entries, got {tuple(m.shape)} and {tuple(s.shape)}")
        self.register_buffer("mean", m.clone())
        self.register_buffer("std", torch.where(s < STD_FLOOR, torch.ones_like(s), s))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std



class LayerProjection(nn.Module):
    """Reference MeanMapper per stage + Aggregator: (R, sum C_l) -> (R, embed_dim), no parameters."""

    def __init__(self, layer_channels: Sequence[int], embed_dim: int) -> None:
        super().__init__()
        self.layer_channels = [int(c) for c in layer_channels]
        self.embed_dim = int(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, self.layer_channels, dim=-1)
        mapped = [F.adaptive_avg_pool1d(p.reshape(len(p), 1, -1), self.embed_dim) for p in parts]  # (R, 1, E) each
        stacked = torch.cat(mapped, dim=-1)  # (R, 1, L * E), stage-major as torch.stack(dim=1).reshape
        return F.adaptive_avg_pool1d(stacked, self.embed_dim).reshape(len(x), self.embed_dim)


class FeatureAdaptor(nn.Module):
    """The linear feature adaptor (reference ``Projection`` with one layer)."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(embed_dim, embed_dim)
        self.apply(_init_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class Discriminator(nn.Module):
    """MLP discriminator: ``n_layers - 1`` (Linear, BatchNorm1d, LeakyReLU) blocks, Linear(., 1, bias=False)."""

    def __init__(self, in_dim: int, n_layers: int = 2, hidden: int = 1024) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        width = in_dim
        for _ in range(n_layers - 1):
            blocks += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(LEAKY_SLOPE)]
            width = hidden
        self.body = nn.Sequential(*blocks)
        self.tail = nn.Linear(width, 1, bias=False)
        self.apply(_init_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.body(x)).squeeze(-1)


class SimpleNetHead(nn.Module):
    """Standardiser -> projection -> adaptor -> discriminator over patch-feature rows (R, sum C_l)."""

    def __init__(self, layer_channels: Sequence[int], embed_dim: int, dsc_hidden: int, dsc_layers: int,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        super().__init__()
        self.standardizer = FeatureStandardizer(sum(int(c) for c in layer_channels), mean, std)
        self.projection = LayerProjection(layer_channels, embed_dim)
        self.adaptor = FeatureAdaptor(embed_dim)
        self.discriminator = Discriminator(embed_dim, dsc_layers, dsc_hidden)

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        return self.adaptor(self.projection(self.standardizer(x)))

    def forward(self, x: torch.Tensor, n_normal: int | None = None, noise_std: float | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """D per row of ``x``; with ``n_normal`` and ``noise_std`` (training), D of
        ``[adapt(x), adapt(x[:n_normal]) + noise]``: rows ``[:n_normal]`` are the normals,
        ``[n_normal:len(x)]`` the given anomalies, ``[len(x):]`` the perturbed normals."""
        adapted = self.adapt(x)
        if n_normal is None:
            return self.discriminator(adapted)
        if noise_std is None:
            raise ValueError("the training pass needs noise_std with n_normal")
        fake = perturb(adapted[:n_normal], noise_std, generator)
        return self.discriminator(torch.cat([adapted, fake]))


def build_head(layer_channels: Sequence[int], embed_dim: int, dsc_hidden: int, dsc_layers: int,
               mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> SimpleNetHead:
    """The trained part of SimpleNet for the given stage channels, config sizes and feature statistics."""
    return SimpleNetHead(layer_channels, embed_dim, dsc_hidden, dsc_layers, mean, std)
