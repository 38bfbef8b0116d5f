"""The channel block of ONNX Runtime's CPU conv kernels on this host or on a deployment target.

ORT's MLAS library runs float Conv in the NCHWc layout where it can: channels are packed in
blocks of `MlasNchwcGetBlockSize()` floats, and a width between two multiples of the block costs
as much as the next multiple (docs/RESULTS.md, "Channel rounding"). In onnxruntime's source,
onnxruntime/core/mlas/lib/platform.cpp (`MLAS_PLATFORM::MLAS_PLATFORM`) sets
`NchwcBlockSize = 8` as the x86-64 baseline (SSE kernels; the AVX and AVX2/FMA3 kernels keep it)
and 16 where the CPU has AVX-512F and the OS saves its state; onnxruntime/core/mlas/lib/snchwc.cpp
(`MlasNchwcGetBlockSize`) returns that value, and 1, MLAS's "no NCHWc support", where a build
has none: ARM64 gets NEON NCHWc kernels only from the opt-in build option
onnxruntime_USE_ARM_NEON_NCHWC, and without NCHWc support ORT registers no NCHWc kernels
(onnxruntime/contrib_ops/cpu/cpu_contrib_kernels.cc). Hence `auto` is 1 (no rounding) off x86-64:
without a block to fill, rounding would only keep channels no kernel is known to need; a build
with NCHWc kernels there can be given its block with --round-to N, or `--target
arm-neon-nchwc` (16: sconv.h's MLAS_NEON_BLOCK_SIZE, which must equal that build's
NchwcBlockSize).

`--target cuda` is 8 from NVIDIA's cuDNN guidance rather than ORT's source: Tensor Core
convolutions want input and output channels divisible by 8 in FP16 (4 in TF32, so 8 serves both).
None of the non-host targets is measured here (docs/RESULTS.md, "Channel rounding").
"""

from __future__ import annotations

import platform
from pathlib import Path

from onnxprune.errors import UsageError

# --target: the channel multiple each deployment target's kernels work in (module docstring).
TARGETS = {"cpu-avx2": 8, "cpu-avx512": 16, "arm-neon": 1, "arm-neon-nchwc": 16, "cuda": 8}
X86_64 = {"x86_64", "amd64"}


def nchwc_block_size(machine: str, cpuinfo: str) -> int:
    """ORT's NCHWc channel block on a CPU of architecture `machine` (platform.machine()) whose
    /proc/cpuinfo text is `cpuinfo`: 16 with the avx512f flag, else 8 on x86-64, else 1."""
    if machine.lower() not in X86_64:
        return 1
    return TARGETS["cpu-avx512"] if "avx512f" in _flags(cpuinfo) else TARGETS["cpu-avx2"]


def host_block_size(cpuinfo_path: str | Path = "/proc/cpuinfo") -> int:
    """`nchwc_block_size` of this machine; a UsageError where `cpuinfo_path` cannot be read on
    x86-64 (not Linux), since AVX-512 cannot then be told apart."""
    machine = platform.machine()
    if machine.lower() not in X86_64:
        return 1
    try:
        cpuinfo = Path(cpuinfo_path).read_text()
    except OSError as exc:
        raise UsageError(
            "--round-to auto reads the CPU flags from /proc/cpuinfo, which this system lacks; "
            f"give --target {' or '.join(TARGETS)}, or --round-to N"
        ) from exc
    return nchwc_block_size(machine, cpuinfo)


def round_to_for(round_to: int | str | None, target: str | None) -> int:
    """The rounding step from --round-to (N, 'auto' or None = not given) and --target: the
    target's block, else N, else the host's block for 'auto', else 16 (the measured default)."""
    if target is not None:
        if target not in TARGETS:
            raise UsageError(f"unknown --target '{target}'; choose one of {', '.join(TARGETS)}")
        if round_to not in (None, "auto"):
            raise UsageError(f"--round-to {round_to} and --target {target} both set the rounding")
        return TARGETS[target]
    if round_to == "auto":
        return host_block_size()
    return 16 if round_to is None else int(round_to)


def _flags(cpuinfo: str) -> set[str]:
    """The words of the first 'flags' line of a /proc/cpuinfo text (empty when there is none)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()
