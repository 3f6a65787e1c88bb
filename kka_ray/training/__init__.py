"""Ray Train loops shared by the confusion evaluator and the detectors.

``trainer.train_deep_sad`` runs Deep SAD (method.md Eq. 5) with ``TorchTrainer`` over Ray
Data shards using ``deep_sad_loop.train_loop_per_worker``; it returns a ``DeepSADState``.
Names resolve lazily, so importing this package loads no torch or ray.
"""

from __future__ import annotations

from kka_ray._lazy import lazy_exports

_EXPORTS = {
    "train_deep_sad": "trainer",
    "DeepSADState": "trainer",
    "arrays_to_dataset": "trainer",
    "train_loop_per_worker": "deep_sad_loop",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
