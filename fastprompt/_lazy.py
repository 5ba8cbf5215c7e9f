"""Lazy package exports (PEP 562): a package names what it exports and from which module, and the module is
imported on first use. `import fastprompt` and the `fastprompt` command then start without importing torch
or transformers until something needs them (`fastprompt --help` prints at once)."""

from __future__ import annotations

import importlib
from typing import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """(__getattr__, __dir__) for `package`, whose attribute `name` is `exports[name]`'s attribute of that
    name, imported when first read and then kept in the package's namespace."""
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
