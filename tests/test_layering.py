"""The layering rule (../shared/DESIGN.md): infra/ imports nothing from the domain (curation, training,
evaluation) or the application layer (flows); the domain does not import flows. Checked on every import
statement, at module level or inside functions, and on import_module() calls with a literal name."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FORBIDDEN = {
    "infra": {"curation", "training", "evaluation", "flows"},
    "curation": {"flows"},
    "training": {"flows"},
    "evaluation": {"flows"},
}


def imported_packages(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every import in a file, including importlib.import_module("...")."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append((node.lineno, node.args[0].value.split(".")[0]))
    return found


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_import_crosses_the_layering_rule(layer):
    violations = [
        f"{path.relative_to(REPO)}:{line} imports {package}"
        for path in sorted((REPO / layer).rglob("*.py"))
        for line, package in imported_packages(path)
        if package in FORBIDDEN[layer]
    ]
    assert not violations, "\n".join(violations)


def test_the_checker_sees_imports_inside_functions(tmp_path):
    sample = tmp_path / "m.py"
    sample.write_text("import os\ndef f():\n    from flows.cli import main\n    importlib.import_module('curation.ingest')\n")
    assert imported_packages(sample) == [(1, "os"), (3, "flows"), (4, "curation")]
