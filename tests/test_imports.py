"""Start-up cost: heavy modules load only where they are used; and which layer may import which.

Each check runs in a fresh interpreter, since this test process has long since imported
everything. scipy.stats and scipy.spatial cost ~0.7 s and torch seconds; `onnx` alone ~1 s
(ml_dtypes registering its dtypes with numpy), which `onnxprune --help` must not pay.

The layering rules (DESIGN.md §1b) are read from the source with `ast`, so an import that breaks
them fails here even where it would not (yet) make a cycle.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import onnxprune as onnxprune_package

HEAVY = ("torch", "scipy.stats", "scipy.spatial", "scipy.linalg")


def _loaded_after(code: str, names: tuple[str, ...]) -> list[str]:
    """Which of `names` are in sys.modules after running `code` in a new interpreter."""
    probe = (
        f"{code}\nimport json, sys\nprint(json.dumps([n for n in {names!r} if n in sys.modules]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.splitlines()[-1])


def test_the_api_loads_without_torch_or_scipy_extras():
    code = "import onnxprune\nonnxprune.prune, onnxprune.analyze, onnxprune.PruneConfig"
    assert _loaded_after(code, HEAVY) == []


def test_building_every_cli_parser_loads_no_onnx():
    code = (
        "from onnxprune.cli import build_parser\n"
        "parser = build_parser()\n"
        "for sub in parser._subparsers._group_actions[0].choices.values():\n"
        "    sub.format_help()"
    )
    assert _loaded_after(code, ("onnx", "onnxruntime", *HEAVY)) == []


def test_lazy_names_are_the_api_objects():
    import onnxprune
    from onnxprune import api, config

    assert onnxprune.prune is api.prune
    assert onnxprune.PruneConfig is config.PruneConfig
    assert set(onnxprune.__all__) <= set(dir(onnxprune))


def test_an_unknown_name_is_an_attribute_error():
    import onnxprune

    with pytest.raises(AttributeError, match="no_such_name"):
        onnxprune.no_such_name  # noqa: B018


def _imports(path: Path) -> set[str]:
    """The onnxprune modules `path` imports at run time (anywhere in it, lazily too; not under
    `if TYPE_CHECKING:`), by their dotted names."""
    tree = ast.parse(path.read_text())
    hidden = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING")
        for inner in ast.walk(node)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in hidden:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.split(".")[0] == "onnxprune"}


def _module_imports() -> dict[str, set[str]]:
    """Every onnxprune module's name → the onnxprune modules it imports."""
    root = Path(onnxprune_package.__file__).parent
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = _imports(path)
    return modules


def _reach(modules: dict[str, set[str]], start: str) -> set[str]:
    """The modules `start` loads, directly or through the modules it imports."""
    seen, stack = set(), [start]
    while stack:
        for name in modules.get(stack.pop(), set()) - seen:
            seen.add(name)
            stack.append(name)
    return seen


def _inside(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def test_the_graph_layer_imports_only_graph_ops_plan_and_errors():
    allowed = ("onnxprune.graph", "onnxprune.ops", "onnxprune.plan", "onnxprune.errors")
    modules = _module_imports()
    wrong = {
        (name, imported)
        for name, imports in modules.items()
        if _inside(name, ("onnxprune.graph", "onnxprune.ops"))
        for imported in imports
        if not _inside(imported, allowed)
    }
    assert wrong == set()


def test_config_and_the_neutral_modules_load_no_method_or_calibration_code():
    modules = _module_imports()
    for start in ("onnxprune.config", "onnxprune.options", "onnxprune.plan"):
        reached = _reach(modules, start)
        assert not [m for m in reached if _inside(m, ("onnxprune.methods", "onnxprune.calib"))]
    assert modules["onnxprune.options"] <= {"onnxprune.errors"}
    assert modules["onnxprune.plan"] == set()


def test_the_import_rules_see_imports():
    """The parser finds a lazy import inside a function and skips a TYPE_CHECKING one."""
    modules = _module_imports()
    assert "onnxprune.calib.data" not in modules["onnxprune.deploy.quantize"]
    assert "onnxprune.methods.activation" in modules["onnxprune.methods"]
    assert "onnxprune.methods.base" in modules["onnxprune.methods.magnitude"]


def test_every_module_imports_first():
    """Each module of the package imports in an interpreter where no other onnxprune module is
    loaded yet: an import cycle fails only for the modules it starts from (ops.norm ↔
    graph.channel_norm failed `import onnxprune.graph.channel_norm` while the API loaded)."""
    root = Path(onnxprune_package.__file__).parent
    names = sorted(
        ".".join(("onnxprune", *path.relative_to(root).with_suffix("").parts)).removesuffix(
            ".__init__"
        )
        for path in root.rglob("*.py")
        if path.name != "__main__.py"
    )
    probe = (
        "import importlib, json, sys\nfailed = {}\n"
        f"for name in {names!r}:\n"
        "    for loaded in [m for m in sys.modules if m.split('.')[0] == 'onnxprune']:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n        importlib.import_module(name)\n"
        "    except ImportError as exc:\n        failed[name] = str(exc)\n"
        "print(json.dumps(failed))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert len(names) > 50
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {}
