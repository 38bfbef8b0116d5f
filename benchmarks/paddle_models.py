"""Export PaddlePaddle models with paddle2onnx, as users of Paddle's model zoos get their ONNX file.

Runs in its own virtual environment (Paddle is no dependency of onnxprune):

    python3 -m venv /work/venvs/paddle
    /work/venvs/paddle/bin/pip install paddlepaddle==3.3.1 paddle2onnx==2.1.0 onnxruntime \
        scikit-image onnx_graphsurgeon sympy
    /work/venvs/paddle/bin/python benchmarks/paddle_models.py [--cache DIR] [--models a,b] [--force]

Models: `paddle.vision.models` MobileNetV3-small and -large, MobileNetV2, ResNet-50,
ResNeXt-50-32x4d, ShuffleNetV2-x1.0, DenseNet-121, SqueezeNet-1.1, GoogLeNet (224×224, 10
classes, seeded random weights; BatchNorm γ ∈ U[0.05, 1.5], β ~ N(0, 0.2), running mean
~ N(0, 0.2) and variance ∈ U[0.5, 2] so that channels differ). Each is exported by
`paddle.onnx.export` (paddle2onnx, which folds constants with Polygraphy, hence
onnx_graphsurgeon and sympy above) at opset 13 with a dynamic batch as `<name>.onnx`, and with
the batch fixed at 1 as `<name>.b1.onnx`, then run once in ONNX Runtime and compared with Paddle
(rel-L2 in `manifest.json`, in `zoo_models.py`'s schema, so that `zoo.py --cache` measures these
files as it does the torch zoo). Data: the torch zoo's photo crops (`photos.photo_crops`,
disjoint calibration and held-out photos), keyed by the models' input name `x`.

The cache defaults to `benchmarks/results/cache/paddle` (git-ignored), or
`$ONNXPRUNE_PADDLE_CACHE`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from exports import export_all, parse_args
from photos import CALIB_PHOTOS, HELDOUT_PHOTOS, photo_crops

DEFAULT_CACHE = Path(__file__).resolve().parent / "results" / "cache" / "paddle"
SEED = 0
OPSET = 13
INPUT = "x"
SIZE = 224
N_CALIB, N_HELDOUT = 32, 16
MODELS = (
    "mobilenet_v3_small", "mobilenet_v3_large", "mobilenet_v2", "resnet50", "resnext50_32x4d",
    "shufflenet_v2_x1_0", "densenet121", "squeezenet1_1", "googlenet",
)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """Write the data, export each selected model, and update the manifest."""
    args = parse_args(argv, __doc__, "ONNXPRUNE_PADDLE_CACHE", DEFAULT_CACHE)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    heldout = ensure_data(cache)["heldout"]
    names = args.models.split(",") if args.models else MODELS
    export_all(cache, names, args.force, lambda n: export_model(build(n), n, cache, heldout))


def build(name: str) -> object:
    """One `paddle.vision.models` network, seeded, BatchNorms randomised, in eval mode."""
    import paddle
    from paddle.vision import models

    paddle.seed(SEED)
    model = getattr(models, name)(num_classes=10)
    rng = np.random.default_rng(SEED)
    for layer in model.sublayers():
        if isinstance(layer, paddle.nn.BatchNorm2D):
            c = layer.weight.shape[0]
            layer.weight.set_value(rng.uniform(0.05, 1.5, c).astype(np.float32))
            layer.bias.set_value(rng.normal(0, 0.2, c).astype(np.float32))
            layer._mean.set_value(rng.normal(0, 0.2, c).astype(np.float32))
            layer._variance.set_value(rng.uniform(0.5, 2.0, c).astype(np.float32))
    model.eval()
    return model


def ensure_data(cache: Path) -> dict[str, np.ndarray]:
    """Calibration and held-out photo crops (NCHW), written once as npz files."""
    out = {}
    for split, photos, count, seed in (
        ("calib", CALIB_PHOTOS, N_CALIB, 1), ("heldout", HELDOUT_PHOTOS, N_HELDOUT, 2)
    ):  # fmt: skip
        path = cache / f"{split}_{SIZE}.npz"
        if not path.exists():
            np.savez(path, **{INPUT: photo_crops(photos, count, SIZE, seed)})
        with np.load(path) as npz:
            out[split] = npz[INPUT]
    return out


def export_model(model: object, name: str, cache: Path, heldout: np.ndarray) -> dict[str, object]:
    """Export dynamic-batch and batch-1 files and check each against Paddle on held-out crops."""
    import paddle

    entry: dict[str, object] = {"size": str(SIZE), "input": INPUT, "files": {}}
    for variant, batch in (("paddle2onnx", None), ("paddle2onnx_b1", 1)):
        stem = name if batch is None else f"{name}.b1"
        spec = [paddle.static.InputSpec([batch, 3, SIZE, SIZE], "float32", name=INPUT)]
        try:
            paddle.onnx.export(model, str(cache / stem), input_spec=spec, opset_version=OPSET)
            x = heldout[:1] if batch == 1 else heldout
            how = f"paddle.onnx.export(opset_version={OPSET}), " + (
                "dynamic batch" if batch is None else "batch 1"
            )
            rel_l2 = check(model, cache / f"{stem}.onnx", x)
            entry["files"][variant] = {"file": f"{stem}.onnx", "how": how, "rel_l2": rel_l2}
        except Exception as err:  # recorded in the manifest, the other exports go on
            entry["files"][variant] = {
                "file": f"{stem}.onnx",
                "error": f"{type(err).__name__}: {err}",
            }
    return entry


def check(model: object, path: Path, x: np.ndarray) -> float:
    """rel-L2 of ONNX Runtime's first output against Paddle's."""
    import onnxruntime as ort
    import paddle

    with paddle.no_grad():
        ref = model(paddle.to_tensor(x))
    ref = np.asarray((ref[0] if isinstance(ref, (list, tuple)) else ref).numpy())
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {INPUT: x})[0]
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


if __name__ == "__main__":
    main()
