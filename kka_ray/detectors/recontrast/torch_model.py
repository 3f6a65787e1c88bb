"""ReContrast networks (Guo et al., "ReContrast: Domain-Specific Anomaly Detection via Contrastive
Reconstruction", NeurIPS 2023) over ImageNet EfficientNet-Lite0, as plain ``nn.Module`` s.

Layout, following the authors' released code (``models/recontrast.py``, ``models/resnet.py``
``BN_layer``, ``models/de_resnet.py``) with the WideResNet-50 replaced by EfficientNet-Lite0:

- :class:`MultiScaleEncoder`: the Lite0 stem and blocks 0-10, returning the ends of the /4, /8
  and /16 stages (24, 40, 112 channels), the analogue of ResNet ``layer1..layer3``. Two copies:
  ``encoder`` (E_t, trainable; its BatchNorm in train mode as the released code does) and
  ``encoder_frozen`` (E_f, the pretrained weights, always eval, no gradients).
- :class:`Bottleneck`: RD4AD's OCBE (one-class bottleneck embedding): the /4 map goes through
  two stride-2 3x3 conv-BN-ReLU, the /8 map through one, both land on the /16 map's shape;
  the three are concatenated and fused by residual bottleneck blocks (the first with stride 2)
  into one compact code at /32.
- :class:`Decoder`: three upsampling stages (a 2x2 transposed-conv residual block, then plain
  residual blocks) back to the /16, /8, /4 shapes, and two sets of 1x1 output convolutions
  (released ``output_conv=2``): head 0 decodes codes from E_t, head 1 codes from E_f.
- :class:`ReContrastNet`: ``forward(x)`` returns ``(targets, recons)``, six maps each, in the
  released order: ``targets = E_f maps + E_t maps`` and ``recons = head0(D(code(E_t))) +
  head1(D(code(E_f)))`` -- so pair k < 3 contrasts the reconstruction from the trainable
  encoder's code with the frozen encoder's maps and pair k >= 3 the other way round
  (cross-reconstruction). E_t's and E_f's maps share one bottleneck/decoder batch (2B rows).
- :meth:`ReContrastNet.anomaly_map`: the released test-time map: per pixel ``1 - cos`` of each
  of the six pairs, bilinearly upsampled (``align_corners=True``) to the input size and summed,
  then Gaussian-smoothed (scipy ``gaussian_filter`` semantics, reproduced in torch by
  :func:`gaussian_blur`); :func:`image_scores` reduces a map to its maximum (or a top share).

Where this differs from the released WideResNet-50 code: the encoder (Lite0 stages of 24/40/112
channels instead of 256/512/1024; Lite0's MBConv outputs are linear, not post-ReLU), the code
(320 channels at /32 instead of 2048), decoder blocks 2x as wide as their output instead of 0.5x
(Lite0's maps are about 10x narrower), and the trainable encoder's BN momentum (set to PyTorch's
0.1, the reference ResNet's, instead of Lite0's TF-style 0.01; ``ReContrastSection``).
"""

from __future__ import annotations

import copy
import os
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Last block index of the /4, /8 and /16 stages of EfficientNet-Lite0 (blocks 0..15), and the
# channels there: the counterparts of WideResNet-50's layer1..layer3 in the released code.
LITE0_STAGE_ENDS = (2, 4, 10)
LITE0_STAGE_CHANNELS = (24, 40, 112)
# Code width at /32: Lite0's own /32 width (its last block has 320 channels).
CODE_CHANNELS = 320
# Residual blocks fusing the concatenated maps (released BN_layer(Bottleneck, 3): three).
BOTTLENECK_BLOCKS = 3
# Residual blocks per decoder stage, /16 first (released de_wide_resnet50_2: [3, 4, 6]).
DECODER_BLOCKS = (3, 4, 6)
# Inner width of a decoder block relative to its output. The released WRN-50-2 decoder uses 0.5x
# on 256-1024-channel maps; Lite0's maps have 24-112 channels, so 2x keeps the decoder blocks
# from being narrower than the maps they rebuild (the code at /32 stays the bottleneck).
WIDTH_FACTOR = 2
# scipy.ndimage.gaussian_filter's default: the kernel reaches 4 sigma on each side.
GAUSSIAN_TRUNCATE = 4.0
# The released code's image size, at which its smoothing sigma (4 px) is given.
REFERENCE_IMAGE_SIZE = 256


class MultiScaleEncoder(nn.Module):
    """EfficientNet-Lite0 up to the /16 stage; ``forward`` returns the /4, /8, /16 stage outputs."""

    def __init__(self, efficientnet: nn.Module, stage_ends: Sequence[int] = LITE0_STAGE_ENDS) -> None:
        super().__init__()
        self.stage_ends = tuple(int(i) for i in stage_ends)
        self.conv_stem = efficientnet._conv_stem
        self.bn0 = efficientnet._bn0
        self.act = efficientnet._swish
        self.blocks = nn.ModuleList(list(efficientnet._blocks)[: self.stage_ends[-1] + 1])
        self.channels = tuple(int(self.blocks[i]._block_args.output_filters) for i in self.stage_ends)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.act(self.bn0(self.conv_stem(x)))
        out = []
        for i, block in enumerate(self.blocks):
            x = block(x)  # no drop-connect: the released ResNet encoder has no stochastic depth
            if i in self.stage_ends:
                out.append(x)
        return out


def _conv_bn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ResidualBlock(nn.Module):
    """ResNet bottleneck block ``1x1 -> 3x3 -> 1x1`` (+ shortcut), keeping, halving (``"down"``:
    stride-2 3x3) or doubling (``"up"``: 2x2 transposed conv, as de_resnet's deconv2x2) the size."""

    def __init__(self, cin: int, cout: int, width: int, mode: Literal["same", "down", "up"] = "same") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        if mode == "down":
            self.conv2: nn.Module = nn.Conv2d(width, width, 3, 2, 1, bias=False)
        elif mode == "up":
            self.conv2 = nn.ConvTranspose2d(width, width, 2, 2, bias=False)
        else:
            self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module | None = None
        if mode == "down":
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, 2, bias=False), nn.BatchNorm2d(cout))
        elif mode == "up":
            self.shortcut = nn.Sequential(nn.ConvTranspose2d(cin, cout, 2, 2, bias=False), nn.BatchNorm2d(cout))
        elif cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """Multi-scale fusion (RD4AD OCBE): three encoder maps -> one code at /32."""

    def __init__(self, channels: Sequence[int] = LITE0_STAGE_CHANNELS, code_channels: int = CODE_CHANNELS,
                 blocks: int = BOTTLENECK_BLOCKS) -> None:
        super().__init__()
        c1, c2, c3 = (int(c) for c in channels)
        self.down1 = nn.Sequential(_conv_bn_relu(c1, c2, 2), _conv_bn_relu(c2, c3, 2))
        self.down2 = _conv_bn_relu(c2, c3, 2)
        width = code_channels // 2  # released: a 2048-channel code with inner width 1024 (wide bottleneck)
        layers = [ResidualBlock(3 * c3, code_channels, width, "down")]
        layers += [ResidualBlock(code_channels, code_channels, width) for _ in range(blocks - 1)]
        self.fuse = nn.Sequential(*layers)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        f1, f2, f3 = feats
        return self.fuse(torch.cat([self.down1(f1), self.down2(f2), f3], dim=1)).contiguous()


class Decoder(nn.Module):
    """Code at /32 -> maps at /16, /8, /4 (returned /4 first, like the encoder) + two output heads."""

    def __init__(self, channels: Sequence[int] = LITE0_STAGE_CHANNELS, code_channels: int = CODE_CHANNELS,
                 blocks: Sequence[int] = DECODER_BLOCKS, heads: int = 2) -> None:
        super().__init__()
        self.channels = tuple(int(c) for c in channels)
        self.stages = nn.ModuleList()
        cin = code_channels
        for cout, n in zip(reversed(self.channels), blocks):
            width = WIDTH_FACTOR * cout
            stage = [ResidualBlock(cin, cout, width, "up")] + [ResidualBlock(cout, cout, width) for _ in range(n - 1)]
            self.stages.append(nn.ModuleList(stage))
            cin = cout
        # linear 1x1 outputs (with bias): encoder maps are BN outputs, so targets can be negative
        self.heads = nn.ModuleList(nn.ModuleList(nn.Conv2d(c, c, 1) for c in self.channels) for _ in range(heads))

    def features(self, code: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        """Decoder maps before the heads, /4 first; ``sizes`` are the encoder maps' (H, W), /4 first.

        A transposed conv doubles the size; where the encoder rounded up (odd sizes), the extra
        row/column is cropped so the shapes match the encoder's exactly."""
        out = []
        x = code
        for stage, (h, w) in zip(self.stages, reversed(list(sizes))):
            x = stage[0](x)[..., :h, :w]
            for block in stage[1:]:
                x = block(x)
            out.append(x)
        return out[::-1]

    def head(self, index: int, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [conv(f) for conv, f in zip(self.heads[index], feats)]


class ReContrastNet(nn.Module):
    """E_t, E_f, bottleneck and decoder; ``forward(x) -> (targets, recons)`` (six maps each)."""

    def __init__(self, encoder: MultiScaleEncoder, encoder_frozen: MultiScaleEncoder, bottleneck: Bottleneck,
                 decoder: Decoder, encoder_bn_train: bool = True) -> None:
        super().__init__()
        self.encoder = encoder
        self.encoder_frozen = encoder_frozen
        self.encoder_frozen.requires_grad_(False)
        self.bottleneck = bottleneck
        self.decoder = decoder
        self.encoder_bn_train = bool(encoder_bn_train)
        self.train(True)

    def train(self, mode: bool = True) -> "ReContrastNet":
        """As the released ``ReContrast.train``: E_f always eval; E_t in train mode only when
        ``encoder_bn_train`` (its BatchNorm then uses batch statistics and updates running ones)."""
        super().train(mode)
        self.encoder_frozen.train(False)
        if mode and not self.encoder_bn_train:
            self.encoder.train(False)
        return self

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        en_t = self.encoder(x)
        with torch.no_grad():
            en_f = self.encoder_frozen(x)
        code = self.bottleneck([torch.cat([a, b], dim=0) for a, b in zip(en_t, en_f)])
        feats = self.decoder.features(code, [tuple(m.shape[-2:]) for m in en_t])
        b = x.shape[0]
        de_t = self.decoder.head(0, [f[:b] for f in feats])  # decoded from E_t's code
        de_f = self.decoder.head(1, [f[b:] for f in feats])  # decoded from E_f's code
        return en_f + en_t, de_t + de_f

    # -- scoring ------------------------------------------------------------------------------
    def anomaly_map(self, x: torch.Tensor, sigma: float = 0.0) -> torch.Tensor:
        """Per-pixel anomaly map (B, H, W): sum over the six pairs of ``1 - cos`` (channels),
        bilinearly upsampled to the input size, then Gaussian-smoothed with ``sigma`` pixels."""
        targets, recons = self(x)
        size = tuple(x.shape[-2:])
        amap = torch.zeros((x.shape[0], 1, *size), dtype=x.dtype, device=x.device)
        for t, r in zip(targets, recons):
            d = (1 - F.cosine_similarity(t, r, dim=1)).unsqueeze(1)
            amap = amap + F.interpolate(d, size=size, mode="bilinear", align_corners=True)
        if sigma > 0:
            amap = gaussian_blur(amap, sigma)
        return amap[:, 0]

    # -- state of the trainable parts ---------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """State of E_t, bottleneck and decoder (E_f is the pretrained weights: not saved)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("encoder_frozen.")}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.trainable_state_dict())
        got = set(state)
        if got != expected:
            missing, extra = sorted(expected - got)[:5], sorted(got - expected)[:5]
            raise ValueError(f"ReContrast weights do not fit this network: missing {missing}, unexpected {extra}")
        self.load_state_dict(state, strict=False)

    def frozen_fingerprint(self) -> float:
        """Sum of |weights| of E_f: tells whether a checkpoint meets the same pretrained encoder."""
        with torch.no_grad():
            return float(sum(v.detach().double().abs().sum() for v in self.encoder_frozen.state_dict().values()
                             if v.is_floating_point()))

    def sibling(self) -> "ReContrastNet":
        """A copy of the trainable parts sharing this net's (frozen) E_f module."""
        twin = ReContrastNet(copy.deepcopy(self.encoder), self.encoder_frozen, copy.deepcopy(self.bottleneck),
                             copy.deepcopy(self.decoder), self.encoder_bn_train)
        return twin.train(self.training)


def _reflect_index(n: int, radius: int, device: torch.device) -> torch.Tensor:
    """Indices of a length-``n`` axis padded by ``radius`` in scipy's ``reflect`` mode
    (d c b a | a b c d | d c b a), for any radius (folds repeatedly)."""
    idx = torch.arange(-radius, n + radius, device=device) % (2 * n)
    return torch.where(idx >= n, 2 * n - 1 - idx, idx)


def gaussian_blur(x: torch.Tensor, sigma: float, truncate: float = GAUSSIAN_TRUNCATE) -> torch.Tensor:
    """Separable Gaussian smoothing of (B, C, H, W) as ``scipy.ndimage.gaussian_filter(sigma)``
    applied per image and channel (kernel radius ``int(truncate * sigma + 0.5)``, reflect mode)."""
    if sigma <= 0:
        return x
    radius = int(truncate * float(sigma) + 0.5)
    if radius == 0:
        return x
    pos = torch.arange(-radius, radius + 1, dtype=torch.float64, device=x.device)
    kernel = torch.exp(-0.5 * (pos / float(sigma)) ** 2)
    kernel = (kernel / kernel.sum()).to(x.dtype)
    b, c, h, w = x.shape
    y = x.reshape(b * c, 1, h, w)
    y = y.index_select(2, _reflect_index(h, radius, x.device))
    y = F.conv2d(y, kernel.view(1, 1, -1, 1))
    y = y.index_select(3, _reflect_index(w, radius, x.device))
    y = F.conv2d(y, kernel.view(1, 1, 1, -1))
    return y.reshape(b, c, h, w)


def image_scores(amap: torch.Tensor, max_ratio: float = 0.0) -> torch.Tensor:
    """Image score from a (B, H, W) map: its maximum (``max_ratio == 0``, the released default),
    else the mean of the top ``max_ratio`` share of pixels (released ``evaluation(max_ratio=...)``)."""
    flat = amap.flatten(1)
    if max_ratio <= 0:
        return flat.max(dim=1).values
    k = max(1, int(flat.shape[1] * max_ratio))
    return flat.topk(k, dim=1).values.mean(dim=1)


def smoothing_sigma(score_sigma: float, image_size: int) -> float:
    """The configured sigma (pixels at 256 px, released code: 4) at ``image_size``."""
    return float(score_sigma) * float(image_size) / REFERENCE_IMAGE_SIZE


def build_recontrast_net(cache_dir: str | os.PathLike, encoder_bn_train: bool = True,
                         encoder_bn_momentum: float | None = 0.1) -> ReContrastNet:
    """E_t and E_f from the pretrained Lite0, a fresh bottleneck and decoder (seed torch first)."""
    from kka_ray.knowledge.backbones import load_efficientnet_lite0_net

    lite0 = load_efficientnet_lite0_net(cache_dir)
    frozen = MultiScaleEncoder(lite0)
    trainable = MultiScaleEncoder(copy.deepcopy(lite0))
    if encoder_bn_momentum is not None:
        for m in trainable.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = float(encoder_bn_momentum)
    channels = trainable.channels
    net = ReContrastNet(trainable, frozen, Bottleneck(channels), Decoder(channels), encoder_bn_train)
    _init_new_layers(net)
    return net


def _init_new_layers(net: ReContrastNet) -> None:
    """Kaiming-normal (fan_out, relu) convs and unit/zero BatchNorm in the new parts (released init)."""
    for part in (net.bottleneck, net.decoder):
        for m in part.modules():
            # as released: Conv2d only (transposed convs and the heads' biases keep torch's init)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
