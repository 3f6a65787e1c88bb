"""Lazy package exports: ``__getattr__, __all__ = lazy_exports(__name__, {"module": "Name other"})``
imports a submodule only when one of its names is first used, so importing a package loads no
torch or ray."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, modules: dict[str, str]) -> tuple[Callable[[str], Any], list[str]]:
    """A module-level ``__getattr__`` resolving the names of ``modules`` (submodule -> names
    separated by spaces) on first access, and the sorted ``__all__``."""
    exports = {name: module for module, names in modules.items() for name in names.split()}

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    return __getattr__, sorted(exports)
