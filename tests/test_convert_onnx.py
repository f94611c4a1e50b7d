"""Tests for the ONNX converter path with real models and real ONNX Runtime quantization.

Models: the committed, really trained 5-class shapes CNN (``models/demo/shapes/model.onnx``),
a quantization-hostile copy of it (one channel of the first conv scaled by 1e4 and the next
conv's matching input weights by 1e-4: identical in fp32, ruined by per-tensor int8
activations), and small graphs built with ``onnx.helper``. Evaluation data are fresh shapes
images from ``models/shapes/data.py`` (seeds never used in training). No TensorFlow.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import build_cnn_onnx, build_sensor_onnx
from onnx import TensorProto, helper, numpy_helper

from converters.calibration import (
    calibration_from_frames,
    load_calibration,
    model_input_spec,
    split_calibration,
)
from converters.evaluate import (
    SQNR_CAP_DB,
    DetectionTask,
    accuracy_drop,
    agreement,
    compare_latency,
    evaluate,
    run_model,
    sqnr_db,
)
from converters.onnx_quant import convert_fp16, prepare_onnx, quantize_onnx
from converters.sensitivity_onnx import fallback_onnx, per_layer_sqnr, rank_sensitivity
from converters.targets import estimate_onnx_cost, preflight, resolve_target
from converters.types import Artifact, CalibrationSet
from edge_runtime.errors import CalibrationError, ConversionError
from edge_runtime.preprocess_spec import ImagePreprocess, TensorPreprocess
from models.shapes import data as shapes_data

REPO = Path(__file__).resolve().parent.parent
DEMO_ONNX = REPO / "models" / "demo" / "shapes" / "model.onnx"
SPEC = ImagePreprocess(resize="stretch", interpolation="area", color="rgb", layout="nhwc", scale=1 / 255)
VNNI = resolve_target("x86-vnni")
CONV1 = "shapes_cnn_1/conv2d_1/BiasAdd"
CONV2 = "shapes_cnn_1/conv2d_1_2/BiasAdd"


@pytest.fixture(scope="module")
def shapes_sets() -> tuple[CalibrationSet, CalibrationSet]:
    """100 calibration images and 400 labelled held-out images, fresh from the generator."""
    images, labels = shapes_data.make_dataset(500, seed=90210)
    calib = calibration_from_frames(images[:100], SPEC, (1, 64, 64, 3))
    held_out = calibration_from_frames(images[100:], SPEC, (1, 64, 64, 3), labels=labels[100:])
    return calib, held_out


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="module")
def shapes_int8(work: Path, shapes_sets: tuple[CalibrationSet, CalibrationSet]) -> Artifact:
    return quantize_onnx(DEMO_ONNX, work / "shapes.int8.onnx", shapes_sets[0], VNNI.options, target=VNNI)


def _hostile(path: Path, factor: float = 1e4) -> Path:
    """The demo CNN with an activation outlier channel that leaves fp32 unchanged."""
    model = onnx.load(str(DEMO_ONNX))
    inits = {i.name: i for i in model.graph.initializer}

    def scale(name: str, index: Any, value: float) -> None:
        arr = numpy_helper.to_array(inits[name]).copy()
        arr[index] *= value
        inits[name].CopyFrom(numpy_helper.from_array(arr, name))

    scale("shapes_cnn_1/conv2d_1/convolution/ReadVariableOp:0", 0, factor)  # out channel 0 of conv 1
    scale("shapes_cnn_1/conv2d_1/Squeeze:0", 0, factor)  # and its bias (ReLU/MaxPool commute)
    scale("shapes_cnn_1/conv2d_1_2/convolution/ReadVariableOp:0", (slice(None), 0), 1 / factor)
    onnx.save(model, str(path))
    return path


def _leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


# --------------------------------------------------------------------------- targets


@pytest.mark.parametrize(
    ("machine", "flags", "jetson", "expected"),
    [
        ("x86_64", {"avx2": True, "avx512_vnni": True}, False, "x86-vnni"),
        ("x86_64", {"avx2": True, "avx_vnni": True}, False, "x86-vnni"),
        ("x86_64", {"avx2": True, "avx512f": True, "avx512_vnni": False}, False, "x86"),
        ("aarch64", {"asimd": True, "asimddp": True}, False, "rpi5"),
        ("aarch64", {"asimd": True, "asimddp": False}, False, "rpi4"),
        ("aarch64", {"asimd": True, "asimddp": True}, True, "jetson"),
    ],
)
def test_auto_target_from_cpu_flags(
    machine: str, flags: dict[str, bool], jetson: bool, expected: str
) -> None:
    profile = resolve_target("auto", features={"machine": machine, "features": flags, "jetson": jetson})
    assert profile.name == expected
    assert profile.detected is not None and machine in profile.detected


def test_target_defaults() -> None:
    vnni, x86, rpi4, rpi5, jetson = (resolve_target(t) for t in ("x86-vnni", "x86", "rpi4", "rpi5", "jetson"))
    assert (vnni.options.activation, vnni.options.weight, vnni.options.per_channel) == ("uint8", "int8", True)
    assert not vnni.options.reduce_range and vnni.int8_fast
    assert x86.options.activation == "uint8" and x86.options.reduce_range and not x86.int8_fast
    assert rpi4.options.activation == rpi5.options.activation == "int8"
    assert not rpi4.int8_fast and rpi5.int8_fast and rpi5.preferred_format == "tflite"
    assert jetson.ort_extra_options["ActivationSymmetric"] is True
    assert vnni.with_options(method="entropy").options.method == "entropy"
    with pytest.raises(ConversionError, match="unknown target 'pi3'; choose one of auto, x86"):
        resolve_target("pi3")


def test_preflight_warnings(tmp_path: Path) -> None:
    # The 64x64 shapes CNN: 14.75 M MACs (conv 1.77 + 4.72 + 4.72 + 3.54 M, dense 6.5 k).
    cost = estimate_onnx_cost(DEMO_ONNX)
    assert (
        cost.macs
        == 64 * 64 * 16 * 27 + 32 * 32 * 32 * 144 + 16 * 16 * 64 * 288 + 8 * 8 * 96 * 576 + 96 * 64 + 64 * 5
    )
    assert cost.params == 85512 and cost.heavy_nodes == 6 and cost.unknown_shapes == 0
    small = preflight(VNNI, DEMO_ONNX)
    assert len(small) == 1 and "14.8 M multiply-accumulates" in small[0] and "unlikely to be 2x" in small[0]
    x86 = preflight("x86", DEMO_ONNX)
    assert any("no int8 dot-product instructions" in w for w in x86)
    s8 = preflight(VNNI, DEMO_ONNX, dataclasses.replace(VNNI.options, activation="int8"))
    assert any("S8S8" in w and "no faster than fp32" in w for w in s8)
    sat = preflight("x86", DEMO_ONNX, dataclasses.replace(resolve_target("x86").options, reduce_range=False))
    assert any("saturate" in w for w in sat)
    no_compute = preflight(VNNI, build_sensor_onnx(tmp_path / "energy.onnx"))
    assert any("no Conv/Gemm/MatMul" in w for w in no_compute)
    assert cost.narrow_macs == 64 * 64 * 16 * 27 + 32 * 32 * 32 * 144  # the 16- and 32-channel convs
    # 302 M MACs, all in a 32-channel conv: enough work, but too narrow for int8 to pay off.
    w = numpy_helper.from_array(np.zeros((32, 16, 3, 3), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], name="conv")],
        "narrow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 256, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 256, 256])],
        [w],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "n.onnx"))
    narrow = preflight(VNNI, tmp_path / "n.onnx")
    assert estimate_onnx_cost(tmp_path / "n.onnx").macs == 256 * 256 * 32 * 144
    assert len(narrow) == 1 and "100 % of n.onnx's multiply-accumulates" in narrow[0]


# --------------------------------------------------------------------------- int8 on the trained model


def test_int8_shapes_model_keeps_accuracy(
    shapes_int8: Artifact, shapes_sets: tuple[CalibrationSet, CalibrationSet]
) -> None:
    _, held_out = shapes_sets
    assert shapes_int8.precision == "int8" and shapes_int8.float_nodes == []
    assert "static QDQ U8S8, per-channel weights" in shapes_int8.notes[0]
    model = onnx.load(str(shapes_int8.path))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm"} <= ops
    int8_weights = [
        i for i in model.graph.initializer if i.data_type == TensorProto.INT8 and len(i.dims) == 4
    ]
    assert len(int8_weights) == 4  # every conv kernel is stored as int8
    fp32 = evaluate(DEMO_ONNX, held_out)
    int8 = evaluate(shapes_int8.path, held_out, reference=DEMO_ONNX)
    assert fp32.score is not None and int8.score is not None and int8.agreement is not None
    assert fp32.score >= 0.97  # the demo model's documented held-out accuracy is 0.996
    assert fp32.score - int8.score <= 0.01  # within 1 point
    assert int8.agreement.top1 >= 0.98 and int8.agreement.cosine > 0.99 and int8.agreement.sqnr_db > 20
    assert fp32.size_bytes / int8.size_bytes >= 3.5  # 97 kB vs 347 kB
    assert any("names shortened" in n for n in shapes_int8.notes)


def test_int8_model_runs_on_integer_kernels(shapes_int8: Artifact, tmp_path: Path) -> None:
    """ORT must fuse the QDQ graph into integer kernels, else int8 is slower than fp32."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(str(shapes_int8.path), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert ops.count("QLinearConv") == 4
    assert "Conv" not in ops and ("QGemm" in ops or "MatMulIntegerToFloat" in ops)


def test_per_layer_sqnr_follows_the_graph(
    shapes_int8: Artifact, shapes_sets: tuple[CalibrationSet, CalibrationSet], tmp_path: Path
) -> None:
    prepared, _ = prepare_onnx(DEMO_ONNX, tmp_path / "prepared.onnx")
    layers = per_layer_sqnr(prepared, shapes_int8.path, shapes_sets[0], samples=4)
    graph = onnx.load(str(prepared)).graph
    assert [entry.node for entry in layers] == [n.name for n in graph.node]
    assert [entry.op_type for entry in layers] == [n.op_type for n in graph.node]
    by_name = {entry.node: entry for entry in layers}
    # The QDQ graph folds each ReLU into its conv's output quantization: the conv's own output
    # no longer exists, the ReLU output is the quantized tensor.
    assert by_name[CONV1].sqnr_db is None
    relu = by_name["shapes_cnn_1/conv2d_1/Relu"]
    assert relu.quantized and relu.sqnr_db is not None and 20 < relu.sqnr_db < SQNR_CAP_DB
    assert "sqnr_db" not in by_name[CONV1].to_dict() and relu.to_dict()["name"] == relu.node
    quantized = [e.sqnr_db for e in layers if e.quantized]
    assert len(quantized) >= 10 and all(s is not None and s > 20 for s in quantized)


def test_quantize_variants_on_a_random_cnn(tmp_path: Path) -> None:
    model = build_cnn_onnx(tmp_path / "cnn.onnx", size=32, classes=4)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (48, 40, 40, 3), dtype=np.uint8)
    data = calibration_from_frames(frames, ImagePreprocess(scale=1.0), (1, 32, 32, 3))
    x86 = resolve_target("x86")
    for i, options in enumerate(
        [
            x86.options,
            dataclasses.replace(VNNI.options, per_channel=False, method="entropy"),
            dataclasses.replace(VNNI.options, method="percentile"),
            resolve_target("rpi5").options,
        ]
    ):
        art = quantize_onnx(model, tmp_path / f"q{i}.onnx", data, options, target=x86)
        agree = evaluate(art.path, data, reference=model, metric=None).agreement
        assert agree is not None and agree.top1 >= 0.9 and agree.cosine > 0.99, (options, agree)
    # build_cnn_onnx leaves node names empty: pre-processing names them so they can be kept float.
    _, notes = prepare_onnx(model, tmp_path / "prepared.onnx")
    assert any("named 7 unnamed" in n for n in notes)
    mixed = dataclasses.replace(VNNI.options, exclude=("Gemm_5",))
    excluded = quantize_onnx(model, tmp_path / "mixed.onnx", data, mixed)
    assert excluded.precision == "mixed" and excluded.float_nodes == ["Gemm_5"]
    float_gemm = [n for n in onnx.load(str(excluded.path)).graph.node if n.name == "Gemm_5"]
    assert float_gemm and not float_gemm[0].input[1].endswith("DequantizeLinear_Output")


def test_fp16_conversion(work: Path, shapes_sets: tuple[CalibrationSet, CalibrationSet]) -> None:
    result = convert_fp16(DEMO_ONNX, work / "shapes.fp16.onnx")
    assert isinstance(result, Artifact) and result.precision == "fp16"
    model = onnx.load(str(result.path))
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT  # float32 io kept
    assert any(i.data_type == TensorProto.FLOAT16 for i in model.graph.initializer)
    agree = evaluate(result.path, shapes_sets[1], reference=DEMO_ONNX, metric=None).agreement
    assert agree is not None and agree.top1 >= 0.99 and agree.cosine > 0.999
    assert result.path.stat().st_size < 0.55 * DEMO_ONNX.stat().st_size


# --------------------------------------------------------------------------- sensitivity and fallback


def test_hostile_model_is_ruined_by_int8_and_fallback_fixes_it(
    tmp_path: Path, shapes_sets: tuple[CalibrationSet, CalibrationSet]
) -> None:
    calib, held_out = shapes_sets
    model = _hostile(tmp_path / "hostile.onnx")
    fp32 = evaluate(model, held_out)
    plain = quantize_onnx(model, tmp_path / "plain.onnx", calib, VNNI.options, target=VNNI)
    int8 = evaluate(plain.path, held_out, reference=model)
    assert fp32.score is not None and int8.score is not None and int8.agreement is not None
    assert fp32.score >= 0.97
    assert fp32.score - int8.score > 0.05  # plain per-tensor int8 activations ruin it
    assert int8.agreement.sqnr_db < 10

    out = tmp_path / "out" / "hostile.int8.onnx"
    result = fallback_onnx(model, calib, held_out, VNNI.options, 0.01, out_path=out, target=VNNI)
    assert result.met_budget and result.achieved_drop <= 0.01
    assert result.int8_drop > 0.05 and result.metric == "top-1 accuracy drop"
    kept = [name for name, _ in result.kept_float]
    assert 1 <= len(kept) <= 3, result.kept_float
    assert set(kept) & {CONV1, CONV2}  # the producer or consumer of the outlier tensor
    assert all("SQNR" in reason and "within 0.01" in reason for _, reason in result.kept_float)
    assert result.artifact.precision == "mixed" and result.artifact.float_nodes == kept
    assert len(result.trials) <= 12
    check = evaluate(out, held_out)
    assert check.score is not None and fp32.score - check.score <= 0.01
    assert _leftovers(out.parent, {out.name}) == []  # trials and staging folders are gone
    # The ranking puts the outlier tensor's nodes first.
    top = {r.node for r in result.ranking[:4]}
    assert {CONV1, CONV2} <= top
    assert result.ranking[0].sqnr_db < 10 < result.ranking[-1].sqnr_db
    summary = json.loads(json.dumps(result.to_dict()))
    assert summary["met_budget"] and [k["name"] for k in summary["kept_float"]] == kept


def test_rank_sensitivity_on_the_hostile_model(
    tmp_path: Path, shapes_sets: tuple[CalibrationSet, CalibrationSet]
) -> None:
    model = _hostile(tmp_path / "hostile.onnx")
    ranking = rank_sensitivity(model, shapes_sets[0], VNNI.options, target=VNNI, samples=8)
    names = [r.node for r in ranking]
    assert len(names) == len(set(names)) >= 10
    assert {CONV1, CONV2} <= set(names[:4])
    assert all(a.sqnr_db <= b.sqnr_db for a, b in itertools.pairwise(ranking))
    skipped = rank_sensitivity(model, shapes_sets[0], dataclasses.replace(VNNI.options, exclude=(CONV2,)))
    assert CONV2 not in {r.node for r in skipped}


def test_fallback_that_cannot_meet_the_budget_keeps_the_best(
    tmp_path: Path, shapes_sets: tuple[CalibrationSet, CalibrationSet]
) -> None:
    calib, held_out = shapes_sets
    model = _hostile(tmp_path / "hostile.onnx")
    unlabelled = CalibrationSet(held_out.inputs[:120])
    out = tmp_path / "best.onnx"
    prepared, _ = prepare_onnx(model, tmp_path / "prepared.onnx")
    result = fallback_onnx(
        prepared,
        calib,
        unlabelled,
        VNNI.options,
        0.0,
        out_path=out,
        target=VNNI,
        max_trials=2,
        preprocess=False,
    )
    assert not result.met_budget
    assert result.metric == "1 - top-1 agreement"
    assert len(result.trials) == 2
    assert result.achieved_drop == min(t.drop for t in result.trials)
    assert out.is_file() and result.artifact.path == out
    assert any("NOT met" in n for n in result.notes)
    with pytest.raises(ConversionError, match="max_drop must be >= 0"):
        fallback_onnx(model, calib, unlabelled, VNNI.options, -0.1, out_path=out)


def test_real_sensor_model_needs_and_gets_fallback(tmp_path: Path) -> None:
    """The trained vibration autoencoder, calibrated from the demo CSV through the device's
    replay source and windower: plain int8 ruins its anomaly score (the Welch power spectrum
    spans orders of magnitude), the fallback keeps a few spectral nodes float."""
    bundle = REPO / "models" / "demo" / "vibration"
    manifest = json.loads((bundle / "manifest.json").read_text())
    spec = TensorPreprocess(**manifest["preprocess"])
    model = bundle / "model.onnx"
    data = load_calibration(REPO / "models" / "demo" / "vibration.csv", spec, model_input_spec(model))
    assert len(data) == 38  # 5000 samples, window 256, hop 128
    calib, held_out = split_calibration(data, 0.5, seed=1)
    plain = quantize_onnx(model, tmp_path / "plain.onnx", calib, VNNI.options, target=VNNI)
    drop, metric = accuracy_drop(run_model(model, held_out), run_model(plain.path, held_out), None)
    assert metric == "relative RMS error" and drop > 0.5
    result = fallback_onnx(
        model, calib, held_out, VNNI.options, 0.05, out_path=tmp_path / "v.onnx", target=VNNI
    )
    assert result.met_budget and result.achieved_drop <= 0.05
    kept = [name for name, _ in result.kept_float]
    assert 1 <= len(kept) <= 4 and all("spectral_features" in name for name in kept), kept


# --------------------------------------------------------------------------- pre-processing and failures


def _dim_conflict(path: Path) -> Path:
    """Two inputs with different symbolic batch dims added together: symbolic shape inference
    refuses it (and needs sympy at all), ONNX Runtime runs it."""
    w = numpy_helper.from_array(np.eye(8, dtype=np.float32) * 2, "w")
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["a", "b"], ["s"], name="add"),
            helper.make_node("MatMul", ["s", "w"], ["y"], name="mm"),
        ],
        "conflict",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 8]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["M", 8]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_prepare_falls_back_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _dim_conflict(tmp_path / "conflict.onnx")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # ORT's failing symbolic inference writes a temp model into the cwd
    out, notes = prepare_onnx(src, tmp_path / "prepared.onnx")
    assert list(cwd.iterdir()) == []
    assert out.is_file()
    assert any("full (symbolic shape inference + optimization) failed" in n for n in notes), notes
    assert any("without symbolic shape inference" in n for n in notes), notes
    a = np.ones((2, 8), np.float32)
    b = np.arange(16, dtype=np.float32).reshape(2, 8)
    y_src = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"a": a, "b": b})[0]
    y_out = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"a": a, "b": b})[0]
    np.testing.assert_allclose(y_out, y_src)
    assert _leftovers(tmp_path, {"conflict.onnx", "prepared.onnx", "cwd"}) == []


def test_unsupported_operator_is_a_clear_error(
    tmp_path: Path, shapes_sets: tuple[CalibrationSet, Any]
) -> None:
    graph = helper.make_graph(
        [helper.make_node("FancyNorm", ["x"], ["y"], domain="com.acme.vision", name="fancy")],
        "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 64, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 64, 3])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.acme.vision", 1)]
    )
    model.ir_version = 8
    src = tmp_path / "custom.onnx"
    onnx.save(model, str(src))
    out_dir = tmp_path / "out"
    with pytest.raises(ConversionError, match=r"fancy \(com\.acme\.vision:FancyNorm\).*re-export"):
        quantize_onnx(src, out_dir / "custom.int8.onnx", shapes_sets[0], VNNI.options)
    with pytest.raises(ConversionError, match="FancyNorm"):
        prepare_onnx(src, out_dir / "prepared.onnx")
    assert not out_dir.exists()  # nothing half-written, not even the folder made for it


def test_bad_calibration_and_options_leave_nothing(
    tmp_path: Path, shapes_sets: tuple[CalibrationSet, CalibrationSet]
) -> None:
    out = tmp_path / "model.int8.onnx"
    with pytest.raises(CalibrationError, match="set is empty"):
        quantize_onnx(DEMO_ONNX, out, CalibrationSet(np.zeros((0, 64, 64, 3), np.float32)), VNNI.options)
    small = CalibrationSet(np.zeros((4, 32, 32, 3), np.float32))
    with pytest.raises(
        CalibrationError, match=r"shape \[32, 32, 3\] but model.onnx input 'image' takes \[64, 64, 3\]"
    ):
        quantize_onnx(DEMO_ONNX, out, small, VNNI.options)
    bad = dataclasses.replace(VNNI.options, exclude=("no/such/node",))
    with pytest.raises(
        ConversionError, match=r"not found in the \(pre-processed\) graph: \['no/such/node'\]"
    ):
        quantize_onnx(DEMO_ONNX, out, shapes_sets[0], bad)
    with pytest.raises(ConversionError, match="does not exist"):
        quantize_onnx(tmp_path / "missing.onnx", out, shapes_sets[0], VNNI.options)
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all")
    with pytest.raises(ConversionError, match="not a readable ONNX model"):
        quantize_onnx(tmp_path / "junk.onnx", out, shapes_sets[0], VNNI.options)
    assert _leftovers(tmp_path, {"junk.onnx"}) == []


# --------------------------------------------------------------------------- evaluation helpers


def test_metrics() -> None:
    ref = np.array([[1.0, 1.0]])
    assert sqnr_db(ref, np.array([[1.1, 0.9]])) == pytest.approx(20.0)
    assert sqnr_db(ref, ref) == SQNR_CAP_DB
    a = agreement(np.array([[0.9, 0.1], [0.2, 0.8]]), np.array([[0.6, 0.4], [0.7, 0.3]]))
    assert a.top1 == 0.5 and 0.5 < a.cosine < 1.0
    labels = np.array([0, 1])
    ref2 = np.array([[0.9, 0.1], [0.2, 0.8]])
    assert accuracy_drop(ref2, np.array([[0.6, 0.4], [0.7, 0.3]]), labels) == (0.5, "top-1 accuracy drop")
    assert accuracy_drop(ref2, ref2[::-1], None) == (1.0, "1 - top-1 agreement")
    drop, name = accuracy_drop(np.array([[2.0], [2.0]]), np.array([[2.2], [1.8]]), None)
    assert name == "relative RMS error" and drop == pytest.approx(0.1)


def test_map50_hook_calls_the_detector_helper(
    monkeypatch: pytest.MonkeyPatch, shapes_sets: tuple[CalibrationSet, CalibrationSet]
) -> None:
    """metric="map50" decodes each sample and scores with converters.detection_metrics.map50
    (imported only then; a stand-in here so this test does not depend on the detector helper)."""
    small = CalibrationSet(shapes_sets[1].inputs[:3])
    seen: dict[str, Any] = {}

    def map50(predictions: list[Any], ground_truth: list[Any], num_classes: int) -> float:
        seen["predictions"], seen["gt"], seen["classes"] = predictions, ground_truth, num_classes
        return 0.625

    fake = types.ModuleType("converters.detection_metrics")
    fake.map50 = map50  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "converters.detection_metrics", fake)

    def decode(outputs: list[np.ndarray]) -> np.ndarray:
        assert len(outputs) == 1 and outputs[0].shape == (1, 5)
        return np.array([[outputs[0].argmax(), outputs[0].max(), 0, 0, 8, 8]])

    gt = [np.array([[0, 0, 0, 8, 8]])] * 3
    task = DetectionTask(gt, num_classes=5, decode=decode)
    result = evaluate(DEMO_ONNX, small, metric="map50", detection=task)
    assert result.score == 0.625 and result.metric == "map50"
    assert len(seen["predictions"]) == 3 and seen["gt"] is gt and seen["classes"] == 5
    outs = run_model(DEMO_ONNX, small, threads=1)
    assert accuracy_drop(outs, outs, None, detection=task) == (0.0, "mAP@0.5 drop")
    with pytest.raises(ConversionError, match="needs detection=DetectionTask"):
        evaluate(DEMO_ONNX, small, metric="map50")


def test_compare_latency_interleaves(shapes_int8: Artifact, shapes_sets: tuple[CalibrationSet, Any]) -> None:
    stats = compare_latency(
        [DEMO_ONNX, shapes_int8.path], threads=1, runs=12, block=4, sample=shapes_sets[0].inputs[:1]
    )
    assert [s.path for s in stats] == [DEMO_ONNX, shapes_int8.path]
    for s in stats:
        assert s.runs == 12 and s.threads == 1 and 0 < s.p50_ms <= s.p90_ms
    outs = run_model(shapes_int8.path, CalibrationSet(shapes_sets[0].inputs[:2]), threads=1)
    assert outs[0].shape == (2, 5) and outs[0].dtype == np.float32
