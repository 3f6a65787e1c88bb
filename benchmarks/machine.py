"""The machine a benchmark ran on, saved beside its figures (platform, CPUs, memory, torch, GPU)."""

from __future__ import annotations

import os
import platform


def machine() -> dict:
    import psutil

    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "processor": platform.processor() or platform.machine()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return info
