"""Export TensorFlow/Keras models with tf2onnx, as users who train in Keras get their ONNX file.

Runs in its own virtual environment (TensorFlow is no dependency of onnxprune):

    python3 -m venv /work/venvs/tf
    /work/venvs/tf/bin/pip install tensorflow-cpu==2.15.1 tf2onnx==1.16.1 \
        scikit-learn scikit-image onnxruntime
    /work/venvs/tf/bin/python benchmarks/keras_models.py [--cache DIR] [--models a,b] [--force]

Models: keras.applications MobileNetV2, ResNet50, EfficientNetB0, DenseNet121 (224×224×3,
`weights=None`, seeded; logits out, `classifier_activation=None`, since random weights give
near-uniform softmax probabilities whose deviations say nothing; BatchNormalization γ ∈
U[0.05, 1.5], β ~ N(0, 0.2), moving mean ~ N(0, 0.2), moving variance ∈ U[0.5, 2] so channels
differ) and a small CNN trained for a few
epochs on scikit-learn's digits (8×8 upscaled to 16×16, one channel), a recurrent one
(LSTM, then a bidirectional LSTM) reading the digits row by row, and a ViT on the 16×16 digits
(`MultiHeadAttention`, `Dense` on the token sequence). Each is exported by
tf2onnx at opset 17 with a dynamic batch as `<name>.onnx`, and with the batch fixed at 1 as
`<name>.b1.onnx`; each export is run once in ONNX Runtime and compared with TF (rel-L2 in
`manifest.json`, written in `zoo_models.py`'s schema so that `zoo.py --cache` measures these
files as it does the torch zoo).

Data (NHWC, as the models read it): `calib_224.npz` / `heldout_224.npz` are the torch zoo's
photo crops (`photos.photo_crops`: disjoint scikit-image photos), transposed to
NHWC; `calib_digits.npz` / `heldout_digits.npz` are digits from the training / test split
(labels in `heldout_digits_labels.npy`), `calib_digitrows.npz` / `heldout_digitrows.npz` the
same digits as (8 rows, 8 pixels) sequences, 256 for calibration.

The cache defaults to `benchmarks/results/cache/keras` (git-ignored), or
`$ONNXPRUNE_KERAS_CACHE`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from exports import export_all, parse_args
from photos import CALIB_PHOTOS, HELDOUT_PHOTOS, photo_crops

DEFAULT_CACHE = Path(__file__).resolve().parent / "results" / "cache" / "keras"
SEED = 0
OPSET = 17
INPUT = "input"
N_CALIB, N_HELDOUT = 32, 16
APPS = ("MobileNetV2", "ResNet50", "EfficientNetB0", "DenseNet121")


def main(argv: list[str] | None = None) -> None:
    """Write the data, export each selected model, and update the manifest."""
    args = parse_args(argv, __doc__, "ONNXPRUNE_KERAS_CACHE", DEFAULT_CACHE)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    import tensorflow as tf

    tf.keras.utils.set_random_seed(SEED)
    builders: dict[str, Callable[[], tuple[object, str]]] = {
        "digits_cnn": lambda: (digits_cnn(cache), "digits"),
        "digits_rnn": lambda: (digits_rnn(cache), "digitrows"),
        "digits_vit": lambda: (digits_vit(cache), "digits"),
        **{name.lower(): app_builder(name) for name in APPS},
    }

    def export(name: str) -> dict:
        model, tag = builders[name]()
        return export_model(model, name, tag, cache, ensure_data(cache, tag))

    export_all(cache, args.models.split(",") if args.models else builders, args.force, export)


def app_builder(name: str) -> Callable[[], tuple[object, str]]:
    """A builder of one keras.applications model with randomised BatchNormalization."""

    def build() -> tuple[object, str]:
        import tensorflow as tf

        app = getattr(tf.keras.applications, name)
        model = app(weights=None, input_shape=(224, 224, 3), classifier_activation=None)
        randomise_norms(model, np.random.default_rng(SEED))
        return model, "224"

    return build


def randomise_norms(model: object, rng: np.random.Generator) -> None:
    """Draw every BatchNormalization's γ, β and moving statistics so channels differ."""
    import tensorflow as tf

    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            weights = []
            for w in layer.weights:
                shape, tag = w.shape, w.name.split("/")[-1]
                if tag.startswith("gamma"):
                    weights.append(rng.uniform(0.05, 1.5, shape))
                elif tag.startswith("beta") or tag.startswith("moving_mean"):
                    weights.append(rng.normal(0, 0.2, shape))
                else:
                    weights.append(rng.uniform(0.5, 2.0, shape))
            layer.set_weights([w.astype(np.float32) for w in weights])


def digits_cnn(cache: Path) -> object:
    """A small Keras CNN trained 8 epochs on digits (16×16×1): Conv, BN, stride-2 'same' Conv,
    Flatten, Dense, Dense — the patterns tf2onnx writes for NHWC Flatten and Dense."""
    import tensorflow as tf

    layers = tf.keras.layers
    stack = [
        tf.keras.Input((16, 16, 1)),
        layers.Conv2D(16, 3, padding="same"),
        layers.BatchNormalization(),
        layers.ReLU(max_value=6.0),
        layers.Conv2D(32, 3, strides=2, padding="same", activation="relu"),
        layers.DepthwiseConv2D(3, padding="same", activation="relu"),
        layers.Flatten(),
        layers.Dense(64, activation="relu"),
        layers.Dense(10),
    ]
    return trained(stack, epochs=8)


def digits_rnn(cache: Path) -> object:
    """A Keras recurrent classifier trained 15 epochs on digits read row by row (8 steps of 8
    pixels): LSTM(48) over the rows, Bidirectional(LSTM(32)) to one vector, Dense — tf2onnx's
    zero initial states (Expand of the batch size) and its Slices of each direction's output."""
    import tensorflow as tf

    layers = tf.keras.layers
    stack = [
        tf.keras.Input((8, 8)),
        layers.LSTM(48, return_sequences=True),
        layers.Bidirectional(layers.LSTM(32)),
        layers.Dense(10),
    ]
    return trained(stack, epochs=15, rows=True)


def digits_vit(cache: Path) -> object:
    """A Keras ViT trained 40 epochs on digits (16×16×1): 4×4 patches by a stride-4 Conv2D,
    learned positions, 3 pre-norm blocks of MultiHeadAttention (4 heads of 16) and a GELU MLP
    (64 → 128 → 64), LayerNormalization, average over the 16 tokens, Dense — tf2onnx's Einsum
    decomposition of the attention, its Tensordot for Dense on a sequence, LayerNormalization in
    arithmetic and Softmax without an axis."""
    import tensorflow as tf

    layers = tf.keras.layers

    class AddPositions(layers.Layer):  # a learned (tokens, width) table: Keras has none
        def build(self, shape: tuple) -> None:
            self.table = self.add_weight(name="table", shape=shape[1:], initializer="normal")

        def call(self, x: object) -> object:
            return x + self.table

    width, inp = 64, tf.keras.Input((16, 16, 1))
    x = AddPositions()(layers.Reshape((16, width))(layers.Conv2D(width, 4, strides=4)(inp)))
    for _ in range(3):
        h = layers.LayerNormalization(epsilon=1e-6)(x)
        x = layers.Add()([x, layers.MultiHeadAttention(num_heads=4, key_dim=16)(h, h)])
        h = layers.LayerNormalization(epsilon=1e-6)(x)
        h = layers.Dense(width, activation=None)(layers.Dense(2 * width, activation="gelu")(h))
        x = layers.Add()([x, h])
    x = layers.GlobalAveragePooling1D()(layers.LayerNormalization(epsilon=1e-6)(x))
    return trained(tf.keras.Model(inp, layers.Dense(10)(x)), epochs=40)


def trained(stack: list | object, epochs: int, rows: bool = False) -> object:
    """A Sequential of `stack` (or the model given; logits out) trained with Adam on the digits
    training split."""
    import tensorflow as tf

    (x_train, y_train), _ = digits_split(rows=rows)
    model = tf.keras.Sequential(stack) if isinstance(stack, list) else stack
    model.compile(
        optimizer="adam",
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x_train, y_train, epochs=epochs, batch_size=32, verbose=0)
    return model


def digits_split(
    rows: bool = False,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's digits in [0, 1], upscaled ×2 to 16×16×1 (or as 8 rows of 8 pixels with
    `rows`); a seeded 75/25 split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = digits.images.astype(np.float32) / 16.0
    if not rows:
        x = x.repeat(2, axis=1).repeat(2, axis=2)[..., None]
    order = np.random.default_rng(SEED).permutation(len(x))
    cut = len(x) * 3 // 4
    train, test = order[:cut], order[cut:]
    return (x[train], digits.target[train]), (x[test], digits.target[test])


def ensure_data(cache: Path, tag: str) -> dict[str, np.ndarray]:
    """Calibration and held-out inputs for one data tag, written once as npz files."""
    out = {}
    for split in ("calib", "heldout"):
        path = cache / f"{split}_{tag}.npz"
        if not path.exists():
            np.savez(path, **{INPUT: make_split(tag, split, cache)})
        with np.load(path) as npz:
            out[split] = npz[INPUT]
    return out


def make_split(tag: str, split: str, cache: Path) -> np.ndarray:
    """Photo crops (224) or digits for one split."""
    if tag in ("digits", "digitrows"):
        (x_train, _), (x_test, y_test) = digits_split(rows=tag == "digitrows")
        if split == "calib":
            return x_train[: 64 if tag == "digits" else 256]
        np.save(cache / f"heldout_{tag}_labels.npy", y_test)
        return x_test
    photos, count, seed = (
        (CALIB_PHOTOS, N_CALIB, 1) if split == "calib" else (HELDOUT_PHOTOS, N_HELDOUT, 2)
    )
    return photo_crops(photos, count, int(tag), seed).transpose(0, 2, 3, 1).copy()  # NHWC


def export_model(
    model: object, name: str, tag: str, cache: Path, data: dict[str, np.ndarray]
) -> dict[str, object]:
    """Export dynamic-batch and batch-1 files and check each against TF on held-out inputs."""
    import tensorflow as tf
    import tf2onnx

    shape = tuple(model.inputs[0].shape[1:])
    entry: dict[str, object] = {"size": tag, "input": INPUT, "files": {}}
    for variant, batch in (("tf2onnx", None), ("tf2onnx_b1", 1)):
        file = f"{name}.onnx" if batch is None else f"{name}.b1.onnx"
        spec = [tf.TensorSpec((batch, *shape), tf.float32, name=INPUT)]
        try:
            tf2onnx.convert.from_keras(
                model, input_signature=spec, opset=OPSET, output_path=str(cache / file)
            )
            x = data["heldout"][:1] if batch == 1 else data["heldout"]
            rel_l2 = check(model, cache / file, x)
            how = f"tf2onnx.convert.from_keras(opset={OPSET}), " + (
                "dynamic batch" if batch is None else "batch 1"
            )
            entry["files"][variant] = {"file": file, "how": how, "rel_l2": rel_l2}
        except Exception as err:  # recorded in the manifest, the other exports go on
            entry["files"][variant] = {"file": file, "error": f"{type(err).__name__}: {err}"}
    return entry


def check(model: object, path: Path, x: np.ndarray) -> float:
    """rel-L2 of ONNX Runtime's output against TF's."""
    import onnxruntime as ort

    ref = np.asarray(model(x, training=False))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {INPUT: x})[0]
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


if __name__ == "__main__":
    main()
