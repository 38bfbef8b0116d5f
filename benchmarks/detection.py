"""torchvision detectors as users export them, through the command line: one image in (3, H, W,
no batch axis), boxes / scores / labels after non-maximum suppression out.

Models (320×320, legacy exporter, opset 17, random seeded weights): SSDlite320-MobileNetV3-Large,
RetinaNet-ResNet50-FPN, FCOS-ResNet50-FPN, Faster R-CNN-MobileNetV3-Large-320-FPN. BatchNorm
statistics are estimated on the calibration photos (backbone in train mode), the head's layers
drawn at random (He initialisation), and the class-logit and box-regression layers scaled so
that on eight photos no logit strays more than 6 from torchvision's prior bias and no box delta
more than 1 from its mean: scores vary between boxes and images instead of tying
(torchvision's initialisation gives every box the same score, larger random weights saturate
them at 1) and boxes stay in the image (unscaled, RetinaNet's were all (0, 0, 0, 0); FCOS's
box distances, which pass a ReLU, get a bias of 2 so that few are cut to zero).
torchvision's C extension does not load against the CPU torch (`zoo_models.import_torchvision`):
its `nms` op is defined here in Python for tracing; the file holds ONNX's NonMaxSuppression.

Per model: groups and prunable share of the MACs (`zoo.analysis_summary`), and `--ratio 0`,
`magnitude` and `id` at `--ratio 0.25` through the CLI: exit code, parameters and MACs before →
after (the report's), the report's notes on the input and shared weights, and on the held-out
photos the detections of each model and the share of the original's 20 best detections that the
pruned model finds again (same label, IoU ≥ 0.5); at ratio 0 also the largest difference of the
sorted scores (boxes of equal scores may come out in another order).

    python benchmarks/detection.py --out benchmarks/results/detection.json
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from photos import CALIB_PHOTOS, HELDOUT_PHOTOS, photo_crops  # noqa: E402
from zoo import analysis_summary  # noqa: E402
from zoo_models import import_torchvision  # noqa: E402

SIZE = 320
RUNS = (("ratio0", "id", 0.0), ("magnitude", "magnitude", 0.25), ("id", "id", 0.25))
TOP = 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="ssdlite,retinanet,fcos,fasterrcnn")
    parser.add_argument("--cache", type=Path, default=Path("benchmarks/results/cache/detection"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/detection.json"))
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    calib = _unnormalised(photo_crops(CALIB_PHOTOS, 32, SIZE, 1))
    heldout = _unnormalised(photo_crops(HELDOUT_PHOTOS, 16, SIZE, 2))
    np.savez(args.cache / "calib.npz", image=calib)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    for name in args.models.split(","):
        results[name] = measure(name, args.cache, calib, heldout)
        print(name, json.dumps(results[name])[:600], flush=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")


def measure(name: str, cache: Path, calib: np.ndarray, heldout: np.ndarray) -> dict:
    """Export one detector and prune it as RUNS say (see the module docstring)."""
    path = cache / f"{name}.onnx"
    try:
        export(name, path, calib)
    except Exception as exc:  # noqa: BLE001 - a failed export is a row, not the end of the run
        return {"export_error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
    summary = analysis_summary(path)
    row = {key: summary[key] for key in ("groups", "prunable_groups", "macs")}
    for mode in ("default", "prune_residual"):
        row[f"share_{mode}"] = summary[mode]["share"]
    row["blockers"] = summary["default"]["blockers"][:3]
    original = detections(path, heldout)
    row["detections"] = [len(d[0]) for d in original]
    for key, method, ratio in RUNS:
        row[key] = prune_cli(path, method, ratio, cache / "calib.npz", heldout, original)
    return row


def prune_cli(
    path: Path, method: str, ratio: float, calib: Path, heldout: np.ndarray, original: list
) -> dict:
    """One `onnxprune` run; the pruned file's detections against the original's."""
    with tempfile.TemporaryDirectory() as folder:
        out, report = Path(folder) / "pruned.onnx", Path(folder) / "report.json"
        command = [sys.executable, "-m", "onnxprune", str(path), "--method", method,
                   "--ratio", str(ratio), "--data", str(calib), "-o", str(out),
                   "--report", str(report)]  # fmt: skip
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        cell = {"exit": done.returncode, "seconds": round(time.perf_counter() - start, 1)}
        if done.returncode != 0:
            cell["error"] = done.stderr.strip().splitlines()[-1:]
            return cell
        data = json.loads(report.read_text())
        cell["params"], cell["macs"] = data["params"], data["macs"]
        cell["notes"] = [n for n in data["notes"] if "sample axis" in n or "copies" in n]
        pruned = detections(out, heldout)
    cell["detections"] = [len(d[0]) for d in pruned]
    pairs = zip(original, pruned, strict=True)
    cell["found_again"] = float(np.mean([found_again(a, b) for a, b in pairs]))
    if ratio == 0:  # boxes of equal scores may swap places: compare the sorted scores
        cell["scores_max_abs"] = max(
            float(np.abs(np.sort(a[1]) - np.sort(b[1])).max(initial=0.0))
            for a, b in zip(original, pruned, strict=True)
            if a[1].shape == b[1].shape
        )
    return cell


def detections(path: Path, images: np.ndarray) -> list[tuple[np.ndarray, ...]]:
    """(boxes, scores, labels) of each image."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    runs = [dict(zip(names, session.run(None, {"image": x}), strict=True)) for x in images]
    return [(r["boxes"], r["scores"], r["labels"]) for r in runs]


def found_again(original: tuple, pruned: tuple) -> float:
    """Share of the original's TOP best detections that a pruned one matches (same label,
    IoU ≥ 0.5, each pruned detection used once); 1.0 when the original has none."""
    boxes, scores, labels = original
    best = np.argsort(-scores, kind="stable")[:TOP]
    free = np.ones(len(pruned[0]), dtype=bool)
    hits = 0
    for i in best:
        iou = _iou(boxes[i], pruned[0]) * (pruned[2] == labels[i]) * free
        if len(iou) and iou.max() >= 0.5:
            free[int(iou.argmax())] = False
            hits += 1
    return hits / len(best) if len(best) else 1.0


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    lo, hi = np.maximum(box[:2], boxes[:, :2]), np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=1)
    area = lambda b: np.prod(b[..., 2:] - b[..., :2], axis=-1)  # noqa: E731
    return inter / np.maximum(area(box) + area(boxes) - inter, 1e-9)


def export(name: str, path: Path, calib: np.ndarray) -> None:
    """Build detector `name` with seeded random weights and export it as torchvision users do."""
    tv = _torchvision_with_nms()
    detection = tv.models.detection
    small = {"weights": None, "weights_backbone": None}
    square = {"min_size": SIZE, "max_size": SIZE}
    builders = {
        "ssdlite": lambda: detection.ssdlite320_mobilenet_v3_large(**small),
        "retinanet": lambda: detection.retinanet_resnet50_fpn(**small, **square),
        "fcos": lambda: detection.fcos_resnet50_fpn(**small, **square),
        "fasterrcnn": lambda: detection.fasterrcnn_mobilenet_v3_large_320_fpn(**small),
    }
    torch.manual_seed(0)
    model = _randomised(builders[name](), calib)
    image = torch.from_numpy(calib[0])
    names = {"input_names": ["image"], "output_names": ["boxes", "scores", "labels"]}
    torch.onnx.export(model, ([image],), str(path), opset_version=17, dynamo=False, **names)


def _randomised(model: torch.nn.Module, calib: np.ndarray) -> torch.nn.Module:
    """BatchNorm statistics from the photos, random last classification convs."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen) * 1.45 + 0.05)
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.2)
                module.reset_running_stats()
                module.momentum = None
        head = getattr(model, "head", None) or model.roi_heads
        for module in head.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                module.weight.normal_(0.0, (2.0 / module.weight[0].numel()) ** 0.5, generator=gen)
        model.backbone.train()
        model.backbone(torch.from_numpy(calib[:8]))
        model.eval()
        _outputs_scaled(model, calib[:8], CLASS_LOGITS, 6.0)
        _outputs_scaled(model, calib[:8], BOX_DELTAS, 1.0)
        if type(model).__name__ == "FCOS":  # its distances pass a ReLU: most must be > 0
            model.head.regression_head.bbox_reg.bias.add_(2.0)
    return model


CLASS_LOGITS = re.compile(r"classification_head\.(cls_logits|module_list\.\d+\.1)$")
BOX_DELTAS = re.compile(r"regression_head\.(bbox_reg|bbox_ctrness|module_list\.\d+\.1)$")


def _outputs_scaled(
    model: torch.nn.Module, images: np.ndarray, pattern: re.Pattern, reach: float
) -> None:
    """Scale the layers whose names match `pattern` so that on `images` no output strays
    further than `reach` from their mean: random weights otherwise saturate the class scores
    (ties at 1.0) and throw every box out of the image (all boxes (0, 0, 0, 0))."""
    layers = [m for name, m in model.named_modules() if pattern.search(name)]
    spread: dict[torch.nn.Module, float] = {}

    def note(layer: torch.nn.Module, _: tuple, out: torch.Tensor) -> None:
        spread[layer] = max(spread.get(layer, 0.0), float((out - out.mean()).abs().max()))

    hooks = [layer.register_forward_hook(note) for layer in layers]
    model([torch.from_numpy(x) for x in images])
    for hook in hooks:
        hook.remove()
    for layer, found in spread.items():
        layer.weight.mul_(reach / max(found, 1e-12))


def _torchvision_with_nms():
    """torchvision with `torchvision::nms` (greedy NMS) and `torchvision::roi_align` (its own
    Python implementation) defined in Python, as its export needs."""
    tv = import_torchvision()
    align = sys.modules["torchvision.ops.roi_align"]  # the module: the package exports a function
    if not hasattr(torch.ops.torchvision, "nms"):
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.impl("nms", _nms, "CPU")
        lib.define(
            "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
            "SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor"
        )
        plain = align._roi_align.__wrapped__  # not torch.compile's wrapper, which tracing refuses
        lib.impl("roi_align", lambda x, rois, *args: plain(x.detach(), rois.detach(), *args), "CPU")
        _torchvision_with_nms.lib = lib  # the registration lives as long as the library
    from torchvision import extension
    from torchvision.ops import _register_onnx_ops

    _register_onnx_ops._register_custom_op()
    extension._has_ops = align._has_ops = _has_ops
    return tv


def _has_ops() -> bool:
    return True


def _nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> torch.Tensor:
    boxes, scores = boxes.detach(), scores.detach()
    order, keep = scores.argsort(descending=True), []
    suppressed = torch.zeros(len(boxes), dtype=torch.bool)
    for i in order.tolist():
        if not suppressed[i]:
            keep.append(i)
            suppressed |= torch.from_numpy(_iou(boxes[i].numpy(), boxes.numpy()) > threshold)
    return torch.tensor(keep, dtype=torch.int64)


def _unnormalised(crops: np.ndarray) -> np.ndarray:
    """The zoo's ImageNet-normalised crops back in [0, 1]: torchvision detectors normalise."""
    mean = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
    std = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
    return np.clip(crops * std + mean, 0.0, 1.0).astype(np.float32)


if __name__ == "__main__":
    main()
