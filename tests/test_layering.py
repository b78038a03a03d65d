"""The layering rule (../shared/DESIGN.md): infra/ imports nothing from the domain (curation, training,
evaluation) or the application layer (flows); the domain does not import flows, and training does not
import evaluation (the effect statistics both use live in infra.effects). Checked on every import
statement, at module level or inside functions, and on import_module() calls with a literal name."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FORBIDDEN = {
    "infra": {"curation", "training", "evaluation", "flows"},
    "curation": {"flows"},
    "training": {"flows", "evaluation"},  # evaluation scores training's checkpoints: it sits above
    "evaluation": {"flows"},
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module name) of every import in a file, including importlib.import_module("...")."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append((node.lineno, node.args[0].value))
    return found


def imported_packages(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every import in a file."""
    return [(line, module.split(".")[0]) for line, module in imported_modules(path)]


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


RANK_PROGRAMS = ["training/pretrain.py", "training/learner.py"]  # run once per rank under torchrun / deepspeed
TRAINING_CONFIGS = ["training/pretrain_config.py", "training/learner_config.py"]
HEAVY = {"torch", "megatron", "deepspeed", "transformers", "vllm"}


@pytest.mark.parametrize("program", RANK_PROGRAMS)
def test_per_rank_programs_do_not_import_a_stage_shell(program):
    """The training shape (README, Architecture): a per-rank loop reads its settings from the config module."""
    shells = [f"{line}: {module}" for line, module in imported_modules(REPO / program) if module.endswith("_stage")]
    assert not shells, shells


@pytest.mark.parametrize("config", TRAINING_CONFIGS)
def test_training_config_modules_import_no_engine(config):
    heavy = [f"{line}: {module}" for line, module in imported_modules(REPO / config) if module.split(".")[0] in HEAVY]
    assert not heavy, heavy


def test_the_cli_and_stage_list_load_no_engine():
    """Function-body imports are kept only for engines: loading the CLI (and with it every stage module)
    must not import torch, Spark, Megatron, DeepSpeed, vLLM or transformers, so `refinery --help` stays fast."""
    import json
    import subprocess
    import sys

    code = ("import json, sys, flows.cli, flows.registry; flows.registry.all_stages(); "
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    loaded = set(json.loads(subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True,
                                           text=True).stdout))
    assert not loaded & (HEAVY | {"pyspark", "numba"}), sorted(loaded & (HEAVY | {"pyspark", "numba"}))


def test_no_import_circles_among_the_projects_modules():
    """No module imports, directly or through others, a module that imports it back — counting imports
    inside functions and under TYPE_CHECKING too (a circle there is still a knot to untie)."""
    modules = {}
    for package in ("curation", "training", "evaluation", "flows", "infra"):
        for path in (REPO / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path
    graph = {name: {m for _, imported in imported_modules(path)
                    for m in (imported, imported.rsplit(".", 1)[0]) if m in modules and m != name}
             for name, path in modules.items()}
    circles, state = [], {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                circles.append(" -> ".join(trail[trail.index(nxt):] + [node, nxt]) if nxt in trail
                               else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, trail + [node])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert not circles, "\n".join(circles)
