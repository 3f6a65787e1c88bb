"""One rule for the ``device`` settings of every role: ``cpu``, ``cuda[:N]`` or ``auto``."""

from __future__ import annotations


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; a CUDA device torch cannot see is an error."""
    import torch

    from kka_ray.config import ConfigError

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(f"device must be cpu, cuda[:N] or auto, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was asked for but torch sees no CUDA device: use cpu or auto")
    return device
