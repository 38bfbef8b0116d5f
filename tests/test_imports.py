"""Start-up cost: heavy modules load only where they are used.

Each check runs in a fresh interpreter, since this test process has long since imported
everything. scipy.stats and scipy.spatial cost ~0.7 s and torch seconds; `onnx` alone ~1 s
(ml_dtypes registering its dtypes with numpy), which `onnxprune --help` must not pay.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

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
