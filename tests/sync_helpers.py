"""Helpers for the fleet sync tests: a real daemon per device, candidate bundles, update watchers.

The device runs the demo shapes classifier on the demo video (looped, paced). The fleet
publishes candidates built from the same trained model: a good one (committed with no frame
lost), and bad ones that must be rolled back or rejected with the reason reported - a
failing self-test, a 10x slower model, and one whose outputs collapse onto one class.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnx
from conftest import DEMO
from mqtt_broker import Broker
from onnx import helper, numpy_helper

from edge_runtime.bundle import create_bundle, open_bundle
from edge_runtime.config import parse_config
from edge_runtime.daemon import Daemon
from edge_runtime.sync.protocol import Rollout

DEMO_PUB = DEMO / "keys" / "demo.pub"
FAST = Rollout(probation_s=1.5, probation_min_frames=30)


def _frames(count: int = 8) -> np.ndarray:
    cap = cv2.VideoCapture(str(DEMO / "shapes.avi"))
    frames = []
    while len(frames) < count:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
        for _ in range(20):
            cap.grab()
    cap.release()
    return np.stack(frames)


def make_candidate(
    out: Path, key: Path, version: str, edit: Callable[[onnx.ModelProto], None] | None = None, **kwargs: Any
) -> Path:
    """A packed, signed bundle of the demo shapes model (optionally edited) at ``version``."""
    demo = open_bundle(DEMO / "shapes", require_signature=False)
    model = onnx.load(str(DEMO / "shapes" / "model.onnx"))
    if edit is not None:
        edit(model)
    path = out / f"shapes-{version}.onnx"
    onnx.save(model, path)
    packed = out / f"shapes-{version}.edgebundle"
    create_bundle(
        out / f"shapes-{version}",
        models=[path],
        name="shapes",
        version=version,
        task="classification",
        preprocess=demo.manifest.preprocess,
        decoder=demo.manifest.decoder,
        labels=demo.labels(),
        golden_frames=_frames(),
        sign_key=key,
        pack=packed,
        **kwargs,
    )
    return packed


def collapse(model: onnx.ModelProto) -> None:
    """Add 100 to the logit of class 0: every frame becomes class 0."""
    last = next(n for n in model.graph.node if n.op_type == "Gemm" and "probs" in n.name)
    bias = next(i for i in model.graph.initializer if i.name == last.input[2])
    values = numpy_helper.to_array(bias).copy()
    values[0] += 100.0
    bias.CopyFrom(numpy_helper.from_array(values, bias.name))


def slow(model: onnx.ModelProto) -> None:
    """Same outputs, plus a heavy branch multiplied by zero: many times the inference time."""
    graph = model.graph
    inp = graph.input[0].name
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((64 * 64 * 3, 1536)).astype(np.float32), "slow_w")
    w2 = numpy_helper.from_array(rng.standard_normal((1536, 1536)).astype(np.float32) * 0.01, "slow_w2")
    zero = numpy_helper.from_array(np.zeros((1, 1), np.float32), "slow_zero")
    shape = numpy_helper.from_array(np.array([1, -1], np.int64), "slow_shape")
    graph.initializer.extend([w, w2, zero, shape])
    softmax = next(n for n in graph.node if n.op_type == "Softmax")
    logits = softmax.input[0]
    nodes = [
        helper.make_node("Reshape", [inp, "slow_shape"], ["slow_flat"]),
        helper.make_node("MatMul", ["slow_flat", "slow_w"], ["slow_h"]),
        helper.make_node("MatMul", ["slow_h", "slow_w2"], ["slow_h2"]),
        helper.make_node("MatMul", ["slow_h2", "slow_w2"], ["slow_h3"]),
        helper.make_node("ReduceSum", ["slow_h3"], ["slow_sum"], keepdims=1),
        helper.make_node("Mul", ["slow_sum", "slow_zero"], ["slow_nil"]),
        helper.make_node("Add", [logits, "slow_nil"], ["slow_logits"]),
    ]
    softmax.input[0] = "slow_logits"
    index = list(graph.node).index(softmax)
    for offset, node in enumerate(nodes):
        graph.node.insert(index + offset, node)


class Device:
    """A daemon for one device (in this process, on its own thread) with sync on."""

    def __init__(
        self,
        tmp_path: Path,
        broker: Broker,
        keys: tuple[Path, Path],
        device_id: str,
        group: str,
        **overrides: dict[str, Any],
    ) -> None:
        cert, key = broker.client_cert(device_id)
        self.results = tmp_path / f"{device_id}-results.jsonl"
        self.state = tmp_path / f"{device_id}-state"
        data: dict[str, Any] = {
            "model": {"bundle": str(DEMO / "shapes"), "format": "onnx", "threads": 1},
            "source": {"kind": "video", "uri": str(DEMO / "shapes.avi"), "loop": True},
            "pipeline": {"max_fps": 60},
            "sinks": [{"kind": "jsonl", "path": str(self.results), "flush_every": 1}],
            "trust": {"keys": [str(DEMO_PUB), str(keys[1])]},
            "state": {"dir": str(self.state)},
            "sync": {
                "enabled": True,
                "host": "127.0.0.1",
                "port": broker.port,
                "fleet": "test",
                "device_id": device_id,
                "groups": [group],
                "ca_file": str(broker.ca_path),
                "cert_file": str(cert),
                "key_file": str(key),
                "telemetry_interval_s": 0.5,
            },
        }
        for section, values in overrides.items():
            data[section] = {**data.get(section, {}), **values}
        self.config = parse_config(data, tmp_path)
        self.daemon: Daemon | None = None
        self.thread: threading.Thread | None = None

    def start(self, connected: bool = True) -> Device:
        self.daemon = Daemon(self.config)
        self.thread = threading.Thread(target=self.daemon.run, kwargs={"install_signals": False}, daemon=True)
        self.thread.start()
        end = time.monotonic() + 30
        while self.agent is None and time.monotonic() < end:
            time.sleep(0.02)
        while connected and not self.agent.link.connected and time.monotonic() < end:
            time.sleep(0.05)
        assert self.agent is not None and (self.agent.link.connected or not connected)
        return self

    @property
    def agent(self) -> Any:
        return None if self.daemon is None else self.daemon.agent

    def stop(self) -> None:
        if self.daemon is not None and self.thread is not None:
            self.daemon.stop_event.set()
            self.thread.join(30)
            assert not self.thread.is_alive()
        self.daemon = None

    def serving(self) -> str:
        return str(self.agent.host.serving().version)

    def state_json(self) -> dict[str, Any]:
        return dict(json.loads((self.state / "sync" / "state.json").read_text()))


def updates(broker: Broker) -> Any:
    watcher = broker.client("fleet-admin")
    watcher.subscribe_wait("edgert/test/device/+/update")
    return watcher


def mark(watcher: Any, device: str = "dev1") -> int:
    """How many update messages ``watcher`` has seen so far (wait_phase(since=...) skips them)."""
    return len(watcher.messages(f"edgert/test/device/{device}/update"))


def wait_phase(
    watcher: Any,
    phases: set[str],
    timeout: float = 60.0,
    device: str = "dev1",
    version: str | None = None,
    since: int = 0,
) -> dict[str, Any]:
    topic = f"edgert/test/device/{device}/update"
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for msg in watcher.messages(topic)[since:]:
            body = json.loads(msg.payload)
            if body["phase"] in phases and (version is None or body.get("version") == version):
                return dict(body)
        time.sleep(0.05)
    seen = [json.loads(m.payload)["phase"] for m in watcher.messages(topic)]
    raise AssertionError(f"no update phase in {phases} within {timeout} s; saw {seen}")
