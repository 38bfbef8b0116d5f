"""Is MiniLM's `id` fit data-limited? The same prune on growing calibration sets, scored on the
same held-out sentences.

The calibration pool is `benchmarks/minilm_model.py`'s 256 calibration sentences followed by
sentences of more standard-library modules' docstrings (`EXTRA_MODULES`, none of them a
held-out source; any sentence also in the held-out pool is dropped), in a seeded order, tokenized
like `calib.npz` (64 tokens). Each cell prunes the legacy export with `id` (defaults: intercept,
recalibration, sequential refit) at `--target-macs` on the first N sentences of the pool and
scores it on `heldout.npz` against the original (mean cosine of mean-pooled embeddings,
nearest-neighbour agreement, Spearman ρ). The 128 held-out sentences are never read by a fit.

    ONNXPRUNE_ZOO_CACHE=/work/zoo_cache python benchmarks/minilm_calib.py --sizes 256,1024,2048

Writes `benchmarks/results/minilm_calib.json` (or `--out`), one line per cell as it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnxprune  # noqa: E402
from benchmarks.accuracy import machine  # noqa: E402
from benchmarks.minilm_model import (  # noqa: E402
    CALIB_SOURCES,
    HELDOUT_SOURCES,
    INPUTS,
    _sentences,
    ensure_minilm,
    sentence_split,
    tokenize,
)
from benchmarks.transformer import _dataset  # noqa: E402
from onnxprune.compare.sweep import Evaluator  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "minilm_calib.json"
EXTRA_MODULES = (  # docstring sources added to the calibration pool; none is a held-out source
    "typing", "asyncio", "unittest", "http.client", "urllib.request", "inspect", "ast", "pickle",
    "sqlite3", "xml.etree.ElementTree", "multiprocessing", "concurrent.futures", "io", "sys",
    "configparser", "tempfile", "glob", "enum", "dataclasses", "contextlib", "traceback",
    "warnings", "copy", "hashlib", "base64", "struct", "codecs", "locale", "gettext", "calendar",
    "time", "uuid", "ipaddress", "smtplib", "imaplib", "ftplib", "mailbox", "pdb", "doctest",
    "pydoc", "dis", "tokenize", "weakref", "gc", "abc", "numbers", "operator", "selectors",
    "signal", "queue", "sched", "zlib", "gzip", "bz2", "lzma", "shelve", "dbm", "platform", "ssl",
    "html.parser", "urllib.parse", "http.server", "wave", "colorsys", "difflib", "unicodedata",
    "pprint", "reprlib", "types", "array", "timeit", "trace", "cProfile", "pstats", "optparse",
    "getopt", "fnmatch", "filecmp", "stat", "netrc", "plistlib", "secrets", "hmac", "mimetypes",
    "quopri", "binascii", "xml.dom.minidom", "webbrowser", "cmd", "shlex", "code", "codeop",
    "importlib", "pkgutil", "modulefinder", "runpy", "site", "sysconfig", "builtins",
    "zipimport", "socketserver", "xmlrpc.client", "email.utils", "email.parser",
)  # fmt: skip


def calibration_pool(model_dir: Path) -> dict[str, np.ndarray]:
    """`pool_sentences()` tokenized to 64 tokens, like calib.npz."""
    return tokenize(model_dir, pool_sentences())


def pool_sentences() -> list[str]:
    """The 256 sentences of calib.npz first, then the extra modules' sentences (seeded order),
    none of them a sentence of the held-out pool (calib.npz avoids only heldout.npz's)."""
    calib, _ = sentence_split()
    excluded = set(calib) | set(_sentences(*HELDOUT_SOURCES))
    extra = [
        s
        for s in _sentences(CALIB_SOURCES[0], CALIB_SOURCES[1] + EXTRA_MODULES)
        if s not in excluded
    ]
    order = np.random.default_rng(2).permutation(len(extra))
    return calib + [extra[i] for i in order]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="256,1024,2048", help="calibration sentences per cell")
    parser.add_argument("--targets", default="0.70", help="fractions of MACs kept")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--save", type=Path, help="folder for the pruned models (for timing)")
    args = parser.parse_args()
    files = ensure_minilm()
    pool = calibration_pool(files.model_dir)
    heldout = Evaluator(onnx.load(str(files.legacy)), _dataset(files.heldout))
    out = {"machine": machine(), "load": os.getloadavg(), "pool": len(pool["input_ids"])}
    out["cells"] = []
    for target in (float(t) for t in args.targets.split(",")):
        for size in (int(s) for s in args.sizes.split(",")):
            data = {k: pool[k][:size] for k in INPUTS}
            start = time.perf_counter()
            result = onnxprune.prune(
                str(files.legacy), method="id", target_macs=target, data=data, verify=False
            )
            before, after = result.report.macs
            s = heldout(result.model)
            if args.save:
                args.save.mkdir(parents=True, exist_ok=True)
                onnx.save(result.model, str(args.save / f"minilm_t{target}_n{size}.onnx"))
            row = {
                "target_macs": target,
                "sentences": size,
                "real_tokens": int(data["attention_mask"].sum()),
                "macs_reduction": 1 - after / before,
                "widths": {g.name: len(p.keep) for g, p in _plans(result)},
                "cosine": s.cosine,
                "retrieval": s.retrieval,
                "spearman": s.spearman,
                "seconds": round(time.perf_counter() - start, 1),
                "load": os.getloadavg(),
            }
            out["cells"].append(row)
            print({k: v for k, v in row.items() if k != "widths"}, flush=True)
            args.out.write_text(json.dumps(out, indent=1) + "\n")


def _plans(result):
    return [(g, result.plans[g.name]) for g in result.groups if g.name in result.plans]


if __name__ == "__main__":
    main()
