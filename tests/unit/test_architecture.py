"""The package's architecture, checked statically: layers, import cycles, lazy imports, module sizes.

The walker reads ``ssd_lightning/`` with :mod:`ast` only (nothing is imported), as functions that take a
package directory and a layer table, so the ``test_self_check_*`` tests can prove on a synthetic package that
every rule does fail when broken.
"""

from __future__ import annotations

import ast
import io
import re
import sys
import tokenize
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

Layers = tuple[tuple[str, tuple[str, ...]], ...]

#: The layer table, lowest layer first: the single source of truth, mirrored in ``docs/ARCHITECTURE.md``
#: (change both together). A module may import modules of its own layer or of lower layers only; each entry
#: covers the module and, if it is a package, all its submodules. The package's ``__init__`` is the public
#: façade: it may import from any layer, and no module inside the package may import from it.
LAYERS: Layers = (
    ("foundation", ("ssd_lightning.errors", "ssd_lightning.fileio", "ssd_lightning.rundirs")),
    (
        "core",
        (
            "ssd_lightning.boxes",
            "ssd_lightning.categories",
            "ssd_lightning.loss",
            "ssd_lightning.postprocess",
            "ssd_lightning.model",
            "ssd_lightning.images",
            "ssd_lightning.evaluation",
            "ssd_lightning.class_metrics",
            "ssd_lightning.pr_plot",
        ),
    ),
    ("data", ("ssd_lightning.data",)),
    ("checkpoints", ("ssd_lightning.checkpoints",)),
    ("training", ("ssd_lightning.training",)),
    ("runtime", ("ssd_lightning.runtime",)),
    ("tasks", ("ssd_lightning.tasks", "ssd_lightning.summary")),
)
MAX_LINES = 500
PACKAGE_DIR = Path(__file__).resolve().parents[2] / "ssd_lightning"
_NOT_THIRD_PARTY = sys.stdlib_module_names | {"__main__"}
_PRAGMA = re.compile(r"#\s*(noqa|type:|pragma|fmt:|pylint:|isort:)")


# ---------------------------------------------------------------------------------------------------------
# The walker
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImportRef:
    """One name imported by one statement: ``import base`` (``name`` None) or ``from base import name``."""

    module: str  # the importing module
    line: int
    base: str  # the absolute module the statement names, relative imports resolved
    name: str | None
    bound: str  # the name the statement binds in the importing module
    relative: bool
    in_function: bool  # inside a def / async def (at any depth, methods included)
    type_checking: bool  # inside an ``if TYPE_CHECKING:`` block
    explained: bool  # a comment on the statement's lines or on a comment line directly above


@dataclass(frozen=True)
class Package:
    """A package as the checks see it: its modules' files and each module's imports."""

    root: str
    files: dict[str, Path]
    imports: dict[str, tuple[ImportRef, ...]]

    def path(self, module: str) -> str:
        """A module's file, relative to the package's parent folder."""
        return self.files[module].relative_to(self.files[self.root].parents[1]).as_posix()

    def where(self, ref: ImportRef) -> str:
        """``path:line`` of an import."""
        return f"{self.path(ref.module)}:{ref.line}"

    def all_imports(self) -> Iterator[ImportRef]:
        """Every import of every module."""
        for refs in self.imports.values():
            yield from refs

    def is_package(self, module: str) -> bool:
        """Whether ``module`` is a package (an ``__init__.py``)."""
        return module in self.files and self.files[module].name == "__init__.py"


def _comments(source: str) -> dict[int, tuple[str, bool]]:
    """Line -> (comment text, whether the line holds nothing but the comment)."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = (tok.string, not tok.line[: tok.start[1]].strip())
    return out


def _is_reason(comment: str) -> bool:
    """A comment that says something: not empty, not a linter or type-checker pragma."""
    return bool(comment.lstrip("#").strip()) and not _PRAGMA.match(comment)


def _is_type_checking(test: ast.expr) -> bool:
    """``TYPE_CHECKING`` or ``typing.TYPE_CHECKING``."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Collector(ast.NodeVisitor):
    """Collects one module's imports, noting function depth, ``TYPE_CHECKING`` blocks and reason comments."""

    def __init__(self, module: str, is_package: bool, source: str) -> None:
        self.module, self.is_package = module, is_package
        self.refs: list[ImportRef] = []
        self.comments = _comments(source)
        self.depth = self.type_checking = 0

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            return self.generic_visit(node)
        self.type_checking += 1
        for stmt in node.body:
            self.visit(stmt)
        self.type_checking -= 1
        for stmt in node.orelse:
            self.visit(stmt)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node, alias.name, None, alias.asname or alias.name.partition(".")[0], relative=False)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            package = self.module if self.is_package else self.module.rpartition(".")[0]
            parts = package.split(".")[: max(0, package.count(".") + 2 - node.level)]
            base = ".".join(parts + [base] if base else parts)
        for alias in node.names:
            self._add(node, base, alias.name, alias.asname or alias.name, relative=bool(node.level))

    def _add(self, node: ast.stmt, base: str, name: str | None, bound: str, relative: bool) -> None:
        lines = range(node.lineno, (node.end_lineno or node.lineno) + 1)
        above = self.comments.get(node.lineno - 1, ("", False))
        explained = any(_is_reason(self.comments.get(n, ("",))[0]) for n in lines) or (
            above[1] and _is_reason(above[0])
        )
        flags = (self.depth > 0, self.type_checking > 0, explained)
        self.refs.append(ImportRef(self.module, node.lineno, base, name, bound, relative, *flags))


def scan_package(package_dir: Path) -> Package:
    """Every ``.py`` under ``package_dir`` as a dotted module name, with its imports."""
    package_dir = package_dir.resolve()
    files = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    imports = {}
    for module, path in files.items():
        source = path.read_text(encoding="utf-8")
        collector = _Collector(module, path.name == "__init__.py", source)
        collector.visit(ast.parse(source, filename=str(path)))
        imports[module] = tuple(collector.refs)
    return Package(package_dir.name, files, imports)


def is_project(pkg: Package, ref: ImportRef) -> bool:
    """Whether an import names a module of the package (relative imports always do)."""
    return ref.relative or ref.base == pkg.root or ref.base.startswith(pkg.root + ".")


def resolve(pkg: Package, ref: ImportRef, seen: frozenset[tuple[str, str]] = frozenset()) -> str | None:
    """The package module an import makes its module depend on; None for a third-party import.

    ``from p import name`` gives the submodule ``p.name`` when there is one; else, when ``p`` is a package
    whose ``__init__`` takes ``name`` from a submodule, that submodule (following chains of re-exports);
    else ``p``. A name that is no module gives its nearest enclosing module.
    """
    if not is_project(pkg, ref):
        return None
    if ref.name not in (None, "*"):
        if f"{ref.base}.{ref.name}" in pkg.files:
            return f"{ref.base}.{ref.name}"
        if pkg.is_package(ref.base) and (ref.base, ref.name) not in seen:
            sources = [s for s in pkg.imports[ref.base] if s.bound == ref.name]
            for found in (resolve(pkg, s, seen | {(ref.base, ref.name)}) for s in sources):
                if found:
                    return found
    target = ref.base
    while target and target not in pkg.files:
        target = target.rpartition(".")[0]
    return target or None


def project_imports(pkg: Package) -> Iterator[tuple[ImportRef, str]]:
    """Every import of a package module, with the module it resolves to."""
    for ref in pkg.all_imports():
        if (target := resolve(pkg, ref)) is not None:
            yield ref, target


def layer_of(module: str, layers: Layers) -> list[int]:
    """Indices of the layers with an entry equal to ``module`` or to a package containing it."""
    return [i for i, (_, entries) in enumerate(layers) if any(_within(module, e) for e in entries)]


def _within(module: str, package: str) -> bool:
    """``module`` is ``package`` or one of its submodules."""
    return module == package or module.startswith(package + ".")


def _by_location(found: Iterable[str]) -> list[str]:
    """Distinct ``path:line -> ...`` lines, by path, then line number."""

    def key(text: str) -> tuple[str, int]:
        path, _, rest = text.partition(":")
        return path, int(rest.partition(" ")[0])

    return sorted(set(found), key=key)


# ---------------------------------------------------------------------------------------------------------
# The rules: each returns its violations as readable lines, none when the rule holds
# ---------------------------------------------------------------------------------------------------------


def unplaced_modules(pkg: Package, layers: Layers) -> list[str]:
    """Modules (the façade aside) in no layer of the table, or in more than one."""
    out = []
    for module in pkg.files:
        found = layer_of(module, layers)
        if module != pkg.root and len(found) != 1:
            names = ", ".join(layers[i][0] for i in found) or "none"
            out.append(f"{pkg.path(module)}: {module} (layers: {names})")
    return out


def upward_imports(pkg: Package, layers: Layers) -> list[str]:
    """Imports of a module of a higher layer than the importer's, ``TYPE_CHECKING`` ones included.

    The façade may import any layer; modules in no layer are left to :func:`unplaced_modules`.
    """
    out = set()
    for ref, target in project_imports(pkg):
        src, dst = layer_of(ref.module, layers), layer_of(target, layers)
        if ref.module != pkg.root and len(src) == len(dst) == 1 and dst[0] > src[0]:
            out.add(f"{pkg.where(ref)} -> {target}  ({layers[src[0]][0]} imports {layers[dst[0]][0]})")
    return _by_location(out)


def foundation_imports(pkg: Package, layers: Layers) -> list[str]:
    """Imports of the package by a module of the lowest layer: its first module (the errors) imports nothing
    of the package, the others only that first module (the file writer raises the errors)."""
    errors = layers[0][1][0]
    return _by_location(
        {
            f"{pkg.where(r)} -> {t}"
            for r, t in project_imports(pkg)
            if layer_of(r.module, layers) == [0] and (r.module == errors or t != errors)
        }
    )


def facade_imports(pkg: Package) -> list[str]:
    """Imports, inside the package, of a name from the bare package (the façade), not its defining module."""
    out = set()
    for ref in pkg.all_imports():
        if ref.module != pkg.root and ref.base == pkg.root and f"{pkg.root}.{ref.name}" not in pkg.files:
            shown = pkg.root if ref.name is None else f"{pkg.root}.{ref.name}"
            source = resolve(pkg, ref)
            hint = "its defining module" if source == pkg.root else source
            out.add(f"{pkg.where(ref)} -> {shown}  (import it from {hint})")
    return _by_location(out)


def function_level_project_imports(pkg: Package) -> list[str]:
    """Imports of a package module inside a function.

    The façade is exempt: its PEP 562 ``__getattr__`` imports lazily, so that importing one subpackage does
    not load the whole stack.
    """
    return _by_location(
        {
            f"{pkg.where(ref)} -> {resolve(pkg, ref) or ref.base}"
            for ref in pkg.all_imports()
            if ref.in_function and not ref.type_checking and ref.module != pkg.root and is_project(pkg, ref)
        }
    )


def unexplained_lazy_imports(pkg: Package) -> list[str]:
    """Third-party imports inside a function without a comment on the statement or on the line above it."""
    return _by_location(
        {
            f"{pkg.where(ref)} -> {ref.base}"
            for ref in pkg.all_imports()
            if ref.in_function
            and not (ref.type_checking or ref.explained or is_project(pkg, ref))
            and ref.base.partition(".")[0] not in _NOT_THIRD_PARTY
        }
    )


def long_modules(pkg: Package, max_lines: int = MAX_LINES) -> list[str]:
    """Modules of more than ``max_lines`` lines."""
    sizes = {m: len(p.read_text(encoding="utf-8").splitlines()) for m, p in pkg.files.items()}
    return [
        f"{pkg.path(m)}: {n} lines" for m, n in sorted(sizes.items(), key=lambda kv: -kv[1]) if n > max_lines
    ]


def import_graph(pkg: Package) -> dict[str, dict[str, ImportRef]]:
    """Module -> {imported module: first import of it}, for cycle finding.

    Like ``shared/hooks/layers.py``: an ``__init__`` importing its own submodules, and a submodule importing
    a package that contains it, add no edge (Python runs the package's ``__init__`` first either way).
    ``TYPE_CHECKING`` imports add none either: they never run.
    """
    graph: dict[str, dict[str, ImportRef]] = {m: {} for m in pkg.files}
    for ref, target in project_imports(pkg):
        importer = ref.module
        if ref.type_checking or _within(importer, target) or _within(target, importer):
            continue
        if ref.line < getattr(graph[importer].get(target), "line", sys.maxsize):
            graph[importer][target] = ref
    return graph


def strongly_connected(graph: dict[str, dict[str, ImportRef]]) -> list[list[str]]:
    """The graph's strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = stack[stack.index(v) :]
            del stack[stack.index(v) :]
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _shortest_cycle(graph: dict[str, dict[str, ImportRef]], component: list[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first), as a module list."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    return paths[v]
                if w in members and w not in paths:
                    paths[w] = [*paths[v], w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")  # unreachable for a strongly connected component


def import_cycles(pkg: Package) -> list[str]:
    """Each import cycle: its modules, then one cycle through them as ``path:line -> module`` lines."""
    graph, out = import_graph(pkg), []
    for component in strongly_connected(graph):
        cycle = _shortest_cycle(graph, component)
        steps = [graph[a][b] for a, b in zip(cycle, cycle[1:] + cycle[:1], strict=True)]
        lines = [f"    {pkg.where(ref)} -> {b}" for ref, b in zip(steps, cycle[1:] + cycle[:1], strict=True)]
        out.append(f"cycle among {', '.join(component)}:\n" + "\n".join(lines))
    return out


# ---------------------------------------------------------------------------------------------------------
# The real package
# ---------------------------------------------------------------------------------------------------------


def _fail_if(violations: list[str], what: str) -> None:
    """Fail with one violation a line, without pytest's assertion diff."""
    if violations:
        pytest.fail(f"{len(violations)} {what}:\n" + "\n".join(violations), pytrace=False)


@pytest.fixture(scope="module")
def package() -> Package:
    return scan_package(PACKAGE_DIR)


def test_every_module_is_in_exactly_one_layer(package: Package):
    _fail_if(
        unplaced_modules(package, LAYERS),
        "modules not in exactly one layer (add each to LAYERS in this file and to docs/ARCHITECTURE.md)",
    )


def test_no_upward_imports(package: Package):
    _fail_if(upward_imports(package, LAYERS), "imports of a higher layer")


def test_no_import_cycles(package: Package):
    _fail_if(import_cycles(package), "import cycles")


def test_no_function_level_project_imports(package: Package):
    _fail_if(function_level_project_imports(package), "function-level imports of package modules")


def test_function_level_third_party_imports_say_why(package: Package):
    _fail_if(
        unexplained_lazy_imports(package),
        "function-level third-party imports without a reason comment (e.g. `# lazy: DALI is heavy`)",
    )


def test_no_module_over_500_lines(package: Package):
    _fail_if(long_modules(package), f"modules over {MAX_LINES} lines")


def test_foundation_imports_nothing_of_the_project(package: Package):
    _fail_if(foundation_imports(package, LAYERS), f"imports of the package by the {LAYERS[0][0]} layer")


def test_nothing_inside_imports_the_package_facade(package: Package):
    _fail_if(facade_imports(package), "imports from the package façade inside the package")
