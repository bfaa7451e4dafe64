"""A package's names imported on first use (PEP 562), so that importing one light submodule does not
import the heavy ones (torch) through the package's `__init__`."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable


def lazy_exports(package: str, module_of: dict[str, str]) -> Callable[[str], object]:
    """The `__getattr__` of `package`: `name` comes from `module_of[name]`, imported when first asked."""
    def getattr_(name: str) -> object:
        module = module_of.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    return getattr_
