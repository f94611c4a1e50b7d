"""Pruning: real ONNX graphs (BN, residual Add, depthwise, Concat, NHWC Flatten -> Gemm) and Keras.

The strongest checks are exact: channels whose filters (and biases) are zero contribute
nothing, so pruning exactly those must leave the model's outputs unchanged - and it only
does if every dependent tensor (BN, depthwise, residual partner, concat offset, flattened
NHWC columns) was sliced at the right indices.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from converters.model_stats import onnx_stats
from converters.prune_onnx import channel_prune_onnx, magnitude_prune_onnx
from edge_runtime.errors import CalibrationError, ConversionError

H = 16  # input height/width of the ONNX test models


def _f32(name: str, a: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(a, np.float32), name)


def _save(path: Path, nodes: list, inputs: list, outputs: list, inits: list) -> Path:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def build_rich(
    path: Path,
    c1: int = 8,
    c2: int = 8,
    c4: int = 6,
    c5: int = 4,
    g: int = 12,
    zero: dict[str, list[int]] | None = None,
    seed: int = 0,
) -> Path:
    """conv1-BN-ReLU (+ conv2-ReLU-conv3 residual Add) -> depthwise -> conv4 | conv5 -> Concat ->
    MaxPool -> Transpose to NHWC -> Reshape [1, F] -> Gemm(transB) -> ReLU -> MatMul + Add.

    ``zero`` names channels to make exactly dead: ``res`` (conv1/BN/conv3/depthwise, the
    residual group), ``c2``, ``c4``, ``c5`` (filters and biases) and ``g`` (Gemm rows).
    """
    rng = np.random.default_rng(seed)
    z = zero or {}

    def w(*shape: int) -> np.ndarray:
        return rng.normal(0, 0.4, shape)

    w1, b1 = w(c1, 3, 3, 3), w(c1)
    gamma, beta = rng.uniform(0.5, 1.5, c1), w(c1)
    mean, var = w(c1) * 0.1, rng.uniform(0.5, 1.5, c1)
    w2, b2 = w(c2, c1, 3, 3), w(c2)
    w3, b3 = w(c1, c2, 3, 3), w(c1)
    wd, bd = w(c1, 1, 3, 3), w(c1)
    w4, b4 = w(c4, c1, 1, 1), w(c4)
    w5, b5 = w(c5, c1, 3, 3), w(c5)
    feats = (H // 2) * (H // 2) * (c4 + c5)
    wg, bg = rng.normal(0, 0.05, (g, feats)), w(g)
    wo, bo = w(g, 5), w(5)
    for c in z.get("res", []):
        w1[c], b1[c], beta[c], mean[c] = 0, 0, 0, 0
        w3[c], b3[c], bd[c] = 0, 0, 0
    for c in z.get("c2", []):
        w2[c], b2[c] = 0, 0
    for c in z.get("c4", []):
        w4[c], b4[c] = 0, 0
    for c in z.get("c5", []):
        w5[c], b5[c] = 0, 0
    for c in z.get("g", []):
        wg[c], bg[c] = 0, 0
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("BatchNormalization", ["c1", "gamma", "beta", "mean", "var"], ["bn1"], name="bn1"),
        helper.make_node("Relu", ["bn1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], pads=[1, 1, 1, 1], name="conv3"),
        helper.make_node("Add", ["r1", "c3"], ["res"], name="residual"),
        helper.make_node("Conv", ["res", "wd", "bd"], ["dw"], pads=[1, 1, 1, 1], group=c1, name="dw"),
        helper.make_node("Relu", ["dw"], ["rdw"]),
        helper.make_node("Conv", ["rdw", "w4", "b4"], ["c4"], name="conv4"),
        helper.make_node("Relu", ["c4"], ["r4"]),
        helper.make_node("Conv", ["res", "w5", "b5"], ["c5"], pads=[1, 1, 1, 1], name="conv5"),
        helper.make_node("Relu", ["c5"], ["r5"]),
        helper.make_node("Concat", ["r4", "r5"], ["cat"], axis=1),
        helper.make_node("MaxPool", ["cat"], ["mp"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Transpose", ["mp"], ["nhwc"], perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", ["nhwc", "shape"], ["flat"]),
        helper.make_node("Gemm", ["flat", "wg", "bg"], ["gm"], transB=1, name="gemm"),
        helper.make_node("Relu", ["gm"], ["rg"]),
        helper.make_node("MatMul", ["rg", "wo"], ["mm"], name="head"),
        helper.make_node("Add", ["mm", "bo"], ["logits"]),
    ]
    inits = [
        _f32(n, a)
        for n, a in [
            ("w1", w1), ("b1", b1), ("gamma", gamma), ("beta", beta), ("mean", mean), ("var", var),
            ("w2", w2), ("b2", b2), ("w3", w3), ("b3", b3), ("wd", wd), ("bd", bd), ("w4", w4),
            ("b4", b4), ("w5", w5), ("b5", b5), ("wg", wg), ("bg", bg), ("wo", wo), ("bo", bo),
        ]
    ]  # fmt: skip
    inits.append(numpy_helper.from_array(np.array([1, feats], np.int64), "shape"))
    return _save(
        path,
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, H, H])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 5])],
        inits,
    )


def _run(path: Path, x: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [np.asarray(o) for o in sess.run(None, {sess.get_inputs()[0].name: x})]


def _inputs(n: int = 3, shape: tuple[int, ...] = (1, 3, H, H)) -> list[np.ndarray]:
    rng = np.random.default_rng(42)
    return [rng.uniform(-1, 1, shape).astype(np.float32) for _ in range(n)]


# ratio 0.25: res 8 -> 6, c2 8 -> 6, c4 6 -> 4 (round(1.5) = 2 removed), c5 4 -> 3, g 12 -> 9
DEAD = {"res": [1, 6], "c2": [0, 5], "c4": [2, 3], "c5": [1], "g": [0, 4, 11]}


def test_pruning_exactly_dead_channels_keeps_outputs_and_matches_a_small_model(tmp_path: Path) -> None:
    src = build_rich(tmp_path / "rich.onnx", zero=DEAD)
    dst = tmp_path / "pruned.onnx"
    report = channel_prune_onnx(src, dst, 0.25)
    onnx.checker.check_model(onnx.load(dst), full_check=True)
    for x in _inputs():
        ref, out = _run(src, x)[0], _run(dst, x)[0]
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    # exactly the dead channels went: the result has the size of a model built that small
    small = onnx_stats(build_rich(tmp_path / "small.onnx", c1=6, c2=6, c4=4, c5=3, g=9))
    assert report.params_after == small.params
    assert report.macs_after == small.macs
    assert report.params_before == onnx_stats(src).params > small.params
    assert report.file_bytes_after < report.file_bytes_before
    rows = {r.name: r for r in report.layers}
    assert (rows["conv1"].channels_before, rows["conv1"].channels_after) == (8, 6)
    assert (rows["conv3"].channels_after, rows["dw"].channels_after) == (6, 6)
    assert (rows["conv4"].channels_after, rows["conv5"].channels_after, rows["gemm"].channels_after) == (
        4,
        3,
        9,
    )
    skipped = {s.name: s.reason for s in report.skipped}
    assert set(skipped) == {"head"} and "graph output" in skipped["head"]
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-4


def test_residual_group_is_pruned_with_the_same_indices(tmp_path: Path) -> None:
    src = build_rich(tmp_path / "rich.onnx", seed=3)
    dst = tmp_path / "pruned.onnx"
    report = channel_prune_onnx(src, dst, 0.5)
    orig = {t.name: numpy_helper.to_array(t) for t in onnx.load(src).graph.initializer}
    model = onnx.load(dst)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    node = {n.name: n for n in model.graph.node}

    def new(layer: str, i: int) -> np.ndarray:
        return inits[node[layer].input[i]]

    def kept(original: np.ndarray, pruned: np.ndarray) -> list[int]:
        return [int(np.flatnonzero(original == v)[0]) for v in pruned]

    k1 = kept(orig["b1"], new("conv1", 2))
    assert len(k1) == 4 and k1 == sorted(k1)
    # every member and follower of the residual group keeps the same channel indices
    assert kept(orig["b3"], new("conv3", 2)) == k1
    assert kept(orig["gamma"], new("bn1", 1)) == k1
    assert kept(orig["bd"], new("dw", 2)) == k1
    assert int(next(a.i for a in node["dw"].attribute if a.name == "group")) == 4
    k2 = kept(orig["b2"], new("conv2", 2))
    k5 = kept(orig["b5"], new("conv5", 2))
    np.testing.assert_array_equal(new("conv3", 1), orig["w3"][k1][:, k2])
    np.testing.assert_array_equal(new("conv2", 1), orig["w2"][k2][:, k1])
    np.testing.assert_array_equal(new("conv5", 1), orig["w5"][k5][:, k1])
    for x in _inputs(2):
        assert np.isfinite(_run(dst, x)[0]).all()
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-3


def _two_conv_model(path: Path, w1: np.ndarray, b1: np.ndarray, k2: int) -> Path:
    """conv1 (3x3, pad 1) -> ReLU -> conv2 (k2 x k2, same padding) -> ReLU -> GAP -> MatMul."""
    rng = np.random.default_rng(7)
    c1 = w1.shape[0]
    w2, b2 = rng.normal(0, 0.5, (8, c1, k2, k2)), rng.normal(0, 0.3, 8)
    wg = rng.normal(0, 0.5, (8, 3))
    p = k2 // 2
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[p, p, p, p], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["f"]),
        helper.make_node("MatMul", ["f", "wg"], ["y"], name="head"),
    ]
    return _save(
        path,
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, H, H])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [_f32("w1", w1), _f32("b1", b1), _f32("w2", w2), _f32("b2", b2), _f32("wg", wg)],
    )


@pytest.mark.parametrize("compensate", ["mean", "refit"])
def test_constant_channels_are_removed_exactly_with_compensation(tmp_path: Path, compensate: str) -> None:
    # conv1 channels 1 and 4 are constant (zero filter, positive bias): their activations have
    # no variance, so they are the least important; moving their constant contribution into
    # conv2's bias keeps the function exactly (conv2 is 1x1, so there is no border effect)
    rng = np.random.default_rng(0)
    w1, b1 = rng.normal(0, 0.5, (6, 3, 3, 3)), rng.normal(0, 0.3, 6)
    w1[[1, 4]] = 0
    b1[[1, 4]] = [0.7, 1.3]
    src = _two_conv_model(tmp_path / "m.onnx", w1, b1, k2=1)
    calib = np.concatenate(_inputs(16))  # (16, 3, H, H): samples with their batch axis
    dst = tmp_path / "p.onnx"
    report = channel_prune_onnx(src, dst, 1 / 3, calib_inputs=calib, skip=["conv2"], compensate=compensate)
    rows = {r.name: r for r in report.layers}
    assert rows["conv1"].channels_after == 4 and rows["conv2"].channels_after == 8
    assert {s.name: s.reason for s in report.skipped}["conv2"] == "listed in skip"
    assert ("least squares" if compensate == "refit" else "means folded") in report.importance
    for x in _inputs(2):
        np.testing.assert_allclose(_run(dst, x)[0], _run(src, x)[0], rtol=1e-4, atol=1e-4)
    # without compensation the constant channels' contribution is lost
    channel_prune_onnx(
        src, tmp_path / "nc.onnx", 1 / 3, calib_inputs=calib, skip=["conv2"], compensate="none"
    )
    x = _inputs(1)[0]
    assert not np.allclose(_run(tmp_path / "nc.onnx", x)[0], _run(src, x)[0], atol=1e-3)


def test_refit_recovers_a_channel_that_is_a_multiple_of_a_kept_one(tmp_path: Path) -> None:
    # channel 4 = 0.05 x channel 1 (ReLU is positively homogeneous): it is the weakest, and a
    # 3x3 consumer with zero padding can absorb it exactly by refitting channel 1's weights;
    # folding its mean into the bias cannot (it varies with the input)
    rng = np.random.default_rng(0)
    w1, b1 = rng.normal(0, 0.5, (6, 3, 3, 3)), rng.normal(0, 0.3, 6)
    w1[4], b1[4] = 0.05 * w1[1], 0.05 * b1[1]
    src = _two_conv_model(tmp_path / "m.onnx", w1, b1, k2=3)
    calib = rng.uniform(-1, 1, (64, 3, H, H)).astype(np.float32)
    errors = {}
    for mode in ("refit", "mean"):
        dst = tmp_path / f"{mode}.onnx"
        report = channel_prune_onnx(src, dst, 1 / 6, calib_inputs=calib, skip=["conv2"], compensate=mode)
        assert {r.name: r.channels_after for r in report.layers}["conv1"] == 5
        w = {t.name: numpy_helper.to_array(t) for t in onnx.load(dst).graph.initializer}
        node = {n.name: n for n in onnx.load(dst).graph.node}
        kept_b = w[node["conv1"].input[2]]
        assert not np.isclose(kept_b, b1[4]).any()  # channel 4 is the one removed
        errors[mode] = max(
            float(np.max(np.abs(_run(dst, x)[0] - _run(src, x)[0])))
            for x in [rng.uniform(-1, 1, (1, 3, H, H)).astype(np.float32) for _ in range(3)]
        )
    assert errors["refit"] < 1e-3
    assert errors["mean"] > 10 * errors["refit"]


def test_unsafe_consumers_leave_producers_alone_and_the_model_unchanged(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)

    def w(*shape: int) -> onnx.TensorProto:
        return rng.normal(0, 0.5, shape)

    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["a"], pads=[1, 1, 1, 1], name="convA"),
        helper.make_node("Add", ["a", "x"], ["ax"]),  # joined with the graph input
        helper.make_node("Conv", ["ax", "wa2"], ["ya"], name="convA2"),
        helper.make_node("Conv", ["x", "wb"], ["b"], name="convB"),
        helper.make_node("Split", ["b", "split"], ["b1", "b2"], axis=1),
        helper.make_node("Concat", ["b2", "b1"], ["bs"], axis=1),
        helper.make_node("Conv", ["bs", "wb2"], ["yb"], name="convB2"),
        helper.make_node("Conv", ["x", "wc"], ["c"], name="convC"),
        helper.make_node("Softmax", ["c"], ["cs"], axis=1),
        helper.make_node("Conv", ["cs", "wc2"], ["yc"], name="convC2"),
    ]
    inits = [
        _f32("wa", w(4, 4, 3, 3)), _f32("ba", w(4)), _f32("wa2", w(2, 4, 1, 1)), _f32("wb", w(6, 4, 1, 1)),
        numpy_helper.from_array(np.array([3, 3], np.int64), "split"), _f32("wb2", w(2, 6, 1, 1)),
        _f32("wc", w(4, 4, 1, 1)), _f32("wc2", w(2, 4, 1, 1)),
    ]  # fmt: skip
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2, 8, 8]) for n in ("ya", "yb", "yc")]
    src = _save(
        tmp_path / "u.onnx",
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        outs,
        inits,
    )
    report = channel_prune_onnx(src, tmp_path / "p.onnx", 0.5)
    reasons = {s.name: s.reason for s in report.skipped}
    assert "not pruned along" in reasons["convA"]
    assert "Split" in reasons["convB"]
    assert "Softmax" in reasons["convC"] and "across channels" in reasons["convC"]
    assert all("graph output" in reasons[n] for n in ("convA2", "convB2", "convC2"))
    assert report.params_after == report.params_before
    x = _inputs(1, (1, 4, 8, 8))[0]
    for a, b in zip(_run(src, x), _run(tmp_path / "p.onnx", x), strict=True):
        np.testing.assert_array_equal(a, b)


def test_round_to_keeps_multiples_and_bad_arguments_raise(tmp_path: Path) -> None:
    src = build_rich(tmp_path / "rich.onnx", c1=16, c2=16, c4=16, c5=8, g=24)
    report = channel_prune_onnx(src, tmp_path / "p.onnx", 0.3, round_to=4)
    after = {r.name: r.channels_after for r in report.layers}
    assert after["conv1"] == 12 and after["conv2"] == 12 and after["conv5"] == 8 and after["gemm"] == 20
    with pytest.raises(ConversionError, match="ratio"):
        channel_prune_onnx(src, tmp_path / "x.onnx", 1.0)
    with pytest.raises(ConversionError, match="does not exist"):
        channel_prune_onnx(tmp_path / "missing.onnx", tmp_path / "x.onnx", 0.3)
    with pytest.raises(ConversionError, match="calib_inputs has shape"):
        channel_prune_onnx(src, tmp_path / "x.onnx", 0.3, calib_inputs=np.zeros((2, 5), np.float32))


def test_magnitude_pruning_hits_the_sparsity_and_compresses(tmp_path: Path) -> None:
    src = build_rich(tmp_path / "rich.onnx", c1=16, c2=16, c4=16, c5=8, g=24)
    dst = tmp_path / "sparse.onnx"
    report = magnitude_prune_onnx(src, dst, 0.6)
    skipped = {s.name: s.reason for s in report.skipped}
    assert "first layer" in skipped["conv1"] and "last layer" in skipped["head"]
    assert "depthwise" in skipped["dw"]
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(dst).graph.initializer}
    conv = {n.name: n for n in onnx.load(dst).graph.node}
    for name in ("conv2", "conv3", "conv4", "conv5", "gemm"):
        wt = inits[conv[name].input[1]]
        assert np.sum(wt == 0) == int(0.6 * wt.size), name
        assert np.count_nonzero(inits[conv[name].input[2]]) == inits[conv[name].input[2]].size  # biases kept
    assert np.count_nonzero(inits[conv["conv1"].input[1]]) == inits[conv["conv1"].input[1]].size
    assert report.sparsity == pytest.approx(0.6, abs=0.01)
    assert report.gzip_bytes_after < 0.75 * report.gzip_bytes_before
    assert report.params_after == report.params_before and report.macs_after == report.macs_before
    x = _inputs(1)[0]
    assert _run(dst, x)[0].shape == _run(src, x)[0].shape
    with pytest.raises(ConversionError, match="sparsity"):
        magnitude_prune_onnx(src, dst, 1.5)


# --------------------------------------------------------------------------- Keras


def _keras_model(c1: int = 8, c2: int = 6, d: int = 12, dead: bool = False) -> object:
    import keras
    from keras import layers

    keras.utils.set_random_seed(0)
    inp = keras.Input((12, 12, 3))
    x = layers.Conv2D(c1, 3, padding="same", use_bias=False, name="conv1")(inp)
    x = layers.BatchNormalization(name="bn1")(x)
    x = layers.ReLU()(x)
    y = layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
    y = layers.Conv2D(c1, 1, name="conv_res")(y)
    x = layers.Add()([x, y])
    x = layers.MaxPooling2D()(x)
    z = layers.Conv2D(c2, 3, padding="same", activation="relu", name="conv2")(x)
    x = layers.Concatenate()([x, z])
    x = layers.Flatten()(x)
    x = layers.Dense(d, activation="relu", name="dense")(x)
    out = layers.Dense(3, activation="softmax", name="out")(x)
    model = keras.Model(inp, out)
    rng = np.random.default_rng(1)
    for layer in model.layers:
        ws = [rng.normal(0, 0.3, w.shape).astype(np.float32) for w in layer.get_weights()]
        if layer.name == "bn1":
            ws[3] = np.abs(ws[3]) + 0.5  # variance
        layer.set_weights(ws)
    if dead:  # residual group channels 2 and 5, conv2 channel 1, dense units 0, 7, 9
        get = {la.name: la.get_weights() for la in model.layers}
        get["conv1"][0][..., [2, 5]] = 0
        get["bn1"][1][[2, 5]] = 0  # beta
        get["bn1"][2][[2, 5]] = 0  # moving mean
        get["dw"][1][[2, 5]] = 0
        get["conv_res"][0][..., [2, 5]] = 0
        get["conv_res"][1][[2, 5]] = 0
        get["conv2"][0][..., 1] = 0
        get["conv2"][1][1] = 0
        get["dense"][0][:, [0, 7, 9]] = 0
        get["dense"][1][[0, 7, 9]] = 0
        for name, ws in get.items():
            if ws:
                model.get_layer(name).set_weights(ws)
    return model


def test_keras_rebuild_prunes_dead_channels_exactly() -> None:
    from converters.prune_keras import channel_prune_keras

    model = _keras_model(dead=True)
    pruned, report = channel_prune_keras(model, 0.25)  # 8 -> 6, 6 -> 4 (round(1.5)=2: 1 dead + 1), 12 -> 9
    widths = {r.name: r.channels_after for r in report.layers}
    assert widths["conv1"] == widths["conv_res"] == widths["dw"] == 6
    assert widths["conv2"] == 4 and widths["dense"] == 9 and widths["out"] == 3
    assert pruned.count_params() == _keras_model(c1=6, c2=4, d=9).count_params()
    assert {s.name for s in report.skipped} == {"out"}
    x = np.random.default_rng(2).uniform(0, 1, (4, 12, 12, 3)).astype(np.float32)
    # conv2 lost one live channel too (4 of 6 kept): outputs change there, so compare the
    # model where conv2 keeps 5 (ratio 1/6 removes exactly the dead one)
    exact, _ = channel_prune_keras(model, 1 / 6 + 1e-9, skip=["dense"])
    np.testing.assert_allclose(exact.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    assert report.macs_after < report.macs_before and report.params_after < report.params_before


def test_keras_finetune_recovers_and_data_loader(tmp_path: Path) -> None:
    from converters.prune_keras import channel_prune_keras, finetune, load_finetune_data

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (96, 12, 12, 3)).astype(np.float32)
    y = (x[..., 0].mean(axis=(1, 2)) > x[..., 2].mean(axis=(1, 2))).astype(np.int64) + (
        x[..., 1].mean(axis=(1, 2)) > 0.5
    )
    pruned, _ = channel_prune_keras(_keras_model(), 0.3)
    hist = finetune(pruned, x, y, epochs=4, batch_size=16, learning_rate=3e-3)
    assert hist["loss"][-1] < hist["loss"][0]
    np.savez(tmp_path / "ft.npz", x=x, y=y)
    x2, y2 = load_finetune_data(tmp_path / "ft.npz")
    assert np.array_equal(x2, x) and np.array_equal(y2, y)
    np.savez(tmp_path / "bad.npz", images=x)
    with pytest.raises(CalibrationError, match="'x'"):
        load_finetune_data(tmp_path / "bad.npz")
    with pytest.raises(CalibrationError, match="labels"):
        finetune(pruned, x, y[:3])


def test_bn_statistics_are_reestimated_from_data() -> None:
    import keras

    from converters.prune_keras import reestimate_bn_statistics
    from converters.sources import quiet_tf

    rng = np.random.default_rng(3)
    x = rng.normal(2.0, 3.0, (300, 6, 6, 4)).astype(np.float32)
    with quiet_tf():
        model = keras.Sequential(
            [keras.Input((6, 6, 4)), keras.layers.BatchNormalization(momentum=0.99, name="bn0"),
             keras.layers.Conv2D(5, 3, name="conv"), keras.layers.BatchNormalization(name="bn1")]
        )  # fmt: skip
        bn0, bn1 = model.get_layer("bn0"), model.get_layer("bn1")
        assert reestimate_bn_statistics(model, x, samples=256) == 2
        # exactly the statistics of each layer's inputs over the first 256 samples
        np.testing.assert_allclose(bn0.moving_mean.numpy(), x[:256].mean(axis=(0, 1, 2)), rtol=1e-4)
        np.testing.assert_allclose(bn0.moving_variance.numpy(), x[:256].var(axis=(0, 1, 2)), rtol=1e-3)
        conv_in = (x[:256] - bn0.moving_mean.numpy()) / np.sqrt(bn0.moving_variance.numpy() + bn0.epsilon)
        conv_out = model.get_layer("conv")(conv_in).numpy()
        want = conv_out.mean(axis=(0, 1, 2))
        np.testing.assert_allclose(bn1.moving_mean.numpy(), want, rtol=1e-3, atol=1e-5)
        assert bn0.momentum == 0.99  # restored
        # in inference mode the first layer now standardizes the data
        y = bn0(x[:256], training=False).numpy()
        assert abs(float(y.mean())) < 1e-3 and abs(float(y.std()) - 1.0) < 1e-2
