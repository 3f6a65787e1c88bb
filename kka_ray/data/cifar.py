"""CIFAR-10 / CIFAR-100 loaders for the original python-pickle layout (Krizhevsky 2009).

Layouts read (``path`` may be the folder itself or its parent):
``cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` and
``cifar-100-python/{train, test, meta}``. Partial copies are accepted: missing training
batches (with a warning), fewer images per file, and no ``filenames`` key.

These files are Python pickles; no other format exists for this layout. They are read only
from the path the user gives, with ``encoding='latin1'`` (the files were written by Python 2),
and through an unpickler that admits only the few globals numpy arrays need, so a tampered
file is refused instead of executed. The KKA paper's CIFAR-100 protocols (one superclass or
one fine class normal) are built in :mod:`kka_ray.data.protocols` from these sets.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any, Literal

import numpy as np

from kka_ray.data.imagesets import ImageSet

logger = logging.getLogger(__name__)

CIFAR10_CLASS_NAMES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip
FOLDERS = {10: "cifar-10-batches-py", 100: "cifar-100-python"}
FIX_HINT = (
    "download the python version from https://www.cs.toronto.edu/~kriz/cifar.html, extract it, "
    "and set data.path to the extracted folder (or its parent)"
)
# The only globals a CIFAR pickle references: numpy array reconstruction (numpy 1.x and 2.x
# module names) and the codec Python 3 uses for latin1-encoded byte strings.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global except numpy array reconstruction."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: a CIFAR file holds only arrays, lists and strings"
            )
        if module == "numpy.core.multiarray":  # numpy 2 renamed it; avoid the deprecation shim
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            obj = _ArraysOnlyUnpickler(fh, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, AttributeError, ImportError) as err:
        raise ValueError(f"{path}: not a readable CIFAR python-pickle file ({err}); {FIX_HINT}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict in a CIFAR pickle, got {type(obj).__name__}")
    # Python-2 pickles read with latin1 give str keys; files re-saved with bytes keys are accepted too.
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def find_cifar_dir(path: str | os.PathLike, variant: Literal[10, 100]) -> Path:
    """The folder holding the CIFAR files: ``path`` itself or ``path/<canonical folder name>``."""
    if variant not in FOLDERS:
        raise ValueError(f"CIFAR variant must be 10 or 100, got {variant!r}")
    base = Path(path).expanduser()
    marker = "batches.meta" if variant == 10 else "meta"
    candidates = [base, base / FOLDERS[variant]]
    candidates += sorted(p / FOLDERS[variant] for p in base.glob("*") if p.is_dir()) if base.is_dir() else []
    for c in candidates:
        if (c / marker).is_file() or (c / ("test_batch" if variant == 10 else "test")).is_file():
            return c
    raise FileNotFoundError(
        f"CIFAR-{variant} ({FOLDERS[variant]}/) not found; looked in: {', '.join(str(c) for c in candidates[:2])}"
        f" and their subfolders. Fix: {FIX_HINT}."
    )


def _images_from(batch: dict[str, Any], path: Path) -> np.ndarray:
    data = np.asarray(batch.get("data"))
    if data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{path}: 'data' must be an (N, 3072) array, got shape {data.shape}")
    # Rows are 1024 red, 1024 green, 1024 blue values, each row-major 32x32.
    return np.ascontiguousarray(data.astype(np.uint8, copy=False).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def _labels_from(batch: dict[str, Any], key: str, n: int, path: Path) -> np.ndarray:
    if key not in batch:
        raise ValueError(f"{path}: no {key!r} entry (keys: {sorted(batch)})")
    labels = np.asarray(batch[key], dtype=np.int64)
    if labels.shape != (n,):
        raise ValueError(f"{path}: {n} images but {labels.shape[0] if labels.ndim else 0} {key!r}")
    return labels


def read_cifar100(path: str | os.PathLike, split: Literal["train", "test"]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str], list[str]]:
    """CIFAR-100 ``split`` as ``(images, fine_labels, coarse_labels, fine_names, coarse_names)``."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = find_cifar_dir(path, 100)
    meta_path, file = folder / "meta", folder / split
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} is missing (it holds the class names). Fix: {FIX_HINT}.")
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing. Fix: {FIX_HINT}.")
    meta = _unpickle(meta_path)
    fine_names, coarse_names = list(meta.get("fine_label_names", [])), list(meta.get("coarse_label_names", []))
    if len(fine_names) != 100 or len(coarse_names) != 20:
        raise ValueError(f"{meta_path}: expected 100 fine and 20 coarse names, got {len(fine_names)} and {len(coarse_names)}")
    batch = _unpickle(file)
    images = _images_from(batch, file)
    fine = _labels_from(batch, "fine_labels", len(images), file)
    coarse = _labels_from(batch, "coarse_labels", len(images), file)
    return images, fine, coarse, fine_names, coarse_names


def load_cifar(
    path: str | os.PathLike,
    variant: Literal[10, 100] = 10,
    split: Literal["train", "test"] = "train",
    label: Literal["fine", "coarse"] = "fine",
) -> ImageSet:
    """Load a CIFAR split as RGB ``(N, 32, 32, 3)`` uint8 images.

    ``label`` picks CIFAR-100's 100 fine or 20 coarse (superclass) labels; CIFAR-10 has only
    one label set. Reads pickles (see the module docstring): pass only a path you trust.
    """
    if label not in ("fine", "coarse"):
        raise ValueError(f"label must be 'fine' or 'coarse', got {label!r}")
    if variant == 100:
        images, fine, coarse, fine_names, coarse_names = read_cifar100(path, split)
        if label == "fine":
            return ImageSet(images, fine, fine_names)
        return ImageSet(images, coarse, coarse_names)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if label == "coarse":
        raise ValueError("CIFAR-10 has no coarse labels; use label='fine' (or variant=100)")
    folder = find_cifar_dir(path, 10)
    names = list(CIFAR10_CLASS_NAMES)
    if (folder / "batches.meta").is_file():
        names = list(_unpickle(folder / "batches.meta").get("label_names", names))
    else:
        logger.warning("%s has no batches.meta; using the standard CIFAR-10 class names", folder)
    files = [folder / f"data_batch_{i}" for i in range(1, 6)] if split == "train" else [folder / "test_batch"]
    present = [f for f in files if f.is_file()]
    if not present:
        raise FileNotFoundError(f"no CIFAR-10 {split} files in {folder} (expected {', '.join(f.name for f in files)}). Fix: {FIX_HINT}.")
    if len(present) < len(files):
        logger.warning("CIFAR-10 %s: %d of %d batch files missing in %s (%s)", split, len(files) - len(present),
                       len(files), folder, ", ".join(f.name for f in files if f not in present))
    images, labels = [], []
    for f in present:
        batch = _unpickle(f)
        images.append(_images_from(batch, f))
        labels.append(_labels_from(batch, "labels", len(images[-1]), f))
    return ImageSet(np.concatenate(images), np.concatenate(labels), names)
