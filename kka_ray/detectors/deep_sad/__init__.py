"""Deep SAD (Ruff et al., ICLR 2020; method.md Eq. 5): networks, loss, its Ray Train code, and
the detector API. The confusion evaluator (``kka_ray.evaluator``) trains through the same code.

Names resolve lazily, so ``import kka_ray.detectors.deep_sad`` does not import torch:
``DeepSAD`` (model.py), ``deep_sad_loss`` / ``center_from_sums`` (loss.py), the networks
(torch_model.py), ``train_deep_sad`` / ``DeepSADState`` (train.py: a TorchTrainer over Ray Data,
then the checkpoint loaded for scoring) and ``train_loop_per_worker`` (train_loop.py).
"""

from __future__ import annotations

from kka_ray._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "model": "DeepSAD",
    "loss": "deep_sad_loss center_from_sums",
    "torch_model": "MLPNet CNNNet MLPAutoencoder CNNAutoencoder build_network build_autoencoder",
    "train": "train_deep_sad DeepSADState arrays_to_dataset",
    "train_loop": "train_loop_per_worker",
})
