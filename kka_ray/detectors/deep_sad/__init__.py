"""Deep SAD (Ruff et al., ICLR 2020; method.md Eq. 5): networks, loss, and the detector API.

Names resolve lazily, so ``import kka_ray.detectors.deep_sad`` does not import torch:
``DeepSAD`` (model.py), ``deep_sad_loss`` / ``center_from_sums`` (loss.py), ``MLPNet``,
``CNNNet``, ``MLPAutoencoder``, ``CNNAutoencoder``, ``build_network``,
``build_autoencoder`` (torch_model.py).
"""

from __future__ import annotations

from kka_ray._lazy import lazy_exports

_EXPORTS = {
    "DeepSAD": "model",
    "deep_sad_loss": "loss",
    "center_from_sums": "loss",
    "MLPNet": "torch_model",
    "CNNNet": "torch_model",
    "MLPAutoencoder": "torch_model",
    "CNNAutoencoder": "torch_model",
    "build_network": "torch_model",
    "build_autoencoder": "torch_model",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
