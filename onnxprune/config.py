"""PruneConfig: every option of a prune run, validated once at construction."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from onnxprune.deploy.quantize import MODES as QUANTIZE_MODES
from onnxprune.errors import UsageError
from onnxprune.options import (
    CRITERIA,
    METHODS,
    WEIGHT_ONLY_METHODS,
    WidthRule,
    check_patterns,
    check_ratio,
    check_weight_options,
    parse_jacobian,
    parse_pattern,
    parse_threshold,
)

COMPENSATIONS = ("none", "bias", "lsq")
HEADS = ("whole", "dims", "both")  # what pruning an attention head group removes
# how the value dims kept within a head are chosen: PCA kept more accuracy than ID on the digits
# ViT (both exports) and on MiniLM (docs/RESULTS.md, "Pruning within attention heads")
HEAD_VALUES = ("pca", "id")
# magnitude's default ranking: |γ| of the folded BatchNorm had the best mean validation accuracy
# of the four criteria on the digits CNNs exported with BatchNorm (benchmarks/ranking.py)
MAGNITUDE_CRITERION = "gamma"


@dataclass(frozen=True)
class PruneConfig:
    """Options of one prune run; construction raises UsageError on any bad value."""

    method: str = "magnitude"
    width: WidthRule = field(default_factory=WidthRule)
    norm: int = 1
    criterion: str | None = (
        None  # magnitude's ranking; None: the method's default (method_defaults)
    )
    compensate: str | None = None  # None: the method's default (method_defaults)
    id_solver: str = "gram"
    epsilon: float | None = None
    recalibrate: bool | None = None  # None: the method's default
    sequential: bool | None = None  # refit corrections on the pruned model (None: the default)
    exact_borders: bool = False
    calib_samples: int | None = None
    batch_size: int = 32
    seed: int = 0
    task: str = "auto"
    verify: bool = True
    verify_samples: int = 64
    holdout: float = 0.125
    min_agreement: float | None = None
    max_deviation: float | None = None
    quantize: str | None = None
    quantize_exclude: tuple[str, ...] = ()
    quantize_float_ends: bool = False
    allow_noop: bool = False
    target_macs: float | None = None
    target_params: float | None = None
    target_latency: float | None = None
    bench_batches: tuple[int, ...] = ()
    ippro_lambda: float | None = None
    jacobian: str = "exact"
    global_ranking: bool = False
    max_group_ratio: float = 0.9
    threshold: str | None = None
    rms_correction: bool = False
    granularity: str = "channel"
    sparsity: float | None = None
    local: bool = False
    pattern: str | None = None  # per weight: "row" or "N:M"; None: the method's scope
    joint: bool = False
    steps: int = 1
    heads: str = "whole"  # attention heads: whole heads, dims within every head, or both
    head_values: str = "pca"  # within heads: each head's principal value directions, or ID
    qk_ratio: float | None = None  # within heads: query/key dims removed (None: the ratio's)
    row_mask: str | None = None  # 2-D input whose 0 entries mark rows the taps leave out
    cv_maps: bool = False  # id: channel groups' maps (ridge or none) by two-fold CV
    cv_widths: bool = False  # id with a MAC/parameter target: width candidates scored held out
    finetune_steps: int = 0  # distillation steps from the original after pruning (0: none)
    finetune_lr: float | None = None  # their Adam learning rate (None: finetune's default)
    input_shapes: Mapping[str, tuple[int, ...]] | None = None  # symbolic dims where no data is

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UsageError(f"unknown method '{self.method}'; choose from {', '.join(METHODS)}")
        defaults = method_defaults(
            self.method, self.id_solver, self.granularity, finetune=self.finetune_steps > 0
        )
        for name, value in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)  # frozen: resolved once, here
        if self.width.prune_residual is None and self.method != "id":  # id: where a target needs
            object.__setattr__(self, "width", replace(self.width, prune_residual=False))  # them
        check_ratio(self.width.ratio)
        check_patterns(self.width.exclude)
        if self.norm not in (1, 2):
            raise UsageError(f"'norm' must be 1 or 2; got {self.norm}")
        if self.compensate not in COMPENSATIONS:
            raise UsageError(f"'compensate' must be one of {', '.join(COMPENSATIONS)}")
        if self.task not in ("auto", "classify", "regress"):
            raise UsageError(f"'task' must be auto, classify or regress; got '{self.task}'")
        if self.id_solver not in ("gram", "qr"):
            raise UsageError(f"'id_solver' must be 'gram' or 'qr'; got '{self.id_solver}'")
        if self.id_solver == "qr" and self.compensate != "none":
            raise UsageError("the qr solver has no intercept variant; use --id-solver gram")
        if self.epsilon is not None and not 0.0 < self.epsilon < 1.0:
            raise UsageError(f"'epsilon' must be in (0, 1); got {self.epsilon}")
        targets = {k: v for k, v in self.targets().items() if v is not None}
        if len(targets) > 1:
            raise UsageError(f"give at most one target; got {', '.join(targets)}")
        for name, value in targets.items():
            if not 0.0 < value <= 1.0:
                raise UsageError(f"'{name}' is the fraction to keep, in (0, 1]; got {value}")
        check_ratio(self.max_group_ratio, "max_group_ratio")
        self._check_criterion()
        parse_jacobian(self.jacobian)
        self._check_cob()
        self._check_sequential()
        self._check_heads()
        self._check_granularity()
        self._check_verification()
        _positive("batch_size", self.batch_size)
        _positive("verify_samples", self.verify_samples)
        _positive("round_to", self.width.round_to)
        if self.calib_samples is not None:
            _positive("calib_samples", self.calib_samples)
        for name, shape in (self.input_shapes or {}).items():
            if not shape or any(int(d) < 1 for d in shape):
                raise UsageError(f"'input_shapes' of '{name}' must be positive dims; got {shape}")

    def _check_criterion(self) -> None:
        """--criterion is magnitude's; --global spends a channel ratio or a MAC/param target."""
        if self.criterion not in (None, *CRITERIA):
            raise UsageError(
                f"'criterion' must be one of {', '.join(CRITERIA)}; got {self.criterion}"
            )
        if self.criterion is not None and self.method != "magnitude":
            raise UsageError(f"--criterion ranks --method magnitude; got --method {self.method}")
        if self.global_ranking and (self.target_latency is not None or self.epsilon is not None):
            raise UsageError(
                "--global allocates a ratio or a MAC/parameter target; "
                "drop --target-latency and --epsilon"
            )

    def _check_verification(self) -> None:
        """The held-out share and the acceptance bounds; bounds need verification to run."""
        if not 0.0 <= self.holdout <= 0.5:
            raise UsageError(f"'holdout' is a share of samples, in [0, 0.5]; got {self.holdout}")
        if self.min_agreement is not None and not 0.0 <= self.min_agreement <= 1.0:
            raise UsageError(f"'min_agreement' must be in [0, 1]; got {self.min_agreement}")
        if self.max_deviation is not None and not self.max_deviation > 0.0:
            raise UsageError(f"'max_deviation' must be positive; got {self.max_deviation}")
        if self.quantize is not None and self.quantize not in QUANTIZE_MODES:
            raise UsageError(
                f"unknown quantization '{self.quantize}'; choose from {', '.join(QUANTIZE_MODES)}"
            )
        gated = self.min_agreement is not None or self.max_deviation is not None
        if gated and not self.verify:
            raise UsageError("--min-agreement/--max-deviation need verification; got --no-verify")

    def _check_granularity(self) -> None:
        """Per-weight pruning (--granularity weight) takes its own options and none of the
        channel-only ones; --joint is biascomp's, --local per-weight's."""
        self._check_pattern()
        channel_only = {
            "--compensate lsq": self.compensate == "lsq",
            "--epsilon": self.epsilon is not None,
            "--recalibrate": self.recalibrate,
            "--target-*": any(v is not None for v in self.targets().values()),
            "--global": self.global_ranking,
        }
        check_weight_options(
            self.granularity, self.method, self.sparsity, channel_only=channel_only
        )
        weight_shift = self.granularity == "weight" and self.compensate == "bias"
        if self.joint and not (self.method == "biascomp" or weight_shift):
            raise UsageError(f"--joint is the biascomp bias solve; got --method {self.method}")
        if self.local and self.granularity != "weight":
            raise UsageError("--local is for --granularity weight (channels rank per group)")
        _positive("steps", self.steps)
        if self.finetune_steps < 0:
            raise UsageError(f"'finetune_steps' must be at least 0; got {self.finetune_steps}")
        if self.finetune_lr is not None and not self.finetune_lr > 0:
            raise UsageError(f"'finetune_lr' must be positive; got {self.finetune_lr}")
        if self.finetune_steps and self.granularity == "weight":
            raise UsageError(
                "--finetune would refill the zeroed weights; it is for channel pruning"
            )
        if self.steps > 1 and self.granularity != "weight":
            raise UsageError("--steps is for --granularity weight")

    def _check_pattern(self) -> None:
        """--pattern is per weight and replaces --local; N:M fixes the sparsity at 1 − N/M."""
        if self.pattern is None:
            return
        if self.granularity != "weight":
            raise UsageError("--pattern is for --granularity weight")
        if self.local:
            raise UsageError("--local and --pattern both choose the scope; give one")
        blocks = parse_pattern(self.pattern)
        if blocks is None:
            return
        implied = 1 - blocks[0] / blocks[1]
        if self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
            raise UsageError(
                f"--pattern {self.pattern} removes {implied:g} of the weights; "
                f"got --sparsity {self.sparsity}"
            )
        if self.steps > 1:
            raise UsageError(f"--pattern {self.pattern} is reached in one step; drop --steps")
        object.__setattr__(self, "sparsity", implied)  # frozen: resolved once, here

    def weight_scope(self) -> str:
        """Where per-weight pruning ranks scores: 'global' (all layers together), 'layer'
        (--local), 'row' (each output unit's weights; Wanda's default) or an 'N:M' pattern."""
        if self.pattern is not None:
            return self.pattern
        if self.local:
            return "layer"
        return "row" if self.method in WEIGHT_ONLY_METHODS else "global"

    def _check_cob(self) -> None:
        """CoB folds its own rotation and correction: the selection-only options do not apply."""
        if self.threshold is not None:
            parse_threshold(self.threshold)
        cob_only = {
            "--threshold": self.threshold is not None,
            "--rms-correction": self.rms_correction,
        }
        for flag, given in cob_only.items():
            if given and self.method != "cob":
                raise UsageError(f"{flag} is an option of --method cob; got --method {self.method}")
        if self.method == "cob" and (self.compensate != "none" or self.recalibrate):
            raise UsageError(
                "cob folds its own correction in the rotated basis; "
                "--compensate and --recalibrate do not apply to it"
            )
        widths = [self.epsilon, *self.targets().values()]
        if self.threshold is not None and any(v is not None for v in widths):
            raise UsageError("--threshold chooses the widths itself; drop --epsilon / --target-*")

    def _check_sequential(self) -> None:
        """--sequential refits a correction at the taps: the method must fold one (not cob's
        rotated one)."""
        if not self.sequential:
            return
        if self.granularity == "weight":
            raise UsageError("--sequential refits channel corrections; drop --granularity weight")
        if self.method == "cob":
            raise UsageError(
                "--sequential does not apply to cob: its correction lives in the rotated basis"
            )
        if self.method != "id" and self.compensate == "none":
            raise UsageError(
                f"--sequential refits a correction at the taps and --method {self.method} "
                "folds none; add --compensate bias or lsq"
            )

    def _check_heads(self) -> None:
        """Within-head widths follow the ratio options; the width searches count whole heads."""
        if self.heads not in HEADS:
            raise UsageError(f"'heads' must be one of {', '.join(HEADS)}; got '{self.heads}'")
        if self.qk_ratio is not None:
            check_ratio(self.qk_ratio, "qk_ratio")
            if self.heads != "dims":
                raise UsageError(
                    "--qk-ratio narrows query/key dims apart from the values: it needs "
                    "--heads dims (with both, whole heads go from q, k and v of one width)"
                )
        if self.head_values not in HEAD_VALUES:
            raise UsageError(
                f"'head_values' must be one of {', '.join(HEAD_VALUES)}; got '{self.head_values}'"
            )
        searches = {
            "--target-*": any(v is not None for v in self.targets().values()),
            "--global": self.global_ranking,
            "--epsilon": self.epsilon is not None,
            "--threshold": self.threshold is not None,
            "--granularity weight": self.granularity == "weight",
        }
        given = [flag for flag, on in searches.items() if on]
        if self.heads != "whole" and given:
            raise UsageError(
                f"--heads {self.heads} takes --ratio, --layer-ratio or --recipe; "
                f"{given[0]} does not count dims within heads"
            )

    def threshold_rule(self) -> tuple[str, float] | None:
        """--threshold parsed as (rule, t), or None."""
        return None if self.threshold is None else parse_threshold(self.threshold)

    @property
    def scores_widths(self) -> bool:
        """Whether width candidates are scored by the pruned model's output deviation
        (budget.refine_widths): `id` with a MAC or parameter target, without --global."""
        given = next((name for name, value in self.targets().items() if value is not None), None)
        scored = given in ("target_macs", "target_params")
        return self.method == "id" and not self.global_ranking and scored

    def targets(self) -> dict[str, float | None]:
        """The target options by name (None where not given)."""
        return {
            "target_macs": self.target_macs,
            "target_params": self.target_params,
            "target_latency": self.target_latency,
        }


def method_defaults(
    method: str, id_solver: str = "gram", granularity: str = "channel", *, finetune: bool = False
) -> dict[str, object]:
    """What `compensate`, `recalibrate`, `sequential` (and magnitude's `criterion`) mean when
    not given. For `id` the intercept and recalibration are on: on a validation split carved
    from the calibration data they gave the best mean accuracy of the four combinations at
    50–85 % fewer MACs on every digits model (benchmarks/defaults.py: 97.2 % vs 84.2 % for plain
    ID); so is the sequential refit, on the same split (benchmarks/sequential.py: mean
    validation accuracy 97.9 % vs 97.0 %, logit rel-L2 0.224 vs 0.282). The blocked-QR solver
    has no intercept variant. Before fine-tuning (`finetune`) the refit is off: distillation from
    the one-shot fit ended closer to the original on held-out calibration images in all nine
    start pairs measured (Inception and MobileNetV2 at 70 and 85 % fewer MACs; docs/RESULTS.md,
    "Recovering Inception at 70 and 85 %"). Magnitude ranks by |γ| (MAGNITUDE_CRITERION)."""
    if method == "id":
        compensate = "bias" if id_solver == "gram" else "none"
        # per weight there are no taps to refit; a fine-tune does better from the one-shot fit
        sequential = granularity == "channel" and not finetune
        return {"compensate": compensate, "recalibrate": True, "sequential": sequential}
    if method == "magnitude":
        return {
            "compensate": "none",
            "recalibrate": False,
            "sequential": False,
            "criterion": MAGNITUDE_CRITERION,
        }
    return {"compensate": "none", "recalibrate": False, "sequential": False}


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise UsageError(f"'{name}' must be at least 1; got {value}")
