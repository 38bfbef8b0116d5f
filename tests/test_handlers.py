"""The op handler registry (onnxprune/ops): every family module registers, lookups respect the
domain, a second handler for an op is refused, and no handler is empty."""

from __future__ import annotations

import pkgutil

import onnx_graphsurgeon as gs
import pytest
from onnx import helper

from onnxprune import ops
from onnxprune.ops.registry import Handler, handler_for, register, registered


def test_every_family_module_registers_a_handler():
    helpers = {"flow", "registry", "shape_values", "torch_support", "torch_recurrent"}
    modules = {m.name for m in pkgutil.iter_modules(ops.__path__)} - helpers
    owners = {type(h).__module__.rsplit(".", 1)[1] for h in registered().values()}
    assert owners == modules


def test_every_handler_has_a_flow_rule_a_mac_count_or_a_torch_equivalent():
    empty = [
        op
        for (_, op), handler in registered().items()
        if type(handler).step is Handler.step
        and type(handler).macs is Handler.macs
        and handler.torch(op) is None
    ]
    assert empty == []


def test_lookup_reads_the_domain_of_graphsurgeon_nodes_and_protos():
    conv = handler_for(gs.Node("Conv", "c"))
    assert conv is not None
    assert handler_for(gs.Node("Conv", "c", domain="ai.onnx")) is conv
    assert handler_for(helper.make_node("Conv", ["x", "w"], ["y"])) is conv
    assert handler_for(gs.Node("Conv", "c", domain="com.example")) is None
    assert handler_for(gs.Node("TSRA", "t", domain="onnxprune")) is not None
    assert handler_for(gs.Node("TSRA", "t")) is None


def test_a_second_handler_for_an_op_is_refused_and_registers_nothing():
    before = registered()
    with pytest.raises(ValueError, match="op Conv has two handlers"):
        register("FreshOpOfThisTest", "Conv")(Handler)
    assert registered() == before


def test_an_op_without_a_rule_blocks_naming_the_op():
    node = gs.Node("QLinearMatMul", "q")  # registered for its MACs only
    state = ops.flow.State("x", 1, 0)
    step = handler_for(node).step(node, 0, state, 4)
    assert step.kind == "block"
    assert step.reason == "op QLinearMatMul is not known to act channel by channel"
