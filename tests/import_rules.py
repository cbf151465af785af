"""Dependency directions, read from the source with ``ast`` (nothing is imported).

The dependency rule:

- ``dataprep`` imports neither ``softrepa`` nor ``flows``;
- ``softrepa`` imports from ``dataprep`` only the foundation: ``dataprep.errors``,
  ``dataprep.runtime`` and ``dataprep.store`` (or a module of a ``dataprep/store/``
  package), and never ``flows``;
- ``flows`` is wiring over both;
- no import cycles between project modules;
- imports inside functions only for the heavy or optional third-party packages
  in :data:`LAZY_OK` (they keep ``dataprep --help`` fast), and for project
  modules that load such a package the importer does not load already (a CLI
  command importing its stage module). Any other project module, and the
  standard library, imported inside a function buys no start-up time and hides
  cycles, so it goes at the top, unless :data:`ALLOWED_IN_FUNCTION` names it
  with the reason.

Every import counts: module level, inside functions and methods, relative
ones, ``importlib.import_module("...")``/``__import__("...")`` with a literal
name, and ``if TYPE_CHECKING:`` blocks (for the directions; they never run, so
they make no cycle). An import inside a function is an edge of the cycle graph
too: it runs on the first call, and moving it to the top must not make a cycle.

The checker takes the root folder and the package names, so tests/test_imports.py
runs it on small synthetic packages to show that it reports each kind of wrong
edge, then on the real tree. Each finding reads
``FILE:LINE: IMPORTER -> IMPORTED: why``.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dataprep", "softrepa", "flows")

# What softrepa may import from dataprep (a module or anything below it).
SOFTREPA_MAY_USE = ("dataprep.errors", "dataprep.runtime", "dataprep.store")

# Third-party packages that may be imported inside a function: each costs tens
# to hundreds of milliseconds to import, or is an optional extra that is not
# installed everywhere, so importing it at the top would slow `dataprep --help`
# or break it.
LAZY_OK = frozenset({
    # model stacks
    "torch", "transformers", "diffusers", "accelerate", "safetensors", "tokenizers", "huggingface_hub",
    "bitsandbytes", "vllm", "datasets",
    # orchestration and serving
    "prefect", "pydantic", "ray", "httpx", "openai",
    # data and images
    "numpy", "pyarrow", "fsspec", "filelock", "pandas", "polars", "duckdb", "PIL",
    # reporting
    "rich", "jinja2", "matplotlib", "playwright",
    # optional quality extras and editing metrics
    "imagehash", "datasketch", "lpips", "ImageReward", "hpsv2", "pytorch_fid",
})

# (importing module, imported module) -> why this import stays inside a function.
_ENGINE_CYCLE = ("each engine module builds on ChatRequest/EngineConfig of dataprep.engines (a real cycle), and "
                 "load_engine imports only the backend asked for")
ALLOWED_IN_FUNCTION: dict[tuple[str, str], str] = {
    # dataprep.store imports pyarrow lazily (module __getattr__), which this reader cannot see
    ("dataprep.cli.data", "dataprep.store"): "check_run_shards loads pyarrow through dataprep.store.__getattr__; dataprep --help must not",
    ("dataprep.cli.rewrite", "dataprep.diversity"): "diversity loads pyarrow through dataprep.store.__getattr__; dataprep --help must not",
    ("dataprep.runtime", "typer"): "runtime serves the library too (stages, softrepa.train, flows); only a command line needs typer",
    # measured with bench/cli_startup.py: together these were ~35 ms of every `dataprep` start
    ("dataprep.runtime", "importlib"): "importlib.metadata costs ~20 ms; only listing a command line's plugin commands reads it",
    ("dataprep.cli.rewrite", "dataprep.check"): "the rule checker compiles its word lists and patterns at import (~17 ms); only `dataprep check` needs it",
    ("dataprep.cli.caption", "dataprep.sources"): "sources pulls hashlib and zipfile (~6 ms); only the caption commands read images",
    ("dataprep.cli.server", "dataprep.server"): "server pulls socket and subprocess (~5 ms); only the server commands start one",
    ("flows.commands", "dataprep.server"): "flows.commands loads with `dataprep --help` (it holds `serve`); only serve itself asks the server",
    ("dataprep.engines", "dataprep.engines.hf"): _ENGINE_CYCLE,
    ("dataprep.engines", "dataprep.engines.vllm_engine"): _ENGINE_CYCLE,
    ("dataprep.engines", "dataprep.engines.openai_engine"): _ENGINE_CYCLE,
}


@dataclass(frozen=True)
class Import:
    path: str  # file, relative to the root
    line: int
    importer: str  # dotted module name of the file
    imported: str  # dotted name: a project module, or the name as written for others
    function: str | None  # enclosing function (None: module or class level)
    type_only: bool  # under `if TYPE_CHECKING:`

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}: {self.importer} -> {self.imported}"


def project_modules(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under the packages."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _resolve(name: str, modules: dict[str, Path]) -> str:
    """The longest prefix of ``name`` that is a project module (``name`` itself when none is)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return name


def _targets(node: ast.AST, importer: str, is_package: bool, modules: dict[str, Path]) -> list[str]:
    """The module names one import statement (or literal dynamic import) brings in."""
    if isinstance(node, ast.Import):
        return [_resolve(a.name, modules) for a in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            package = importer.split(".") if is_package else importer.split(".")[:-1]
            package = package[: len(package) - (node.level - 1)]
            base = ".".join([*package, *([base] if base else [])])
        # `from pkg import name`: the submodule pkg.name when there is one, else pkg
        names = [_resolve(f"{base}.{a.name}", modules) if f"{base}.{a.name}" in modules else _resolve(base, modules)
                 for a in node.names]
        return list(dict.fromkeys(names))  # `from m import a, b`: one edge
    return [_resolve(node.args[0].value, modules)]  # importlib.import_module("x") / __import__("x")


def _is_dynamic_import(node: ast.AST) -> bool:
    if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)):
        return False
    f = node.func
    return (isinstance(f, ast.Name) and f.id in ("__import__", "import_module")) or (
        isinstance(f, ast.Attribute) and f.attr == "import_module")


def read_imports(root: Path, packages: tuple[str, ...] = PACKAGES) -> tuple[list[Import], dict[str, Path]]:
    """Every import of every project module, and the modules themselves."""
    modules = project_modules(root, packages)
    found: list[Import] = []
    for importer, path in modules.items():
        rel = path.relative_to(root).as_posix()
        is_package = path.name == "__init__.py"

        def visit(node: ast.AST, function: str | None, type_only: bool) -> None:
            for child in ast.iter_child_nodes(node):
                inner, guarded = function, type_only
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                    inner = getattr(child, "name", "<lambda>")
                if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                    guarded = True
                if isinstance(child, (ast.Import, ast.ImportFrom)) or _is_dynamic_import(child):
                    for target in _targets(child, importer, is_package, modules):
                        found.append(Import(rel, child.lineno, importer, target, function, type_only))
                visit(child, inner, guarded)

        visit(ast.parse(path.read_text(encoding="utf-8"), filename=rel), None, False)
    return found, modules


def _top(name: str) -> str:
    return name.split(".")[0]


def wrong_direction(imports: list[Import], packages: tuple[str, ...] = PACKAGES) -> list[str]:
    """Edges against the dependency rule, one line each."""
    out = []
    for imp in imports:
        src, dst = _top(imp.importer), _top(imp.imported)
        if dst not in packages or src == dst:
            continue
        why = None
        if src == "dataprep" and dst in ("softrepa", "flows"):
            why = "dataprep must import neither softrepa nor flows"
        elif src == "softrepa" and dst == "flows":
            why = "softrepa must not import flows"
        elif src == "softrepa" and dst == "dataprep" and not any(
                imp.imported == ok or imp.imported.startswith(ok + ".") for ok in SOFTREPA_MAY_USE):
            why = f"softrepa may import from dataprep only {', '.join(SOFTREPA_MAY_USE)}"
        if why:
            out.append(f"{imp.where}: {why}")
    return out


def _with_packages(name: str) -> list[str]:
    """``a.b.c`` -> ``a``, ``a.b``, ``a.b.c``: importing a module runs its packages' ``__init__`` first."""
    parts = name.split(".")
    return [".".join(parts[:n]) for n in range(1, len(parts) + 1)]


def heavy_on_import(imports: list[Import], packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """Project module -> the :data:`LAZY_OK` packages that importing it loads (through its
    module-level imports and those of the project modules and packages they import)."""
    direct: dict[str, set[str]] = {}
    for imp in imports:
        if imp.function is None and not imp.type_only:
            direct.setdefault(imp.importer, set()).add(imp.imported)
    heavy: dict[str, set[str]] = {}
    for module in {i.importer for i in imports}:
        seen, todo, found = set(), _with_packages(module), set()
        while todo:
            node = todo.pop()
            if node in seen:
                continue
            seen.add(node)
            for target in direct.get(node, ()):
                if _top(target) in packages:
                    todo.extend(_with_packages(target))
                elif _top(target) in LAZY_OK:
                    found.add(_top(target))
        heavy[module] = found
    return heavy


def imports_in_functions(imports: list[Import], packages: tuple[str, ...] = PACKAGES,
                         allowed: dict[tuple[str, str], str] = ALLOWED_IN_FUNCTION) -> list[str]:
    """Imports inside functions that load nothing heavy and are not allowed with a reason.

    A project module counts as heavy for an importer when importing it loads a
    :data:`LAZY_OK` package that the importer itself does not load (``dataprep.cli``
    imports ``dataprep.caption`` inside its command: at the top it would bring
    pyarrow and PIL into every ``dataprep --help``).
    """
    heavy = heavy_on_import(imports, packages)
    out = []
    used = set()
    for imp in imports:
        if imp.function is None:
            continue
        top = _top(imp.imported)
        if (imp.importer, imp.imported) in allowed:
            used.add((imp.importer, imp.imported))
            continue
        if top in packages:
            if heavy.get(imp.imported, set()) - heavy.get(imp.importer, set()):
                continue
            kind = "a project module that loads nothing heavy"
        elif top in sys.stdlib_module_names:
            kind = "the standard library"
        elif top in LAZY_OK:
            continue
        else:
            kind = "a package not in LAZY_OK (add it there if it is heavy or optional)"
        out.append(f"{imp.where}: imported inside {imp.function}(): {kind} goes at the top of the module")
    for key, why in allowed.items():
        if not why.strip():
            out.append(f"ALLOWED_IN_FUNCTION{key}: give the reason the import stays inside a function")
        elif key not in used:
            out.append(f"ALLOWED_IN_FUNCTION{key}: no such import inside a function any more; remove the entry")
    return out


def import_cycles(imports: list[Import], modules: dict[str, Path],
                  allowed: dict[tuple[str, str], str] = ALLOWED_IN_FUNCTION) -> list[str]:
    """Each group of project modules that import each other, shown as one cycle with its lines."""
    edges: dict[str, dict[str, Import]] = {m: {} for m in modules}
    for imp in imports:
        if imp.imported in modules and not imp.type_only and (imp.importer, imp.imported) not in allowed:
            edges[imp.importer].setdefault(imp.imported, imp)

    # Tarjan's strongly connected components, iteratively (no recursion limit).
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    for start in sorted(modules):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    group.append(m)
                    if m == node:
                        break
                if len(group) > 1 or node in edges[node]:
                    groups.append(sorted(group))

    out = []
    for group in sorted(groups):
        members = set(group)
        # one concrete cycle through the group's first module (breadth-first: the shortest)
        first = group[0]
        paths = {first: [first]}
        queue = [first]
        cycle = None
        while queue and cycle is None:
            m = queue.pop(0)
            for nxt in sorted(edges[m]):
                if nxt == first:
                    cycle = paths[m] + [first]
                    break
                if nxt in members and nxt not in paths:
                    paths[nxt] = paths[m] + [nxt]
                    queue.append(nxt)
        steps = [edges[a][b] for a, b in zip(cycle, cycle[1:])]
        out.append("import cycle " + " -> ".join(cycle) + " ("
                   + "; ".join(f"{s.path}:{s.line}" + (f" in {s.function}()" if s.function else "") for s in steps) + ")")
    return out


def check(root: Path, packages: tuple[str, ...] = PACKAGES,
          allowed: dict[tuple[str, str], str] = ALLOWED_IN_FUNCTION) -> list[str]:
    imports, modules = read_imports(root, packages)
    return wrong_direction(imports, packages) + imports_in_functions(imports, packages, allowed) + import_cycles(imports, modules, allowed)
