"""Hold calibration samples out of the fit, so verification measures data the fit never saw.

Every statistic, selection, width allocation and correction is computed on `Split.fit`; the
pruned model is compared with the original on `Split.verify`. Verifying on the samples a
correction was fitted to is optimistic (a least-squares map is best exactly there), so the
verification samples come from a seeded held-out share of the calibration data, or from separate
verification data. Where neither is possible (synthetic random data, too few samples, holdout 0)
the split says so and the report marks the verification as not independent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from onnxprune.calib.data import Dataset, input_specs, load_data, with_input_shapes
from onnxprune.config import PruneConfig
from onnxprune.errors import UsageError

MIN_HELD_OUT = 8


@dataclass(frozen=True, eq=False)
class Split:
    """The samples the fit may use, those verification compares on, and how they were chosen.

    `held_out` holds the indices (into the calibration data) of the verification samples when
    they were taken from it, else None. `independent` is False when verification reuses samples
    the fit used.
    """

    fit: Dataset
    verify: Dataset
    how: str
    independent: bool
    held_out: np.ndarray | None = None


@dataclass(frozen=True)
class DataInputs:
    """The data arguments of `prune` as given: calibration data, its labels, verification data
    (each a path, dict of arrays, Dataset or None)."""

    data: Any
    labels: Any = None
    verify_data: Any = None


def split_inputs(
    proto: onnx.ModelProto, inputs: DataInputs, config: PruneConfig, *, fitted: bool
) -> Split:
    """`inputs` loaded and split into what the fit may use and what verification compares on
    (`fitted`: whether the method reads data at all). Without verification nothing is held out."""
    dataset = _dataset(proto, inputs.data, inputs.labels, config, needs_data=fitted)
    separate = None
    if inputs.verify_data is not None:
        if not config.verify:
            raise UsageError("verification data was given but verification is off (--no-verify)")
        separate = _as_dataset(proto, inputs.verify_data, config, role="verification")
    return split_for_verification(
        dataset,
        share=config.holdout if config.verify else 0.0,  # nothing to verify: the fit takes all
        samples=config.verify_samples,
        seed=config.seed,
        fitted=fitted,
        verify_data=separate,
    )


def split_for_verification(
    data: Dataset,
    *,
    share: float,
    samples: int,
    seed: int,
    fitted: bool,
    verify_data: Dataset | None = None,
) -> Split:
    """Split `data` into fit and verification samples.

    With `verify_data`, the fit keeps all of `data` and verification takes a seeded subset of
    `samples` from `verify_data`. Otherwise min(`samples`, ⌊`share`·n⌋) calibration samples, at
    least MIN_HELD_OUT of them, are held out at seeded random positions. `fitted` says whether
    the method reads data at all; if not, reusing the samples costs no independence.
    """
    if verify_data is not None:
        chosen = verify_data.subset(samples, seed)
        return Split(data, chosen, f"separate verification data: {chosen.source}", True)
    held = min(samples, int(share * len(data)))
    reason = _no_split_reason(data, share, held)
    if reason is None:
        return _held_out(data, held, seed)
    verify = data.head(samples)
    if not fitted:
        return Split(data, verify, f"{reason}; the method fitted nothing to data", True)
    return Split(data, verify, f"{reason}: verified on samples the fit used (optimistic)", False)


def _dataset(
    proto: onnx.ModelProto, data: Any, labels: Any, config: PruneConfig, *, needs_data: bool
) -> Dataset:
    if data is None and needs_data:
        raise UsageError(
            f"method '{config.method}' needs calibration data",
            hint="pass --data calib.npz (or --data random for a synthetic smoke test)",
        )
    return _as_dataset(proto, data, config, labels=labels)


def _as_dataset(
    proto: onnx.ModelProto,
    data: Any,
    config: PruneConfig,
    *,
    labels: Any = None,
    role: str = "calibration",
) -> Dataset:
    """`data` loaded and checked against the model's inputs (a Dataset is taken as is)."""
    if isinstance(data, Dataset):
        return data
    return load_data(
        data,
        with_input_shapes(input_specs(proto), config.input_shapes),
        labels=labels,
        samples=config.calib_samples if role == "calibration" else None,
        seed=config.seed,
        random_samples=config.verify_samples,
        role=role,
    )


def _no_split_reason(data: Dataset, share: float, held: int) -> str | None:
    """Why `data` cannot give up `held` samples to verification, or None if it can."""
    if data.synthetic:
        return "no split (synthetic random data)"
    if share == 0:
        return "no split (holdout 0)"
    if held < MIN_HELD_OUT:
        return (
            f"no split ({len(data)} samples are too few to hold out {MIN_HELD_OUT} "
            f"at share {share:g})"
        )
    return None


def _held_out(data: Dataset, held: int, seed: int) -> Split:
    """`held` seeded random samples for verification, the rest (in order) for the fit."""
    n = len(data)
    index = np.sort(np.random.default_rng(seed).choice(n, size=held, replace=False))
    rest = np.setdiff1d(np.arange(n), index)
    fit = _take(data, rest, f"{data.source}, fit part: {n - held}")
    verify = _take(data, index, f"{data.source}, held out: {held}")
    how = f"{held} of {n} calibration samples held out (seed {seed}); fit on the other {n - held}"
    return Split(fit, verify, how, True, index)


def _take(data: Dataset, index: np.ndarray, source: str) -> Dataset:
    arrays = {name: np.ascontiguousarray(a[index]) for name, a in data.arrays.items()}
    labels = None if data.labels is None else data.labels[index]
    return Dataset(arrays, labels, data.synthetic, source)
