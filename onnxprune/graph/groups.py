"""What the analyzer finds and every later stage reads: channel groups, their taps and edits.

Plain frozen dataclasses with no ONNX objects, so methods can read a group without touching protos.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Role = Literal[
    "out", "chan", "in", "reshape", "split", "count", "tail", "hidden", "shuffle", "norm"
]


@dataclass(frozen=True)
class Tap:
    """A tensor that consumers read, and where the group's channels lie in it.

    `spatial` > 1 after a Flatten/Reshape: each channel occupies `spatial` consecutive features
    along `axis` (channel-major flatten), and statistics treat those features as positions.
    `stride` > 1 behind a channel shuffle (ops/reshape.py): channel c lies at `offset + stride·c`.
    `select` = (axis, index): only that entry of another axis holds the group's channels (one
    direction of a bidirectional recurrent node's output sequence Y [T, D, B, H]: the other
    direction is another group's); statistics read that entry alone.
    """

    tensor: str
    axis: int
    offset: int
    spatial: int = 1
    stride: int = 1
    select: tuple[int, int] | None = None

    @property
    def key(self) -> str:
        """The name this tap's statistics and correction are filed under (see `tap_key`)."""
        return tap_key(self.tensor, self.offset)


def tap_key(tensor: str, offset: int) -> str:
    """The tensor name, with '@offset' when the group's channels do not start at channel 0.

    One tensor can carry a group's channels at several offsets (SPPF: Concat(x, mp(x),
    mp(mp(x))) holds the same channels three times); each segment is its own tap, with its own
    statistics and its own correction, so the key must tell them apart.
    """
    return tensor if offset == 0 else f"{tensor}@{offset}"


@dataclass(frozen=True)
class ParamEdit:
    """How one constant input of one node follows the group's channels.

    role "out": producer weight/bias rows (sliced, rotated by a Plan's Q);
    "chan": a per-channel parameter of a passthrough op (sliced);
    "in": a consumer's input-channel axis (the Plan's M and c are folded in);
    "reshape": a Reshape target whose explicit size must shrink;
    "split": a TSRA call whose `split` attribute (the index where V starts, `split` here) must
    shrink by the pruned channels that lie before it;
    "count": entry `axis` of a 1-D integer constant (a Split size, a Slice bound, a Resize or
    Reshape size) that counts the group's channels and shrinks by the removed ones × `spatial`;
    "tail": such an entry counted from the end (a negative Slice bound), which grows by them;
    "hidden": the hidden units of direction `axis` of a recurrent node (LSTM/GRU/RNN): every
    gate block's rows of W, R and B, the initial states, the peepholes and `hidden_size`, and
    R's columns, into which the correction of `tap` (at `offset`) is folded (ops/recurrent.py);
    "shuffle": the channels enter a channel shuffle (ops/reshape.py) at `offset` (every `stride`
    positions); the rewriter turns a shuffle that loses channels into a Gather of the rest;
    "norm": a LayerNormalization over the group's channels (its last axis), rebuilt from the
    kept channels with the correction of `tap`, its input (graph/channel_norm.py).
    `stride` > 1: the group's channel c lies at `offset + stride·c` (behind a channel shuffle).
    """

    node: str
    input: int
    axis: int
    offset: int
    role: Role
    spatial: int = 1
    tap: str | None = None
    split: int | None = None
    stride: int = 1


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be removed together, with everything that touches them.

    `sigma` is the input and output of the first elementwise nonlinearity the channels pass
    (the producer's output twice when there is none): where IPPRO injects its offset.
    `subspaces` are the boundaries (inside (0, channels)) of the TSRA subspaces the channels fall
    into: a rotation must be block-diagonal on them and pruning keeps ≥ 1 channel in each.
    `rotation_block` says why an orthogonal change of basis cannot be folded (None: it can),
    `invariants` lists the rotation-invariant nonlinear ops on the way as (kind, node), kind
    "tsra", "rmsnorm" or "rmssum" (an RMSNorm dividing by the original width however many
    channels remain: graph/layernorm.py's). `normalized` pairs the key of every tap that lies
    after an RMSNorm of the channels with that norm's output (its input for RMSNormalization,
    whose output carries a per-channel scale): removing channels changes the norm's divisor,
    and the energies there say by how much.
    `ties` name the grouped Convs this group is one conv group of ("node:in" for the channels
    a conv group reads, "node:out" for those it writes): groups sharing a tie keep equal widths.
    `head_dim` > 1: the channels are attention heads of that many features each
    (graph/attention.py); the q, k and v producers meet in the attention MatMuls, not
    elementwise, so the group is not `coupled`. `feature_dim`: the features per head the
    consumers read (the value width: `head_dim` unless, as in LeViT, one producer writes each
    head's q, k and v side by side); the head maps (methods/heads.py) are stated on these.
    `norm_group`: the units of `head_dim` channels are instead the groups of a GroupNorm
    (ops/group_norm.py), selected and corrected whole like heads but with no attention.
    `gated`: the producers meet only where one gates the other (Mul: an SE / squeeze-excitation
    gate, a gated FFN's GLU): removing channel c removes it from the gated tensor and from the
    gate alike and touches nothing else, so such a group is not `coupled` either.
    `copies` > 1: the group joins that many groups that cut one shared weight alike (the
    pyramid levels of a detector's head, graph/shared.py), so it has `copies` times the
    producers of one without being `coupled`. `pooled` lists the keys of the taps that one
    shared weight reads alike (one per level, or a level and its pooled copy in one group):
    their statistics are summed, so they get one correction and the weight's copies stay equal.
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
    subspaces: tuple[int, ...] = ()
    rotation_block: str | None = None
    invariants: tuple[tuple[str, str], ...] = ()
    normalized: tuple[tuple[str, Tap], ...] = ()
    ties: tuple[str, ...] = ()
    head_dim: int = 1
    feature_dim: int = 1
    norm_group: bool = False
    gated: bool = False
    copies: int = 1
    pooled: tuple[tuple[str, ...], ...] = ()

    @property
    def rotatable(self) -> bool:
        """True when a rotation of the channels can be folded into producers and consumers."""
        return self.prunable and self.rotation_block is None

    @property
    def ranges(self) -> tuple[tuple[int, int], ...]:
        """The subspaces as (start, stop) channel ranges covering the group."""
        edges = (0, *self.subspaces, self.channels)
        return tuple(zip(edges[:-1], edges[1:], strict=True))

    def row_span(self, producer: str) -> tuple[int, int]:
        """(first output row, rows per channel) of `producer` in this group: the first row is > 0
        where a Split cut its outputs into several groups, a channel is `head_dim` rows."""
        edit = next(
            e for e in self.edits if e.node == producer and e.role == "out" and e.input == 1
        )
        return edit.offset * edit.spatial, edit.spatial

    @property
    def prunable(self) -> bool:
        """True when nothing blocks removing channels of this group."""
        return self.reason is None

    @property
    def coupled(self) -> bool:
        """True for groups tied elementwise across producers by a sum (residual streams), the
        groups `--prune-residual` opts into; not for head groups or gate-only groups."""
        return len(self.producers) > self.copies and not self.heads and not self.gated

    @property
    def unit(self) -> int:
        """Channels of its layers per channel of the group: a GroupNorm group's d; 1 otherwise
        (attention heads are counted, and rounded, as heads)."""
        return self.head_dim if self.norm_group else 1

    @property
    def heads(self) -> bool:
        """True for a group of attention heads (not GroupNorm groups)."""
        return self.head_dim > 1 and not self.norm_group
