"""Export the model zoo: real torchvision / ultralytics architectures as users' ONNX files.

Random weights (seeded), but not a fresh init: the BatchNorm and LayerNorm affine parameters
(γ ∈ [0.05, 1.5], β ~ N(0, 0.2)), ConvNeXt's layer scales (U[0.05, 0.5]; 1e-6 at init would
make every block an identity) and ViT's zero-initialised head are drawn at random so channels
differ in importance, and the BatchNorm running statistics are then re-estimated on
the calibration photos (one train-mode pass, cumulative average), so every layer sees
activations of the scale a trained network would.
Each model is exported by the legacy TorchScript exporter (opset 17, dynamic batch) as
`<name>.onnx`; ResNet-50, MobileNetV3-Small and YOLOv8n also as `<name>.b1.onnx` (legacy, batch
fixed at 1) and `<name>.dynamo.onnx` (dynamo exporter, opset 18, its lowest; dynamic batch where
it succeeds). Every export is run once in ONNX Runtime and compared with torch (rel-L2 in
`manifest.json`).

Data: crops of scikit-image's bundled photos, random scale/aspect/flip, resized to the input
size, ImageNet mean/std, NCHW float32: `calib_<S>.npz` (32 samples from astronaut, coffee,
rocket, immunohistochemistry) and `heldout_<S>.npz` (16 samples from chelsea, hubble_deep_field,
retina, camera): disjoint photos. Keyed by the model's input name (`input`, YOLO: `images`).
A video model's clips stack T crops of one photo as frames: `calib_<T>x<S>.npz` (N×3×T×S×S).

`extra_specs()` (for `zoo_breadth.py`) also holds segmentation models (their 'out' tensor as
the output), a video model, ultralytics' segment/pose/classify/OBB models, and ResNet-18
exported at opset 11 and without constant folding.

Install (benchmark deps, not core deps). torchvision and ultralytics come with --no-deps: both
depend on torch, and the index's torchvision is a CUDA build whose pinned torch would replace
torch 2.13.0 CPU; ultralytics' import needs only opencv and pyyaml besides. The `zoo` extra
holds the rest and nothing that depends on torch:

    pip install --no-deps torchvision==0.28.0
    pip install --no-deps ultralytics                     # 8.4.190 was used
    pip install -e ".[zoo]"    # scikit-image, opencv-python-headless, pyyaml

Run:

    python benchmarks/zoo_models.py [--cache DIR] [--models a,b] [--force]

The cache defaults to `benchmarks/results/cache/zoo` (git-ignored), or `$ONNXPRUNE_ZOO_CACHE`.
A model whose files all exist is skipped unless `--force`. Writes `INDEX.md` and `manifest.json`
there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

# the crops live in a torch-free sibling, also read by keras_models.py (run as a script, or
# imported from a script beside it, this file has no package; imported as benchmarks.zoo_models
# it has one)
if __package__:
    from .photos import CALIB_PHOTOS, HELDOUT_PHOTOS, photo_crops
else:
    from photos import CALIB_PHOTOS, HELDOUT_PHOTOS, photo_crops

DEFAULT_CACHE = Path(__file__).resolve().parent / "results" / "cache" / "zoo"
SEED = 0
OPSET = 17
DYNAMO_OPSET = 18  # the dynamo exporter's lowest; asking for 17 runs a failing down-conversion
N_CALIB, N_HELDOUT = 32, 16
EXTRA_EXPORTS = ("resnet50", "mobilenet_v3_small", "yolov8n")


@dataclass(frozen=True)
class ZooSpec:
    """One zoo entry: how to build the torch module and what it reads."""

    name: str
    build: Callable[[], nn.Module]
    size: int
    input_name: str = "input"
    output_name: str = "logits"
    source: str = "torchvision.models"
    extra_outputs: tuple[str, ...] = ()  # names of outputs after the first (YOLO-seg's protos)
    frames: int = 0  # clip length of a video model's N×3×T×S×S input; 0: N×3×S×S images
    opset: int = OPSET
    fold_constants: bool = True  # the legacy exporter's do_constant_folding
    dynamo_opset: int = 0  # not 0: the one file is the dynamo exporter's at this opset

    @property
    def data_tag(self) -> str:
        """The suffix of its calibration / held-out files: `224`, or `8x112` for clips."""
        return f"{self.frames}x{self.size}" if self.frames else str(self.size)


def zoo_specs() -> dict[str, ZooSpec]:
    """The zoo, in benchmark order (lightest first within each family)."""
    tv = import_torchvision().models
    specs = [
        ZooSpec("squeezenet1_1", tv.squeezenet1_1, 224),
        ZooSpec("mobilenet_v3_small", tv.mobilenet_v3_small, 224),
        ZooSpec("shufflenet_v2_x1_0", tv.shufflenet_v2_x1_0, 224),
        ZooSpec("regnet_y_400mf", tv.regnet_y_400mf, 224),
        ZooSpec("efficientnet_b0", tv.efficientnet_b0, 224),
        ZooSpec("densenet121", tv.densenet121, 224),
        ZooSpec("resnet50", tv.resnet50, 224),
        ZooSpec("resnext50_32x4d", tv.resnext50_32x4d, 224),
        ZooSpec("convnext_tiny", tv.convnext_tiny, 224),
        ZooSpec("vit_b_16", tv.vit_b_16, 224),
        yolo_spec("yolov8n"),
    ]
    return {s.name: s for s in specs}


def extra_specs() -> dict[str, ZooSpec]:
    """More architectures for the breadth check (`zoo_breadth.py`): built with `--models`,
    never by default (the main zoo's benchmark stays as it is)."""
    tv = import_torchvision().models
    specs = [
        ZooSpec("mobilenet_v2", tv.mobilenet_v2, 224),
        ZooSpec("mnasnet1_0", tv.mnasnet1_0, 224),
        ZooSpec("resnet18", tv.resnet18, 224),
        ZooSpec("regnet_x_400mf", tv.regnet_x_400mf, 224),
        ZooSpec("googlenet", lambda: tv.googlenet(aux_logits=False, init_weights=True), 224),
        ZooSpec("inception_v3", lambda: tv.inception_v3(aux_logits=False, init_weights=True), 299),
        ZooSpec("efficientnet_v2_s", tv.efficientnet_v2_s, 224),
        ZooSpec("swin_t", tv.swin_t, 224),
        *(yolo_spec(name) for name in ("yolov5nu", "yolov10n", "yolo11n")),
        ZooSpec("vgg16_bn", tv.vgg16_bn, 224),
        ZooSpec("mobilenet_v3_large", tv.mobilenet_v3_large, 224),
        ZooSpec("wide_resnet50_2", tv.wide_resnet50_2, 224),
        *(
            ZooSpec(
                name,
                lambda name=name: segmentation_out(name),
                224,
                output_name="out",
                source="torchvision.models.segmentation ('out')",
            )
            for name in (
                "lraspp_mobilenet_v3_large",
                "deeplabv3_mobilenet_v3_large",
                "fcn_resnet50",
            )
        ),
        ZooSpec("r3d_18", tv.video.r3d_18, 112, frames=8, source="torchvision.models.video"),
        ZooSpec("maxvit_t", tv.maxvit_t, 224),
        ZooSpec("swin_v2_t", tv.swin_v2_t, 224),
        yolo_spec("yolov8n-seg", task="Segmentation", extra_outputs=("output1",)),
        yolo_spec("yolov8n-pose", task="Pose"),
        yolo_spec("yolov8n-cls", 224, task="Classification"),
        yolo_spec("yolov8n-obb", task="OBB"),
        ZooSpec("resnet18_opset11", tv.resnet18, 224, opset=11),
        ZooSpec("resnet18_nofold", tv.resnet18, 224, fold_constants=False),
        *(yolo_spec(name) for name in ("yolo12n", "yolo26n")),
        # opsets below the supported range, converted at load (graph/load.upgraded)
        ZooSpec("squeezenet1_1_opset7", tv.squeezenet1_1, 224, opset=7),
        ZooSpec("densenet121_opset8", tv.densenet121, 224, opset=8),
        ZooSpec("resnet18_opset9", tv.resnet18, 224, opset=9),
        ZooSpec("resnet18_opset9_nofold", tv.resnet18, 224, opset=9, fold_constants=False),
        ZooSpec("mobilenet_v2_opset9", tv.mobilenet_v2, 224, opset=9),
        ZooSpec(
            "googlenet_opset9",
            lambda: tv.googlenet(aux_logits=False, init_weights=True),
            224,
            opset=9,
        ),
        ZooSpec(
            "lraspp_opset9",
            lambda: segmentation_out("lraspp_mobilenet_v3_large"),
            224,
            output_name="out",
            source="torchvision.models.segmentation ('out')",
            opset=9,
        ),
        replace(yolo_spec("yolov8n"), name="yolov8n_opset9", opset=9),
        # the newest opsets, which only the dynamo exporter writes (23+: attention as one op)
        ZooSpec("resnet18_dynamo_opset24", tv.resnet18, 224, dynamo_opset=24),
        ZooSpec("mobilenet_v3_small_dynamo_opset25", tv.mobilenet_v3_small, 224, dynamo_opset=25),
        ZooSpec("vit_b_16_dynamo_opset24", tv.vit_b_16, 224, dynamo_opset=24),
        replace(yolo_spec("yolov8n"), name="yolov8n_dynamo_opset26", dynamo_opset=26),
    ]
    return {s.name: s for s in specs}


def yolo_spec(
    name: str, size: int = 320, *, task: str = "Detection", extra_outputs: tuple[str, ...] = ()
) -> ZooSpec:
    """An ultralytics model built from `name`.yaml (`build_yolo`), read as its exporter names
    the tensors."""
    return ZooSpec(
        name,
        lambda: build_yolo(f"{name}.yaml"),
        size,
        "images",
        "output0",
        f"ultralytics {task}Model",
        extra_outputs=extra_outputs,
    )


def segmentation_out(name: str) -> nn.Module:
    """Segmentation model `name` of torchvision, untrained (no backbone weights either), with
    its 'out' tensor as the one output."""
    build = getattr(import_torchvision().models.segmentation, name)
    return SegmentationOut(build(weights=None, weights_backbone=None))


class SegmentationOut(nn.Module):
    """A torchvision segmentation model with its 'out' tensor as the one output (not a dict)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


def import_torchvision() -> types.ModuleType:
    """Import torchvision's Python models without its C extension's op registrations.

    The index's torchvision 0.28.0 is a CUDA build: its `_C` library does not load against the
    CPU torch, `extension._has_ops()` is then False and every op registration is skipped —
    except `_meta_registrations`, which registers fake kernels for `torchvision::nms` & co.
    unconditionally and fails because the ops do not exist. The model definitions need none of
    those ops (they are for detection post-processing), so that one module is stubbed out.
    """
    name = "torchvision._meta_registrations"
    sys.modules.setdefault(name, types.ModuleType(name))
    import torchvision

    return torchvision


def build_yolo(yaml: str) -> nn.Module:
    """An ultralytics model from its yaml (no weights download), in its ONNX export mode; the
    task (detect, `-seg`, `-pose`, `-cls`, `-obb`) from the yaml's name."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    import_torchvision()
    from ultralytics.nn import tasks
    from ultralytics.nn.modules import Classify, Detect

    task = {
        "seg": tasks.SegmentationModel,
        "pose": tasks.PoseModel,
        "cls": tasks.ClassificationModel,
        "obb": tasks.OBBModel,
    }
    model = task.get(Path(yaml).stem.rpartition("-")[2], tasks.DetectionModel)(yaml, verbose=False)
    for module in model.modules():
        if isinstance(module, Detect):
            module.export, module.format, module.dynamic = True, "onnx", True
        if isinstance(module, Classify):
            module.export = True
    return model


def main(argv: list[str] | None = None) -> None:
    """Build the photos, then each requested model; write INDEX.md and manifest.json."""
    args = parse_args(argv)
    specs = zoo_specs()
    names = args.models.split(",") if args.models else list(specs)
    if set(names) - set(specs):
        specs |= extra_specs()
    build(Path(args.cache), [specs[name] for name in names], force=args.force)


def build(cache: Path, specs: list[ZooSpec], *, force: bool = False) -> None:
    """Export each spec not yet in the cache's manifest (all with `force`); update the index."""
    cache.mkdir(parents=True, exist_ok=True)
    manifest_path = cache / "manifest.json"
    for spec in specs:
        manifest = read_manifest(manifest_path)
        if spec.name in manifest and not force and all_present(cache, manifest[spec.name]):
            continue
        data = ensure_data(cache, spec)
        start = time.perf_counter()
        entry = export_model(spec, cache, data)
        print(f"{spec.name}: {time.perf_counter() - start:.0f} s", flush=True)
        # re-read: another run building into the same cache may have added entries meanwhile
        manifest = read_manifest(manifest_path) | {spec.name: entry}
        manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    (cache / "INDEX.md").write_text(index_markdown(read_manifest(manifest_path)))


def read_manifest(path: Path) -> dict[str, dict]:
    """The cache's manifest as it is on disk now ({} before the first export)."""
    return json.loads(path.read_text()) if path.exists() else {}


def all_present(cache: Path, entry: dict) -> bool:
    """Whether every file of a manifest entry was exported and is still there."""
    files = entry["files"].values()
    return all("error" not in f and (cache / f["file"]).exists() for f in files)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command line: cache folder, model subset, overwrite."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    default = os.environ.get("ONNXPRUNE_ZOO_CACHE", str(DEFAULT_CACHE))
    parser.add_argument("--cache", default=default, help="Folder for the models and data.")
    parser.add_argument(
        "--models",
        default="",
        help="Comma-separated subset (default: the main zoo); may name extra_specs() models.",
    )
    parser.add_argument("--force", action="store_true", help="Re-export existing files.")
    return parser.parse_args(argv)


def ensure_data(cache: Path, spec: ZooSpec) -> dict[str, np.ndarray]:
    """Calibration and held-out crops for one input size (or clip shape), written once as npz
    files keyed by the model's input name."""
    out = {}
    for split, photos, count, seed in (
        ("calib", CALIB_PHOTOS, N_CALIB, 1),
        ("heldout", HELDOUT_PHOTOS, N_HELDOUT, 2),
    ):
        path = cache / f"{split}_{spec.data_tag}.npz"
        if not path.exists():
            if spec.frames:
                crops = photo_clips(photos, count, spec.frames, spec.size, seed)
            else:
                crops = photo_crops(photos, count, spec.size, seed)
            np.savez(path, **{spec.input_name: crops})
        with np.load(path) as npz:
            out[split] = npz[npz.files[0]]
    return out


def photo_clips(
    photos: tuple[str, ...], count: int, frames: int, size: int, seed: int
) -> np.ndarray:
    """`count` clips of `frames` crops of one photo each (the photos in turn): N×3×T×S×S."""
    clips = [
        photo_crops((photos[i % len(photos)],), frames, size, seed * 1000 + i) for i in range(count)
    ]
    return np.stack(clips).transpose(0, 2, 1, 3, 4).copy()


def randomise_norms(model: nn.Module, calib: np.ndarray, seed: int) -> nn.Module:
    """Draw norm affine params, layer scales and zero-initialised Linear weights at random, then
    re-estimate BatchNorm running stats on `calib`.

    Random γ/β make channels differ; estimating the running statistics on real photos (one
    train-mode pass, cumulative average) keeps activations at a trained network's scale, where
    randomly drawn running stats compound across 50+ layers into overflow or collapse.
    """
    gen = torch.Generator().manual_seed(seed)
    norms = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and not module.weight.any():
                # ViT's head starts at zero: its logits would be 0 for every input
                bound = module.in_features**-0.5
                module.weight.uniform_(-bound, bound, generator=gen)
            if isinstance(module, norms) and getattr(module, "weight", None) is not None:
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen) * 1.45 + 0.05)
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.2)
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
                module.momentum = None
            for scale in layer_scales(module):
                scale.copy_(torch.rand(scale.shape, generator=gen) * 0.45 + 0.05)
        model.train()
        model(torch.from_numpy(calib[:16]))
    return model.eval()


def layer_scales(module: nn.Module) -> list[nn.Parameter]:
    """A module's layer-scale parameters, near zero at init: ConvNeXt's `layer_scale` (1e-6),
    timm's `LayerScale`/`LayerScale2d` `gamma` and PoolFormer's `Scale` `scale` (1e-5)."""
    names = ["layer_scale"]
    if type(module).__name__ in ("LayerScale", "LayerScale2d", "Scale"):
        names += ["gamma", "scale"]
    found = (getattr(module, name, None) for name in names)
    return [p for p in found if isinstance(p, nn.Parameter)]


def export_model(spec: ZooSpec, cache: Path, data: dict[str, np.ndarray]) -> dict[str, object]:
    """Build, randomise and export one model in every form it gets; returns its manifest entry."""
    torch.manual_seed(SEED)
    model = randomise_norms(spec.build(), data["calib"], SEED)
    if spec.name.startswith("yolo"):
        model = model.fuse()  # as ultralytics' own exporter does
    x = torch.from_numpy(data["heldout"][:2])
    with torch.no_grad():
        expected = model(x)
        expected = (expected[0] if isinstance(expected, (tuple, list)) else expected).numpy()
    forms = {"legacy": (f"{spec.name}.onnx", export_legacy, True)}
    if spec.dynamo_opset:
        forms = {"dynamo": (f"{spec.name}.onnx", export_dynamo, True)}
    if spec.name in EXTRA_EXPORTS:
        forms["legacy_b1"] = (f"{spec.name}.b1.onnx", export_legacy, False)
        forms["dynamo"] = (f"{spec.name}.dynamo.onnx", export_dynamo, True)
    files = {}
    for form, (filename, exporter, dynamic) in forms.items():
        files[form] = export_one(spec, model, x, cache / filename, exporter, dynamic, expected)
    return {"size": spec.size, "input": spec.input_name, "source": spec.source, "files": files}


def export_one(
    spec: ZooSpec,
    model: nn.Module,
    x: torch.Tensor,
    path: Path,
    exporter: Callable[..., str],
    dynamic: bool,
    expected: np.ndarray,
) -> dict[str, object]:
    """Export one file and check it against torch; failures are recorded."""
    entry: dict[str, object] = {"file": path.name}
    try:
        entry["how"] = exporter(model, x, path, spec, dynamic)
        entry.update(check_export(path, spec.input_name, x.numpy(), expected))
    except Exception as err:  # an exporter failure is a result to record, not a crash
        entry["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
        path.unlink(missing_ok=True)
    print(f"  {path.name}: {entry}", flush=True)
    return entry


def export_legacy(
    model: nn.Module, x: torch.Tensor, path: Path, spec: ZooSpec, dynamic: bool
) -> str:
    """TorchScript exporter, opset 17; dynamic batch axis or batch fixed at 1."""
    outputs = [spec.output_name, *spec.extra_outputs]
    axes = {name: {0: "batch"} for name in (spec.input_name, *outputs)} if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter is deliberate
        torch.onnx.export(
            model,
            (x if dynamic else x[:1],),
            str(path),
            dynamo=False,
            opset_version=spec.opset,
            do_constant_folding=spec.fold_constants,
            input_names=[spec.input_name],
            output_names=outputs,
            dynamic_axes=axes,
        )
    batch = "dynamic batch" if dynamic else "batch 1"
    folding = "" if spec.fold_constants else ", do_constant_folding=False"
    return f"torch.onnx.export(dynamo=False, opset_version={spec.opset}{folding}), {batch}"


def export_dynamo(
    model: nn.Module, x: torch.Tensor, path: Path, spec: ZooSpec, dynamic: bool
) -> str:
    """Dynamo exporter with embedded weights (at DYNAMO_OPSET unless the spec names one); falls
    back to batch 1 if the dynamic axis fails."""
    opset = spec.dynamo_opset or DYNAMO_OPSET
    common = {
        "dynamo": True,
        "opset_version": opset,
        "input_names": [spec.input_name],
        "output_names": [spec.output_name],
        "external_data": False,
        "verbose": False,
    }
    how = f"torch.onnx.export(dynamo=True, opset_version={opset})"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            dims = ({0: torch.export.Dim("batch", min=1, max=1024)},)
            program = torch.onnx.export(model, (x,), dynamic_shapes=dims, **common)
            how += ", dynamic batch"
        except Exception as err:  # retry static, and say why in the index
            program = torch.onnx.export(model, (x[:1],), **common)
            how += f", batch 1 (dynamic batch failed: {type(err).__name__})"
    program.save(str(path), external_data=False)
    return how


def check_export(
    path: Path, input_name: str, x: np.ndarray, expected: np.ndarray
) -> dict[str, object]:
    """Run the file in ONNX Runtime and compare its first output with torch's (rel-L2)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    fixed = isinstance(inp.shape[0], int)
    feed = x[:1] if fixed else x
    got = session.run(None, {inp.name: feed})[0]
    want = expected[: len(feed)]
    rel = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
    model = onnx.load(str(path), load_external_data=False)
    return {
        "opset": next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
        "input_shape": dims(inp.shape),
        "output_shape": [
            d if isinstance(d, int) else str(d) for d in session.get_outputs()[0].shape
        ],
        "ort_vs_torch_rel_l2": rel,
        "mb": round(path.stat().st_size / 2**20, 1),
    }


def dims(shape: list[int | str | None]) -> list[int | str]:
    """ORT's shape with symbolic dimensions as their names (JSON-friendly)."""
    return [d if isinstance(d, int) else str(d) for d in shape]


def index_markdown(manifest: dict[str, dict]) -> str:
    """INDEX.md: one row per file with its input, output, exporter and check."""
    lines = [
        "# onnxprune model zoo",
        "",
        "Written by `benchmarks/zoo_models.py` (see its docstring). Random seeded weights with",
        "randomised norm affine params and BN stats estimated on the calibration photos.",
        "",
        "Data per input size S: `calib_S.npz` (32 crops of astronaut, coffee, rocket,",
        "immunohistochemistry) and `heldout_S.npz` (16 crops of chelsea, hubble_deep_field,",
        "retina, camera), ImageNet-normalised NCHW float32, keyed by the input name.",
        "",
        "| file | input | output | MB | opset | exported by | ORT vs torch rel-L2 |",
        "|---|---|---|---|---|---|---|",
    ]
    for entry in manifest.values():
        for form in entry["files"].values():
            if "error" in form:
                lines.append(f"| {form['file']} | — | — | — | — | FAILED: {form['error']} | — |")
                continue
            shape = "×".join(str(d) for d in form["input_shape"])
            out = "×".join(str(d) for d in form["output_shape"])
            lines.append(
                f"| {form['file']} | `{entry['input']}` {shape} | {out} | {form['mb']} | "
                f"{form['opset']} | {form['how']} | {form['ort_vs_torch_rel_l2']:.1e} |"
            )
    lines += ["", "Calibration: `calib_224.npz` (key `input`), `calib_320.npz` (key `images`)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
