"""Shared fixtures: real ONNX models built with onnx.helper, real videos, keys, bundles."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_runtime.bundle import create_bundle, generate_keypair
from edge_runtime.decoders.specs import ClassificationSpec, YoloSpec
from edge_runtime.preprocess_spec import ImagePreprocess

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "models" / "demo"


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array.astype(np.float32), name)


def build_cnn_onnx(path: Path, size: int = 32, classes: int = 4, seed: int = 0) -> Path:
    """A small real CNN classifier: NHWC uint8-range float input -> softmax probabilities."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((8, 3, 3, 3)) * 0.3
    b1 = rng.standard_normal(8) * 0.1
    w2 = rng.standard_normal((classes, 8)) * 0.5
    b2 = rng.standard_normal(classes) * 0.1
    nodes = [
        helper.make_node("Transpose", ["input"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("GlobalAveragePool", ["r1"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w2", "b2"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, size, size, 3])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, classes])],
        [_init("w1", w1), _init("b1", b1), _init("w2", w2), _init("b2", b2)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def build_yolo_onnx(path: Path, size: int = 64, classes: int = 3, anchors: int = 16) -> Path:
    """A real ONNX graph with a YOLOv8 output layout (1, 4 + C, N) computed from the image.

    Box centres come from a fixed grid, sizes and class scores from the mean colour, so the
    output depends on the input like a real detector's.
    """
    rng = np.random.default_rng(1)
    grid = rng.uniform(8, size - 8, (2, anchors))
    nodes = [
        helper.make_node("ReduceMean", ["input"], ["m"], axes=[1, 2], keepdims=0),  # (1, 3)
        helper.make_node("MatMul", ["m", "wc"], ["cls_logits"]),  # (1, C*N)
        helper.make_node("Sigmoid", ["cls_logits"], ["cls_flat"]),
        helper.make_node("Reshape", ["cls_flat", "cls_shape"], ["cls"]),  # (1, C, N)
        helper.make_node("MatMul", ["m", "ws"], ["wh_flat"]),
        helper.make_node("Reshape", ["wh_flat", "wh_shape"], ["wh"]),  # (1, 2, N)
        helper.make_node("Abs", ["wh"], ["wh_pos"]),
        helper.make_node("Add", ["wh_pos", "min_wh"], ["wh_final"]),
        helper.make_node("Concat", ["centres", "wh_final", "cls"], ["output0"], axis=1),
    ]
    inits = [
        _init("wc", rng.standard_normal((3, classes * anchors)) * 0.05),
        _init("ws", rng.standard_normal((3, 2 * anchors)) * 0.1),
        numpy_helper.from_array(np.array([1, classes, anchors], np.int64), "cls_shape"),
        numpy_helper.from_array(np.array([1, 2, anchors], np.int64), "wh_shape"),
        _init("min_wh", np.full((1, 2, 1), 6.0)),
        _init("centres", grid[None]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_yolo",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, size, size, 3])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 4 + classes, anchors])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def build_sensor_onnx(path: Path, window: int = 32, channels: int = 3, batch: int | str = 1) -> Path:
    """A real sensor model: the mean energy of a (1, window, channels) window -> (1, 1) score."""
    nodes = [
        helper.make_node("Mul", ["input", "input"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"], ["score"], axes=[1, 2], keepdims=0),
        helper.make_node("Unsqueeze", ["score", "axis"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "energy",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, window, channels])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [batch, 1])],
        [numpy_helper.from_array(np.array([1], np.int64), "axis")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


@pytest.fixture(scope="session")
def sensor_bundle(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]) -> Path:
    from edge_runtime.decoders.specs import RawSpec
    from edge_runtime.preprocess_spec import TensorPreprocess

    base = tmp_path_factory.mktemp("sensor")
    rng = np.random.default_rng(7)
    return create_bundle(
        base / "bundle",
        models=[build_sensor_onnx(base / "energy.onnx")],
        name="energy",
        version="1.0.0",
        task="anomaly",
        preprocess=TensorPreprocess(window=32, hop=16, channels=3),
        decoder=RawSpec(anomaly_threshold=4.0),
        golden_frames=rng.standard_normal((4, 32, 3)).astype(np.float32),
        sign_key=keys[0],
    )


def write_video(path: Path, frames: int = 20, size: tuple[int, int] = (96, 64), fps: float = 15.0) -> Path:
    """A real MJPG video written by OpenCV; frame i has a moving square and brightness i."""
    w, h = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    assert writer.isOpened()
    for i in range(frames):
        img = np.full((h, w, 3), (i * 7) % 255, np.uint8)
        x = (i * 3) % max(1, w - 16)
        cv2.rectangle(img, (x, 10), (x + 16, 26), (0, 0, 255), -1)
        writer.write(img)
    writer.release()
    return path


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return generate_keypair(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="session")
def cnn_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_cnn_onnx(tmp_path_factory.mktemp("models") / "cnn.onnx")


@pytest.fixture(scope="session")
def golden_images() -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.integers(0, 256, (4, 48, 64, 3), dtype=np.uint8)


@pytest.fixture
def make_cnn_bundle(
    tmp_path: Path, cnn_onnx: Path, keys: tuple[Path, Path], golden_images: np.ndarray
) -> Callable[..., Path]:
    counter = iter(range(1000))

    def make(version: str = "1.0.0", sign: bool = True, **kwargs: object) -> Path:
        out = tmp_path / f"bundle{next(counter)}"
        return create_bundle(
            out,
            models=[cnn_onnx],
            name="tiny-cnn",
            version=version,
            task="classification",
            preprocess=ImagePreprocess(resize="stretch"),
            decoder=ClassificationSpec(top_k=2),
            labels=["a", "b", "c", "d"],
            golden_frames=golden_images,
            sign_key=keys[0] if sign else None,
            **kwargs,  # type: ignore[arg-type]
        )

    return make


@pytest.fixture(scope="session")
def yolo_bundle(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]) -> Path:
    base = tmp_path_factory.mktemp("yolo")
    model = build_yolo_onnx(base / "yolo.onnx")
    rng = np.random.default_rng(5)
    return create_bundle(
        base / "bundle",
        models=[model],
        name="tiny-yolo",
        version="1.0.0",
        task="detection",
        preprocess=ImagePreprocess(resize="letterbox"),
        decoder=YoloSpec(layout="v8", conf_threshold=0.3),
        labels=["red", "green", "blue"],
        golden_frames=rng.integers(0, 256, (3, 48, 80, 3), dtype=np.uint8),
        sign_key=keys[0],
    )


@pytest.fixture
def video(tmp_path: Path) -> Path:
    return write_video(tmp_path / "clip.avi")


# --- A real mosquitto broker (tests/mqtt_broker.py) --------------------------------------------------
# pytest puts tests/ (this file's directory, which has no __init__.py) on sys.path before importing it.
from mqtt_broker import Broker  # noqa: E402  (appended section; keeps the lines above unchanged)


@pytest.fixture
def broker(tmp_path: Path, request: pytest.FixtureRequest) -> Broker:
    """A running mosquitto for fleet ``test``: dev1 in ``cams``, dev2 in ``sensors``, operator fleet-admin.

    Mutual TLS on a free 127.0.0.1 port; files and mosquitto.log under ``tmp_path/broker``. Clients
    made with ``broker.client(...)`` and the mosquitto process are closed after the test, also when
    it fails.
    """
    instance = Broker(
        tmp_path / "broker",
        fleet="test",
        devices={"dev1": ["cams"], "dev2": ["sensors"]},
        operators=["fleet-admin"],
    )
    request.addfinalizer(instance.close)
    instance.start()
    return instance


# --- Fleet sync: real daemons per device and an operator client (tests/sync_helpers.py) ----------
from sync_helpers import Device  # noqa: E402


@pytest.fixture
def devices(tmp_path: Path, broker: Broker, keys: tuple[Path, Path]) -> Iterator[Callable[..., Device]]:
    """Start daemons (in this process) for devices of the ``broker`` fleet; all stopped after the test."""
    made: list[Device] = []

    def make(device_id: str = "dev1", group: str = "cams", start: bool = True, **overrides: Any) -> Device:
        dev = Device(tmp_path, broker, keys, device_id, group, **overrides)
        made.append(dev)
        return dev.start() if start else dev

    yield make
    for dev in made:
        dev.stop()


@pytest.fixture
def device(devices: Callable[..., Device]) -> Device:
    """dev1 (group cams) serving the demo shapes bundle with sync on."""
    return devices()


@pytest.fixture
def fleet(broker: Broker) -> Iterator[Any]:
    """An operator FleetClient (fleet-admin certificate) connected to ``broker``."""
    from edge_runtime.sync.mqtt import LinkSettings
    from edge_runtime.sync.publisher import FleetClient

    cert, key = broker.client_cert("fleet-admin")
    settings = LinkSettings(
        host="127.0.0.1", port=broker.port, client_id="fleet-cli", ca_file=broker.ca_path, cert_file=cert,
        key_file=key,
    )  # fmt: skip
    with FleetClient(settings, "test") as client:
        yield client
