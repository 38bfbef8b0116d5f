"""`--heads dims|both`: every head of the selected head groups keeps D′ of its D query/key
dimensions and D″ of its value dimensions (the same in every head of a group).

One statistics pass (ORT) over the fit data collects, per head group, the queries and keys after
their biases and the merged head outputs the out projection reads; methods/headdims.py turns
them into the value selection with its correction and the query/key maps, graph/headdims.py
folds them in. This runs before the channel pipeline, which then analyzes and calibrates the
narrowed model (with `both` it also removes whole heads of it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.calib.stats import collect
from onnxprune.graph.groups import ChannelGroup, Tap
from onnxprune.graph.headdims import HeadSites, Refused, head_sites, shrink_heads
from onnxprune.graph.load import export, folded_batchnorms, import_graph, infer_shapes
from onnxprune.methods.headdims import query_key_basis, value_dims
from onnxprune.report import GroupRow


def prune_within_heads(
    graph: gs.Graph,
    groups: Iterable[ChannelGroup],
    widths: Mapping[str, tuple[int, int]],
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    values: str = "pca",
    row_mask: str | None = None,
) -> tuple[gs.Graph, tuple[GroupRow, ...]]:
    """A copy of `graph` whose head groups named in `widths` keep `widths[name]` = (query/key,
    value) dimensions per head (the values' chosen by `values`, "pca" or "id"), and a report
    row per such group (a refused group, left whole, says why). `row_mask`: the input whose
    zero entries mark token rows the statistics leave out (`calib.stats.collect_all`)."""
    found: dict[str, HeadSites | str] = {}
    selected = [g for g in groups if g.name in widths and g.heads]
    for group in selected:
        try:
            found[group.name] = head_sites(graph, group)
        except Refused as refused:
            found[group.name] = str(refused)
    sites = {name: s for name, s in found.items() if isinstance(s, HeadSites)}
    rows = [_refused_row(g, found[g.name]) for g in selected if g.name not in sites]
    if not sites:
        return graph, tuple(rows)
    taps = [_tap(t, s) for s in sites.values() for t in _tensors(s)]
    stats = collect(export(graph), taps, batches, row_mask=row_mask)
    by_tensor = {tap.tensor: value for tap, value in stats.items()}
    pruned = import_graph(export(graph))
    for group in (g for g in selected if g.name in sites):
        site, (keep_qk, keep_v) = sites[group.name], widths[group.name]
        if keep_qk != keep_v and _shared_split(site):
            rows.append(_refused_row(group, "q/k and v heads are split by one shared target"))
            continue
        queries, keys, merged = (by_tensor[t] for t in _tensors(site))
        qk = query_key_basis(queries, keys, site.heads, keep_qk)
        v = value_dims(merged, site.heads, keep_v, basis=values)
        shrink_heads(pruned, site, qk, v)
        rows.append(_row(group, keep_qk, keep_v, qk.error, v.error))
    pruned.cleanup().toposort()
    pruned = infer_shapes(pruned)
    pruned.folded_batchnorms = folded_batchnorms(graph)
    return pruned, tuple(rows)


def _shared_split(site: HeadSites) -> bool:
    """True when the value split's head width is stated by the node that states q's or k's
    (one Concat serving several Reshapes), so they cannot take different widths."""
    entries = (site.query.dim_entry, site.key.dim_entry)
    value = site.value.dim_entry
    return value is not None and value.node in {e.node for e in entries if e is not None}


def _tensors(site: HeadSites) -> tuple[str, str, str]:
    return site.query.tensor, site.key.tensor, site.merged


def _tap(tensor: str, site: HeadSites) -> tuple[Tap, int]:
    return Tap(tensor, -1, 0), site.heads * site.dim


def _row(group: ChannelGroup, keep_qk: int, keep_v: int, qk_error: float, v_error: float):
    """The group's row: its width is the value features the out projection reads."""
    dim = group.head_dim
    status = f"pruned within heads: q/k {dim} → {keep_qk}, v {dim} → {keep_v} dims per head"
    info = {"qk_score_err": qk_error, "v_err": v_error}
    return GroupRow(
        group.name, group.channels * dim, group.channels * keep_v, status, info, v_error
    )


def _refused_row(group: ChannelGroup, reason: str) -> GroupRow:
    dim = group.head_dim
    total = group.channels * dim
    return GroupRow(group.name, total, total, f"kept: heads not prunable within: {reason}")
