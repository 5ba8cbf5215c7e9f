"""fastprompt installs and imports the same way from a wheel, an editable install and a bare checkout, and its
top-level `kernels/` folder never shadows Hugging Face's `kernels` package (which transformers imports).

The wheel is built offline (`pip wheel --no-index --no-build-isolation`), the GPU image's situation: no index
is reachable there. Each import runs in a fresh interpreter, so what this process imported cannot hide a
failure.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNEL_MODULES = ("prefix_attention", "prompt_embed", "norms", "linear_cross_entropy", "aot_compile")
IMPORT_KERNELS = ("import importlib, fastprompt; "
                  + "".join(f"importlib.import_module('fastprompt.kernels.{m}'); " for m in KERNEL_MODULES)
                  + "print(fastprompt.__file__)")


def _python(code: str, cwd: Path, pythonpath: Path | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


def test_the_kernels_folder_is_not_a_top_level_package():
    """Run from the checkout's root (`python -m pytest`, `python -m bench` put it first on sys.path), `import
    kernels` finds Hugging Face's package when it is installed, and otherwise only a namespace folder, which
    transformers reads as "not installed"."""
    assert not (ROOT / "kernels" / "__init__.py").exists()
    found = _python("import kernels; print(getattr(kernels, '__file__', None))", cwd=ROOT)
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        assert found == "None"
        assert _python("from transformers.utils import is_kernels_available; print(is_kernels_available())",
                       cwd=ROOT) == "False"
    else:
        assert Path(found).resolve().parent != (ROOT / "kernels").resolve(), found   # (a venv may sit in ROOT)


def test_bare_checkout_imports_the_kernels(tmp_path):
    """A copy of the checkout (links kept, nothing installed from it) on PYTHONPATH imports every kernel
    module as fastprompt.kernels."""
    checkout = tmp_path / "checkout"
    for folder in ("fastprompt", "kernels"):
        shutil.copytree(ROOT / folder, checkout / folder, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
    assert (checkout / "fastprompt" / "kernels").is_symlink()
    origin = _python(IMPORT_KERNELS, cwd=checkout, pythonpath=checkout)
    assert Path(origin).is_relative_to(checkout), origin


def test_offline_wheel_holds_and_imports_the_kernels(tmp_path):
    """`pip wheel --no-index --no-build-isolation .` builds; the wheel holds fastprompt/kernels/*.py and no
    top-level kernels package; unpacked alone on PYTHONPATH it imports every kernel module."""
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-index",
                           "--no-build-isolation", "--wheel-dir", str(tmp_path / "dist"), str(ROOT)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("fastprompt-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        archive.extractall(tmp_path / "site")
    assert {f"fastprompt/kernels/{m}.py" for m in KERNEL_MODULES} <= set(names)
    assert not [n for n in names if n.startswith("kernels/")]
    origin = _python(IMPORT_KERNELS, cwd=tmp_path, pythonpath=tmp_path / "site")
    assert Path(origin).is_relative_to(tmp_path / "site"), origin


@pytest.mark.parametrize("module", ["fastprompt", "fastprompt.cli"])
def test_the_command_line_starts_without_torch(module):
    """`fastprompt --help` builds its parser without importing torch or transformers (they take seconds)."""
    code = (f"import sys, {module}, fastprompt.cli; fastprompt.cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    assert _python(code, cwd=ROOT) == "[]"
