"""What the analyzer finds and every later stage reads: channel groups, their taps and edits.

Plain frozen dataclasses with no ONNX objects, so methods can read a group without touching protos.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Role = Literal["out", "chan", "in", "reshape"]


@dataclass(frozen=True)
class Tap:
    """A tensor that consumers read, and where the group's channels lie in it.

    `spatial` > 1 after a Flatten/Reshape: each channel occupies `spatial` consecutive features
    along `axis` (channel-major flatten), and statistics treat those features as positions.
    """

    tensor: str
    axis: int
    offset: int
    spatial: int = 1


@dataclass(frozen=True)
class ParamEdit:
    """How one constant input of one node follows the group's channels.

    role "out": producer weight/bias rows (sliced, rotated by a Plan's Q);
    "chan": a per-channel parameter of a passthrough op (sliced);
    "in": a consumer's input-channel axis (the Plan's M and c are folded in);
    "reshape": a Reshape target whose explicit size must shrink.
    """

    node: str
    input: int
    axis: int
    offset: int
    role: Role
    spatial: int = 1
    tap: str | None = None


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be removed together, with everything that touches them.

    `sigma` is the input and output of the first elementwise nonlinearity the channels pass
    (the producer's output twice when there is none): where IPPRO injects its offset.
    """

    name: str
    channels: int
    producers: tuple[str, ...]
    passthrough: tuple[str, ...] = ()
    consumers: tuple[str, ...] = ()
    taps: tuple[Tap, ...] = ()
    edits: tuple[ParamEdit, ...] = field(default=(), repr=False)
    sigma: tuple[Tap, Tap] | None = None
    reason: str | None = None
    blocker: str | None = None

    @property
    def prunable(self) -> bool:
        """True when nothing blocks removing channels of this group."""
        return self.reason is None

    @property
    def coupled(self) -> bool:
        """True for groups tied elementwise across producers (residual streams, SE gates)."""
        return len(self.producers) > 1
