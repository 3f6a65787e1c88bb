"""The Deep SAD objective and centre rule (method.md Eq. 5; Ruff et al., ICLR 2020, Eq. 4).

Semi-labels: ``+1`` known normal, ``0`` unlabeled, ``-1`` known anomaly (the generated
anomalies). With ``d = ||phi(x) - c||^2`` the per-sample loss is

- ``d``                          for label 0 (unlabeled: pulled towards ``c``),
- ``eta * (d + eps) ** label``   for labels +-1 (normal: ``eta*(d+eps)``, pulled in;
  anomaly: ``eta/(d+eps)``, pushed out; ``eps`` keeps the inverse finite),

averaged over the batch. ``c`` is the mean of phi over the training data after one forward
pass; coordinates with ``|c_i| < 0.1`` are set to ``+-0.1`` keeping their sign (0 counts as
positive), so that no coordinate sits at the origin where a bias-free net trivially maps.
"""

from __future__ import annotations

import torch

# Released code's centre epsilon: |c_i| below this is moved to +-CENTER_EPS.
CENTER_EPS = 0.1


def deep_sad_loss(
    dist_sq: torch.Tensor, semi_labels: torch.Tensor, eta: float = 1.0, eps: float = 1e-6
) -> torch.Tensor:
    """Mean Deep SAD loss of a batch (see module docstring); labels must be in {-1, 0, +1}."""
    if dist_sq.shape != semi_labels.shape:
        raise ValueError(f"dist_sq shape {tuple(dist_sq.shape)} != semi_labels shape {tuple(semi_labels.shape)}")
    labels = semi_labels.to(dist_sq.dtype)
    if labels.numel() and not bool(((labels == 0) | (labels == 1) | (labels == -1)).all()):
        bad = sorted({float(v) for v in labels.unique().tolist()} - {-1.0, 0.0, 1.0})
        raise ValueError(f"semi-labels must be +1 (normal), 0 (unlabeled) or -1 (anomaly); got {bad}")
    labelled = eta * (dist_sq + eps) ** labels
    return torch.where(labels == 0, dist_sq, labelled).mean()


def center_from_sums(sum_phi: torch.Tensor, count: int | float | torch.Tensor, eps: float = CENTER_EPS) -> torch.Tensor:
    """``c = sum_phi / count``, then any ``|c_i| < eps`` is set to ``+eps`` (c_i >= 0) or ``-eps`` (c_i < 0)."""
    n = float(count.item() if isinstance(count, torch.Tensor) else count)
    if n <= 0:
        raise ValueError("cannot compute the Deep SAD centre from 0 samples: the training data is empty")
    c = sum_phi.detach().to(torch.float32) / n
    small = c.abs() < eps
    return torch.where(small, torch.where(c < 0, -eps, eps).to(c.dtype), c)
