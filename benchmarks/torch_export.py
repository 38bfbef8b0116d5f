"""Export a torch module by the legacy or the dynamo exporter and check ONNX Runtime against
torch on the example inputs (llm_models.py, hf_models.py)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np


def first_output(model, names: tuple[str, ...]):
    """A module calling the transformers model `model` with its one or two inputs as the
    keywords `names`, returning the logits, else the last hidden state."""
    import torch

    class Output(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, first, second=None):
            inputs = dict(zip(names, (first, second)[: len(names)], strict=True))
            out = self.model(**inputs)
            logits = getattr(out, "logits", None)
            return logits if logits is not None else out.last_hidden_state

    return Output()


def export_checked(
    module,
    inputs: Mapping[str, object],
    path: Path,
    *,
    dynamo: bool,
    dims: Mapping[str, Mapping[int, str]],
    out_dims: Mapping[int, str],
    maxima: Mapping[str, int] | None = None,
) -> dict[str, object]:
    """`module(*inputs.values())` (one tensor out, named `out`) written to `path`: legacy at
    opset 17 or dynamo at its default opset, the axes in `dims` (per input: axis → name)
    dynamic, a named size at most `maxima[name]` for dynamo; with the rel-L2 of ONNX Runtime's
    output against torch's."""
    import onnxruntime as ort
    import torch

    names = list(inputs)
    args = tuple(inputs.values())
    if dynamo:
        shared: dict[str, object] = {}  # one torch.export.Dim per name, shared across inputs
        limits = dict(maxima or {})
        shapes = tuple(
            {axis: shared.setdefault(name, torch.export.Dim(name, min=2, max=limits.get(name)))
             for axis, name in dims.get(key, {}).items()}
            for key in names
        )  # fmt: skip
        program = torch.onnx.export(
            module.eval(), args, dynamo=True, dynamic_shapes=shapes, input_names=names,
            output_names=["out"], verbose=False,
        )  # fmt: skip
        program.save(str(path))
    else:
        axes = {key: dict(dims.get(key, {})) for key in names} | {"out": dict(out_dims)}
        torch.onnx.export(module.eval(), args, str(path), dynamo=False, opset_version=17,
                          input_names=names, output_names=["out"], dynamic_axes=axes)  # fmt: skip
    with torch.no_grad():
        ref = module(*args).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    rel_l2 = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    return {"file": path.name, "exporter": "dynamo" if dynamo else "legacy",
            "ort_vs_torch_rel_l2": rel_l2}  # fmt: skip
