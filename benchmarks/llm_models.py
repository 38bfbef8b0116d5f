"""Export small Hugging Face language models as users export them, for the analyzer's breadth.

Random weights (seeded; the structure is what is measured): LLaMA with grouped-query attention
(4 query, 2 key/value heads) and with one key/value head per query head, Qwen2 (biased q/k/v,
grouped-query), Mistral (grouped-query), Gemma (one key/value head, GeGLU, embeddings scaled by
√d), Phi-3 (packed q/k/v and gate/up projections), GPT-2 (packed `c_attn` Conv1D, tanh GELU),
GPT-NeoX, OPT (FFN on the tokens as rows), BERT and DistilBERT (post-LN encoders) and T5's
encoder (relative position bias); hidden 128, 2 layers, vocabulary 1000, eager attention. Each
through the legacy exporter at opset 17 (`NAME.onnx`) and the dynamo exporter
(`NAME.dynamo.onnx`, opset 18), batch and
sequence dynamic, inputs `input_ids` and `attention_mask`, output the logits (DistilBERT: the
last hidden state), checked against torch; plus `calib.npz` (64 random token sequences of 32,
all-ones mask).

    ONNXPRUNE_ZOO_CACHE=/work/zoo_cache python benchmarks/llm_models.py [NAME ...]
    onnxprune analyze /work/zoo_cache/llm/llama.onnx
    onnxprune /work/zoo_cache/llm/gpt2.onnx --method cob --ratio 0.25 \\
        --data /work/zoo_cache/llm/calib.npz -o gpt2.cob.onnx

Needs the `models` extra. Cache: `$ONNXPRUNE_ZOO_CACHE/llm` or `benchmarks/results/cache/llm`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks.zoo_models`
VOCAB, HIDDEN, LAYERS, HEADS = 1000, 128, 2, 4


def main() -> None:
    root = Path(os.environ.get("ONNXPRUNE_ZOO_CACHE", Path(__file__).parent / "results" / "cache"))
    cache = root / "llm"
    cache.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, (64, 32)).astype(np.int64)
    np.savez(cache / "calib.npz", input_ids=ids, attention_mask=np.ones_like(ids))
    only = set(sys.argv[1:])  # names to export (default: all)
    manifest_path = cache / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if only and manifest_path.exists() else {}
    for name, build in models():
        for suffix in ("", ".dynamo") if not only or name in only else ():
            path = cache / f"{name}{suffix}.onnx"
            try:
                manifest[name + suffix] = export(build, path, dynamo=bool(suffix))
            except Exception as error:  # an exporter's failure is a finding, not a crash
                manifest[name + suffix] = {"export_error": f"{type(error).__name__}: {error}"[:300]}
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    print(json.dumps(manifest, indent=1))


def models():
    """(name, builder) of each model."""
    from benchmarks.zoo_models import import_torchvision

    import_torchvision()  # transformers imports torchvision, whose CUDA build needs the stub
    import transformers as hf

    common = {"attn_implementation": "eager"}
    decoder = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": 344,
               "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
               "max_position_embeddings": 128, "use_cache": False, **common}  # fmt: skip
    yield "llama", lambda: hf.LlamaForCausalLM(hf.LlamaConfig(num_key_value_heads=2, **decoder))
    yield "llama_mha", lambda: hf.LlamaForCausalLM(hf.LlamaConfig(num_key_value_heads=4, **decoder))
    yield "qwen2", lambda: hf.Qwen2ForCausalLM(hf.Qwen2Config(num_key_value_heads=2, **decoder))
    gpt2 = {"vocab_size": VOCAB, "n_embd": HIDDEN, "n_layer": LAYERS, "n_head": HEADS,
            "n_positions": 128, "bos_token_id": 0, "eos_token_id": 0,
            "use_cache": False}  # fmt: skip
    yield "gpt2", lambda: hf.GPT2LMHeadModel(hf.GPT2Config(**gpt2, **common))
    bert = {"vocab_size": VOCAB, "dim": HIDDEN, "hidden_dim": 4 * HIDDEN, "n_layers": LAYERS,
            "n_heads": HEADS, "max_position_embeddings": 128}  # fmt: skip
    yield "distilbert", lambda: hf.DistilBertModel(hf.DistilBertConfig(**bert, **common))
    yield (
        "mistral",
        lambda: hf.MistralForCausalLM(hf.MistralConfig(num_key_value_heads=2, **decoder)),
    )
    gemma = {**decoder, "head_dim": HIDDEN // HEADS, "num_key_value_heads": 1}
    yield "gemma", lambda: hf.GemmaForCausalLM(hf.GemmaConfig(**gemma))
    phi3 = {**decoder, "num_key_value_heads": 2, "pad_token_id": 0}
    yield "phi3", lambda: hf.Phi3ForCausalLM(hf.Phi3Config(**phi3))
    neox = {**decoder, "num_key_value_heads": HEADS}
    yield "gpt_neox", lambda: hf.GPTNeoXForCausalLM(hf.GPTNeoXConfig(**neox))
    opt = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "ffn_dim": 344,
           "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
           "max_position_embeddings": 128, "word_embed_proj_dim": HIDDEN, "use_cache": False,
           **common}  # fmt: skip
    yield "opt", lambda: hf.OPTForCausalLM(hf.OPTConfig(**opt))
    encoder = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": 4 * HIDDEN,
               "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
               "max_position_embeddings": 128, **common}  # fmt: skip
    yield "bert", lambda: hf.BertModel(hf.BertConfig(**encoder))
    t5 = {"vocab_size": VOCAB, "d_model": HIDDEN, "d_kv": HIDDEN // HEADS, "d_ff": 344,
          "num_layers": LAYERS, "num_heads": HEADS, "use_cache": False, **common}  # fmt: skip
    yield "t5_encoder", lambda: hf.T5EncoderModel(hf.T5Config(**t5))


def export(build, path: Path, dynamo: bool) -> dict[str, object]:
    """The model `build` makes (seeded), exported by the legacy exporter at opset 17 or by the
    dynamo exporter; with the rel-L2 of ONNX Runtime's output against torch's."""
    import torch

    from benchmarks.torch_export import export_checked, first_output

    torch.manual_seed(0)
    model = build().eval()
    ids = torch.randint(0, VOCAB, (2, 16))
    axes = {0: "batch", 1: "sequence"}
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    dims = {"input_ids": axes, "attention_mask": axes}
    wrapped = first_output(model, tuple(inputs))
    found = export_checked(wrapped, inputs, path, dynamo=dynamo, dims=dims, out_dims=axes,
                           maxima={"sequence": 128})  # fmt: skip
    return {**found, "class": type(model).__name__}


if __name__ == "__main__":
    main()
