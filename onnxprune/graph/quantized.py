"""Weight layers of a quantized model: their weights come out of DequantizeLinear.

Such a weight is int8 (or int4/uint8) with a scale per tensor or channel; removing channels and
folding a correction into it would mean quantizing again, which is the quantizer's job. The
analyzer sees no constant weight there and finds no group, so the stages that would otherwise
answer "nothing to prune" name the cause instead.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

WEIGHT_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
ADVICE = "prune the float model, then quantize the pruned one (`onnxprune quantize`)"


def dequantized_weights(graph: gs.Graph) -> tuple[str, ...]:
    """Names of the Conv/ConvTranspose/Gemm/MatMul nodes whose weight input is produced by a
    DequantizeLinear of a constant."""
    return tuple(
        node.name
        for node in graph.nodes
        if node.op in WEIGHT_OPS and len(node.inputs) > 1 and _dequantized(node.inputs[1])
    )


def quantized_message(nodes: tuple[str, ...]) -> str:
    """One line naming how many weight layers are quantized, the first of them, and the remedy."""
    return (
        f"the model is quantized: {len(nodes)} Conv/Gemm/MatMul node(s) read their weights "
        f"through DequantizeLinear (e.g. '{nodes[0]}'), so no channel can be removed from them; "
        + ADVICE
    )


def _dequantized(tensor: gs.Tensor) -> bool:
    producers = tensor.inputs
    return (
        len(producers) == 1
        and producers[0].op == "DequantizeLinear"
        and isinstance(producers[0].inputs[0], gs.Constant)
    )
