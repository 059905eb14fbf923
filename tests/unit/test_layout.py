"""The package's shape, kept by tests: layering, no import cycles, short functions, one of each.

Layers (README "Architecture"): the core modules at the top of ``src/qformer_lora`` import
only the core; ``diagnostics`` imports the core; ``training`` the core and diagnostics;
``inference`` the core and training; ``bench`` the core, diagnostics and training; ``repro``
anything but the CLI; nothing imports ``cli`` or ``cli_options`` (its vocabulary). Imports
inside functions count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import qformer_lora

PACKAGE = Path(qformer_lora.__file__).parent
WORKFLOWS = ("diagnostics", "training", "inference", "bench", "repro")
ALLOWED = {  # layer -> layers it may import
    "core": {"core"},
    "diagnostics": {"core", "diagnostics"},
    "training": {"core", "diagnostics", "training"},
    "inference": {"core", "training", "inference"},
    "bench": {"core", "diagnostics", "training", "bench"},
    "repro": {"core", "diagnostics", "training", "inference", "bench", "repro"},
    "cli": {"core", "diagnostics", "training", "inference", "bench", "repro", "cli"},
}
MAX_FUNCTION_LINES = 60


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in WORKFLOWS:
        return parts[1]
    return "cli" if module in ("qformer_lora.cli", "qformer_lora.cli_options") else "core"


def imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules ``module`` imports (``from . import x`` resolved to ``x`` when x is a module)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("qformer_lora")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if not base.startswith("qformer_lora"):
                continue
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in known else base)
    return {m for m in found if m in known and m != module}


GRAPH = {name: imports(name, path, modules()) for name, path in modules().items()}


def test_the_graph_sees_the_known_dependencies():
    # the parser must resolve relative imports, or every layering check below passes vacuously
    assert "qformer_lora.training.step" in GRAPH["qformer_lora.training.train"]
    assert "qformer_lora.precision" in GRAPH["qformer_lora.diagnostics.doctor"]
    assert "qformer_lora.forward" in GRAPH["qformer_lora.inputs"]
    assert {layer(m) for m in GRAPH} == {"core", "cli", *WORKFLOWS}


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_layering(module):
    bad = sorted(m for m in GRAPH[module] if layer(m) not in ALLOWED[layer(module)] and layer(m) != layer(module))
    bad += sorted(m for m in GRAPH[module] if layer(m) == "cli" and layer(module) != "cli")
    assert not bad, f"{module} ({layer(module)}) imports {bad}; allowed layers: {sorted(ALLOWED[layer(module)])}"


def test_no_import_cycles():
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(GRAPH[node]):
            if nxt.startswith(node + ".") or node.startswith(nxt + "."):
                continue  # a package and its own modules
            if state.get(nxt) == "open":
                return path + [node, nxt]
            if nxt not in state:
                cycle = visit(nxt, path + [node])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for name in sorted(GRAPH):
        if name not in state:
            cycle = visit(name, [])
            assert cycle is None, "import cycle: " + " -> ".join(cycle[cycle.index(cycle[-1]) :])


def test_no_function_is_longer_than_60_lines():
    long = []
    for path in modules().values():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "split these functions: " + "; ".join(long)


@pytest.mark.parametrize(
    "definition",
    [
        "def training_step(",  # the one training step
        "\nPRECISIONS = ",  # the one precision table
        "def linear_warmup_decay(",  # the one schedule
        "def build_adapter_model(",  # the one model set-up
    ],
)
def test_one_definition_of_each(definition):
    where = [
        str(path.relative_to(PACKAGE.parent))
        for path in modules().values()
        if definition in path.read_text(encoding="utf-8")
    ]
    assert len(where) == 1, f"{definition!r} is defined in {where or 'no module'}"


def test_release_checks_live_in_compat_only():
    # version knowledge in one place: other modules ask compat, never compare releases themselves
    needles = ("packaging.version", "Version(", "transformers.__version__", "peft.__version__")
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}: {needle}"
        for name, path in modules().items()
        if not name.endswith(".compat")
        for needle in needles
        if needle in path.read_text(encoding="utf-8")
    ]
    assert not offenders, offenders


def test_the_cli_imports_workflows_only_in_the_command_that_runs_them():
    # `qformer-lora train` imported the whole benchmark stack: top-level imports are the vocabulary only
    tree = ast.parse((PACKAGE / "cli.py").read_text(encoding="utf-8") + (PACKAGE / "cli_options.py").read_text())
    top = {
        f"{node.module or ''}.{alias.name}".strip(".")
        for node in tree.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    heavy = sorted(
        name
        for name in top
        if name.split(".")[0] in ("bench", "repro", "inference") or name in ("training.train", "diagnostics.doctor")
    )
    assert not heavy, f"cli.py imports {heavy} at module level; import them inside the command"
