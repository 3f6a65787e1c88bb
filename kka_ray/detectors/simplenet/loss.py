"""SimpleNet's training objective (Liu et al., CVPR 2023, Eq. 5-6; the released code's form).

Negatives are the adapted normal patch features plus Gaussian noise ``N(0, noise_std^2)``
(:func:`perturb`), and with KKA also the adapted patch features of generated anomaly images
(method.md "Detectors"). The discriminator D is trained with the truncated L1 loss of margin
``th``, as the released code computes it:

    loss = mean(clip(th - D(normal), min=0)) + mean(clip(th + D(negatives), min=0))

A term whose set is empty contributes 0 (a batch of only generated anomalies has no normal
rows). The image anomaly score is ``max over patches of -D``.
"""

from __future__ import annotations

import torch


def perturb(adapted: torch.Tensor, noise_std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``adapted + eps`` with ``eps ~ N(0, noise_std^2)`` elementwise (the synthetic negatives)."""
    if noise_std <= 0:
        raise ValueError(f"noise_std must be > 0, got {noise_std} (simplenet.noise_std)")
    noise = torch.randn(adapted.shape, generator=generator, device=adapted.device, dtype=adapted.dtype)
    return adapted + noise * noise_std


def truncated_l1_loss(
    normal_scores: torch.Tensor, negative_scores: torch.Tensor, margin: float = 0.5
) -> tuple[torch.Tensor, dict[str, float]]:
    """Truncated L1 loss of D's scores; returns the loss and its parts (normal, negative, and
    the fractions already past the margin: ``p_true = P(D >= th)``, ``p_fake = P(D < -th)``)."""
    if margin <= 0:
        raise ValueError(f"margin must be > 0, got {margin} (simplenet.margin)")
    if not normal_scores.numel() and not negative_scores.numel():
        raise ValueError("truncated_l1_loss got no scores: a batch needs normal or negative rows")
    zero = normal_scores.new_zeros(())
    normal_part = torch.clamp(margin - normal_scores, min=0).mean() if normal_scores.numel() else zero
    negative_part = torch.clamp(margin + negative_scores, min=0).mean() if negative_scores.numel() else zero
    with torch.no_grad():
        stats = {
            "normal_loss": float(normal_part),
            "negative_loss": float(negative_part),
            "p_true": float((normal_scores >= margin).float().mean()) if normal_scores.numel() else 0.0,
            "p_fake": float((negative_scores < -margin).float().mean()) if negative_scores.numel() else 0.0,
        }
    return normal_part + negative_part, stats
