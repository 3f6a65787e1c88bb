"""ReContrast losses (Guo et al., NeurIPS 2023) and KKA's generated-anomaly term.

The released code's objective (``utils.global_cosine_hm``, called as
``global_cosine_hm(en[:3], de[:3]) / 2 + global_cosine_hm(en[3:], de[3:]) / 2``), implemented
exactly by :func:`recontrast_loss`:

    L = 1/2 * sum_k mean_b [1 - cos(flat sg(E_f^k(x_b)), flat D^k_0(code(E_t(x_b))))]
      + 1/2 * sum_k mean_b [1 - cos(flat sg(E_t^k(x_b)), flat D^k_1(code(E_f(x_b))))]

with k over the three scales (weights 1), ``flat`` the whole (C, H, W) map of one sample (global
cosine distance), ``sg`` stop-gradient on the encoder targets (the trainable encoder learns only
through the code it hands the decoder). Hard-point mining: for each reconstruction ``D^k`` the
per-point distances ``d(b, h, w) = 1 - cos`` over channels are computed without gradient; points
with ``d < mean(d) + alpha * std(d)`` (over all the batch's points of that map, unbiased std as
``torch.std``) are *easy* and a hook on ``D^k`` multiplies their gradient by ``factor`` (0 =
dropped). ``alpha`` ramps linearly (:func:`hook_alpha`): ``min(a0 + (a1 - a0) * it /
(total * ramp), a1)``, -3 -> 1 over the first 10 % of iterations in the released code.

KKA's addition (:func:`anomaly_term`): generated anomalies' reconstruction distance
``d_anom`` -- the same per-sample quantity as the loss above, without the hook
(:func:`reconstruction_distance`) -- is pushed above a margin:
``weight * mean(clip(margin - d_anom, min=0))``. Anomaly rows never enter ``L``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F


def hook_alpha(iteration: int, total_iters: int, alpha_start: float = -3.0, alpha_end: float = 1.0,
               ramp_fraction: float = 0.1) -> float:
    """The hook's alpha at ``iteration`` (0-based): linear from ``alpha_start`` to ``alpha_end`` over
    the first ``ramp_fraction * total_iters`` iterations, then ``alpha_end``."""
    if total_iters < 1:
        raise ValueError(f"total_iters must be >= 1, got {total_iters}")
    if not 0 < ramp_fraction <= 1:
        raise ValueError(f"ramp_fraction must be in (0, 1], got {ramp_fraction}")
    progress = min(max(iteration, 0) / (total_iters * ramp_fraction), 1.0)
    return float(alpha_start + (alpha_end - alpha_start) * progress)


def point_cosine_distance(target: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """``1 - cos`` over channels at every point: (B, C, H, W) x 2 -> (B, H, W)."""
    return 1 - F.cosine_similarity(target, recon, dim=1)


def global_cosine_distance(target: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """``1 - cos`` of each sample's flattened map: (B, ...) x 2 -> (B,). 0 identical, 1 orthogonal, 2 opposite."""
    return 1 - F.cosine_similarity(target.flatten(1), recon.flatten(1), dim=1)


def easy_point_mask(point_dist: torch.Tensor, alpha: float) -> torch.Tensor:
    """True where a point's distance is below ``mean + alpha * std`` over all points given."""
    d = point_dist.detach()
    return d < d.mean() + alpha * d.reshape(-1).std()


def attach_easy_point_hook(recon: torch.Tensor, easy: torch.Tensor, factor: float = 0.0) -> Any:
    """Multiply the gradient reaching ``recon`` (B, C, H, W) at the ``easy`` points (B, H, W) by
    ``factor``; other points keep theirs. Returns the hook handle."""
    mask = easy.reshape(easy.shape[0], 1, *easy.shape[1:]).to(recon.device)

    def scale(grad: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, grad * factor, grad)

    return recon.register_hook(scale)


def global_cosine_hm(targets: Sequence[torch.Tensor], recons: Sequence[torch.Tensor], alpha: float,
                     factor: float = 0.0) -> torch.Tensor:
    """``sum_k mean_b global_cosine_distance(sg(t_k), r_k)`` with the easy-point hook on each ``r_k``."""
    if len(targets) != len(recons) or not targets:
        raise ValueError(f"need matching non-empty map lists, got {len(targets)} targets and {len(recons)} reconstructions")
    loss = recons[0].new_zeros(())
    for t, r in zip(targets, recons):
        t = t.detach()
        loss = loss + global_cosine_distance(t, r).mean()
        if r.requires_grad:
            with torch.no_grad():
                easy = easy_point_mask(point_cosine_distance(t, r), alpha)
            attach_easy_point_hook(r, easy, factor)
    return loss


def recontrast_loss(targets: Sequence[torch.Tensor], recons: Sequence[torch.Tensor], alpha: float,
                    factor: float = 0.0) -> torch.Tensor:
    """The released objective: the two cross-reconstruction branches, each halved (see module doc)."""
    n = len(targets) // 2
    return (global_cosine_hm(targets[:n], recons[:n], alpha, factor) / 2
            + global_cosine_hm(targets[n:], recons[n:], alpha, factor) / 2)


def reconstruction_distance(targets: Sequence[torch.Tensor], recons: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-sample (B,) distance on the loss's scale: ``1/2 * sum over the six pairs`` of the global
    cosine distance (targets stop-gradient, no hook). Its mean over normal rows equals ``L``."""
    d = recons[0].new_zeros(recons[0].shape[0])
    for t, r in zip(targets, recons):
        d = d + global_cosine_distance(t.detach(), r)
    return d / 2


def anomaly_term(d_anom: torch.Tensor, margin: float, weight: float) -> torch.Tensor:
    """KKA's term for generated anomalies: ``weight * mean(clip(margin - d_anom, min=0))`` (0 if none)."""
    if d_anom.numel() == 0:
        return d_anom.sum() * 0.0
    return weight * torch.clamp(margin - d_anom, min=0).mean()
