"""Self-checks of the architecture test (test_architecture.py): each rule fails on a synthetic package that
breaks it and passes on a clean one, so the architecture test is not a test that cannot fail."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from test_architecture import (
    MAX_LINES,
    Layers,
    Package,
    facade_imports,
    foundation_imports,
    function_level_project_imports,
    import_cycles,
    long_modules,
    resolve,
    scan_package,
    unexplained_lazy_imports,
    unplaced_modules,
    upward_imports,
)

_LAYERS_SYN: Layers = (("foundation", ("pkg.errors",)), ("core", ("pkg.core",)), ("tasks", ("pkg.tasks",)))

_BROKEN = {
    "__init__.py": "",
    "errors.py": "from pkg.tasks.x import run\n",
    "core/__init__.py": "",
    "core/a.py": "from . import b\n",
    "core/b.py": "from pkg.core.a import VALUE\n\nVALUE = 1\n",
    "tasks/__init__.py": "",
    "tasks/x.py": (
        "def run():\n"
        "    from ..core import a\n"
        "    import numpy\n"
        "    # lazy: scipy is heavy\n"
        "    import scipy\n"
        "    import yaml  # noqa: PLC0415\n"
        "    from pkg import thing\n"
        "    return a, numpy, scipy, yaml, thing\n"
    ),
    "stray.py": "x = 1\n" * (MAX_LINES + 1),
}

_CLEAN = {
    "__init__.py": "from pkg.tasks.x import run\n\n__all__ = ['run']\n",
    "errors.py": "class Oops(Exception):\n    import enum\n",
    "core/__init__.py": "from .a import VALUE\n",
    "core/a.py": (
        "from typing import TYPE_CHECKING\n\nimport pkg.core\n\n"
        "if TYPE_CHECKING:\n    from pkg.core.b import B\n\nVALUE = 1\n"
    ),
    "core/b.py": "from pkg.core import VALUE\nfrom pkg.errors import Oops\n\nB = VALUE, Oops\n",
    "tasks/__init__.py": "",
    "tasks/x.py": (
        "import json\n\nfrom ..core.b import B\n\n\n"
        "def run():\n"
        "    import os\n"
        "    import numpy  # lazy: numpy is heavy\n"
        "    # lazy: scipy is heavy too\n"
        "    from scipy import (\n        stats,\n    )\n"
        "    return json, os, numpy, stats, B\n"
    ),
}

_CYCLE_STEPS = "    pkg/core/a.py:1 -> pkg.core.b\n    pkg/core/b.py:1 -> pkg.core.a"

_RULES: dict[str, Callable[[Package], list[str]]] = {
    "layers": lambda pkg: unplaced_modules(pkg, _LAYERS_SYN),
    "upward": lambda pkg: upward_imports(pkg, _LAYERS_SYN),
    "cycles": import_cycles,
    "function_level_project": function_level_project_imports,
    "lazy_reason": unexplained_lazy_imports,
    "long": long_modules,
    "foundation": lambda pkg: foundation_imports(pkg, _LAYERS_SYN),
    "facade": facade_imports,
}


def _write_package(root: Path, files: dict[str, str]) -> Package:
    """Writes ``files`` (path -> text) as the package ``root/pkg`` and scans it."""
    for name, text in files.items():
        (root / "pkg" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "pkg" / name).write_text(text, encoding="utf-8")
    return scan_package(root / "pkg")


_BROKEN_REPORTS = {
    "layers": ["pkg/stray.py: pkg.stray (layers: none)"],
    "upward": ["pkg/errors.py:1 -> pkg.tasks.x  (foundation imports tasks)"],
    "cycles": ["cycle among pkg.core.a, pkg.core.b:\n" + _CYCLE_STEPS],
    "function_level_project": ["pkg/tasks/x.py:2 -> pkg.core.a", "pkg/tasks/x.py:7 -> pkg"],
    "lazy_reason": ["pkg/tasks/x.py:3 -> numpy", "pkg/tasks/x.py:6 -> yaml"],
    "long": [f"pkg/stray.py: {MAX_LINES + 1} lines"],
    "foundation": ["pkg/errors.py:1 -> pkg.tasks.x"],
    "facade": ["pkg/tasks/x.py:7 -> pkg.thing  (import it from its defining module)"],
}


@pytest.mark.parametrize("rule, expected", list(_BROKEN_REPORTS.items()), ids=list(_BROKEN_REPORTS))
def test_self_check_reports_violation(tmp_path: Path, rule: str, expected: list[str]):
    assert _RULES[rule](_write_package(tmp_path, _BROKEN)) == expected


@pytest.mark.parametrize("rule", list(_RULES))
def test_self_check_accepts_clean_package(tmp_path: Path, rule: str):
    assert _RULES[rule](_write_package(tmp_path, _CLEAN)) == []


def test_self_check_resolves_reexports_and_relative_imports(tmp_path: Path):
    pkg = _write_package(tmp_path, _CLEAN)
    targets = {(ref.module, ref.line): resolve(pkg, ref) for ref in pkg.all_imports()}
    assert targets[("pkg.core.b", 1)] == "pkg.core.a"  # `from pkg.core import VALUE`, re-exported
    assert targets[("pkg.tasks.x", 3)] == "pkg.core.b"  # `from ..core.b import B`
    assert targets[("pkg", 1)] == "pkg.tasks.x"
    assert targets[("pkg.tasks.x", 1)] is None  # json: not the package's


def test_self_check_reports_module_in_two_layers(tmp_path: Path):
    pkg = _write_package(tmp_path, _CLEAN)
    overlapping = (*_LAYERS_SYN, ("extra", ("pkg.core.a",)))
    assert unplaced_modules(pkg, overlapping) == ["pkg/core/a.py: pkg.core.a (layers: core, extra)"]
