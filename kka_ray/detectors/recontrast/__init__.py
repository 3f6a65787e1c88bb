"""ReContrast (Guo et al., "ReContrast: Domain-Specific Anomaly Detection via Contrastive
Reconstruction", NeurIPS 2023) over EfficientNet-Lite0, with KKA's generated-anomaly term.

Names resolve lazily, so ``import kka_ray.detectors.recontrast`` does not import torch:
``ReContrast``, ``preprocess_images`` (model.py); ``hook_alpha``, ``global_cosine_distance``,
``point_cosine_distance``, ``easy_point_mask``, ``attach_easy_point_hook``, ``global_cosine_hm``,
``recontrast_loss``, ``reconstruction_distance``, ``anomaly_term`` (loss.py);
``ReContrastNet``, ``MultiScaleEncoder``, ``Bottleneck``, ``Decoder``, ``build_recontrast_net``,
``gaussian_blur``, ``image_scores`` (torch_model.py); ``train_loop_per_worker`` (train_loop.py).
"""

from __future__ import annotations

from kka_ray._lazy import lazy_exports

_EXPORTS = {
    "ReContrast": "model",
    "preprocess_images": "model",
    "hook_alpha": "loss",
    "global_cosine_distance": "loss",
    "point_cosine_distance": "loss",
    "easy_point_mask": "loss",
    "attach_easy_point_hook": "loss",
    "global_cosine_hm": "loss",
    "recontrast_loss": "loss",
    "reconstruction_distance": "loss",
    "anomaly_term": "loss",
    "ReContrastNet": "torch_model",
    "MultiScaleEncoder": "torch_model",
    "Bottleneck": "torch_model",
    "Decoder": "torch_model",
    "build_recontrast_net": "torch_model",
    "gaussian_blur": "torch_model",
    "image_scores": "torch_model",
    "train_loop_per_worker": "train_loop",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
