"""Breadth check on timm backbones: the architectures users most often export, through the same
analysis, ratio-0 and `--ratio 0.5` checks as `zoo_breadth.py`.

Each model is built by `timm.create_model(name, pretrained=False)` with seeded random weights,
randomised norms and BatchNorm statistics estimated on the calibration photos (as the main zoo),
exported by the legacy exporter (opset 17, dynamic batch) into the zoo cache, then checked. The
architectures hit different graph patterns: RepVGG's multi-branch train form, CSP split/concat,
MixConv, TF 'SAME' padding, Ghost modules, Res2Net's hierarchical splits, DLA and HRNet's
multi-resolution fusion, DPN's dual path, NF-Nets' weights standardised at run time, hybrid
conv/attention nets (MobileViT, LeViT, EfficientFormer), PoolFormer, VoVNet.

timm is a benchmark-only dependency installed with --no-deps (it needs torch, torchvision,
huggingface_hub, safetensors, pyyaml); its import goes through `import_torchvision()`:

    pip install --no-deps timm            # 1.0.31 was used
    python benchmarks/zoo_timm.py --models repvgg_a0 --out benchmarks/results/timm/repvgg_a0.json
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from torch import nn
from zoo_breadth import check_model
from zoo_models import DEFAULT_CACHE, ZooSpec, build, import_torchvision

ARCHITECTURES = (
    "repvgg_a0",
    "cspresnet50",
    "mixnet_s",
    "tf_efficientnet_b0",
    "ghostnet_100",
    "res2net50_14w_8s",
    "dla34",
    "hrnet_w18_small",
    "dpn68",
    "rexnet_100",
    "nf_resnet26",
    "mobilevit_s",
    "levit_128s",
    "poolformer_s12",
    "efficientformer_l1",
    "convmixer_768_32",
    "ese_vovnet19b_dw",
)


def timm_specs(size: int = 224) -> dict[str, ZooSpec]:
    """One zoo entry per architecture, all at `size`×`size`, named `timm_<name>`."""
    return {
        f"timm_{name}": ZooSpec(f"timm_{name}", lambda n=name: create(n), size, source="timm")
        for name in ARCHITECTURES
    }


def create(name: str) -> nn.Module:
    """A timm model with random weights (no download)."""
    import_torchvision()
    import timm

    return timm.create_model(name, pretrained=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = os.environ.get("ONNXPRUNE_ZOO_CACHE", str(DEFAULT_CACHE))
    parser.add_argument("--cache", type=Path, default=Path(default))
    parser.add_argument("--models", default="", help="comma-separated timm names (default: all)")
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--flags", default="", help="extra CLI flags, e.g. '--prune-residual'")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/zoo_timm.json"))
    args = parser.parse_args()
    specs = timm_specs(args.size)
    names = [f"timm_{n}" for n in args.models.split(",")] if args.models else list(specs)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    for name in names:
        build(args.cache, [specs[name]])
        results[name] = check_model(args.cache, name, args.size, args.ratio, args.flags.split())
        print(name, json.dumps(results[name])[:400], flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
