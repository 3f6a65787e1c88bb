"""SimpleNet (Liu et al., CVPR 2023; method.md "Detectors"): frozen patch features, a linear
feature adaptor and an MLP discriminator trained with a truncated L1 loss against Gaussian
negatives (and, with KKA, the generated anomalies' patch features).

Names resolve lazily, so ``import kka_ray.detectors.simplenet`` does not import torch:
``SimpleNet`` (model.py), ``truncated_l1_loss`` / ``perturb`` (loss.py),
``PatchFeatureExtractor``, ``LayerProjection``, ``FeatureAdaptor``, ``Discriminator``,
``SimpleNetHead``, ``build_head``, ``efficientnet_stage_blocks`` (torch_model.py).
"""

from __future__ import annotations

from kka_ray._lazy import lazy_exports

_EXPORTS = {
    "SimpleNet": "model",
    "truncated_l1_loss": "loss",
    "perturb": "loss",
    "PatchFeatureExtractor": "torch_model",
    "LayerProjection": "torch_model",
    "FeatureAdaptor": "torch_model",
    "Discriminator": "torch_model",
    "SimpleNetHead": "torch_model",
    "build_head": "torch_model",
    "efficientnet_stage_blocks": "torch_model",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
