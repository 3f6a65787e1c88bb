"""Run Deep SAD (method.md Eq. 5) through Ray Train and load the result for scoring.

:func:`train_deep_sad` turns arrays (or takes a ready ``ray.data.Dataset`` with columns
``x`` and ``label``, as the engine streams from the anomaly store) into the ``"train"``
dataset of a ``ray.train.torch.TorchTrainer`` running
:func:`kka_ray.detectors.deep_sad.train_loop.train_loop_per_worker`, and returns a
:class:`DeepSADState`: phi rebuilt from the checkpoint's ``meta.json`` with weights from
``model.safetensors``, the centre, the loss history and the checkpoint path.
``DeepSADState.score`` gives ``||phi(x) - c||^2`` in-process (eval mode, CPU).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from kka_ray.config import DeepSADSection
from kka_ray.training import ray_fit

if TYPE_CHECKING:
    import ray.data
    import torch

logger = logging.getLogger(__name__)

DEFAULT_SCORE_BATCH = 1024
VALID_LABELS = (-1, 0, 1)


@dataclass
class DeepSADState:
    """A trained Deep SAD: phi (eval mode, CPU), centre c, config, input shape, loss history."""

    network: "torch.nn.Module"
    center: "torch.Tensor"
    config: DeepSADSection
    in_shape: tuple[int, ...]
    history: list[dict[str, Any]] = field(default_factory=list)
    checkpoint_path: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    # phi after the last epoch when validation selected an earlier one (``network``)
    last_network: "torch.nn.Module | None" = None

    def score(self, x: np.ndarray, batch_size: int = DEFAULT_SCORE_BATCH, which: str = "selected") -> np.ndarray:
        """``||phi(x) - c||^2`` per row of ``x`` (shape ``(n, *in_shape)``); float64.

        ``which="last"`` scores with the last epoch's phi (the same as ``"selected"`` unless a
        validation split chose an earlier epoch)."""
        import torch

        x = np.asarray(x)
        if x.ndim < 1 or tuple(x.shape[1:]) != tuple(self.in_shape):
            raise ValueError(f"score() expects an array shaped (n, {', '.join(map(str, self.in_shape))}), got {x.shape}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        from kka_ray.detectors.base import check_which

        net = self.last_network if check_which(which) == "last" and self.last_network is not None else self.network
        net.eval()
        out = np.empty(len(x), dtype=np.float64)
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                xb = torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size], dtype=np.float32))
                out[i : i + len(xb)] = ((net(xb) - self.center) ** 2).sum(1).double().numpy()
        return out

    def save(self, directory: str | os.PathLike) -> str:
        """Write ``model.safetensors``, ``center.safetensors``, ``meta.json`` into ``directory``."""
        from kka_ray.detectors.deep_sad.train_loop import FORMAT_VERSION, deep_sad_fields, write_checkpoint_files

        meta = {**self.meta, "format_version": FORMAT_VERSION, "config": deep_sad_fields(self.config),
                "in_shape": list(self.in_shape), "history": self.history}
        last = self.last_network.state_dict() if self.last_network is not None else None
        write_checkpoint_files(directory, self.network.state_dict(), self.center, meta, last)
        return str(directory)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "DeepSADState":
        """Rebuild phi from ``meta.json`` and load weights and centre from safetensors."""
        from kka_ray.detectors.deep_sad.torch_model import build_network
        from kka_ray.detectors.deep_sad.train_loop import read_checkpoint_files

        state_dict, center, meta = read_checkpoint_files(directory)
        cfg = DeepSADSection.model_validate(meta["config"])
        in_shape = tuple(int(s) for s in meta["in_shape"])
        from kka_ray.detectors.deep_sad.train_loop import LAST_MODEL_FILE

        net = build_network(cfg, in_shape)
        net.load_state_dict(state_dict, strict=True)
        net.eval()
        last = None
        if os.path.isfile(os.path.join(directory, LAST_MODEL_FILE)):
            from safetensors.torch import load_file

            last = build_network(cfg, in_shape)
            last.load_state_dict(load_file(os.path.join(directory, LAST_MODEL_FILE)), strict=True)
            last.eval()
        return cls(net, center, cfg, in_shape, list(meta.get("history", [])), str(directory), meta, last)


def arrays_to_dataset(x: np.ndarray, semi_labels: np.ndarray, num_workers: int = 1, seed: int = 0) -> "ray.data.Dataset":
    """Rows ``(x, label)`` as a Ray Dataset of Arrow tensor blocks, in a seeded random order
    (every block mixes normals and anomalies, so BatchNorm sees mixed batches)."""
    x, labels = _check_arrays(x, semi_labels)
    return ray_fit.arrays_to_dataset({"x": x, "label": labels}, num_workers, seed)


def _check_arrays(x: np.ndarray, semi_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.ascontiguousarray(x, dtype=np.float32)
    labels = np.asarray(semi_labels)
    if x.ndim < 2:
        raise ValueError(f"x must be shaped (n, d) or (n, C, H, W), got {x.shape}")
    if labels.shape != (len(x),):
        raise ValueError(f"semi_labels must be shaped ({len(x)},) to match x, got {labels.shape}")
    if len(x) < 2:
        raise ValueError(f"Deep SAD needs at least 2 training rows (BatchNorm), got {len(x)}")
    if not np.isfinite(x).all():
        raise ValueError(f"x has {int((~np.isfinite(x)).sum())} non-finite values; drop or fix those rows first")
    bad = sorted(set(np.unique(labels).tolist()) - set(VALID_LABELS))
    if bad:
        raise ValueError(f"semi_labels must be +1 (normal), 0 (unlabeled) or -1 (anomaly); got {bad}")
    return x, labels.astype(np.int64)


def _dataset_in_shape(ds: "ray.data.Dataset") -> tuple[int, ...]:
    schema = ds.schema()
    names = list(schema.names) if schema is not None else []
    if "x" not in names or "label" not in names:
        raise ValueError(f"the Deep SAD dataset needs columns 'x' (float tensor) and 'label' (semi-label); it has {names}")
    shape = getattr(schema.types[names.index("x")], "shape", None)
    if not shape or any(s is None for s in shape):
        raise ValueError("cannot read the per-row shape of column 'x' from the dataset schema; pass in_shape=")
    return tuple(int(s) for s in shape)


def train_deep_sad(
    x: "np.ndarray | ray.data.Dataset",
    semi_labels: np.ndarray | None,
    cfg: DeepSADSection,
    storage_path: str,
    name: str,
    seed: int = 0,
    in_shape: Sequence[int] | None = None,
    val: tuple[np.ndarray, np.ndarray] | None = None,
) -> DeepSADState:
    """Train Deep SAD with ``TorchTrainer`` on arrays (``x``, ``semi_labels``) or a Ray Dataset
    (``x`` with columns ``x``/``label``, ``semi_labels=None``); return the loaded state.

    ``val``: ``(x, is_anomaly)`` for checkpoint selection (held-out normals = 0, generated
    anomalies = 1, never test data): the epoch with the best validation AUROC becomes
    ``network`` and the last epoch stays available as ``last_network``.

    A run directory ``storage_path/name`` that already exists is refused: Ray Train v2 would
    resume it instead of training anew.
    """
    import ray.data

    from kka_ray.detectors.deep_sad.train_loop import deep_sad_fields, train_loop_per_worker

    from kka_ray.cluster import ensure_ray

    ensure_ray()
    if isinstance(x, ray.data.Dataset):
        if semi_labels is not None:
            raise ValueError("pass semi_labels=None with a Ray Dataset: its 'label' column holds them")
        ds = x
        shape = tuple(int(s) for s in in_shape) if in_shape is not None else _dataset_in_shape(ds)
    else:
        if semi_labels is None:
            raise ValueError("semi_labels is required with array input (+1 normal, 0 unlabeled, -1 anomaly)")
        ds = arrays_to_dataset(x, semi_labels, cfg.num_workers, seed)
        shape = tuple(int(s) for s in np.shape(x)[1:])

    datasets = {"train": ds}
    if val is not None:
        vx, vy = np.ascontiguousarray(val[0], dtype=np.float32), np.asarray(val[1]).astype(np.float32)
        if vx.shape[1:] != tuple(shape) or vy.shape != (len(vx),):
            raise ValueError(f"val must be (x shaped (n, {', '.join(map(str, shape))}), labels shaped (n,)); "
                             f"got {vx.shape} and {vy.shape}")
        datasets["val"] = ray_fit.validation_dataset(vx, vy)
    result = ray_fit.fit_section(
        train_loop_per_worker, {"deep_sad": deep_sad_fields(cfg), "in_shape": list(shape), "seed": int(seed)},
        datasets, cfg, storage_path, name,
    )
    with result.checkpoint.as_directory() as directory:
        state = DeepSADState.load(directory)
    state.checkpoint_path = result.checkpoint.path
    last = state.history[-1]["loss"] if state.history else float("nan")
    logger.info("Deep SAD run %s: %d epochs, final loss %.6f, checkpoint %s", name, cfg.epochs, last, state.checkpoint_path)
    return state
