"""Builders of tiny real models (random weights, real architectures and tokenizers) for tests
and smoke runs. Nothing here downloads: tokenizers come from locally installed packages."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Callable


def built_once(marker: str) -> Callable:
    """A builder ``fn(out: Path, ...)`` that writes a model into ``out`` becomes
    ``fn(out_dir, ..., seed=0) -> Path``: a no-op when ``out/marker`` exists, else torch is seeded
    with ``seed`` and ``fn`` builds and saves."""

    def wrap(fn: Callable) -> Callable[..., Path]:
        @functools.wraps(fn)
        def build(out_dir: str | os.PathLike, *args, seed: int = 0, **kwargs) -> Path:
            import torch

            out = Path(out_dir)
            if not (out / marker).is_file():
                torch.manual_seed(seed)
                fn(out, *args, seed=seed, **kwargs)
            return out

        return build

    return wrap
