"""Checkpoint files of every trained model: safetensors tensors plus a JSON ``meta.json``.

Nothing is pickled. :func:`write_checkpoint` writes one safetensors file per named state
dict; :func:`read_checkpoint` checks the required files and the format version and returns the
state dicts (``None`` for a missing optional file) and the metadata. Deep SAD, SimpleNet and
ReContrast name their own files on top of these two functions.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

META_FILE = "meta.json"


def write_checkpoint(directory: str | os.PathLike, tensors: dict[str, "dict[str, torch.Tensor] | None"],
                     meta: dict[str, Any]) -> None:
    """Write ``{file name: state dict}`` (``None`` entries skipped) and ``meta.json`` into ``directory``."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    for name, state in tensors.items():
        if state is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, os.path.join(directory, name),
                      metadata={"format": "pt"})
    with open(os.path.join(directory, META_FILE), "w") as fh:
        json.dump(meta, fh, indent=1)


def read_checkpoint(directory: str | os.PathLike, required: list[str], what: str, format_version: int,
                    optional: tuple[str, ...] = ()) -> tuple[dict[str, "dict[str, torch.Tensor] | None"], dict[str, Any]]:
    """The state dicts of ``required`` + ``optional`` files and the metadata; clear errors otherwise."""
    from safetensors.torch import load_file

    missing = [f for f in (*required, META_FILE) if not os.path.isfile(os.path.join(directory, f))]
    if missing:
        raise FileNotFoundError(f"{str(directory)!r} is not a {what} checkpoint: missing {missing}")
    with open(os.path.join(directory, META_FILE)) as fh:
        meta = json.load(fh)
    if meta.get("format_version") != format_version:
        raise ValueError(f"{what} checkpoint {str(directory)!r} has format_version {meta.get('format_version')!r}; "
                         f"expected {format_version}")
    states = {}
    for name in (*required, *optional):
        path = os.path.join(directory, name)
        states[name] = load_file(path) if os.path.isfile(path) else None
    return states, meta
