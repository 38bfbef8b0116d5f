"""Elimination–compensation benchmark: `python benchmarks/biascomp.py` → results/biascomp.json.

(a) digits MLP, per weight: test loss and accuracy vs the fraction of weights removed, no
    fine-tuning — biascomp (global, joint, local, iterated in 5 steps), magnitude, gradient
    magnitude |w·∂L/∂w| (`taylor`), random (3 seeds), and magnitude selection + biascomp's shift.
(b) MLP regressors on the diffusion–sorption data of models/pde.py (noise 0, 1, 5 %): test MSE.
(c) per weight on the digits VGG (the Conv extension) against the same baselines, and per
    channel on the digits CNNs (vgg, resnet): biascomp (±joint) vs magnitude vs id, plus the
    cost of the joint statistics and the Conv border effect of the tap-summed bias shift.

Statistics are gathered once per model and reused for every ratio; each pruned model is the
same one `onnxprune.prune` writes (the iterated variant calls it).
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnxprune  # noqa: E402
from onnxprune.calib.data import Dataset  # noqa: E402
from onnxprune.calib.gather import gather, gather_weights  # noqa: E402
from onnxprune.config import PruneConfig  # noqa: E402
from onnxprune.graph.analyze import analyze  # noqa: E402
from onnxprune.graph.load import export, normalize  # noqa: E402
from onnxprune.graph.rewrite import rewrite  # noqa: E402
from onnxprune.graph.sparsify import layer_weights, sparsify, weight_layers  # noqa: E402
from onnxprune.methods import build_method  # noqa: E402
from onnxprune.methods.planner import make_plans  # noqa: E402
from onnxprune.methods.sparse import bias_shifts, choose_removed, weight_scores  # noqa: E402
from onnxprune.methods.width import keep_counts  # noqa: E402
from onnxprune.options import WidthRule  # noqa: E402

MODELS = ROOT / "models"
RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)
CHANNEL_RATIOS = (0.25, 0.5, 0.75)
BATCH = 256


def load(name: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(MODELS / name) as data:
        return data["input"], data["labels"]


def evaluate(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray, task: str) -> dict:
    """Test cross-entropy and accuracy (classify) or mean squared error (regress), in ORT."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, ["CPUExecutionProvider"])
    out = session.run(None, {"input": x})[0].astype(np.float64)
    if task == "regress":
        return {"mse": float(np.mean((out - y) ** 2))}
    out -= out.max(axis=1, keepdims=True)
    logp = out - np.log(np.exp(out).sum(axis=1, keepdims=True))
    loss = float(-logp[np.arange(len(y)), y].mean())
    return {"loss": loss, "acc": float(100 * np.mean(out.argmax(axis=1) == y))}


def weight_sweep(
    path: Path, calib: tuple, test: tuple, task: str, *, ratios=RATIOS, extended: bool = True
) -> dict:
    """Every per-weight variant at every ratio on one model; {variant: [metrics per ratio]}.
    Without `extended`, only biascomp and the three baselines (for the larger Conv model)."""
    graph = normalize(onnx.load(str(path)))
    layers = weight_layers(graph)
    weights = layer_weights(graph, layers)
    data = Dataset({"input": calib[0]}, labels=calib[1])
    timing, stats = {}, {}
    for joint in (False, True) if extended else (False,):
        config = PruneConfig(
            method="biascomp",
            granularity="weight",
            sparsity=0.5,
            joint=joint,
            batch_size=BATCH,
            task=task,
        )
        start = time.perf_counter()
        stats[joint] = gather_weights(graph, layers, frozenset({"jacobian"}), data, config)[0]
        timing["jacobian_joint_s" if joint else "jacobian_s"] = time.perf_counter() - start
    config = PruneConfig(
        method="taylor", granularity="weight", sparsity=0.5, batch_size=BATCH, task=task
    )
    grads = gather_weights(graph, layers, frozenset({"grad"}), data, config)[1]
    scores = {
        m: weight_scores(m, weights, stats[False], grads)
        for m in ("biascomp", "magnitude", "taylor")
    }
    randoms = [weight_scores("random", weights, {}, {}, seed=s) for s in range(3)]
    variants = {  # name: (scores, shift?, joint?, local?)
        "biascomp": (scores["biascomp"], True, False, False),
        "biascomp_joint": (scores["biascomp"], True, True, False),
        "biascomp_local": (scores["biascomp"], True, False, True),
        "magnitude": (scores["magnitude"], False, False, False),
        "magnitude+shift": (scores["magnitude"], True, False, False),
        "taylor": (scores["taylor"], False, False, False),
    }
    if not extended:
        variants = {k: v for k, v in variants.items() if k in ("biascomp", "magnitude", "taylor")}
    results = {name: [] for name in [*variants, "random"]}
    results.update({"biascomp_5steps": []} if extended else {})
    for ratio in ratios:
        for name, (score, shift, joint, local) in variants.items():
            removed = choose_removed(score, ratio, scope="layer" if local else "global")
            shifts = bias_shifts(weights, stats[joint], removed, joint=joint) if shift else {}
            model = export(sparsify(graph, layers, removed, shifts))
            results[name].append(evaluate(model, *test, task))
        runs = [
            evaluate(export(sparsify(graph, layers, choose_removed(r, ratio), {})), *test, task)
            for r in randoms
        ]
        results["random"].append({k: float(np.mean([r[k] for r in runs])) for k in runs[0]})
        if extended:
            results["biascomp_5steps"].append(evaluate(iterated(path, calib, ratio), *test, task))
    return {
        "ratios": list(ratios),
        "results": results,
        "timing": timing,
        "original": evaluate(onnx.load(str(path)), *test, task),
    }


def iterated(path: Path, calib: tuple, ratio: float, steps: int = 5) -> onnx.ModelProto:
    """`--method biascomp --granularity weight --steps 5`: statistics refreshed on the partly
    pruned model after each round, earlier removals kept."""
    result = onnxprune.prune(
        str(path),
        method="biascomp",
        granularity="weight",
        sparsity=ratio,
        steps=steps,
        data={"input": calib[0]},
        verify=False,
        batch_size=BATCH,
    )
    return result.model


def channel_sweep(name: str) -> dict:
    """biascomp (independent and joint shifts), magnitude and id per channel at a few ratios."""
    calib, test = load("digits32_calib.npz"), load("digits32_test.npz")
    graph = normalize(onnx.load(str(MODELS / f"{name}.onnx")))
    groups = analyze(graph)
    data = Dataset({"input": calib[0][:256]})
    base = PruneConfig(method="magnitude", width=WidthRule(ratio=0.5, round_to=1))
    counts = keep_counts(groups, base.width)
    out = {
        "ratios": list(CHANNEL_RATIOS),
        "results": {},
        "timing": {},
        "original": evaluate(onnx.load(str(MODELS / f"{name}.onnx")), *test, "classify"),
    }
    for label, method, joint in (
        ("biascomp", "biascomp", False),
        ("biascomp_joint", "biascomp", True),
        ("magnitude", "magnitude", False),
        ("id", "id", False),
    ):
        config = PruneConfig(method=method, joint=joint, width=base.width, batch_size=64)
        pruner = build_method(method, joint=joint)
        start = time.perf_counter()
        calibration = gather(graph, groups, counts, pruner.needs, data, config)
        out["timing"][label] = time.perf_counter() - start
        if joint:
            out["joint_bytes"] = joint_bytes(calibration)
        rows = []
        for ratio in CHANNEL_RATIOS:
            width = WidthRule(ratio=ratio, round_to=1)
            plans = make_plans(
                groups,
                keep_counts(groups, width),
                calibration.stats,
                pruner,
                PruneConfig(method=method, joint=joint, width=width),
            )
            rows.append(evaluate(export(rewrite(graph, groups, plans)), *test, "classify"))
        out["results"][label] = rows
    return out


def joint_bytes(calibration) -> int:
    """Memory of the joint statistics (M and T) over all consumers."""
    return int(
        sum(
            site.joint.m.nbytes + site.joint.t.nbytes
            for stats in calibration.stats.values()
            for site, _ in stats.consumers.values()
        )
    )


def border_effect(name: str = "vgg", ratio: float = 0.5) -> dict:
    """The bias shift Σ_taps W·mean(a_j) equals replacing a removed channel by its mean only away
    from zero-padded borders. Compare, for magnitude selection with mean compensation, the
    pruned model against one that keeps every channel but substitutes the removed channels'
    means at the taps (exact), on the test split."""
    calib, test = load("digits32_calib.npz"), load("digits32_test.npz")
    path = MODELS / f"{name}.onnx"
    result = onnxprune.prune(
        str(path),
        method="magnitude",
        ratio=ratio,
        compensate="bias",
        data={"input": calib[0]},
        round_to=1,
        verify=False,
    )
    substituted = mean_substituted(onnx.load(str(path)), result, calib[0])
    original = onnx.load(str(path))

    def logits(model):
        session = ort.InferenceSession(model.SerializeToString(), None, ["CPUExecutionProvider"])
        return session.run(None, {"input": test[0]})[0].astype(np.float64)

    ref, shifted, exact = logits(original), logits(result.model), logits(substituted)

    def rel(a, b):
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    return {
        "model": name,
        "ratio": ratio,
        "rel_l2_shift_vs_original": rel(shifted, ref),
        "rel_l2_mean_substitution_vs_original": rel(exact, ref),
        "rel_l2_shift_vs_mean_substitution": rel(shifted, exact),
        "acc_shift": float(100 * np.mean(shifted.argmax(1) == test[1])),
        "acc_mean_substitution": float(100 * np.mean(exact.argmax(1) == test[1])),
    }


def mean_substituted(model: onnx.ModelProto, result, x: np.ndarray) -> onnx.ModelProto:
    """`model` with every removed channel replaced by its calibration mean at each tap that a
    pruned group's consumers read (a' = a·keep + mean·(1 − keep)); no channel is removed."""
    graph = model.graph
    taps = {}
    for group in result.groups:
        plan = result.plans.get(group.name)
        if plan is None or len(plan.keep) == group.channels:
            continue
        for tap in group.taps:
            taps[tap.tensor] = (tap, group, plan)
    probe = onnx.ModelProto.FromString(model.SerializeToString())
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(t, 1, None) for t in taps)
    session = ort.InferenceSession(probe.SerializeToString(), None, ["CPUExecutionProvider"])
    values = dict(
        zip([o.name for o in session.get_outputs()], session.run(None, {"input": x}), strict=True)
    )
    for tensor, (tap, group, plan) in taps.items():
        value = values[tensor]
        axes = tuple(i for i in range(value.ndim) if i != tap.axis)
        keep = np.zeros(value.shape[tap.axis], np.float32)
        keep[np.asarray(plan.keep) + tap.offset] = 1.0  # spatial == 1 for conv taps
        shape = [1] * value.ndim
        shape[tap.axis] = -1
        mean = value.mean(axis=axes) * (1 - keep)
        if tap.spatial > 1:  # Flatten: per-channel mean spread over its features
            per = value.reshape(len(value), -1, tap.spatial).mean(axis=(0, 2))
            keep = np.zeros(per.size, np.float32)
            keep[np.asarray(plan.keep) + tap.offset] = 1.0
            mean, keep = np.repeat(per * (1 - keep), tap.spatial), np.repeat(keep, tap.spatial)
        _substitute(graph, tensor, group.consumers, keep.reshape(shape), mean.reshape(shape))
    return model


def _substitute(graph, tensor: str, consumers, keep: np.ndarray, mean: np.ndarray) -> None:
    new = f"{tensor}__substituted"
    graph.initializer.extend(
        [
            onnx.numpy_helper.from_array(keep.astype(np.float32), f"{new}_k"),
            onnx.numpy_helper.from_array(mean.astype(np.float32), f"{new}_m"),
        ]
    )
    graph.node.extend(
        [
            onnx.helper.make_node("Mul", [tensor, f"{new}_k"], [f"{new}_x"]),
            onnx.helper.make_node("Add", [f"{new}_x", f"{new}_m"], [new]),
        ]
    )
    for node in graph.node:
        if node.name in consumers:
            node.input[:] = [new if i == tensor else i for i in node.input]
    order = _toposort(
        list(graph.node), {i.name for i in graph.input} | {i.name for i in graph.initializer}
    )
    del graph.node[:]
    graph.node.extend(order)


def _toposort(nodes, known: set[str]) -> list:
    done, order, pending = set(known), [], list(nodes)
    while pending:
        ready = [n for n in pending if all(i in done or not i for i in n.input)]
        order += ready
        done.update(o for n in ready for o in n.output)
        pending = [n for n in pending if n not in ready]
    return order


def main() -> None:
    start = time.perf_counter()
    out = {
        "machine": f"{platform.processor() or platform.machine()}, {platform.system()}",
        "ratios_weight": list(RATIOS),
    }
    out["digits_mlp"] = weight_sweep(
        MODELS / "mlp.onnx", load("digits64_calib.npz"), load("digits64_test.npz"), "classify"
    )
    print(f"(a) done at {time.perf_counter() - start:.0f} s", flush=True)
    calib, test = load("diffsorp/pde_calib.npz"), load("diffsorp/pde_test.npz")
    out["pde"] = {
        f"noise_{level}": weight_sweep(
            MODELS / "diffsorp" / f"pde_mlp_n{level}.onnx", calib, test, "regress"
        )
        for level in (0, 1, 5)
    }
    print(f"(b) done at {time.perf_counter() - start:.0f} s", flush=True)
    calib, test = load("digits32_calib.npz"), load("digits32_test.npz")
    out["vgg_weight"] = weight_sweep(  # the Conv extension: im2col patches, positions as samples
        MODELS / "vgg.onnx",
        (calib[0][:128], calib[1][:128]),
        test,
        "classify",
        ratios=(0.5, 0.7, 0.8, 0.9, 0.95),
        extended=False,
    )
    print(f"(c) per weight done at {time.perf_counter() - start:.0f} s", flush=True)
    out["channel"] = {name: channel_sweep(name) for name in ("vgg", "resnet")}
    out["border_effect"] = [border_effect("vgg", ratio) for ratio in (0.1, 0.25, 0.5)]
    out["total_s"] = time.perf_counter() - start
    path = ROOT / "benchmarks" / "results" / "biascomp.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path} in {out['total_s']:.0f} s")


if __name__ == "__main__":
    main()
