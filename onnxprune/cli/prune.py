"""`onnxprune prune` (the default subcommand): prune a model and print the report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from onnxprune.cli import EXIT_OK, EXIT_TARGET
from onnxprune.cli.bench import parse_batches
from onnxprune.cli.options import (
    add_biascomp_arguments,
    add_data_arguments,
    add_input_shape_argument,
    add_rounding_arguments,
    load_dataset,
    parse_input_shapes,
    reading_options,
    rounding,
)
from onnxprune.config import (
    COMPENSATIONS,
    HEAD_VALUES,
    HEADS,
    MAGNITUDE_CRITERION,
    QUANTIZE_MODES,
    PruneConfig,
)
from onnxprune.errors import RejectedError, UsageError
from onnxprune.methods.cob import channel_ratio_for_params
from onnxprune.methods.width import load_recipe, parse_layer_ratio
from onnxprune.options import CRITERIA, METHODS, WidthRule

if TYPE_CHECKING:
    from onnxprune.api import Result

EXAMPLE = """examples:
  onnxprune model.onnx --method magnitude --ratio 0.5
  onnxprune model.onnx --method id --ratio 0.5 --data calib.npz -o model.small.onnx
  onnxprune model.onnx --method id --epsilon 0.05 --data calib.npz --report report.json
  onnxprune model.onnx --method id --ratio 0.5 --data calib.npz --min-agreement 0.95
  onnxprune mlp.onnx --method biascomp --granularity weight --sparsity 0.8 --data calib.npz
  onnxprune bert.onnx --method wanda --granularity weight --pattern 2:4 --data calib.npz
"""


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "prune",
        help="prune channels and fold a correction downstream (default)",
        description="Remove whole channels from an ONNX model, fold each method's correction into "
        "the downstream weights, verify the result against the original.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="input .onnx file (never modified)")
    parser.add_argument("-o", "--output", help="output path (default: MODEL.pruned.onnx)")
    parser.add_argument(
        "--method",
        choices=METHODS,
        default="magnitude",
        help="how channels are chosen and corrected (default: magnitude)",
    )
    _add_width_arguments(parser)
    _add_method_arguments(parser)
    add_biascomp_arguments(parser)
    add_data_arguments(parser)
    add_input_shape_argument(parser)
    out = parser.add_argument_group("verification and report")
    out.add_argument("--no-verify", action="store_true", help="skip checking the pruned model")
    out.add_argument(
        "--verify-samples",
        type=int,
        default=64,
        help="at most this many samples (held out of --data, or from --verify-data) are "
        "compared against the original (default: 64)",
    )
    out.add_argument(
        "--verify-data",
        metavar="PATH",
        help="verify on this data (same formats as --data) instead of a held-out share of --data",
    )
    out.add_argument(
        "--holdout",
        type=float,
        default=0.125,
        metavar="F",
        help="share of the --data samples (at most --verify-samples, at least 8) held out of the "
        "fit to verify on; 0 verifies on samples the fit used; --no-verify holds out none "
        "(default: 0.125)",
    )
    out.add_argument(
        "--min-agreement",
        type=float,
        metavar="A",
        help="reject the result (exit 3, nothing written) if top-1 agreement with the original "
        "is below A on any class-score output, e.g. 0.9",
    )
    out.add_argument(
        "--max-deviation",
        type=float,
        metavar="D",
        help="reject the result (exit 3, nothing written) if any output's relative L2 "
        "deviation from the original exceeds D",
    )
    out.add_argument(
        "--keep-rejected",
        action="store_true",
        help="write a rejected result anyway, as OUTPUT with '.rejected' before its suffix "
        "(still exit 3)",
    )
    out.add_argument(
        "--quantize",
        choices=QUANTIZE_MODES,
        help="quantize after pruning (int8: static QDQ calibrated on the fit part of --data; "
        "int8-dynamic: Gemm/MatMul weights; fp16) and verify the quantized model",
    )
    out.add_argument(
        "--quantize-exclude",
        action="append",
        default=[],
        metavar="REGEX",
        help="with --quantize: keep nodes whose name matches REGEX in float (repeatable)",
    )
    out.add_argument(
        "--quantize-float-ends",
        action="store_true",
        help="with --quantize: keep the first and last Conv/Gemm/MatMul in float (not the "
        "default: it changed digits accuracy by at most 0.4 points either way)",
    )
    out.add_argument(
        "--finetune",
        type=int,
        default=0,
        metavar="STEPS",
        help="fine-tune the pruned model by distillation from the original on the fit part of "
        "--data for STEPS steps (needs torch; see `onnxprune finetune`); id then fits in one "
        "shot unless --sequential",
    )
    out.add_argument(
        "--finetune-lr",
        type=float,
        metavar="LR",
        help="Adam learning rate of --finetune (default 1e-3, chosen on digits CNNs; a "
        "pretrained sentence encoder did better at 3e-4 than 1e-4)",
    )
    out.add_argument("--report", metavar="FILE", help="write the report as JSON ('-' = stdout)")
    out.add_argument(
        "--bench",
        metavar="BATCHES",
        nargs="?",
        const="1,32",
        help="measure ORT latency of the original and the pruned model at these batch sizes "
        "(default when given without a value: 1,32)",
    )
    out.add_argument(
        "--allow-noop", action="store_true", help="succeed even when nothing is prunable"
    )
    parser.set_defaults(func=run)


def _add_width_arguments(parser: argparse.ArgumentParser) -> None:
    width = parser.add_argument_group("how much to prune")
    width.add_argument(
        "--ratio",
        type=float,
        default=0.5,
        help="fraction of CHANNELS removed from each group, in [0, 1) — not of "
        "parameters or MACs (default: 0.5)",
    )
    width.add_argument(
        "--param-ratio",
        type=float,
        metavar="P",
        help="remove about P of the parameters: channel ratio 1 − √(1 − P) in every group "
        "(the CoB paper's rule; overrides --ratio)",
    )
    for kind, what in (("macs", "MACs"), ("params", "parameters"), ("latency", "latency")):
        width.add_argument(
            f"--target-{kind}",
            type=float,
            metavar="F",
            help=f"keep this fraction of the {what} instead of a fixed --ratio"
            + (" (measured while searching)" if kind == "latency" else ""),
        )
    width.add_argument(
        "--layer-ratio",
        action="append",
        default=[],
        metavar="REGEX=R",
        help="ratio for groups whose name matches REGEX (repeatable; last wins)",
    )
    width.add_argument(
        "--recipe", metavar="FILE", help="JSON/YAML mapping group name → ratio (overrides --ratio)"
    )
    width.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="REGEX",
        help="leave groups (per weight: layers, by node name) whose name matches REGEX "
        "untouched (repeatable)",
    )
    add_rounding_arguments(width)
    width.add_argument(
        "--prune-residual",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also prune groups tied by a residual sum (default: off; id prunes them where a "
        "MAC/param target is out of reach without them or they clearly deviate less pruned; "
        "SE-gated groups are pruned by default)",
    )


def _add_method_arguments(parser: argparse.ArgumentParser) -> None:
    method = parser.add_argument_group("method options")
    method.add_argument(
        "--norm", type=int, choices=(1, 2), default=1, help="filter norm for magnitude (default: 1)"
    )
    method.add_argument(
        "--compensate",
        choices=COMPENSATIONS,
        help="correction for any selection: 'bias' adds the removed channels' "
        "means (id: ID with intercept; per weight: elimination–compensation's bias shift), "
        "'lsq' the least-squares map (default: bias for id, none for the others)",
    )
    method.add_argument(
        "--epsilon",
        type=float,
        help="id: per group, the smallest width whose relative error ≤ EPSILON",
    )
    method.add_argument(
        "--ippro-lambda",
        type=float,
        metavar="L",
        help="ippro: the step λ in PROscore (default: per layer, 0.1·min‖F‖/max(|∂L/∂D|, ‖∇F‖))",
    )
    method.add_argument(
        "--criterion",
        choices=CRITERIA,
        help="magnitude: rank by |γ| of the BatchNorm folded at load time ('gamma'), |γ|/σ "
        "('bn-scale'), the filter norm before the fold ('raw') or after it ('folded'); "
        "producers without a BatchNorm use the filter norm (default: "
        f"{MAGNITUDE_CRITERION}, best on validation data, docs/RESULTS.md)",
    )
    method.add_argument(
        "--global",
        dest="global_ranking",
        action="store_true",
        help="any method: remove --ratio of all selected channels (or meet --target-macs/"
        "--target-params), allocated across groups by the method's damage per MAC saved",
    )
    method.add_argument(
        "--heads",
        choices=HEADS,
        default="whole",
        help="attention head groups: remove whole heads (default), keep every head with "
        "RATIO of its dims removed (values by ID, queries/keys by a change of basis; needs "
        "--data), or both: dims first, then whole heads",
    )
    method.add_argument(
        "--head-values",
        choices=HEAD_VALUES,
        default="pca",
        help="--heads dims|both: keep each head's principal directions of its output (pca, "
        "default: more accurate on the digits ViT and MiniLM) or value dims chosen by ID; "
        "either way the correction is folded into the out projection",
    )
    method.add_argument(
        "--qk-ratio",
        type=float,
        metavar="R",
        help="--heads dims: remove R of every head's query/key dims (default: the group's "
        "ratio, as for its value dims; truncating queries/keys costs less, docs/RESULTS.md)",
    )
    method.add_argument(
        "--cv-maps",
        action="store_true",
        help="id: choose each channel group's map from its kept channels (a ridge, or means "
        "only) by two-fold cross-validation on the calibration samples, as for attention heads "
        "(the report names it: map_full=…)",
    )
    method.add_argument(
        "--cv-widths",
        action="store_true",
        help="id with a MAC or parameter target: score the candidate widths by two-fold "
        "cross-validation on the calibration samples (maps fitted on one half, the output "
        "deviation measured on the other) instead of on the samples the maps were fitted to; "
        "the candidates with residual streams pruned then need no margin of evidence",
    )
    method.add_argument(
        "--row-mask",
        metavar="INPUT",
        help="leave out of the tap statistics the token rows whose entry of the 2-D input INPUT "
        "(samples, positions) is 0, e.g. a transformer's padding: attention_mask; 'auto': the "
        "integer input named attention_mask if there is one (the sequential refit, the width "
        "scores and --finetune's loss leave them out too; recalibration still reads every row)",
    )
    method.add_argument(
        "--max-group-ratio",
        type=float,
        default=0.9,
        help="with --global: the largest fraction of its channels any one group may lose "
        "(default: 0.9)",
    )
    method.add_argument(
        "--recalibrate",
        action=argparse.BooleanOptionalAction,
        help="after pruning, restore each affected layer's per-channel output mean and "
        "variance on the calibration data (like re-estimating BatchNorm statistics); "
        "default: on for id, off for the others",
    )
    method.add_argument(
        "--sequential",
        action=argparse.BooleanOptionalAction,
        help="refit each tap's correction, in topological order, on the activations of the "
        "pruned model (earlier taps already refit) against the original's; the selection stays "
        "the method's (id, or --compensate bias|lsq); default: on for id, off for the others",
    )
    method.add_argument(
        "--exact-borders",
        action="store_true",
        help="fold a correction's constant into zero-padded Conv consumers exactly (an Add of a "
        "per-position map after the conv) instead of into the bias; more accurate, but slower "
        "and larger (docs/RESULTS.md)",
    )
    method.add_argument(
        "--task",
        choices=("auto", "classify", "regress"),
        default="auto",
        help="loss for gradient methods: cross-entropy or MSE to --labels; without labels, "
        "the model's own argmax or a random projection",
    )
    method.add_argument(
        "--threshold",
        metavar="RULE:T",
        help="cob: keep per subspace the directions with importance ≥ T·max|mean|median "
        "(max:0.1, mean:T, median:T) or z-score ≥ T (zscore:T) instead of a fixed ratio",
    )
    method.add_argument(
        "--rms-correction",
        action="store_true",
        help="cob: rescale the consumers of groups behind an RMSNorm for its changed divisor",
    )
    method.add_argument(
        "--id-solver",
        choices=("gram", "qr"),
        default="gram",
        help="id: pivoted Cholesky on the streamed Gram, or the paper's blocked QR",
    )


def run(args: argparse.Namespace) -> int:
    from onnxprune.api import output_path_for, prune  # lazy: --help needs no onnx
    from onnxprune.calib.data import fed_specs, load_data
    from onnxprune.graph.load import load_model

    source = Path(args.model)
    output = Path(args.output) if args.output else output_path_for(source)
    if output.resolve() == source.resolve():
        raise UsageError(f"output path '{output}' is the input file; choose another -o")
    config = _config(args)
    model = load_model(source, weights=False)
    dataset = None
    if args.data:
        dataset = load_dataset(args, model, random_samples=config.verify_samples, unbatched=True)
    if config.finetune_steps and dataset is not None and dataset.synthetic:
        print(
            "onnxprune: warning: --finetune on random data is distillation on noise",
            file=sys.stderr,
        )
    verify_data = None
    if args.verify_data:
        specs, options = fed_specs(model, args.verify_data), reading_options(args)
        verify_data = load_data(args.verify_data, specs, role="verification", **options)
    try:
        result = prune(source, data=dataset, verify_data=verify_data, config=config)
    except RejectedError as exc:
        if args.keep_rejected:
            _emit(exc.result, args, rejected_path(output), "written (rejected)")
        raise
    _emit(result, args, output)
    missed = result.report.target is not None and result.report.target.missed
    return EXIT_TARGET if missed else EXIT_OK


def rejected_path(output: Path) -> Path:
    """Where --keep-rejected writes: `model.small.onnx` → `model.small.rejected.onnx`."""
    return output.with_name(f"{output.stem}.rejected{output.suffix}")


def _emit(result: Result, args: argparse.Namespace, output: Path, written: str = "written") -> None:
    """Write the model and the report; warnings go to stderr, one line each."""
    result.save(output)
    for warning in result.report.warnings:
        print(f"onnxprune: warning: {warning}", file=sys.stderr)
    text = result.report.format() + f"\n{written}: {output}"
    if args.report == "-":
        print(result.report.to_json())
        print(text, file=sys.stderr)
    else:
        print(text)
        if args.report:
            Path(args.report).write_text(result.report.to_json())


def _ratio(args: argparse.Namespace) -> float:
    if args.param_ratio is None:
        return args.ratio
    return channel_ratio_for_params(args.param_ratio)


def _config(args: argparse.Namespace) -> PruneConfig:
    width = WidthRule(
        ratio=_ratio(args),
        layer_ratios=tuple(parse_layer_ratio(text) for text in args.layer_ratio),
        exclude=tuple(args.exclude),
        round_to=rounding(args),
        prune_residual=args.prune_residual,
        recipe=load_recipe(args.recipe) if args.recipe else {},
    )
    return PruneConfig(
        method=args.method,
        width=width,
        norm=args.norm,
        criterion=args.criterion,
        compensate=args.compensate,
        id_solver=args.id_solver,
        epsilon=args.epsilon,
        calib_samples=args.calib_samples,
        batch_size=args.batch_size,
        seed=args.seed,
        task=args.task,
        verify=not args.no_verify,
        verify_samples=args.verify_samples,
        holdout=args.holdout,
        min_agreement=args.min_agreement,
        max_deviation=args.max_deviation,
        quantize=args.quantize,
        quantize_exclude=tuple(args.quantize_exclude),
        quantize_float_ends=args.quantize_float_ends,
        allow_noop=args.allow_noop,
        recalibrate=args.recalibrate,
        sequential=args.sequential,
        exact_borders=args.exact_borders,
        ippro_lambda=args.ippro_lambda,
        threshold=args.threshold,
        rms_correction=args.rms_correction,
        global_ranking=args.global_ranking,
        heads=args.heads,
        head_values=args.head_values,
        qk_ratio=args.qk_ratio,
        row_mask=args.row_mask,
        cv_maps=args.cv_maps,
        cv_widths=args.cv_widths,
        max_group_ratio=args.max_group_ratio,
        target_macs=args.target_macs,
        target_params=args.target_params,
        target_latency=args.target_latency,
        bench_batches=parse_batches(args.bench) if args.bench else (),
        granularity=args.granularity,
        sparsity=args.sparsity,
        local=args.local,
        pattern=args.pattern,
        joint=args.joint,
        steps=args.steps,
        finetune_steps=args.finetune,
        finetune_lr=args.finetune_lr,
        jacobian=args.jacobian,
        input_shapes=parse_input_shapes(args.input_shape),
    )
