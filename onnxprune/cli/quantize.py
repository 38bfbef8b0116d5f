"""`onnxprune quantize`: quantize a (pruned) model and verify it against its float original."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from onnxprune.cli.options import add_data_arguments, load_dataset
from onnxprune.deploy.quantize import MODES

EXAMPLE = """examples:
  onnxprune quantize model.pruned.onnx --mode int8 --data calib.npz -o model.int8.onnx
  onnxprune quantize bert.onnx --mode int8-dynamic
  onnxprune quantize model.onnx --mode fp16 --quantize-exclude '^/head/'
"""


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `quantize` parser and point it at `run`."""
    parser = sub.add_parser(
        "quantize",
        help="quantize a model (int8 static QDQ, int8 dynamic, fp16) and verify it",
        description="Quantize with ONNX Runtime's quantization tool, calibrated on --data, then "
        "compare the result's outputs with the float model's.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="input .onnx file (never modified)")
    parser.add_argument("-o", "--output", help="output path (default: MODEL.MODE.onnx)")
    parser.add_argument("--mode", choices=MODES, default="int8", help="(default: int8)")
    parser.add_argument(
        "--quantize-exclude",
        action="append",
        default=[],
        metavar="REGEX",
        help="keep nodes whose name matches REGEX in float (repeatable)",
    )
    parser.add_argument(
        "--quantize-float-ends",
        action="store_true",
        help="keep the first and last Conv/Gemm/MatMul in float",
    )
    parser.add_argument(
        "--verify-samples", type=int, default=64, help="samples compared with the float model"
    )
    add_data_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Quantize, verify on the data (or seeded random inputs), write, print a summary.

    A model with a fixed batch is fed batches of that size; one whose input has no sample axis
    (torchvision's detectors) is quantized and verified with one added (graph/unbatched.py)
    and written as it was declared."""
    from onnxprune.calib.data import batch_for, input_specs, inputs_without_sample_axis
    from onnxprune.deploy.quantize import quantize  # lazy: --help needs no onnx
    from onnxprune.graph.load import load_model, model_bytes, save_model
    from onnxprune.graph.unbatched import with_sample_axis, without_sample_axis
    from onnxprune.measure.verify import verify

    model = load_model(args.model)
    dataset = load_dataset(args, model, unbatched=True)
    unbatched = inputs_without_sample_axis(model, dataset)
    work = with_sample_axis(model, unbatched) if unbatched else model
    wrapped = quantize(
        work,
        args.mode,
        data=dataset,
        exclude=args.quantize_exclude,
        float_ends=args.quantize_float_ends,
        batch_size=batch_for((spec.shape for spec in input_specs(work)), args.batch_size),
    )
    samples = dataset.head(args.verify_samples).arrays
    check = verify(work, wrapped, samples, data=dataset.source)
    quantized = without_sample_axis(wrapped, model) if unbatched else wrapped
    path = Path(args.model)
    output = Path(args.output) if args.output else path.with_name(f"{path.stem}.{args.mode}.onnx")
    save_model(quantized, output)
    print(
        f"{args.mode}: {model_bytes(model):,} → {model_bytes(quantized):,} bytes, "
        f"written to {output}"
    )
    for out in check.outputs:
        agreement = "" if out.top1_agreement is None else f", top-1 {out.top1_agreement:.1%}"
        print(f"  {out.name}: rel-L2 {out.rel_l2:.4f}, max |Δ| {out.max_abs:.4g}{agreement}")
    if dataset.synthetic:
        what = "calibrated and checked" if args.mode == "int8" else "checked"
        print(f"onnxprune: warning: {what} on random data (no --data)", file=sys.stderr)
    return 0
