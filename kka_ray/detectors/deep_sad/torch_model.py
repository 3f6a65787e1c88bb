"""Deep SAD networks phi (method.md Eq. 5; Ruff et al., "Deep Semi-Supervised Anomaly Detection", ICLR 2020).

Every layer is bias-free and every BatchNorm has ``affine=False``: with a bias (or a BN
shift) the network could map all inputs onto the centre ``c`` and reach zero loss
(hypersphere collapse, Ruff et al. 2018, Prop. 2). The blocks follow the authors' released
code (``Linear/Conv -> BatchNorm(eps=1e-4, affine=False) -> leaky ReLU``):

- :class:`MLPNet` for backbone feature vectors (the engine's default input),
- :class:`CNNNet`, the LeNet-type encoder for 28 px (Fashion-MNIST: 8 and 4 channels) and
  32 px images (CIFAR: 32, 64 and 128 channels),
- :class:`MLPAutoencoder` / :class:`CNNAutoencoder`, bias-free mirrored decoders for the
  optional autoencoder pre-training; their ``encoder`` is the same class as phi, so its
  weights initialise phi one to one. Decoders end linearly (no sigmoid), so they
  reconstruct standardised features as well as pixels.

:func:`build_network` / :func:`build_autoencoder` build them from a ``DeepSADSection`` and
an input shape (``(d,)`` for vectors, ``(C, H, W)`` for images).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from kka_ray.config import DeepSADSection

# BatchNorm epsilon of the released Deep SAD code (1e-4, not torch's 1e-5).
BN_EPS = 1e-4
# LeNet channel widths of the released code, by image size.
LENET_CHANNELS = {28: (8, 4), 32: (32, 64, 128)}
# Wider images fall back to the CIFAR widths, as long as 2**blocks divides the size.
DEFAULT_CNN_CHANNELS = (32, 64, 128)
KERNEL = 5  # 5x5 convolutions with padding 2 keep the spatial size, as in LeNet


def _hidden_layers(dims: Sequence[int]) -> nn.ModuleList:
    """``[Linear(bias=False) -> BN(affine=False)]`` between consecutive ``dims``."""
    return nn.ModuleList(
        nn.ModuleDict({"linear": nn.Linear(a, b, bias=False), "bn": nn.BatchNorm1d(b, eps=BN_EPS, affine=False)})
        for a, b in zip(dims[:-1], dims[1:])
    )


def _through(hidden: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    for layer in hidden:
        x = F.leaky_relu(layer["bn"](layer["linear"](x)))
    return x


class MLPNet(nn.Module):
    """Bias-free MLP: ``[Linear -> BN(affine=False) -> leaky ReLU] * len(hidden) -> Linear``."""

    def __init__(self, in_dim: int, hidden_dims: Sequence[int], rep_dim: int) -> None:
        super().__init__()
        if in_dim < 1 or rep_dim < 1 or any(h < 1 for h in hidden_dims):
            raise ValueError(f"MLPNet sizes must be >= 1, got in_dim={in_dim}, hidden={list(hidden_dims)}, rep_dim={rep_dim}")
        self.in_dim, self.hidden_dims, self.rep_dim = int(in_dim), [int(h) for h in hidden_dims], int(rep_dim)
        dims = [self.in_dim, *self.hidden_dims]
        self.hidden = _hidden_layers(dims)
        self.code = nn.Linear(dims[-1], self.rep_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.code(_through(self.hidden, x.flatten(1)))


class MLPDecoder(nn.Module):
    """Mirror of :class:`MLPNet`: ``rep -> reversed(hidden) -> in_dim``, bias-free, linear output."""

    def __init__(self, in_dim: int, hidden_dims: Sequence[int], rep_dim: int) -> None:
        super().__init__()
        dims = [int(rep_dim), *[int(h) for h in reversed(list(hidden_dims))]]
        self.hidden = _hidden_layers(dims)
        self.out = nn.Linear(dims[-1], int(in_dim), bias=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(_through(self.hidden, z))


class MLPAutoencoder(nn.Module):
    """Autoencoder whose ``encoder`` is an :class:`MLPNet` (its weights initialise phi)."""

    def __init__(self, in_dim: int, hidden_dims: Sequence[int], rep_dim: int) -> None:
        super().__init__()
        self.encoder = MLPNet(in_dim, hidden_dims, rep_dim)
        self.decoder = MLPDecoder(in_dim, hidden_dims, rep_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x)).view_as(x)


def _cnn_channels(image_size: int, channels: Sequence[int] | None) -> tuple[int, ...]:
    chans = tuple(channels) if channels is not None else LENET_CHANNELS.get(image_size, DEFAULT_CNN_CHANNELS)
    if not chans or any(c < 1 for c in chans):
        raise ValueError(f"CNN channels must be a non-empty list of positive ints, got {list(chans)}")
    if image_size % (2 ** len(chans)) != 0:
        raise ValueError(
            f"image_size {image_size} is not divisible by 2**{len(chans)} (one 2x2 pooling per conv block); "
            "resize the images to 28 or 32 px (LeNet as in Ruff et al.) or use network='mlp' on features"
        )
    return chans


class CNNNet(nn.Module):
    """LeNet-type bias-free encoder: ``[Conv5x5 -> BN(affine=False) -> leaky ReLU -> MaxPool2] * k -> Linear``.

    28 px: channels (8, 4), 32 px: (32, 64, 128), as in the released Deep SAD code.
    """

    def __init__(self, in_channels: int, image_size: int, rep_dim: int, channels: Sequence[int] | None = None) -> None:
        super().__init__()
        if in_channels < 1 or image_size < 4 or rep_dim < 1:
            raise ValueError(f"CNNNet needs in_channels >= 1, image_size >= 4, rep_dim >= 1; got {in_channels}, {image_size}, {rep_dim}")
        self.in_channels, self.image_size, self.rep_dim = int(in_channels), int(image_size), int(rep_dim)
        self.channels = _cnn_channels(self.image_size, channels)
        chans = [self.in_channels, *self.channels]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, KERNEL, padding=KERNEL // 2, bias=False) for a, b in zip(chans[:-1], chans[1:]))
        self.bns = nn.ModuleList(nn.BatchNorm2d(b, eps=BN_EPS, affine=False) for b in self.channels)
        self.final_size = self.image_size // 2 ** len(self.channels)
        self.code = nn.Linear(self.channels[-1] * self.final_size**2, self.rep_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:  # (B, H, W) grey images
            x = x.unsqueeze(1)
        for conv, bn in zip(self.convs, self.bns):
            x = F.max_pool2d(F.leaky_relu(bn(conv(x))), 2)
        return self.code(x.flatten(1))


class CNNDecoder(nn.Module):
    """Mirror of :class:`CNNNet`: Linear to the last feature map, then ``[BN -> leaky ReLU ->
    upsample x2 -> ConvTranspose5x5]`` per block back to the input channels; bias-free."""

    def __init__(self, in_channels: int, image_size: int, rep_dim: int, channels: Sequence[int] | None = None) -> None:
        super().__init__()
        self.channels = _cnn_channels(int(image_size), channels)
        self.final_size = int(image_size) // 2 ** len(self.channels)
        self.fc = nn.Linear(int(rep_dim), self.channels[-1] * self.final_size**2, bias=False)
        chans = [*reversed(self.channels), int(in_channels)]
        self.bns = nn.ModuleList(nn.BatchNorm2d(c, eps=BN_EPS, affine=False) for c in chans[:-1])
        self.deconvs = nn.ModuleList(
            nn.ConvTranspose2d(a, b, KERNEL, padding=KERNEL // 2, bias=False) for a, b in zip(chans[:-1], chans[1:])
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.fc(z).view(z.shape[0], self.channels[-1], self.final_size, self.final_size)
        for bn, deconv in zip(self.bns, self.deconvs):
            x = deconv(F.interpolate(F.leaky_relu(bn(x)), scale_factor=2))
        return x


class CNNAutoencoder(nn.Module):
    """Autoencoder whose ``encoder`` is a :class:`CNNNet` (its weights initialise phi)."""

    def __init__(self, in_channels: int, image_size: int, rep_dim: int, channels: Sequence[int] | None = None) -> None:
        super().__init__()
        self.encoder = CNNNet(in_channels, image_size, rep_dim, channels)
        self.decoder = CNNDecoder(in_channels, image_size, rep_dim, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x)).view_as(x)


def _image_shape(in_shape: Sequence[int]) -> tuple[int, int]:
    shape = tuple(int(s) for s in in_shape)
    if len(shape) == 2:  # (H, W): one grey channel
        shape = (1, *shape)
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ValueError(
            f"network='cnn' needs square images shaped (C, H, W) or (H, W), got input shape {shape}; "
            "use network='mlp' for feature vectors"
        )
    return shape[0], shape[1]


def _build(cfg: "DeepSADSection", in_shape: Sequence[int], mlp: type, cnn: type) -> nn.Module:
    if cfg.network == "mlp":
        return mlp(math.prod(int(s) for s in in_shape), cfg.hidden_dims, cfg.rep_dim)
    if cfg.network == "cnn":
        c, size = _image_shape(in_shape)
        return cnn(c, size, cfg.rep_dim)
    raise ValueError(f"unknown Deep SAD network {cfg.network!r}; use 'mlp' or 'cnn'")


def build_network(cfg: "DeepSADSection", in_shape: Sequence[int]) -> nn.Module:
    """phi for ``cfg.network`` ('mlp' flattens any input shape; 'cnn' needs (C, H, W))."""
    return _build(cfg, in_shape, MLPNet, CNNNet)


def build_autoencoder(cfg: "DeepSADSection", in_shape: Sequence[int]) -> nn.Module:
    """The autoencoder for pre-training; ``.encoder`` has phi's architecture and state-dict keys."""
    return _build(cfg, in_shape, MLPAutoencoder, CNNAutoencoder)
