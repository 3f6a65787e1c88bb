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

__getattr__, __all__ = lazy_exports(__name__, {
    "model": "SimpleNet",
    "loss": "truncated_l1_loss perturb",
    "torch_model": "PatchFeatureExtractor LayerProjection FeatureAdaptor Discriminator SimpleNetHead build_head efficientnet_stage_blocks",
})
