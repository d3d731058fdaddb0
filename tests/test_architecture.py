"""The layer order of docs/architecture.md holds: no module imports a module of a higher layer.

Every ``import`` / ``from ... import`` in the package is read with ``ast`` (function-level lazy imports
included) and each module is placed in a layer by its dotted name; an import may go to the same
layer or a lower one. A module that no layer claims fails too, so a new package must be placed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import mia_lightning

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("ground", ("mia_lightning.version", "mia_lightning.errors", "mia_lightning.atomic", "mia_lightning.runtime", "mia_lightning.interrupts", "mia_lightning.logs", "mia_lightning.console", "mia_lightning.phases", "mia_lightning.names", "mia_lightning.hub", "mia_lightning.downloads", "mia_lightning.recipe_files")),
    ("contract", ("mia_lightning.contract",)),
    ("statistics", ("mia_lightning.metrics", "mia_lightning.grouping", "mia_lightning.utility")),
    ("report", ("mia_lightning.report",)),
    ("defences", ("mia_lightning.defences",)),
    ("models", ("mia_lightning.models",)),
    ("data", ("mia_lightning.data",)),
    ("farm", ("mia_lightning.farm",)),
    ("unlearning", ("mia_lightning.unlearning",)),
    ("attacks", ("mia_lightning.attacks",)),
    ("analyses", ("mia_lightning.privacy", "mia_lightning.analysis")),
    ("audit", ("mia_lightning.audit",)),
    ("commands", ("mia_lightning.cli", "mia_lightning.study", "mia_lightning.importers", "mia_lightning.__main__")),
    ("api", ("mia_lightning", "mia_lightning.api")),
)
"""Bottom to top; the same order, with each layer's job, is in docs/architecture.md."""

ROOT = "mia_lightning"


def layer_of(module: str) -> int | None:
    """Index in ``LAYERS`` of the longest prefix naming ``module`` (the root package only names itself)."""
    best, best_length = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module == prefix or (prefix != ROOT and module.startswith(prefix + "."))
            if matches and len(prefix) > best_length:
                best, best_length = index, len(prefix)
    return best


def module_name(path: Path, package_dir: Path) -> str:
    parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, name: str, known: set[str]) -> list[tuple[int, str]]:
    """(line, module) of every package module ``path`` imports, at any depth (lazy imports in functions too)."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importing module's package
                package = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.append((node.lineno, submodule if submodule in known else base))
    return list(dict.fromkeys((line, module) for line, module in found if module == ROOT or module.startswith(ROOT + ".")))


def upward_imports(package_dir: Path) -> list[str]:
    """One line per import that runs from a lower layer up to a higher one, and per module no layer claims."""
    paths = sorted(package_dir.rglob("*.py"))
    names = {path: module_name(path, package_dir) for path in paths}
    known = set(names.values())
    problems = []
    for path, name in names.items():
        layer = layer_of(name)
        if layer is None:
            problems.append(f"{name}: no layer claims it; add it to LAYERS here and to docs/architecture.md")
            continue
        for line, target in imported_modules(path, name, known):
            target_layer = layer_of(target)
            if target_layer is not None and target_layer > layer:
                problems.append(f"{path.relative_to(package_dir.parent)}:{line}: {name} ({LAYERS[layer][0]}) imports "
                                f"{target} ({LAYERS[target_layer][0]}), a higher layer")
    return problems


def test_no_module_imports_a_higher_layer():
    assert upward_imports(Path(mia_lightning.__file__).parent) == []


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    package = tmp_path / ROOT
    for relative, text in {"__init__.py": "", **files}.items():
        (package / relative).parent.mkdir(parents=True, exist_ok=True)
        (package / relative).write_text(text)
    return package


def test_the_checker_finds_an_upward_lazy_import_and_an_unplaced_module(tmp_path):
    package = _package(tmp_path, {
        "errors.py": "def f():\n    from mia_lightning.cli import main\n",
        "models/__init__.py": "",
        "models/mlp.py": "from ..data import plan\nfrom mia_lightning.contract.io import load\n",
        "data/__init__.py": "", "data/plan.py": "", "contract/__init__.py": "", "contract/io.py": "",
        "cli.py": "import mia_lightning.errors\nfrom mia_lightning import audit\n",
        "audit.py": "", "novel.py": "",
    })
    problems = upward_imports(package)
    assert len(problems) == 3, problems
    assert problems[0].startswith("mia_lightning/errors.py:2: mia_lightning.errors (ground) imports mia_lightning.cli (commands)")
    assert problems[1].startswith("mia_lightning/models/mlp.py:1: mia_lightning.models.mlp (models) imports mia_lightning.data.plan (data)")
    assert problems[2].startswith("mia_lightning.novel: no layer claims it")


def test_downward_and_same_layer_imports_pass(tmp_path):
    package = _package(tmp_path, {
        "data/__init__.py": "", "data/plan.py": "from mia_lightning.errors import MiaError\n", "errors.py": "",
        "data/text.py": "from . import plan\nfrom .plan import x\n",
        "study.py": "def run():\n    from mia_lightning.cli import farm_main\n", "cli.py": "",
    })
    assert upward_imports(package) == []
