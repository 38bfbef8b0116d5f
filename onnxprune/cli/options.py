"""Argument groups shared by subcommands (calibration data), so each is declared once."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from onnxprune.errors import UsageError

if TYPE_CHECKING:  # loaded where used, so that building the parser (--help) needs no onnx
    import onnx

    from onnxprune.calib.data import Dataset


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """--data and the options that say how to read it."""
    group = parser.add_argument_group("calibration data")
    group.add_argument(
        "--data",
        metavar="PATH",
        help="calibration data: .npz keyed by input name, .npy, a folder of images, "
        "or 'random' (seeded, synthetic)",
    )
    group.add_argument("--labels", metavar="FILE", help="labels (.npy) for the calibration data")
    group.add_argument(
        "--calib-samples",
        type=int,
        metavar="N",
        help="use a seeded random subset of N calibration samples",
    )
    group.add_argument("--batch-size", type=int, default=32, help="samples per ORT batch")
    group.add_argument("--image-size", metavar="HxW", help="resize images to H×W, e.g. 224x224")
    group.add_argument("--mean", type=_floats, help="per-channel mean after scaling to [0,1]")
    group.add_argument("--std", type=_floats, help="per-channel std after scaling to [0,1]")
    group.add_argument(
        "--layout", choices=("NCHW", "NHWC"), default="NCHW", help="image tensor layout"
    )
    group.add_argument("--seed", type=int, default=0, help="seed for sampling and random data")


def add_input_shape_argument(parser: argparse.ArgumentParser) -> None:
    """--input-shape: what the model's symbolic input dims are when no data shows them."""
    parser.add_argument(
        "--input-shape",
        action="append",
        default=[],
        metavar="NAME:1x3x224x224",
        help="shape of an input with symbolic dims, for MAC counts and random data where no "
        "--data gives them (repeatable)",
    )


def parse_input_shapes(specs: list[str]) -> dict[str, tuple[int, ...]]:
    """['x:1,3,224,224'] or ['x:1x3x224x224'] -> {'x': (1, 3, 224, 224)}; the name may itself
    contain ':'."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        name, sep, dims = spec.rpartition(":")
        try:
            shape = tuple(int(d) for d in dims.lower().replace("x", ",").split(","))
        except ValueError:
            shape = ()
        if not sep or not name or not shape or any(d < 1 for d in shape):
            raise UsageError(f"--input-shape '{spec}' is not NAME:D1,D2,... with positive dims")
        shapes[name] = shape
    return shapes


def add_rounding_arguments(group: argparse._ArgumentGroup) -> None:
    """--round-to N|auto and --target: the channel multiple kept widths are rounded to."""
    from onnxprune.measure.host import TARGETS

    group.add_argument(  # absent unless given (SUPPRESS), so that --target can tell
        "--round-to",
        type=_round_to,
        default=argparse.SUPPRESS,
        metavar="N|auto",
        help="keep channel counts in multiples of N where a group has ≥ 2N (narrower groups: "
        "N/2, … down to 8); ORT's CPU conv kernels work in blocks of channels (16 floats with "
        "AVX-512, 8 on other x86-64), other widths waste the saving; 'auto': this CPU's block; "
        "1 disables rounding (default: 16)",
    )
    group.add_argument(
        "--target",
        choices=sorted(TARGETS),
        default=argparse.SUPPRESS,
        help="round for this deployment target instead: its kernels' channel block (cpu-avx2: "
        "8, cpu-avx512: 16, arm-neon: 1 = ORT's default ARM64 build has no NCHWc kernels, "
        "arm-neon-nchwc: 16, cuda: 8 = Tensor Core convs in FP16)",
    )


def rounding(args: argparse.Namespace) -> int:
    """The rounding step --round-to and --target ask for (16 when neither is given)."""
    from onnxprune.measure.host import round_to_for

    return round_to_for(getattr(args, "round_to", None), getattr(args, "target", None))


def add_biascomp_arguments(parser: argparse.ArgumentParser) -> None:
    """Granularity (channels or single weights) and elimination–compensation's options."""
    group = parser.add_argument_group("per-weight pruning and biascomp")
    group.add_argument(
        "--granularity",
        choices=("channel", "weight"),
        default="channel",
        help="remove whole channels (smaller, faster) or single weights of Gemm/MatMul/Conv "
        "(zeros in dense tensors: smaller when zipped, not faster in ORT)",
    )
    group.add_argument(
        "--sparsity",
        type=float,
        metavar="F",
        help="with --granularity weight: the fraction of weights removed, in [0, 1)",
    )
    group.add_argument(
        "--local",
        action="store_true",
        help="with --granularity weight: remove F of each layer's weights instead of ranking "
        "all layers together",
    )
    group.add_argument(
        "--pattern",
        metavar="row|N:M",
        help="with --granularity weight: remove F of every output row's weights ('row', wanda's "
        "default), or keep N of every M consecutive weights of a row (e.g. 2:4; sets F)",
    )
    group.add_argument(
        "--steps",
        type=int,
        default=1,
        metavar="N",
        help="with --granularity weight: reach --sparsity in N rounds, re-scoring the partly "
        "pruned model after each (no training; helps biascomp at high sparsity)",
    )
    group.add_argument(
        "--joint",
        action="store_true",
        help="biascomp: solve all bias shifts of a layer jointly (M δ = c) instead of "
        "summing the per-unit optima",
    )
    group.add_argument(
        "--jacobian",
        default="exact",
        metavar="exact|probe:N",
        help="biascomp: output Jacobian norms exactly (one backward per output component) "
        "or estimated from N random probes",
    )


def load_dataset(
    args: argparse.Namespace,
    model: onnx.ModelProto,
    *,
    random_samples: int = 64,
    unbatched: bool = False,
) -> Dataset:
    """The calibration Dataset described by the data arguments (random when none is given);
    `unbatched`: the command runs models whose input has no sample axis (`calib.data.fed_specs`)."""
    from onnxprune.calib.data import fed_specs, input_specs, load_data

    return load_data(
        args.data,
        fed_specs(model, args.data) if unbatched else input_specs(model),
        labels=args.labels,
        samples=args.calib_samples,
        random_samples=random_samples,
        **reading_options(args),
    )


def reading_options(args: argparse.Namespace) -> dict:
    """How data files are read (image decoding and the seed), shared by --data and --eval."""
    return {
        "image_size": _image_size(args.image_size),
        "mean": args.mean,
        "std": args.std,
        "layout": args.layout,
        "seed": args.seed,
    }


def _round_to(text: str) -> int | str:
    """'auto' or a positive integer (--round-to)."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got '{text}'")
    return value


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'") from exc


def _image_size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    parts = text.lower().replace(",", "x").split("x")
    try:
        height, width = (int(p) for p in parts) if len(parts) == 2 else (int(parts[0]),) * 2
    except ValueError as exc:
        raise UsageError(f"--image-size expects HxW, e.g. 224x224; got '{text}'") from exc
    return height, width


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults and keep the line breaks of a subcommand's example epilog."""
