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

__getattr__, __all__ = lazy_exports(__name__, {
    "model": "ReContrast preprocess_images",
    "loss": "hook_alpha global_cosine_distance point_cosine_distance easy_point_mask attach_easy_point_hook "
            "global_cosine_hm recontrast_loss reconstruction_distance anomaly_term",
    "torch_model": "ReContrastNet MultiScaleEncoder Bottleneck Decoder build_recontrast_net gaussian_blur "
                   "image_scores",
    "train_loop": "train_loop_per_worker",
})
