"""Where a pruned model's inner tensors are known channels of the original's: hint targets.

Channel pruning removes channels and does not move the ones it keeps: at every tap of a group
(a tensor its consumers read) the pruned model's tensor of the same name holds, along the tap's
axis, the original's channels `offset + plan.keep`, segment after segment where a Concat holds
several groups. A `Hint` records that correspondence so fine-tuning can match the student's
inner tensors to the teacher's (intermediate-feature distillation). Taps whose channels are
mixed or moved are skipped, never guessed: a change of basis (`rotation`), heads narrowed within
(`head_dim` > 1), a flattened tap (`spatial` > 1), a channel shuffle's stride, and tensors whose
segments leave a gap.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from onnxprune.graph.groups import ChannelGroup, Tap
from onnxprune.plan import Plan


@dataclass(frozen=True)
class Hint:
    """The student's tensor `tensor` is the teacher's same-named tensor at channels `index`
    along `axis` (student channel j is teacher channel index[j]); `channels` is the teacher
    tensor's width along `axis`."""

    tensor: str
    axis: int
    index: np.ndarray
    channels: int

    @classmethod
    def whole(cls, tensor: str, axis: int, channels: int) -> Hint:
        """A tensor the student holds unpruned: every channel corresponds to itself."""
        return cls(tensor, axis, np.arange(channels), channels)


def hints_from_plans(
    groups: Sequence[ChannelGroup],
    plans: Mapping[str, Plan],
    skip: Sequence[str] = (),
) -> tuple[Hint, ...]:
    """One Hint per tap tensor of `groups` whose channels the pruning kept in place, from each
    group's plan (a group without a plan kept all its channels); tensors in `skip` (e.g. the
    graph outputs, distilled already) are left out."""
    segments: dict[str, list[tuple[Tap, ChannelGroup]]] = defaultdict(list)
    for group in groups:
        for tap in group.taps:
            if tap.tensor not in skip:
                segments[tap.tensor].append((tap, group))
    hints = (_hint(tensor, parts, plans) for tensor, parts in segments.items())
    return tuple(h for h in hints if h is not None)


def _hint(
    tensor: str, parts: list[tuple[Tap, ChannelGroup]], plans: Mapping[str, Plan]
) -> Hint | None:
    """The Hint of one tensor from its segments, or None where a segment moves or mixes
    channels or the segments do not tile the tensor from channel 0."""
    parts = sorted(parts, key=lambda part: part[0].offset)
    if len({tap.axis for tap, _ in parts}) != 1:
        return None
    index, end = [], 0
    for tap, group in parts:
        plan = plans.get(group.name)
        moved = plan is not None and plan.rotation is not None
        if moved or tap.offset != end or tap.spatial != 1 or tap.stride != 1:
            return None
        if group.head_dim != 1:
            return None
        keep = np.arange(group.channels) if plan is None else np.asarray(plan.keep, np.int64)
        index.append(tap.offset + keep)
        end += group.channels
    return Hint(tensor, parts[0][0].axis, np.concatenate(index), end)
