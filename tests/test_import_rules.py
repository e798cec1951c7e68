"""The layers' import rules, checked on every module's source (an AST walk, lazy imports too).

* ``inference`` and ``export`` never import ``dicom_node`` (the node is built on them, not the
  other way round).
* ``export`` takes only result types from ``inference`` (``inference.results``).
* Production code (``dicom_node``, ``inference``, ``export``) never imports the sample data
  (``omnimri_samples``) or the tests; the two commands that exist to use sample data import it
  inside the command, listed in :data:`SAMPLE_USERS`.
* ``omnimri_samples`` is a leaf: of the project it imports only the UID root (``export.uids``).

A known crossing that is still to be removed is listed in :data:`KNOWN` with its issue; the test
fails when it is gone too, so the list cannot go stale.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRODUCTION = ("dicom_node", "inference", "export")
SAMPLES = "omnimri_samples"

SAMPLE_USERS = {
    "dicom_node/cli/demo.py": "omnimri-node demo sends a sample brain series (it is a demo)",
    "inference/omnimri/real_mr.py": "eval --real-mr runs the MNI152 template as a DICOM series",
}
"""Production modules allowed to import :mod:`omnimri_samples`, inside a function only."""

KNOWN: dict[tuple[str, str], str] = {}
"""Crossings still to be removed: ``(module path, imported module)`` → why it is allowed now."""


@dataclass(frozen=True)
class Import:
    """One import statement: which module, from where, and whether inside a function."""

    path: str
    line: int
    module: str
    lazy: bool


def _resolve(path: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = Path(path).with_suffix("").parts[:-1]  # the module's package (also for __init__)
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def imports_of(path: str, source: str) -> list[Import]:
    """Every module ``source`` imports (``from a import b`` also as ``a.b``; import_module)."""
    tree = ast.parse(source, filename=path)
    out: list[Import] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import):
                out.extend(Import(path, child.lineno, a.name, lazy) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = _resolve(path, child)
                out.append(Import(path, child.lineno, base, lazy))
                out.extend(Import(path, child.lineno, f"{base}.{a.name}", lazy)
                           for a in child.names if a.name != "*")
            elif (isinstance(child, ast.Call) and child.args
                  and isinstance(child.args[0], ast.Constant)
                  and isinstance(child.args[0].value, str)
                  and getattr(child.func, "attr", getattr(child.func, "id", "")) in (
                      "import_module", "__import__")):
                out.append(Import(path, child.lineno, child.args[0].value.split(":")[0], True))
            visit(child, inner)

    visit(tree, False)
    return out


def _top(module: str) -> str:
    return module.split(".", 1)[0]


def violations(imports: list[Import]) -> list[tuple[str, str, str]]:
    """``(path:line, imported module, rule broken)`` for every import against the rules."""
    bad: list[tuple[str, str, str]] = []
    for imp in imports:
        layer = imp.path.split("/", 1)[0]
        top = _top(imp.module)
        where = f"{imp.path}:{imp.line}"
        if layer in ("inference", "export") and top == "dicom_node":
            bad.append((where, imp.module, f"{layer} never imports dicom_node"))
        if (layer == "export" and top == "inference" and imp.module != "inference"
                and not imp.module.startswith("inference.results")):
            bad.append((where, imp.module, "export imports only inference.results"))
        if layer in PRODUCTION and top in (SAMPLES, "tests"):
            allowed = top == SAMPLES and imp.path in SAMPLE_USERS and imp.lazy
            if not allowed:
                bad.append((where, imp.module, "production code never imports sample/test data"))
        if layer == SAMPLES and top in PRODUCTION and not imp.module.startswith("export.uids"):
            bad.append((where, imp.module, "omnimri_samples imports only export.uids"))
    return bad


def _all_imports() -> list[Import]:
    out: list[Import] = []
    for package in (*PRODUCTION, SAMPLES):
        for file in sorted((ROOT / package).rglob("*.py")):
            rel = file.relative_to(ROOT).as_posix()
            out.extend(imports_of(rel, file.read_text(encoding="utf-8")))
    return out


def _known(where: str, module: str) -> tuple[str, str] | None:
    path = where.split(":")[0]
    return next((k for k in KNOWN
                 if k[0] == path and (module == k[1] or module.startswith(k[1] + "."))), None)


def test_the_layers_import_only_what_they_may() -> None:
    found = violations(_all_imports())
    unknown = [v for v in found if _known(v[0], v[1]) is None]
    assert unknown == [], "\n".join(f"{w}: imports {m} ({why})" for w, m, why in unknown)
    seen = {_known(v[0], v[1]) for v in found}
    stale = [k for k in KNOWN if k not in seen]
    assert stale == [], f"fixed crossings still listed in KNOWN (remove them): {stale}"


def test_sample_users_import_samples_inside_the_command() -> None:
    by_path: dict[str, list[Import]] = {}
    for imp in _all_imports():
        if _top(imp.module) == SAMPLES:
            by_path.setdefault(imp.path, []).append(imp)
    assert set(by_path) <= set(SAMPLE_USERS), set(by_path) - set(SAMPLE_USERS)
    assert all(i.lazy for imps in by_path.values() for i in imps)


@pytest.mark.parametrize(("path", "source", "rule"), [
    ("inference/x.py", "from dicom_node.config import NodeSettings\n", "never imports dicom_node"),
    ("export/x.py", "def f():\n    import dicom_node.logs\n", "never imports dicom_node"),
    ("export/x.py", "from inference.volume import Volume\n", "only inference.results"),
    ("export/x.py", "from inference import volume\n", "only inference.results"),
    ("export/sub/x.py", "from ...inference.runner import run_model\n", "only inference.results"),
    ("dicom_node/x.py", "from omnimri_samples import synthetic_series\n", "sample/test data"),
    ("dicom_node/cli/demo.py", "from omnimri_samples import brain_series\n", "sample/test data"),
    ("inference/x.py", "def f():\n    from tests.fixtures import net\n", "sample/test data"),
    ("export/x.py", "import importlib\nimportlib.import_module('dicom_node.x')\n", "dicom_node"),
    ("omnimri_samples/x.py", "from dicom_node.index import SeriesIndex\n", "only export.uids"),
])
def test_a_new_crossing_is_caught(path: str, source: str, rule: str) -> None:
    found = violations(imports_of(path, source))
    assert found and rule in found[0][2], found


def test_allowed_imports_pass() -> None:
    ok = [("export/x.py", "from inference.results import Results\n"),
          ("export/x.py", "from . import uids\nfrom .uids import UID_PREFIX\n"),
          ("dicom_node/cli/demo.py", "def run():\n    from omnimri_samples import brain_series\n"),
          ("omnimri_samples/__init__.py", "from export.uids import UID_PREFIX\n"),
          ("dicom_node/x.py", "from inference.engines import Engine\n")]
    for path, source in ok:
        assert violations(imports_of(path, source)) == [], (path, source)
