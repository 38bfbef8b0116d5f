"""Where one `prune()` spends its CPU time: process CPU seconds (every thread) per stage.

Each stage is a function wrapped in place for one call of `prune` on a zoo model (ResNet-50
by default; the options of `prune_time.py`'s methods). Stages nest (`collect_all` holds the
ORT runs and the Gram updates, `_verification` the checker, session and run): a row is the
time inside that function, children included. Run it once per source tree to compare trees:

    PYTHONPATH=/tmp/before python benchmarks/prune_stages.py --method id
    PYTHONPATH=. python benchmarks/prune_stages.py --method id
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prune_time import METHODS, RATIO, load_data, model_files  # noqa: E402

STAGES = {
    "onnxprune.api": ("_load", "_normalized", "find_groups", "gather", "make_plans", "rewrite",
                      "recalibrate", "_finish", "_verification", "count"),
    "onnxprune.calib.gather": ("export", "collect_all"),
    "onnxprune.calib.stats": ("tapped_session", "_run_input_model",
                              "one_blas_thread"),
    "onnxprune.measure.verify": ("session_for", "run_session"),
}  # fmt: skip


def timed_stages() -> dict[str, float]:
    """Wrap every stage of STAGES (and the Gram updates, the moments and the checker) so that
    its CPU seconds add up in the returned dict."""
    import importlib

    from onnxprune.calib.stats import ChannelMoments, TapAccumulator

    seconds: dict[str, float] = {}
    targets = [(importlib.import_module(m), n, f"{m.split('.')[-1]}.{n}")
               for m, names in STAGES.items() for n in names]  # fmt: skip
    targets += [(TapAccumulator, "add", "TapAccumulator.add"),
                (ChannelMoments, "add", "ChannelMoments.add"),
                (onnx.checker, "check_model", "checker")]  # fmt: skip
    for owner, name, label in targets:
        setattr(owner, name, _wrapped(getattr(owner, name), label, seconds))
    return seconds


def _wrapped(call, label: str, seconds: dict[str, float]):
    def wrapper(*args, **kwargs):
        start = time.process_time()
        try:
            return call(*args, **kwargs)
        finally:
            seconds[label] = seconds.get(label, 0.0) + time.process_time() - start

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--method", default="id", choices=sorted(METHODS))
    parser.add_argument("--samples", type=int, default=0, help="first N samples (0: all)")
    args = parser.parse_args()
    import onnxprune
    import onnxprune.api  # noqa: F401  (imports are not a stage)

    model, data = model_files(args.model)
    feeds = load_data(data, args.samples or None)
    seconds = timed_stages()
    start = time.process_time()
    result = onnxprune.prune(str(model), ratio=RATIO, data=feeds, **METHODS[args.method])
    seconds["total"] = time.process_time() - start
    check = result.report.verification
    print(json.dumps({
        "tree": str(Path(onnxprune.__file__).parents[1]),
        "model": args.model, "method": args.method, "rel_l2": check.rel_l2 if check else None,
        "cpu_s": {k: round(v, 3) for k, v in seconds.items()},
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
