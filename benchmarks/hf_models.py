"""Export small Hugging Face vision and speech models as users export them, for the analyzer's
breadth beside llm_models.py's language models.

Random weights (seeded; the structure is what is measured), hidden 64 and 2 layers where the
architecture has them: ViT, DeiT, DINOv2, BEiT (relative position bias), CLIP's vision tower,
Swin (windows, shifted windows), ConvNeXt, ResNet, SegFormer (efficient attention, Mix-FFN,
decode head) on 3×64×64 images, Whisper's encoder on 20 mel bins × 100 frames, wav2vec2 on
4000 samples. Each through the legacy exporter at opset 17 (`NAME.onnx`) and the dynamo
exporter (`NAME.dynamo.onnx`), batch dynamic, input `x`, output `out` (logits, else the last
hidden state), checked against torch; plus `NAME.calib.npz` (48 standard-normal inputs).
HF Swin's dynamo export fails in the exporter (recorded in the manifest).

    ONNXPRUNE_ZOO_CACHE=/work/zoo_cache python benchmarks/hf_models.py [NAME ...]
    onnxprune /work/zoo_cache/hf/segformer.onnx --method id --ratio 0.5 \\
        --data /work/zoo_cache/hf/segformer.calib.npz -o segformer.id.onnx

Needs the `models` extra. Cache: `$ONNXPRUNE_ZOO_CACHE/hf` or `benchmarks/results/cache/hf`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks.*`
HIDDEN, IMAGE = 64, (3, 64, 64)


def main() -> None:
    root = Path(os.environ.get("ONNXPRUNE_ZOO_CACHE", Path(__file__).parent / "results" / "cache"))
    cache = root / "hf"
    cache.mkdir(parents=True, exist_ok=True)
    only = set(sys.argv[1:])  # names to export (default: all)
    manifest_path = cache / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if only and manifest_path.exists() else {}
    for name, (build, key, shape) in models().items():
        if only and name not in only:
            continue
        rng = np.random.default_rng(0)
        np.savez(cache / f"{name}.calib.npz", x=rng.standard_normal((48, *shape), np.float32))
        for suffix in ("", ".dynamo"):
            path = cache / f"{name}{suffix}.onnx"
            try:
                manifest[name + suffix] = export(build, key, shape, path, dynamo=bool(suffix))
            except Exception as error:  # an exporter's failure is a finding, not a crash
                manifest[name + suffix] = {"export_error": f"{type(error).__name__}: {error}"[:300]}
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    print(json.dumps(manifest, indent=1))


def models() -> dict[str, tuple]:
    """name: (builder, input keyword, input shape without the batch)."""
    from benchmarks.zoo_models import import_torchvision

    import_torchvision()  # transformers imports torchvision, whose CUDA build needs the stub
    import transformers as hf

    eager = {"attn_implementation": "eager"}
    vit = {"hidden_size": HIDDEN, "num_hidden_layers": 2, "num_attention_heads": 4,
           "intermediate_size": 4 * HIDDEN, "image_size": 64, "patch_size": 8, **eager}  # fmt: skip
    whisper = {"d_model": HIDDEN, "encoder_layers": 2, "decoder_layers": 1,
               "encoder_attention_heads": 4, "decoder_attention_heads": 4,
               "encoder_ffn_dim": 4 * HIDDEN, "decoder_ffn_dim": 4 * HIDDEN, "num_mel_bins": 20,
               "max_source_positions": 50, "max_target_positions": 16, "vocab_size": 100,
               "pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0,
               "decoder_start_token_id": 0, **eager}  # fmt: skip
    wav2vec2 = {"hidden_size": HIDDEN, "num_hidden_layers": 2, "num_attention_heads": 4,
                "intermediate_size": 4 * HIDDEN, "conv_dim": (32, 32, 32),
                "conv_stride": (5, 2, 2), "conv_kernel": (10, 3, 3),
                "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 4,
                **eager}  # fmt: skip
    stages = {"hidden_sizes": [32, 64, 128, 256]}
    pixels = "pixel_values"
    return {
        "hf_vit": (lambda: hf.ViTModel(hf.ViTConfig(**vit), add_pooling_layer=False), pixels,
                   IMAGE),
        "deit": (lambda: hf.DeiTModel(hf.DeiTConfig(**vit), add_pooling_layer=False), pixels,
                 IMAGE),
        "dinov2": (lambda: hf.Dinov2Model(hf.Dinov2Config(mlp_ratio=4, **{
            k: v for k, v in vit.items() if k != "intermediate_size"})), pixels, IMAGE),
        "beit": (lambda: hf.BeitModel(hf.BeitConfig(use_relative_position_bias=True, **vit),
                                      add_pooling_layer=False), pixels, IMAGE),
        "clip_vision": (lambda: hf.CLIPVisionModel(hf.CLIPVisionConfig(**vit)), pixels, IMAGE),
        "hf_swin": (lambda: hf.SwinModel(hf.SwinConfig(image_size=64, patch_size=4,
                    embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=4)), pixels,
                    IMAGE),
        "hf_convnext": (lambda: hf.ConvNextModel(hf.ConvNextConfig(depths=[1, 1, 2, 1],
                        **stages)), pixels, IMAGE),
        "hf_resnet": (lambda: hf.ResNetModel(hf.ResNetConfig(embedding_size=16,
                      depths=[1, 1, 1, 1], **stages)), pixels, IMAGE),
        "segformer": (lambda: hf.SegformerForSemanticSegmentation(hf.SegformerConfig(
            depths=[1, 1, 1, 1], num_attention_heads=[1, 2, 4, 8], decoder_hidden_size=64,
            num_labels=5, **stages)), pixels, IMAGE),
        "whisper_encoder": (lambda: hf.WhisperModel(hf.WhisperConfig(**whisper)).encoder,
                            "input_features", (20, 100)),
        "wav2vec2": (lambda: hf.Wav2Vec2Model(hf.Wav2Vec2Config(**wav2vec2)), "input_values",
                     (4000,)),
    }  # fmt: skip


def export(build, key: str, shape: tuple[int, ...], path: Path, dynamo: bool) -> dict:
    """The model `build` makes (seeded) reading `key`, exported with a dynamic batch."""
    import torch

    from benchmarks.torch_export import export_checked, first_output

    torch.manual_seed(0)
    model = build().eval()
    batch = {0: "batch"}
    inputs = {"x": torch.randn(2, *shape)}
    found = export_checked(first_output(model, (key,)), inputs, path, dynamo=dynamo,
                           dims={"x": batch}, out_dims=batch)  # fmt: skip
    return {**found, "class": type(model).__name__}


if __name__ == "__main__":
    main()
