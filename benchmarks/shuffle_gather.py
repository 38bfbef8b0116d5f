"""ORT time of a channel shuffle as exported (Reshape → Transpose → Reshape) and as the Gather a
pruned shuffle becomes (graph/rewrite.py), alone, at ShuffleNetV2-x1.0's three stage shapes.

Both run interleaved at 1 thread; the minimum and first quartile of 300 runs are kept (robust to
a loaded machine). The outputs are checked equal first.

    python benchmarks/shuffle_gather.py [--out benchmarks/results/shuffle_gather.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

SHAPES = ((116, 28), (232, 14), (464, 7))  # ShuffleNetV2-x1.0's stage widths and sizes
OUT = Path(__file__).resolve().parent / "results" / "shuffle_gather.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--runs", type=int, default=300)
    args = parser.parse_args()
    results = [measure(c, h, args.runs) for c, h in SHAPES]
    for row in results:
        print(row)
    Path(args.out).write_text(json.dumps({"runs": args.runs, "results": results}, indent=1) + "\n")


def measure(channels: int, size: int, runs: int) -> dict:
    """Min and first-quartile µs of both forms on a (1, channels, size, size) input."""
    x = np.random.default_rng(0).random((1, channels, size, size), dtype=np.float32)
    sessions = {kind: _session(kind, channels, size) for kind in ("shuffle", "gather")}
    first, second = (s.run(None, {"x": x})[0] for s in sessions.values())
    assert np.array_equal(first, second)
    times: dict[str, list[float]] = {kind: [] for kind in sessions}
    for _ in range(runs):
        for kind, session in sessions.items():
            start = time.perf_counter()
            session.run(None, {"x": x})
            times[kind].append(time.perf_counter() - start)
    row = {"channels": channels, "size": size}
    for kind, values in times.items():
        row[f"{kind}_min_us"] = round(min(values) * 1e6, 1)
        row[f"{kind}_q1_us"] = round(float(np.percentile(values, 25)) * 1e6, 1)
    return row


def _session(kind: str, channels: int, size: int) -> ort.InferenceSession:
    """The shuffle with 2 groups as torchvision exports it, or one Gather of its permutation."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, size, size])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    if kind == "shuffle":
        apart = np.array([1, 2, channels // 2, size, size], np.int64)
        back = np.array([1, channels, size, size], np.int64)
        inits = [numpy_helper.from_array(apart, "apart"), numpy_helper.from_array(back, "back")]
        nodes = [
            helper.make_node("Reshape", ["x", "apart"], ["t1"]),
            helper.make_node("Transpose", ["t1"], ["t2"], perm=[0, 2, 1, 3, 4]),
            helper.make_node("Reshape", ["t2", "back"], ["y"]),
        ]
    else:
        out = np.arange(channels)
        order = (out % 2) * (channels // 2) + out // 2
        inits = [numpy_helper.from_array(order.astype(np.int64), "order")]
        nodes = [helper.make_node("Gather", ["x", "order"], ["y"], axis=1)]
    graph = helper.make_graph(nodes, kind, [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, ["CPUExecutionProvider"])


if __name__ == "__main__":
    main()
