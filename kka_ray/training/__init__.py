"""What every trained model of the engine shares: the Ray Train path (``ray_fit``: ``fit_torch``,
the worker helpers, Arrow-backed datasets) and the safetensors checkpoint files
(``checkpoint``). Each model's own training code lives with the model (e.g. Deep SAD's in
``kka_ray.detectors.deep_sad.train``). Names resolve lazily, so importing this package loads no
torch or ray.
"""

from __future__ import annotations

from kka_ray._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "ray_fit": "fit_torch fit_section arrays_to_dataset labelled_datasets TRAIN_MAX_FAILURES",
    "checkpoint": "read_checkpoint write_checkpoint",
})
