"""Train and export a small LLaMA-architecture language model, for SliceGPT-style slicing.

transformers' LlamaForCausalLM (RMSNorm, rotary positions, grouped-query attention with 4
query and 2 key/value heads, gated SiLU MLP; hidden 128, 4 layers, untied LM head), trained
from scratch as a byte-level model on the docstrings of Python's standard library: no download.
The modules are split three ways, disjoint: training text, calibration text (`calib.npz`, 128
windows of 64 bytes) and held-out text (`heldout.npz`, 64 windows). Exported by the legacy
exporter (opset 17; batch and sequence dynamic; inputs `input_ids`, `attention_mask`; output
the logits), checked against torch.

    python benchmarks/tiny_llama.py [--cache DIR] [--steps 800]
    python benchmarks/slicegpt.py DIR/tiny_llama.onnx --calib DIR/calib.npz \\
        --heldout DIR/heldout.npz --ratios 0,0.125,0.25 --streams-only --lm

Needs the `models` extra (torch, transformers). Cache: `$ONNXPRUNE_ZOO_CACHE/tiny_llama` or
`benchmarks/results/cache/tiny_llama` (git-ignored).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import pkgutil
import sys
import time
from pathlib import Path

import numpy as np

SEQ, N_CALIB, N_HELDOUT, SEED = 64, 128, 64, 0
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks.zoo_models`


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    root = Path(os.environ.get("ONNXPRUNE_ZOO_CACHE", Path(__file__).parent / "results" / "cache"))
    parser.add_argument("--cache", default=str(root / "tiny_llama"))
    parser.add_argument("--steps", type=int, default=800)
    args = parser.parse_args(argv)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    train, calib, heldout = (np.frombuffer(t.encode(), np.uint8) for t in texts())
    rng = np.random.default_rng(SEED)
    for name, text, n in (("calib", calib, N_CALIB), ("heldout", heldout, N_HELDOUT)):
        ids = windows(text, n, rng)
        np.savez(cache / f"{name}.npz", input_ids=ids, attention_mask=np.ones_like(ids))
    model, loss = trained(train, args.steps, rng)
    rel_l2 = export(model, cache / "tiny_llama.onnx")
    sizes = {"train": len(train), "calib": len(calib), "heldout": len(heldout)}
    info = {"steps": args.steps, "train_loss": loss, "ort_vs_torch_rel_l2": rel_l2, "bytes": sizes}
    (cache / "manifest.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info))


def texts() -> tuple[str, str, str]:
    """Docstrings of the standard library's top-level modules, split by module 8 : 1 : 1."""
    names = sorted(m.name for m in pkgutil.iter_modules() if m.name in sys.stdlib_module_names)
    parts: list[list[str]] = [[], [], []]
    for i, name in enumerate(
        n for n in names if not n.startswith("_") and n not in ("antigravity", "this")
    ):
        try:
            module = importlib.import_module(name)
        except Exception:  # platform-specific or deprecated modules: skipped
            continue
        docs = [inspect.getdoc(module) or ""]
        docs += [inspect.getdoc(v) or "" for _, v in inspect.getmembers(module) if callable(v)]
        text = "\n".join(d for d in docs if d.isascii())
        parts[0 if i % 10 < 8 else 1 + i % 10 - 8].append(text)
    return tuple("\n".join(p) for p in parts)


def windows(text: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n random windows of SEQ bytes as int64 token ids."""
    starts = rng.integers(0, len(text) - SEQ, size=n)
    return np.stack([text[s : s + SEQ] for s in starts]).astype(np.int64)


def trained(text: np.ndarray, steps: int, rng: np.random.Generator):
    """The model after `steps` AdamW steps (batch 32, lr 3e-3 with cosine decay)."""
    import torch

    from benchmarks.zoo_models import import_torchvision

    import_torchvision()  # transformers imports torchvision, whose CUDA build needs the stub
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=352,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=SEQ, tie_word_embeddings=False,
                         attn_implementation="eager", use_cache=False)  # fmt: skip
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    start, losses = time.perf_counter(), []
    for step in range(steps):
        ids = torch.from_numpy(windows(text, 32, rng))
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss))
        if step % 100 == 0:
            print(f"step {step}: loss {loss:.3f} ({time.perf_counter() - start:.0f} s)")
    return model.eval(), float(np.mean(losses[-50:]))


def export(model, path: Path) -> float:
    """Legacy export of the logits; rel-L2 of ONNX Runtime's against torch's."""
    import onnxruntime as ort
    import torch

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    ids = torch.randint(0, 256, (2, SEQ))
    axes = {0: "batch", 1: "sequence"}
    dynamic = {"input_ids": axes, "attention_mask": axes, "logits": axes}
    torch.onnx.export(Logits().eval(), (ids, torch.ones_like(ids)), str(path), dynamo=False,
                      opset_version=17, input_names=["input_ids", "attention_mask"],
                      output_names=["logits"], dynamic_axes=dynamic)  # fmt: skip
    with torch.no_grad():
        ref = Logits()(ids, torch.ones_like(ids)).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": np.ones_like(ids)})[0]
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


if __name__ == "__main__":
    main()
