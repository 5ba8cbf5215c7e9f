"""ARCHITECTURE.md stays true to the code: every path it names in backticks exists and every `fastprompt.`
name it gives resolves; every project folder is on its map and every module in a layer of its table
("## Layers"); imports follow that table; and no circle runs through the project's modules.

Imports are read statically (ast) from fastprompt/, kernels/ (as `fastprompt.kernels`), bench/, examples/
and tests/, at module level and inside functions alike (a circle closed inside a function is still two modules
that each need the other: model.py choosing its own subclasses was one), except under `if TYPE_CHECKING:`.
`from package import name` counts as an import of the submodule when `name` is one, else of the package.
"""

from __future__ import annotations

import ast
import inspect
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "ARCHITECTURE.md"
# Where the project's modules live, and the dotted name each folder's modules take.
SOURCES = {"fastprompt": "fastprompt", "kernels": "fastprompt.kernels", "bench": "bench", "examples": "examples",
           "tests": "tests"}
PROJECT_ROOTS = ("fastprompt", "bench", "tests", "examples")


# -- the project's modules and their imports ----------------------------------------------------------------
def project_modules() -> dict[str, Path]:
    """Dotted name -> file of every module under SOURCES (the `fastprompt/kernels` link is read as kernels/)."""
    modules = {}
    for folder, dotted in SOURCES.items():
        for dirpath, dirnames, filenames in os.walk(ROOT / folder):  # does not follow links
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
            rel = Path(dirpath).relative_to(ROOT / folder)
            for filename in sorted(filenames):
                if not filename.endswith(".py"):
                    continue
                parts = [dotted, *rel.parts] + ([] if filename == "__init__.py" else [filename[:-3]])
                modules[".".join(p for p in parts if p and p != ".")] = Path(dirpath) / filename
    return modules


class _ImportVisitor(ast.NodeVisitor):
    def __init__(self):
        self.found: list[tuple[ast.AST, int]] = []  # (Import or ImportFrom node, line)

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else None
        if name == "TYPE_CHECKING":
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        self.found.append((node, node.lineno))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        self.found.append((node, node.lineno))


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported project module, line) for every import in the module `name` at `path`."""
    visitor = _ImportVisitor()
    visitor.visit(ast.parse(path.read_text(), filename=str(path)))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node, line in visitor.found:
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        found += [(t, line) for t in targets if t.split(".")[0] in PROJECT_ROOTS]
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, list[tuple[str, int]]]:
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def module_path(name: str, modules: dict[str, Path]) -> str:
    """A dotted name's path relative to the root, as ARCHITECTURE.md writes it (kernels/ for fastprompt.kernels;
    a package without a file, such as fastprompt.kernels, as its folder's __init__.py)."""
    if name in modules:
        return modules[name].relative_to(ROOT).as_posix()
    for folder, dotted in SOURCES.items():
        if name == dotted or name.startswith(dotted + "."):
            rest = name[len(dotted):].lstrip(".").replace(".", "/")
            return f"{folder}/{rest}/__init__.py" if rest else f"{folder}/__init__.py"
    return name.replace(".", "/") + ".py"


def cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


# -- ARCHITECTURE.md ------------------------------------------------------------------------------------------
PATH_TOKEN = re.compile(r"^[A-Za-z0-9_.\-/]+$")
PATH_SUFFIXES = (".py", ".md", ".toml", ".ini", ".txt", ".json", ".cfg", ".yaml", ".yml")


def backticked(text: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", text)


def named_paths(text: str) -> list[str]:
    """Backticked tokens that are paths in the repository: with a slash or a file suffix, no placeholders
    (`<name>`), nothing outside the root."""
    paths = []
    for token in backticked(text):
        if not PATH_TOKEN.match(token) or token.startswith(("../", "/", "~")) or ".." in token.split("/"):
            continue
        if "/" in token or token.endswith(PATH_SUFFIXES):
            if re.match(r"^[\w]+(\.[\w]+)+$", token) and not token.endswith(PATH_SUFFIXES):
                continue  # a dotted name, not a path
            paths.append(token)
    return paths


def layer_table(text: str) -> dict[str, tuple[list[str], set[str] | None]]:
    """Layer -> (its files and folders, the layers it may import; None: all), from the "## Layers" table."""
    section = text.split("\n## Layers", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    layers = {}
    for row in rows[2:]:  # header and separator
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        assert len(cells) == 3, f"ARCHITECTURE.md, Layers: a row has {len(cells)} cells, not 3: {row!r}"
        name, files, allowed = cells
        paths = [t for t in backticked(files) if "/" in t or t.endswith(".py")]
        may = None if allowed.strip() == "all" else {w for w in re.split(r"[,\s]+", allowed) if w}
        layers[name] = (paths, may)
    return layers


def layer_of(path: str, layers) -> str | None:
    """The layer whose files hold `path` (the longest matching entry: a file, or a folder ending in /)."""
    best, best_len = None, -1
    for name, (entries, _) in layers.items():
        for entry in entries:
            if (entry == path or (entry.endswith("/") and path.startswith(entry))) and len(entry) > best_len:
                best, best_len = name, len(entry)
    return best


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text()


@pytest.fixture(scope="module")
def modules() -> dict[str, Path]:
    return project_modules()


@pytest.fixture(scope="module")
def graph(modules):
    return import_graph(modules)


# -- the page -------------------------------------------------------------------------------------------------
def test_every_path_named_exists(doc):
    paths = named_paths(doc)
    assert len(paths) > 50, "the path parser found almost nothing: is ARCHITECTURE.md's format changed?"
    # A bare file name (`__init__.py`) is a path at the root or a file name found in the project's folders.
    file_names = {path.name for path in project_modules().values()}
    missing = sorted({p for p in paths if not (ROOT / p).exists() and ("/" in p or p not in file_names)})
    assert not missing, f"ARCHITECTURE.md names paths that do not exist: {missing}"


def top_level_names(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def resolves(token: str, modules: dict[str, Path]) -> bool:
    """A module, a package folder (fastprompt.kernels has no __init__.py), or a module's top-level name."""
    if token in modules or (ROOT / module_path(token, modules)).parent.is_dir():
        return True
    parts = token.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        name = ".".join(parts[:cut])
        if name in modules:
            return parts[cut] in top_level_names(modules[name])
    return False


def test_every_fastprompt_name_resolves(doc, modules):
    """`fastprompt.x.y` in backticks names a module, a package or a module's top-level name."""
    names = {t for t in backticked(doc) if re.fullmatch(r"fastprompt(\.\w+)+", t)}
    assert names, "no fastprompt names found in ARCHITECTURE.md"
    bad = sorted(t for t in names if not resolves(t, modules))
    assert not bad, f"ARCHITECTURE.md names fastprompt names that do not resolve: {bad}"


def test_every_folder_is_on_the_map(doc, modules):
    named = set(backticked(doc))
    folders = {"kernels/", "bench/", "tests/", "examples/", ".ci/"}
    folders |= {path.parent.relative_to(ROOT).as_posix() + "/" for name, path in modules.items()
                if path.name == "__init__.py" and name.startswith("fastprompt.")}
    missing = sorted(f for f in folders if f not in named)
    assert not missing, f"ARCHITECTURE.md does not name these folders: {missing}"


def test_every_module_is_in_a_layer(doc, modules):
    layers = layer_table(doc)
    assert {"kernels", "ops", "backbones", "methods", "model", "train", "serve", "tests"} <= set(layers)
    for name, (_, may) in layers.items():
        unknown = set() if may is None else may - set(layers)
        assert not unknown, f"ARCHITECTURE.md, Layers: {name} may import unknown layers {sorted(unknown)}"
    homeless = sorted(module_path(m, modules) for m in modules if layer_of(module_path(m, modules), layers) is None)
    assert not homeless, f"modules in no layer of ARCHITECTURE.md's table (add them to a row): {homeless}"


# -- the imports ----------------------------------------------------------------------------------------------
def layer_violations(graph, modules, layers) -> list[str]:
    violations = []
    for source, targets in graph.items():
        src_path = module_path(source, modules)
        src_layer = layer_of(src_path, layers)
        may = layers[src_layer][1] if src_layer else set()
        for target, line in targets:
            dst_layer = layer_of(module_path(target, modules), layers)
            if may is not None and dst_layer not in may:
                violations.append(f"{src_path}:{line} imports {target} (layer {dst_layer}), which layer "
                                  f"{src_layer} may not import")
    return violations


def test_imports_follow_the_layers(doc, graph, modules):
    violations = layer_violations(graph, modules, layer_table(doc))
    assert not violations, "imports against ARCHITECTURE.md's layers:\n" + "\n".join(violations)


def test_no_import_circle(graph, modules):
    edges = {m: sorted({t for t, _ in targets if t != m}) for m, targets in graph.items()}
    found = cycles(edges)
    lines = []
    for component in found:
        members = set(component)
        for m in component:
            lines += [f"  {module_path(m, modules)}:{line} imports {t}" for t, line in graph[m] if t in members]
    assert not found, f"import circles: {found}\n" + "\n".join(lines)


def test_the_readers_see_what_is_there(graph, modules):
    """The analysis itself: known imports are found (module level, inside a function, relative, through the
    kernels link), a circle and a layer breach planted in a made-up graph are reported."""
    assert any(t == "fastprompt.routing" for t, _ in graph["fastprompt.model"])
    assert any(t == "fastprompt.encoder" for t, _ in graph["fastprompt.wrap"])
    assert any(t == "fastprompt.generation" for t, _ in graph["fastprompt.model"])  # inside generate()
    assert any(t == "fastprompt.kernels.prefix_attention" for t, _ in graph["fastprompt.ops.prefix_attention"])
    assert module_path("fastprompt.kernels.norms", modules) == "kernels/norms.py"
    assert not any(str(p).startswith(str(ROOT / "fastprompt" / "kernels")) for p in modules.values())
    assert cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]
    assert cycles({"a": ["b"], "b": []}) == []
    assert not resolves("fastprompt.model.no_such_name", modules) and resolves("fastprompt.kernels", modules)
    layers = {"low": (["fastprompt/ops/"], {"low"}), "high": (["fastprompt/model.py"], {"high", "low"})}
    planted = {"fastprompt.ops.norms": [("fastprompt.model", 3)], "fastprompt.model": [("fastprompt.ops", 1)]}
    assert layer_violations(planted, modules, layers) == [
        "fastprompt/ops/norms.py:3 imports fastprompt.model (layer high), which layer low may not import"]


# -- what the layers share --------------------------------------------------------------------------------------
def package_modules(modules: dict[str, Path]) -> dict[str, Path]:
    """The installed package's modules: fastprompt.* with the kernels."""
    return {name: path for name, path in modules.items() if name.split(".")[0] == "fastprompt"}


def test_ops_are_imported_by_their_public_names(modules):
    """Above the ops, code imports `fastprompt.ops` (whose names are its API, the helpers the model layer
    uses included) and never one of its modules: what an op module keeps to itself can change freely."""
    found = []
    for name, path in package_modules(modules).items():
        if name.startswith(("fastprompt.ops", "fastprompt.kernels")):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            named = ([node.module] if isinstance(node, ast.ImportFrom) and not node.level and node.module
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            found += [f"{path.relative_to(ROOT)}:{node.lineno} imports {m}" for m in named
                      if m.startswith("fastprompt.ops.")]
    assert not found, "ops' modules imported from above the ops:\n" + "\n".join(found)


def literal_constants(path: Path) -> list[tuple[str, object, int]]:
    """(name, value, line) of the module-level UPPER_CASE names bound to a literal in `path`."""
    constants = []
    for node in ast.parse(path.read_text()).body:
        target = (node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1
                  else node.target if isinstance(node, ast.AnnAssign) and node.value is not None else None)
        if isinstance(target, ast.Name) and target.id.lstrip("_").isupper():
            try:
                constants.append((target.id, ast.literal_eval(node.value), node.lineno))
            except ValueError:
                continue  # computed, not a literal
    return constants


def test_each_constant_is_defined_once(modules):
    """A constant the package needs in two places is defined in one and imported in the other: two modules
    binding the same name to the same literal (DECODE_MAX_T once was) drift apart when one changes."""
    seen: dict[tuple, list[str]] = {}
    for name, path in package_modules(modules).items():
        for constant, value, line in literal_constants(path):
            seen.setdefault((constant, repr(value)), []).append(f"{path.relative_to(ROOT)}:{line}")
    twice = {key[0]: places for key, places in seen.items() if len(places) > 1}
    assert not twice, f"constants defined more than once: {twice}"
    read = [(constant, value) for constant, value, _ in literal_constants(ROOT / "kernels" / "decode_shapes.py")]
    assert read == [("DECODE_MAX_T", 16)]  # the reader reads


def test_bank_rows_below_the_api(modules):
    """Below the model's API a bank index is `bank_rows`: the ops that read a bank by row (prefix attention,
    prompt embedding, their references), the encoder models' embedding and decoder cache, and the serving
    engine never say `task_ids`, which names MPT's task
    only (`mpt_prompt_embed`, `mpt_prompts` and their references keep it: there it is the task)."""
    from fastprompt import ops
    from fastprompt.ops import reference

    from fastprompt.bidirectional import BidirectionalPromptModel
    from fastprompt.seq2seq import decoder_prefix_cache

    for op in (ops.prefix_attention, ops.prefix_attention_unchecked, ops.prompt_embed, ops.prompt_embed_unchecked,
               reference.prefix_attention, reference.prompt_embed, BidirectionalPromptModel.embed,
               decoder_prefix_cache):
        parameters = list(inspect.signature(op).parameters)
        assert "bank_rows" in parameters and "task_ids" not in parameters, (op.__qualname__, parameters)
    for op in (ops.mpt_prompt_embed, ops.mpt_prompts):
        assert "task_ids" in inspect.signature(op).parameters
    for relative in ("fastprompt/ops/prefix_attention.py", "kernels/prefix_attention.py",
                     "fastprompt/backbones/attention.py", "fastprompt/serve/engine.py"):
        text = (ROOT / relative).read_text()
        assert "task_ids" not in text, f"{relative} says task_ids below the API; the bank index is bank_rows"


def test_only_the_methods_name_a_method(modules):
    """A method is its module in fastprompt/methods/: no other module names a peft_type (as a constant or a
    string), so nothing outside branches on which method it holds; the runtime asks the source's
    capabilities. The MPT and SPoT drivers name the one method each drives."""
    method_name = re.compile(r"\b(PROMPT_TUNING|P_TUNING|PREFIX_TUNING|MULTITASK_PROMPT_TUNING)\b")
    drivers = {"fastprompt/train/mpt.py", "fastprompt/train/spot.py"}
    naming = []
    for path in package_modules(modules).values():
        relative = path.relative_to(ROOT).as_posix()
        if relative.startswith("fastprompt/methods/") or relative in drivers:
            continue
        naming += [f"{relative}:{n}" for n, line in enumerate(path.read_text().splitlines(), 1)
                   if method_name.search(line)]
    assert not naming, f"modules outside fastprompt/methods/ that name a method: {naming}"
