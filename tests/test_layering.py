"""Import layering, read from the source (``ast``, nothing is imported):

* ``stepdistill/teachers/`` and ``stepdistill/data/`` sit below the algorithms and the trainer:
  none of their modules imports ``stepdistill.algorithms`` or ``stepdistill.training`` (absolute or
  relative, at module level or inside a function).
* No module of ``stepdistill/``, ``eval/`` or ``pipelines/`` imports a private name (``_x``) from
  another first-party module: shared helpers are public where they are defined.  (The pipelines'
  deliberate copies of helpers are copies, not imports, and are not affected.)

``eval/`` and ``pipelines/`` are installed as ``stepdistill.eval`` / ``stepdistill.pipelines``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"stepdistill": ROOT / "stepdistill", "stepdistill.eval": ROOT / "eval",
            "stepdistill.pipelines": ROOT / "pipelines"}
LOWER = ["stepdistill.teachers", "stepdistill.data"]
UPPER = ("stepdistill.algorithms", "stepdistill.training",
         # the glue above them too (a teacher that trains itself on first use asks the glue, not the reverse)
         "stepdistill.run", "stepdistill.cli", "stepdistill.t2i_teacher", "stepdistill.compare", "stepdistill.demo",
         "stepdistill.export")


def _modules(package: str):
    """(dotted module name, path) of every ``.py`` file under ``package``'s folder."""
    top = next(p for p in sorted(PACKAGES, key=len, reverse=True) if package == p or package.startswith(p + "."))
    folder = PACKAGES[top].joinpath(*package[len(top):].split(".")[1:])
    for path in sorted(folder.rglob("*.py")):
        if top == "stepdistill" and path.relative_to(folder).parts[0] in ("eval", "pipelines"):
            continue
        rel = path.relative_to(PACKAGES[top]).with_suffix("").parts
        name = ".".join((top, *rel))
        yield (name[: -len(".__init__")] if name.endswith(".__init__") else name), path


def _imports(module: str, path: Path):
    """(line, imported module, imported names or None) for every import in the file; relative
    imports resolved against ``module``."""
    is_pkg = path.name == "__init__.py"
    parts = module.split(".")
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name, None
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = parts if is_pkg else parts[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
            yield node.lineno, target, names
            for n in names:  # ``from .. import training`` imports the submodule
                yield node.lineno, f"{target}.{n}", None


def _first_party(module: str) -> bool:
    return module == "stepdistill" or module.startswith("stepdistill.")


def _layering_violations() -> list[str]:
    bad: dict[tuple, str] = {}
    for package in LOWER:
        for module, path in _modules(package):
            for line, target, _ in _imports(module, path):
                if any(target == u or target.startswith(u + ".") for u in UPPER):
                    bad.setdefault((str(path.relative_to(ROOT)), line), target)  # one entry per statement
    return [f"{f}:{line} imports {target}" for (f, line), target in sorted(bad.items())]


def _private_imports() -> list[str]:
    bad = []
    for package in PACKAGES:
        for module, path in _modules(package):
            for line, target, names in _imports(module, path):
                if names is None or not _first_party(target) or target == module:
                    continue
                for n in names:
                    if n.startswith("_") and not n.startswith("__"):
                        bad.append(f"{path.relative_to(ROOT)}:{line} imports private {n} from {target}")
    return sorted(set(bad))


def test_the_scanner_sees_the_packages():
    mods = {m for p in PACKAGES for m, _ in _modules(p)}
    assert {"stepdistill.teachers.base", "stepdistill.data.sources", "stepdistill.eval.metrics",
            "stepdistill.pipelines.one_step", "stepdistill.algorithms.dmd2"} <= mods
    # relative imports resolve against the module: dmd2 imports the registry and the base class
    targets = {t for _, t, _ in _imports("stepdistill.algorithms.dmd2", ROOT / "stepdistill/algorithms/dmd2.py")}
    assert {"stepdistill.algorithms", "stepdistill.algorithms.base", "stepdistill.teachers.base"} <= targets


def test_scanner_flags_upward_and_private_imports(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("from ..algorithms.base import Distiller\nfrom .. import training\n"
                 "def f():\n    from ..data.sources import _EpochPermutation\n")
    found = list(_imports("stepdistill.teachers.x", f))
    assert (1, "stepdistill.algorithms.base", ["Distiller"]) in found
    assert (2, "stepdistill.training", None) in found
    assert (4, "stepdistill.data.sources", ["_EpochPermutation"]) in found


def test_teachers_and_data_import_nothing_from_algorithms_or_training():
    assert _layering_violations() == []


def test_no_private_cross_module_imports():
    assert _private_imports() == []
