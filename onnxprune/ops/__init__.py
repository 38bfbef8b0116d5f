"""One handler per op family: everything onnxprune knows about an op, in one place.

`registry.handler_for(node)` gives the node's Handler, or None for an op nobody registered (the
analyzer then blocks the group with a reason: it never guesses). A Handler answers, where it
applies (registry.Handler has the defaults):

* `produce(node) -> Output` — the channels it creates through its weight (a group's producer);
* `step(node, index, state, channels) -> Step` — how a group's channels flow through the node
  (flow.py: through / consume / drop / block, the constants to edit as `ParamEdit`s);
* `rotation(...)` — why it does not commute with an orthogonal change of basis (None: it does);
  `invariant(...)`, `nonlinear`, `scales_along(...)` — what CoB, IPPRO and the RMSNorm
  correction need to know of it;
* `out_axis(node)` — which axis of its weight indexes its outputs (producer rows, where a
  consumer's correction lands: graph/rewrite.py, graph/weights.py);
* `macs(node_proto, shape_of)` — its multiply-accumulates (measure/cost.py);
* `torch(op_type)` — its torch equivalent for the interpreter (calib/torch_exec.py; the
  functions import torch themselves, torch_support.py holds what they share);
* `prepare(node)` / `finish(node, index, edits, opset)` — attribute fix-ups of the rewriter
  (a Split's sizes as an input and back, a depthwise Conv's `group`).

To add an op: write one module here with a `Handler` subclass decorated with
`@register("OpType", ...)` (add `domain="..."` for a custom domain), override what applies
(start with `step`), and add the module to the imports below. Test it on a minimal graph
in tests/test_ops.py; tests/test_handlers.py checks that every family registers.
"""

from __future__ import annotations

from onnxprune.ops import (  # noqa: F401 - importing a family registers its handlers
    activation,
    concat_split,
    constant,
    conv,
    elementwise,
    fused,
    gemm_matmul,
    group_norm,
    logic,
    norm,
    pool,
    recurrent,
    reshape,
    resize,
    rmsnorm,
)
