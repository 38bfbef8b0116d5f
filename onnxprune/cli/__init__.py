"""Command line: `onnxprune [prune] model.onnx ...`, `analyze`, `bench`, `sweep`, `sensitivity`,
`quantize`, `finetune`.

Each subcommand is a module with `register(subparsers)`, which adds its parser and sets
`func(args) -> int`. This module only dispatches and maps errors to exit codes.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from onnxprune.errors import OnnxPruneError, UsageError, VerificationError
from onnxprune.progress import shown

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_VERIFY, EXIT_TARGET = 0, 1, 2, 3, 4
EPILOG = (
    "exit codes: 0 ok, 1 error (one-line reason), 2 bad usage, 3 verification failed, "
    "4 --target-* missed by more than 0.01 of the original (model written, warning on stderr); "
    "a command without a subcommand is `prune`"
)


def _subcommands() -> list:
    from onnxprune.cli import analyze, bench, finetune, prune, quantize, sensitivity, sweep

    return [prune, analyze, bench, sweep, sensitivity, quantize, finetune]


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per subcommand."""
    parser = argparse.ArgumentParser(
        prog="onnxprune",
        description="Remove channels from an ONNX model and fold a correction downstream.",
        epilog=EPILOG,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(
        dest="command", metavar="{prune,analyze,bench,sweep,sensitivity,quantize,finetune}"
    )
    for module in _subcommands():
        module.register(sub)
    for command in sub.choices.values():
        command.add_argument(
            "--progress",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="progress bars on stderr (default: only when stderr is a terminal)",
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `onnxprune` console script; returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    names = {"prune", "analyze", "bench", "sweep", "sensitivity", "quantize", "finetune"}
    names |= {"-h", "--help"}
    first = next((a for a in args_list if a != "--debug"), None)
    if first is not None and first not in names:
        args_list.insert(args_list.index(first), "prune")
    parser = build_parser()
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exc:  # argparse exits 2 on bad usage, 0 on --help
        return int(exc.code or 0)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        with shown(args.progress):
            return int(args.func(args) or 0)
    except OnnxPruneError as exc:
        if args.debug:
            raise
        print(f"onnxprune: error: {exc}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        if isinstance(exc, UsageError):
            return EXIT_USAGE
        return EXIT_VERIFY if isinstance(exc, VerificationError) else EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
