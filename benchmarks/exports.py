"""What the exporting scripts for other frameworks share (keras_models.py, paddle_models.py):
their command line and the manifest, in `zoo_models.py`'s schema, that `zoo.py --cache` reads.
Standard library only: each script runs in its framework's own environment."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path


def parse_args(argv: list[str] | None, doc: str, env: str, default: Path) -> argparse.Namespace:
    """Command line: cache (default `$env`, else `default`), subset, force."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--cache", default=os.environ.get(env, str(default)), help="Output folder.")
    parser.add_argument("--models", default="", help="Comma-separated subset (default: all).")
    parser.add_argument("--force", action="store_true", help="Re-export existing files.")
    return parser.parse_args(argv)


def export_all(
    cache: Path, names: Iterable[str], force: bool, export: Callable[[str], dict]
) -> None:
    """Export each model of `names` not yet in the cache's manifest (all with `force`), writing
    the manifest after each so that an interrupted run keeps what it did."""
    path = cache / "manifest.json"
    manifest = json.loads(path.read_text()) if path.exists() else {}
    for name in names:
        if name in manifest and not force and (cache / f"{name}.onnx").exists():
            continue
        manifest[name] = export(name)
        path.write_text(json.dumps(manifest, indent=1) + "\n")
        print(name, json.dumps(manifest[name]), flush=True)
