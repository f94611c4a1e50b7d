"""Recipe: train the YOLOv8-style "shapes" detector and export it to ONNX (fp32, opset 17).

Usage::

    python models/detector/recipe.py [--out models/detector/build] [--seed 1234] [--int8]

Synthesizes train/val images with :mod:`models.detector.data` (several shapes per image,
exact boxes; nothing is downloaded), trains a small anchor-free Keras detector, exports
``model.onnx`` with the YOLOv8 output layout and evaluates it on the held-out evaluation set
through the runtime's own :class:`~edge_runtime.decoders.YoloDecoder`
(``YoloSpec(layout="v8", normalized=False)``). Writes ``model.onnx``, ``labels.txt``,
``eval.npz`` (the evaluation images and boxes) and ``metrics.json`` (mAP@0.5, timings,
versions). ``--int8`` also quantizes the model (QDQ, U8S8, per-channel) and measures fp32 vs
int8 latency and mAP (:func:`int8_comparison`).

Model (128x128x3 RGB 0..1, NHWC):

* backbone: Conv-BN-ReLU blocks 16 (s2) - 32 (s2) - 32 - 64 (s2, "P3", stride 8) - 64 -
  96 (s2, "P4", stride 16) - 96;
* neck: P4 upsampled x2, concatenated with P3, 1x1 conv 64 (a one-step FPN);
* head per level (YOLOv8 style, decoupled, anchor-free): a 3x3 conv 48 + 1x1 conv to the 4
  box distances (left, top, right, bottom in strides, ``softplus``), and a 3x3 conv 48 + 1x1
  conv to the class logits;
* decode in the graph: distances around each cell centre -> ``cx, cy, w, h`` in input
  pixels; class scores through a sigmoid; both levels concatenated and transposed to the
  YOLOv8 layout ``(1, 4 + C, N)``, ``N = 16*16 + 8*8 = 320``.

Training: centre-sampling assignment (a cell is positive for a box when its centre is inside
the box and within 2.5 strides of the box centre, on the level that suits the box size; the
cell holding the centre is always positive; contested cells go to the smaller box), sigmoid
focal loss for the classes and GIoU loss for the boxes, Adam with cosine decay.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
import numpy.typing as npt

from models.detector import data
from models.export import export_onnx, seed_everything, tool_versions, write_json

HERE = Path(__file__).resolve().parent
INPUT_NAME = "images"
OUTPUT_NAME = "output0"
LEVELS: tuple[tuple[int, int], ...] = ((8, data.INPUT_SIZE // 8), (16, data.INPUT_SIZE // 16))
"""(stride, grid size) of each output level, in output order."""

F32Array = npt.NDArray[np.float32]


def anchors() -> tuple[F32Array, F32Array]:
    """Cell centres ``(N, 2)`` (x, y pixels) and strides ``(N,)`` in the model's output order."""
    pts, strides = [], []
    for stride, g in LEVELS:
        ys, xs = np.meshgrid(np.arange(g), np.arange(g), indexing="ij")
        pts.append(np.stack([(xs.reshape(-1) + 0.5) * stride, (ys.reshape(-1) + 0.5) * stride], -1))
        strides.append(np.full(g * g, stride, np.float32))
    return np.concatenate(pts).astype(np.float32), np.concatenate(strides)


def assign_targets(boxes: list[F32Array], n_classes: int) -> F32Array:
    """Training targets ``(B, N, 4 + C + 1)``: box ``cx, cy, w, h``, one-hot class, positive mask."""
    pts, strides = anchors()
    n = len(pts)
    out = np.zeros((len(boxes), n, 5 + n_classes), np.float32)
    for b, gt in enumerate(boxes):
        best_area = np.full(n, np.inf)
        for cls, x1, y1, x2, y2 in gt:
            w, h = x2 - x1, y2 - y1
            side = max(w, h)
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            levels = [s for s, lo, hi in ((8, 0, 48), (16, 28, 1e9)) if lo <= side <= hi]
            on_level = np.isin(strides, levels)
            inside = (pts[:, 0] > x1) & (pts[:, 0] < x2) & (pts[:, 1] > y1) & (pts[:, 1] < y2)
            near = (np.abs(pts[:, 0] - cx) <= 2.5 * strides) & (np.abs(pts[:, 1] - cy) <= 2.5 * strides)
            home = (np.abs(pts[:, 0] - cx) <= strides / 2) & (np.abs(pts[:, 1] - cy) <= strides / 2)
            pos = on_level & ((inside & near) | home)
            area = w * h
            take = pos & (area < best_area)
            best_area[take] = area
            out[b, take, :4] = (cx, cy, w, h)
            out[b, take, 4 : 4 + n_classes] = 0
            out[b, take, 4 + int(cls)] = 1
            out[b, take, -1] = 1
    return out


def build_model(n_classes: int) -> tuple[Any, Any]:
    """``(train_model, export_model)`` sharing weights.

    The training model outputs ``(B, N, 4 + C)``: decoded boxes and class *logits*; the export
    model outputs ``(B, 4 + C, N)``: boxes and sigmoid scores (YOLOv8 layout).
    """
    import keras
    from keras import layers, ops

    s = data.INPUT_SIZE
    inp = keras.Input((s, s, 3), name=INPUT_NAME)
    x = layers.Rescaling(4.0, offset=-2.0)(inp)  # 0..1 -> -2..2

    def cbr(t: Any, f: int, k: int = 3, stride: int = 1) -> Any:
        t = layers.Conv2D(f, k, strides=stride, padding="same", use_bias=False)(t)
        t = layers.BatchNormalization(momentum=0.97)(t)
        return layers.ReLU()(t)

    x = cbr(x, 16, stride=2)
    x = cbr(x, 32, stride=2)
    x = cbr(x, 32)
    p3 = cbr(cbr(x, 64, stride=2), 64)
    p4 = cbr(cbr(p3, 96, stride=2), 96)
    up = layers.UpSampling2D(2, interpolation="nearest")(p4)
    p3 = cbr(layers.Concatenate()([p3, up]), 64, k=1)
    prior = float(-np.log((1 - 0.01) / 0.01))
    boxes, logits = [], []
    for feat, (stride, g) in zip((p3, p4), LEVELS, strict=True):
        bf = cbr(feat, 48)
        raw = layers.Conv2D(4, 1)(bf)
        cf = cbr(feat, 48)
        cl = layers.Conv2D(n_classes, 1, bias_initializer=keras.initializers.Constant(prior))(cf)
        raw = layers.Reshape((g * g, 4))(raw)
        cl = layers.Reshape((g * g, n_classes))(cl)
        ys, xs = np.meshgrid(np.arange(g), np.arange(g), indexing="ij")
        centre = np.stack([(xs.reshape(-1) + 0.5) * stride, (ys.reshape(-1) + 0.5) * stride], -1)
        centre = centre[None].astype(np.float32)  # (1, g*g, 2)
        dist = ops.softplus(raw) * float(stride)  # left, top, right, bottom
        lt, rb = dist[..., 0:2], dist[..., 2:4]  # each slice once: tf2onnx would merge repeats
        cxcy = (rb - lt) * 0.5 + centre
        wh = lt + rb
        boxes.append(ops.concatenate([cxcy, wh], axis=-1))
        logits.append(cl)
    box = ops.concatenate(boxes, axis=1)
    logit = ops.concatenate(logits, axis=1)
    train_out = ops.concatenate([box, logit], axis=-1)
    export_out = ops.transpose(ops.concatenate([box, ops.sigmoid(logit)], axis=-1), (0, 2, 1))
    train_model = keras.Model(inp, train_out, name="shapes_detector_train")
    export_model = keras.Model(inp, export_out, name="shapes_detector")
    return train_model, export_model


def make_loss(n_classes: int, box_weight: float = 2.5, alpha: float = 0.25, gamma: float = 2.0) -> Any:
    """Sigmoid focal loss (classes) + GIoU loss (boxes), both normalised by the positives."""
    from keras import ops

    def loss(y_true: Any, y_pred: Any) -> Any:
        mask = y_true[..., -1]
        num_pos = ops.maximum(ops.sum(mask), 1.0)
        t_cls = y_true[..., 4 : 4 + n_classes]
        logit = y_pred[..., 4:]
        p = ops.sigmoid(logit)
        ce = ops.maximum(logit, 0.0) - logit * t_cls + ops.log1p(ops.exp(-ops.abs(logit)))
        p_t = p * t_cls + (1 - p) * (1 - t_cls)
        a_t = alpha * t_cls + (1 - alpha) * (1 - t_cls)
        cls_loss = ops.sum(a_t * ops.power(1 - p_t, gamma) * ce) / num_pos

        def corners(b: Any) -> tuple[Any, Any, Any, Any]:
            return (
                b[..., 0] - b[..., 2] / 2,
                b[..., 1] - b[..., 3] / 2,
                b[..., 0] + b[..., 2] / 2,
                b[..., 1] + b[..., 3] / 2,
            )

        px1, py1, px2, py2 = corners(y_pred[..., :4])
        tx1, ty1, tx2, ty2 = corners(y_true[..., :4])
        iw = ops.maximum(ops.minimum(px2, tx2) - ops.maximum(px1, tx1), 0.0)
        ih = ops.maximum(ops.minimum(py2, ty2) - ops.maximum(py1, ty1), 0.0)
        inter = iw * ih
        union = (px2 - px1) * (py2 - py1) + (tx2 - tx1) * (ty2 - ty1) - inter + 1e-6
        iou = inter / union
        cw = ops.maximum(px2, tx2) - ops.minimum(px1, tx1)
        ch = ops.maximum(py2, ty2) - ops.minimum(py1, ty1)
        hull = cw * ch + 1e-6
        giou = iou - (hull - union) / hull
        box_loss = ops.sum(mask * (1.0 - giou)) / num_pos
        return cls_loss + box_weight * box_loss

    return loss


def detect(session: Any, images: F32Array, conf: float = 0.01) -> list[dict[str, Any]]:
    """Run an ORT session image by image and decode with the runtime's YoloDecoder."""
    from edge_runtime.decoders import YoloDecoder, YoloSpec

    dec = YoloDecoder(
        YoloSpec(layout="v8", normalized=False, conf_threshold=conf, max_detections=100), data.CLASSES
    )
    name = session.get_inputs()[0].name
    return [dec.decode(session.run(None, {name: images[i : i + 1]}), None) for i in range(len(images))]


def evaluate_onnx(path: Path, images: F32Array, boxes: list[F32Array], threads: int = 2) -> float:
    """mAP@0.5 of an ONNX detector on ``images`` (model inputs) against ``boxes``."""
    from converters.detection_metrics import map50
    from converters.model_stats import make_session

    preds = detect(make_session(path, threads), images)
    return map50(preds, boxes, len(data.CLASSES))


def int8_comparison(
    fp32: Path,
    out_dir: Path,
    calib: F32Array,
    eval_x: F32Array,
    eval_boxes: list[F32Array],
    rounds: int = 200,
) -> dict[str, Any]:
    """Quantize ``fp32`` (QDQ, U8S8, per-channel, MinMax) two ways and measure against it.

    ``int8_full`` quantizes every op; ``int8_float_tail`` keeps the decode tail (everything
    after the last convolutions: softplus/box arithmetic, sigmoid, concat, transpose) in
    float, because boxes (0..128 px) and scores (0..1) share the one output tensor and one
    uint8 scale cannot represent both (scores would be quantized in steps of about 0.5).
    Returns mAP, latency (interleaved medians and paired ratios, 2 and 1 threads) and the
    excluded nodes.
    """
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from converters.model_stats import compare_latency

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self, name: str) -> None:
            self.it = iter([{name: calib[i : i + 1]} for i in range(len(calib))])

        def get_next(self) -> dict[str, F32Array] | None:
            return next(self.it, None)

    pre = out_dir / "model.pre.onnx"
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    model = onnx.load(str(pre))
    name = model.graph.input[0].name
    tail = _tail_nodes(model)
    results: dict[str, Any] = {"excluded_tail_nodes": tail}
    variants = {"int8_full": [], "int8_float_tail": tail}
    for key, exclude in variants.items():
        dst = out_dir / f"model.{key}.onnx"
        quantize_static(
            str(pre),
            str(dst),
            Reader(name),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            nodes_to_exclude=exclude,
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
        results[key] = {"map50": evaluate_onnx(dst, eval_x, eval_boxes), "bytes": dst.stat().st_size}
    results["fp32"] = {"map50": evaluate_onnx(fp32, eval_x, eval_boxes), "bytes": fp32.stat().st_size}
    paths = {key: out_dir / f"model.{key}.onnx" for key in variants}
    for threads in (2, 1):  # 2 threads as asked; 1 thread is the robust figure on a busy machine
        lat = compare_latency({"fp32": fp32, **paths}, threads=threads, rounds=rounds, warmup=5, repeat=3)
        for key, v in lat.items():
            suffix = "" if threads == 2 else "_t1"
            results[key][f"latency_ms{suffix}"] = v["median_ms"]
            results[key][f"speedup_vs_fp32{suffix}"] = v["speedup"]
            results[key][f"speedup_vs_fp32_paired{suffix}"] = v["speedup_paired"]
    pre.unlink(missing_ok=True)
    return results


def canonical_onnx(path: Path) -> None:
    """Make an exported ONNX file canonical, in place: same graph, same bytes on every run.

    tf2onnx's node order, the counters in the names it generates (``Transpose__85``) and the
    name kept when it merges equal constants vary from run to run even with
    ``PYTHONHASHSEED=0``. Here nodes are put in a topological order decided by their
    structure (op type, canonical input names, attributes, given name), generated names are
    renumbered in that order and every initializer is named after its first consumer
    (``node/inputK``).
    """
    import heapq
    import re

    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    generated = re.compile(r"__\d+(:\d+)?$")
    keep_names = {o.name for o in graph.output} | {i.name for i in graph.input}
    nodes = list(graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    users: dict[int, list[int]] = {}
    waiting = []
    for i, n in enumerate(nodes):
        deps_i = {producer[x] for x in n.input if x in producer}
        waiting.append(len(deps_i))
        for j in deps_i:
            users.setdefault(j, []).append(i)
    tensor: dict[str, str] = {}

    def key(i: int) -> tuple[str, tuple[str, ...], bytes, str, int]:
        n = nodes[i]
        attrs = b"".join(a.SerializeToString() for a in n.attribute)
        given = "" if generated.search(n.name) else n.name
        return (n.op_type, tuple(tensor.get(x, x) for x in n.input), attrs, given, i)

    ready = [key(i) for i in range(len(nodes)) if waiting[i] == 0]
    heapq.heapify(ready)
    ordered = []
    counter = 0
    while ready:
        i = heapq.heappop(ready)[-1]
        n = nodes[i]
        if generated.search(n.name):
            n.name = f"{n.op_type}__c{counter}"
            counter += 1
        for k, o in enumerate(n.output):
            if o and o not in keep_names and generated.search(o):
                tensor[o] = f"{n.name}:{k}"
        n.output[:] = [tensor.get(o, o) for o in n.output]
        ordered.append(n)
        for j in users.get(i, []):
            waiting[j] -= 1
            if waiting[j] == 0:
                heapq.heappush(ready, key(j))
    for n in ordered:
        n.input[:] = [tensor.get(x, x) for x in n.input]
    del graph.node[:]
    graph.node.extend(ordered)
    del graph.value_info[:]
    inits = {t.name for t in graph.initializer}
    rename: dict[str, str] = {}
    for node in graph.node:
        for idx, name in enumerate(node.input):
            if name in inits and name not in rename:
                rename[name] = f"{node.name}/input{idx}"
    for node in graph.node:
        node.input[:] = [rename.get(n, n) for n in node.input]
    sorted_inits = sorted(graph.initializer, key=lambda t: rename.get(t.name, t.name))
    for t in sorted_inits:
        t.name = rename.get(t.name, t.name)
    del graph.initializer[:]
    graph.initializer.extend(sorted_inits)
    onnx.checker.check_model(model, full_check=True)
    path.write_bytes(model.SerializeToString())


def _tail_nodes(model: Any) -> list[str]:
    """Names of the nodes downstream of the last Conv nodes (the decode tail)."""
    consumers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    last_convs = [
        n
        for n in model.graph.node
        if n.op_type == "Conv"
        and not any(c.op_type == "Conv" for o in n.output for c in _downstream_nodes(o, consumers))
    ]
    tail: dict[str, None] = {}
    for conv in last_convs:
        for o in conv.output:
            for n in _downstream_nodes(o, consumers):
                tail[n.name] = None
    return list(tail)


def _downstream_nodes(name: str, consumers: dict[str, list[Any]]) -> list[Any]:
    seen: dict[int, Any] = {}
    todo = [name]
    while todo:
        for n in consumers.get(todo.pop(), []):
            if id(n) not in seen:
                seen[id(n)] = n
                todo.extend(n.output)
    return list(seen.values())


def main(argv: list[str] | None = None) -> int:
    """Train, export, evaluate (and optionally quantize); prints a summary."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE / "build", help="output directory")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--train", type=int, default=3200, help="training images")
    ap.add_argument("--val", type=int, default=300, help="validation images")
    ap.add_argument("--eval", type=int, default=500, help="held-out evaluation images")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--int8", action="store_true", help="also quantize to int8 and compare")
    args = ap.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    t_start = time.perf_counter()
    deterministic = seed_everything(args.seed)
    import keras

    n_cls = len(data.CLASSES)
    x_train, b_train = data.make_dataset(args.train, args.seed + 1)
    x_val, b_val = data.make_dataset(args.val, args.seed + 2)
    x_eval, b_eval = data.make_eval_set(args.eval)
    y_train = assign_targets(b_train, n_cls)
    y_val = assign_targets(b_val, n_cls)
    t_data = time.perf_counter() - t_start

    train_model, export_model = build_model(n_cls)
    steps = args.epochs * int(np.ceil(args.train / args.batch))
    lr = keras.optimizers.schedules.CosineDecay(3e-3, steps, alpha=0.02, warmup_target=None)
    train_model.compile(optimizer=keras.optimizers.Adam(lr), loss=make_loss(n_cls))
    t0 = time.perf_counter()
    hist = train_model.fit(
        data.to_input(x_train),
        y_train,
        validation_data=(data.to_input(x_val), y_val),
        epochs=args.epochs,
        batch_size=args.batch,
        shuffle=True,
        verbose=2,
    )
    t_train = time.perf_counter() - t0

    onnx_path = out / "model.onnx"
    shape = (1, data.INPUT_SIZE, data.INPUT_SIZE, 3)
    route = export_onnx(export_model, onnx_path, shape, INPUT_NAME, OUTPUT_NAME)
    canonical_onnx(onnx_path)
    ex = data.to_input(x_eval)
    keras_out = export_model.predict(ex[:16], verbose=0)
    from converters.model_stats import make_session, onnx_stats

    sess = make_session(onnx_path, threads=2)
    onnx_out = np.concatenate([sess.run(None, {INPUT_NAME: ex[i : i + 1]})[0] for i in range(16)])
    map_val = evaluate_onnx(onnx_path, data.to_input(x_val), b_val)
    map_eval = evaluate_onnx(onnx_path, ex, b_eval)
    (out / "labels.txt").write_text("\n".join(data.CLASSES) + "\n", encoding="utf-8")
    np.savez_compressed(
        out / "eval.npz",
        images=x_eval,
        boxes=np.concatenate([np.c_[np.full(len(b), i), b] for i, b in enumerate(b_eval)]).astype(np.float32),
    )
    stats = onnx_stats(onnx_path)
    metrics: dict[str, Any] = {
        "model": "shapes-detector",
        "task": "detection",
        "classes": list(data.CLASSES),
        "input": {
            "name": INPUT_NAME,
            "shape": list(shape),
            "dtype": "float32",
            "layout": "nhwc",
            "color": "rgb",
        },
        "output": {
            "name": OUTPUT_NAME,
            "shape": [1, 4 + n_cls, int(sum(g * g for _, g in LEVELS))],
            "meaning": "YOLOv8 layout: cx, cy, w, h (input pixels), per-class sigmoid scores",
            "decoder": {"kind": "yolo", "layout": "v8", "normalized": False},
        },
        "seed": args.seed,
        "op_determinism": deterministic,
        "samples": {"train": args.train, "val": args.val, "eval": args.eval},
        "epochs": args.epochs,
        "params": stats.params,
        "macs": stats.macs,
        "final_loss": float(hist.history["loss"][-1]),
        "final_val_loss": float(hist.history["val_loss"][-1]),
        "val_map50": map_val,
        "eval_map50": map_eval,
        "export": {
            "onnx": route,
            "onnx_bytes": onnx_path.stat().st_size,
            "max_abs_diff_vs_keras": float(np.max(np.abs(onnx_out - keras_out))),
        },
        "timings_s": {"data": round(t_data, 1), "train": round(t_train, 1)},
        "versions": tool_versions(),
    }
    if args.int8:
        calib = data.to_input(data.make_dataset(128, args.seed + 4)[0])
        metrics["int8"] = int8_comparison(onnx_path, out, calib, ex, b_eval)
    metrics["timings_s"]["total"] = round(time.perf_counter() - t_start, 1)
    write_json(out / "metrics.json", metrics)
    print(
        f"detector: mAP@0.5 {map_eval:.4f} on {args.eval} eval images (val {map_val:.4f}); "
        f"train {t_train:.1f} s, total {metrics['timings_s']['total']} s; wrote {out}"
    )
    if args.int8:
        for key in ("fp32", "int8_full", "int8_float_tail"):
            r = metrics["int8"][key]
            print(
                f"  {key}: mAP@0.5 {r['map50']:.4f}; 2 threads {r['latency_ms']:.3f} ms "
                f"(x{r['speedup_vs_fp32']:.2f}, paired x{r['speedup_vs_fp32_paired']:.2f}); "
                f"1 thread {r['latency_ms_t1']:.3f} ms (x{r['speedup_vs_fp32_t1']:.2f})"
            )
    return 0


if __name__ == "__main__":
    if os.environ.get("PYTHONHASHSEED") != "0":
        # tf2onnx iterates sets of node names: pin str hashing for a reproducible ONNX file
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    raise SystemExit(main())
