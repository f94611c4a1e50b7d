"""Fleet scale: N simulated devices running the real agent against one mosquitto on this machine.

Run from the repository root (the device venv plus paho-mqtt and onnx; mosquitto installed, see
``scripts/ensure-mosquitto.sh``)::

    PYTHONPATH=. python bench/fleet.py [--n 200] [--max-n 3200] [--workers 4] [--json out.json]
    PYTHONPATH=. python bench/fleet.py --quick          # N=20 (+ one ladder step of 40), ~1 min

What a simulated device is. Every device runs the REAL :class:`~edge_runtime.sync.agent.SyncAgent`
(its MqttLink with mutual TLS and its own client certificate, the SQLite outbox, the StateStore with
A/B slots, the ChunkAssembler, self-test, hot swap, probation with the previous model running beside
the candidate, telemetry with SystemMetrics). Only the daemon around it is replaced by
:class:`SimHost`, a small ModelHost: it serves a tiny signed ONNX classifier (colour of a 16x16
frame -> one of 3 classes; its own onnxruntime session per device), runs it on synthetic frames at
``--fps`` per device on ONE shared "camera" thread per worker process (preprocess, ``backend.run``,
the agent's observers: ModelWatch, DriftWatch, the probation's ShadowRunner), and ``load`` opens the
staged slot with the fleet trust store, loads the model and runs the bundle's self-test, as the
daemon's loader does. Differences from a real device, all deliberate: no camera, no sinks, no
pipeline threads; the self-test of the factory bundle runs once per worker, not once per device;
the probe child process (``[sync] probe``) is skipped unless ``--probe`` (it is a new Python process
per install, ~1 s of CPU each, which would measure process start-up on a 2-core machine, not the
fleet); inference latency handed to the observers is the thread's CPU time around
``backend.run`` instead of wall time (hundreds of devices share one GIL here, wall time would
measure the GIL queue and fail the probation latency rule for no fault of the candidate); the
bundles' self-test latency budget is 10 s instead of 100 ms for the same reason.

Devices are split evenly over ``--workers`` processes (spawned; default 4), so one GIL does not
bound the simulation; the coordinator (this process) is the fleet operator: a FleetClient
(operator certificate) that uploads bundles, publishes signed documents and follows every device's
``update`` events. mosquitto runs with the test helper's generated PKI and ACL (``tests/
mqtt_broker.py``: one certificate per device, CN = device id, all devices in the ACL up front), with
``log_type error warning notice`` instead of ``all`` (one log line per packet would be measured as
broker load).

Sections, in ONE run:

1. **rollout** at ``--n`` devices: connect them all, then ``FleetClient.upload_bundle`` +
   ``publish_document`` of a good candidate to their group; the times from the start of the
   publish until 50/90/100 % of the devices accepted the document, had it downloaded, were in
   probation (swapped in) and reported ``committed`` (from the ``update`` events the operator
   receives). Broker CPU seconds and % of one core, bytes out, during the rollout (psutil).
2. **telemetry** at ``--n``: two consumer processes in one MQTT 5 shared subscription group
   (``$share/bench-consumers/edgert/bench/device/+/telemetry``); (a) live: every device's real
   ``_telemetry_once`` called back to back for ``--telemetry-seconds``; (b) drain: every
   outbox pre-filled with telemetry records that the senders then drain. Messages/s delivered to
   the group, split between the two consumers, duplicates and losses, broker CPU per message.
3. **canary** at ``--n``: a bad candidate (its outputs collapse onto class 0) with
   ``canary_percent`` ``--canary`` (10 %) and ``follow_rollout``: canaries roll it back in
   probation, the rollout aborts (the previous document re-issued), non-canaries never install
   it: counts from the update events and from the devices themselves.
4. **ladder**: fresh fleets of 2n, 4n, ... up to ``--max-n`` devices, each connected and given
   one rollout, until one does not hold (not every device connected within 30 s + 50 ms x N, or
   not every device committed within 120 s + 150 ms x N of the publish), memory would run short,
   or file descriptors would: the largest N held and what limited it, with broker, worker and
   machine CPU, memory per device and per broker connection. Ladder rollouts switch off the
   probation's latency and fps rules (``max_latency_ratio`` 1000, ``min_fps_ratio`` 0): with
   hundreds of simulated devices per core those measure the simulation starving itself (at N=400
   they rolled back a quarter of the devices in a trial run); every other rule stays. A worker
   process gets at most ``devices_per_worker`` (100) devices: bigger fleets get more workers.

The machine is shared (other engineers run tests on its 2 cores at the same time): every section
reports the CPU used by processes that are not this bench (``outside``). No absolute time is a
goal; goals are correctness (every device committed, the bad candidate nowhere but on canaries,
no telemetry lost).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import multiprocessing as mp
import os
import shlex
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

if __package__ in (None, ""):  # run as a script: make ``bench`` and ``edge_runtime`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge_runtime.backends.base import BackendOptions
from edge_runtime.bundle import TrustStore, create_bundle, generate_keypair, load_private_key, open_bundle
from edge_runtime.decoders.specs import ClassificationSpec
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.model import LoadedModel, load_model
from edge_runtime.preprocess_spec import ImagePreprocess
from edge_runtime.selftest import run_selftest
from edge_runtime.sync.agent import PRIORITY_TELEMETRY, AgentOptions, SyncAgent
from edge_runtime.sync.mqtt import LinkSettings
from edge_runtime.sync.outbox import Outbox
from edge_runtime.sync.protocol import Rollout, canary_bucket
from edge_runtime.sync.publisher import FleetClient, follow_rollout
from edge_runtime.sync.slots import StateStore
from edge_runtime.types import Frame

__all__ = [
    "BenchConfig",
    "SimHost",
    "build_tiny_onnx",
    "format_report",
    "main",
    "make_bundle",
    "run_bench",
    "summary_rows",
    "synthetic_frames",
]

log = logging.getLogger("bench.fleet")

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
FLEET = "bench"
GROUP = "fleet"
OPERATOR = "fleet-admin"
SHARE_GROUP = "bench-consumers"
SIZE = 16
LABELS = ("blue", "green", "red")
GOOD, BAD, FACTORY = "1.1.0", "1.2.0", "1.0.0"
SELFTEST_BUDGET_MS = 10_000.0
"""The bundles' self-test latency budget (the default is 100 ms): hundreds of simulated devices
share each worker's GIL, so the wall time of a 0.05 ms inference can exceed 100 ms in the queue."""
MIB = 1024 * 1024


@dataclass
class BenchConfig:
    """What to run; the defaults are the documented configuration."""

    n: int = 200
    max_n: int = 3200
    workers: int = 4
    fps: float = 5.0
    """Frames per second per device (one shared camera thread per worker runs them) ..."""
    camera_budget: float = 1000.0
    """... but at most this many frames per second for the whole fleet (a bigger fleet gets fewer
    per device): the simulated cameras share this machine's CPUs, real devices have their own."""

    def fps_for(self, n: int) -> float:
        return min(self.fps, self.camera_budget / max(1, n))

    probation_s: float = 2.0
    probation_min_frames: int = 8
    bundle_kb: int = 1024
    """Random payload added to the candidate bundles (KiB); the tiny model itself is ~3 KB."""
    chunk_kb: int = 256
    telemetry_interval_s: float = 10.0
    """The agents' own telemetry interval (the product default) outside the telemetry section."""
    telemetry_s: float = 8.0
    prefill: int = 40
    """Telemetry records pre-filled into every outbox for the drain measurement."""
    canary_percent: float = 10.0
    abort_share: float = 0.5
    devices_per_worker: int = 100
    """More devices than ``workers`` x this get more worker processes (fewer threads per GIL)."""
    connect_timeout_s: float = 0.0
    """0: 30 s + 50 ms per device."""
    commit_timeout_s: float = 0.0
    """0: 120 s + 150 ms per device (publish start -> every device committed)."""
    mem_reserve_mb: int = 3072
    """The ladder stops before a step whose estimated memory would leave less than this available."""
    probe: bool = False
    quick: bool = False
    keep: Path | None = None
    """Keep the work directory here (broker log, device state) instead of a temporary one."""

    def connect_timeout(self, n: int) -> float:
        return self.connect_timeout_s or 30.0 + 0.05 * n

    def commit_timeout(self, n: int) -> float:
        return self.commit_timeout_s or 120.0 + 0.15 * n

    def workers_for(self, n: int) -> int:
        return max(1, min(n, 32, max(self.workers, math.ceil(n / max(1, self.devices_per_worker)))))

    def ladder(self) -> list[int]:
        out, n = [], self.n * 2
        while n <= self.max_n:
            out.append(n)
            n *= 2
        if self.max_n > self.n and (not out or out[-1] != self.max_n) and self.max_n not in out:
            out.append(self.max_n)
        return out

    @classmethod
    def quick_config(cls) -> BenchConfig:
        return cls(
            n=20, max_n=40, workers=2, probation_s=1.0, probation_min_frames=5, bundle_kb=256,
            telemetry_s=2.0, prefill=20, connect_timeout_s=30.0, commit_timeout_s=45.0, quick=True,
        )  # fmt: skip


# -- model, frames and bundles ----------------------------------------------------------------------
def build_tiny_onnx(path: Path, *, collapse: bool = False) -> Path:
    """A tiny real CNN (3x3 conv, ReLU, global average pool, Gemm, softmax), NHWC 16x16x3 input.

    Each conv filter passes one colour channel, so the class is the frame's dominant channel in
    the preprocessed (RGB) order; ``collapse`` adds 100 to the logit of class 0 (every frame becomes
    class 0: the bad candidate, caught by the probation's collapse rule).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w1 = np.zeros((3, 3, 3, 3), np.float32)
    for k in range(3):
        w1[k, k, 1, 1] = 1.0
    w2 = np.eye(3, dtype=np.float32) * 8.0
    b2 = np.zeros(3, np.float32)
    if collapse:
        b2[0] += 100.0
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
        "fleet_tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, SIZE, SIZE, 3])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, len(LABELS)])],
        [
            numpy_helper.from_array(w1, "w1"),
            numpy_helper.from_array(np.zeros(3, np.float32), "b1"),
            numpy_helper.from_array(w2, "w2"),
            numpy_helper.from_array(b2, "b2"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def synthetic_frames(count: int = 30, seed: int = 0) -> np.ndarray:
    """``count`` 16x16 BGR frames of noisy flat colour; frame i's dominant channel is i % 3."""
    rng = np.random.default_rng(seed)
    out = np.empty((count, SIZE, SIZE, 3), np.uint8)
    for i in range(count):
        base = rng.integers(0, 90, 3)
        base[i % 3] = rng.integers(160, 256)
        noise = rng.integers(-20, 21, (SIZE, SIZE, 3))
        out[i] = np.clip(base[None, None, :] + noise, 0, 255).astype(np.uint8)
    return out


def make_bundle(
    out: Path, version: str, key: Path, *, collapse: bool = False, payload_bytes: int = 0, pack: bool = True
) -> Path:
    """A signed bundle of the tiny classifier at ``version`` (packed ``.edgebundle`` when ``pack``),
    with ``payload_bytes`` random bytes as the extra file ``payload.bin`` (a bigger download)."""
    tag = f"tiny-{version}{'-collapse' if collapse else ''}"
    onnx_path = build_tiny_onnx(out / f"{tag}.onnx", collapse=collapse)
    extra: dict[str, Path] = {}
    if payload_bytes > 0:
        blob = out / f"{tag}-payload.bin"
        blob.write_bytes(np.random.default_rng(abs(hash(tag)) % 2**32).bytes(payload_bytes))
        extra["payload.bin"] = blob
    packed = out / f"{tag}.edgebundle" if pack else None
    bundle_dir = create_bundle(
        out / tag,
        models=[onnx_path],
        name="tiny",
        version=version,
        task="classification",
        preprocess=ImagePreprocess(color="rgb", interpolation="nearest"),
        decoder=ClassificationSpec(softmax="never", top_k=1),
        labels=list(LABELS),
        golden_frames=synthetic_frames(6, seed=1),
        extra_files=extra,
        sign_key=key,
        latency_budget_ms=SELFTEST_BUDGET_MS,
        pack=packed,
        threads=1,
    )
    for blob in extra.values():
        blob.unlink()
    if packed is not None:
        shutil.rmtree(bundle_dir)
        return packed
    return bundle_dir


# -- the simulated device ---------------------------------------------------------------------------
class SimHost:
    """:class:`~edge_runtime.sync.agent.ModelHost` of one simulated device (see the module doc)."""

    def __init__(self, device: str, model: LoadedModel, trust: TrustStore, *, probe: bool = False) -> None:
        self.device = device
        self.trust = trust
        self.probe = probe
        self._model = model
        self._lock = threading.Lock()  # held around each inference: swap() returns once none runs
        self._observers: tuple[Any, ...] = ()
        self._buf_model: LoadedModel | None = None
        self._buf: Any = None
        self._errors = 0
        self.frames = 0
        self.swaps = 0
        self.loaded: list[str] = []
        self._ms: deque[float] = deque(maxlen=200)
        self._t0 = time.monotonic()

    # ModelHost
    def serving(self) -> LoadedModel:
        return self._model

    def load(self, bundle_dir: Path) -> LoadedModel:
        if self.probe:
            from edge_runtime.sync.probe import probe_bundle

            probe_bundle(bundle_dir, "onnx", 1)
        bundle = open_bundle(bundle_dir, trust=self.trust, require_signature=True)
        model = load_model(bundle, "onnx", BackendOptions(threads=1, warmup_runs=1))
        try:
            run_selftest(model)
        except EdgeRuntimeError:
            model.close()
            raise
        self.loaded.append(bundle.version)
        return model

    def swap(self, model: LoadedModel) -> LoadedModel:
        with self._lock:
            old, self._model = self._model, model
            self.swaps += 1
        return old

    def add_observer(self, observer: Any) -> None:
        with self._lock:
            self._observers = (*self._observers, observer)

    def remove_observer(self, observer: Any) -> None:
        with self._lock:
            self._observers = tuple(o for o in self._observers if o is not observer)

    def errors(self) -> int:
        return self._errors

    def summary(self) -> dict[str, Any]:
        elapsed = time.monotonic() - self._t0
        ms = sorted(self._ms)
        p50 = ms[len(ms) // 2] if ms else None
        return {
            "frames": self.frames, "errors": {"inference": self._errors} if self._errors else {},
            "elapsed_s": round(elapsed, 1), "fps": round(self.frames / elapsed, 2) if elapsed > 0 else 0.0,
            "latency_ms": {"inference": {"p50": p50}}, "model_swaps": self.swaps,
        }  # fmt: skip

    # the shared camera thread
    def step(self, data: np.ndarray, index: int) -> None:
        """Run one frame through the serving model and hand it to the observers (as the pipeline)."""
        frame = Frame(data, index, time.monotonic())
        with self._lock:
            model, observers = self._model, self._observers
            if model is not self._buf_model:
                self._buf_model, self._buf = model, model.preprocessor.new_buffer()
            buf = self._buf
            try:
                model.preprocessor(data, buf)
                t0 = time.thread_time()
                outputs = model.backend.run([buf])
                ms = (time.thread_time() - t0) * 1000.0
            except EdgeRuntimeError:
                self._errors += 1
                return
        self.frames += 1
        self._ms.append(ms)
        for observer in observers:
            try:
                observer(model, frame, buf, outputs, ms)
            except Exception:  # an observer must never stop inference (as in the pipeline)
                log.debug("observer %r failed", observer, exc_info=True)


class _LogCounter(logging.Handler):
    """Counts a worker's warnings/errors by logger and keeps the first few messages."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: Counter[str] = Counter()
        self.samples: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[f"{record.levelname} {record.name}"] += 1
        if len(self.samples) < 8:
            with contextlib.suppress(Exception):
                self.samples.append(f"{record.levelname} {record.name}: {record.getMessage()[:300]}")


@dataclass
class WorkerSpec:
    """What one worker process simulates (picklable)."""

    index: int
    devices: list[str]
    port: int
    ca: str
    pki: str
    factory: str
    trust_pub: str
    work: str
    fps: float
    telemetry_interval_s: float
    chunk_window: int = 32
    probe: bool = False


class _Worker:
    """The devices of one worker process, their camera thread, and the command loop."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.trust = TrustStore.from_files([Path(spec.trust_pub)])
        self.hosts: list[SimHost] = []
        self.agents: list[SyncAgent] = []
        self.frames = synthetic_frames(30, seed=2)
        self._stop = threading.Event()
        self._camera: threading.Thread | None = None
        self.camera_frames = 0
        self.camera_resets = 0
        self.camera_busy_s = 0.0
        self.start_s = 0.0
        self.rss_before = psutil.Process().memory_info().rss

    def build(self) -> None:
        spec = self.spec
        t0 = time.monotonic()
        factory = open_bundle(Path(spec.factory), trust=self.trust, require_signature=True)
        options = BackendOptions(threads=1, warmup_runs=1)
        check = load_model(factory, "onnx", options)
        try:
            run_selftest(check)  # once per worker (the daemon self-tests its boot bundle)
        finally:
            check.close()
        for device in spec.devices:
            sync_dir = Path(spec.work) / device / "sync"
            host = SimHost(device, load_model(factory, "onnx", options), self.trust, probe=spec.probe)
            link = LinkSettings(
                host="127.0.0.1", port=spec.port, client_id=f"edgert-{FLEET}-{device}", ca_file=Path(spec.ca),
                cert_file=Path(spec.pki) / f"{device}.crt", key_file=Path(spec.pki) / f"{device}.key",
            )  # fmt: skip
            opts = AgentOptions(
                device_id=device, fleet=FLEET, groups=(GROUP,), state_dir=sync_dir,
                factory_bundle=Path(spec.factory), link=link, telemetry_interval_s=spec.telemetry_interval_s,
                chunk_window=spec.chunk_window,
            )  # fmt: skip
            outbox = Outbox(sync_dir / "outbox.db", default_ttl_s=None)
            try:
                agent = SyncAgent(opts, host, self.trust, StateStore(sync_dir, trust=self.trust), outbox)
            except BaseException:
                outbox.close()
                raise
            self.hosts.append(host)
            self.agents.append(agent)
        self._camera = threading.Thread(target=self._camera_loop, name="sim-camera", daemon=True)
        self._camera.start()
        for agent in self.agents:
            agent.start()
            time.sleep(0.002)  # a little spacing: the broker does every TLS handshake on one thread
        self.start_s = time.monotonic() - t0

    def _camera_loop(self) -> None:
        """Every device gets ``fps`` frames per second, round robin on this one thread."""
        n = len(self.hosts)
        if n == 0 or self.spec.fps <= 0:
            return
        period = 1.0 / (self.spec.fps * n)
        offsets = [i * 7 for i in range(n)]
        nxt = time.monotonic()
        i = 0
        while not self._stop.is_set():
            k = i % n
            c0 = time.thread_time()
            self.hosts[k].step(self.frames[(i // n + offsets[k]) % len(self.frames)], i // n)
            self.camera_busy_s += time.thread_time() - c0
            self.camera_frames += 1
            i += 1
            nxt += period
            delay = nxt - time.monotonic()
            if delay > 0.002:
                time.sleep(delay)
            elif delay < -2.0:  # more than 2 s behind: skip ahead rather than burst
                nxt = time.monotonic()
                self.camera_resets += 1

    def status(self, detail: bool = False) -> dict[str, Any]:
        proc = psutil.Process()
        phases: Counter[str] = Counter()
        serving: Counter[str] = Counter()
        connected = 0
        errors: Counter[str] = Counter()
        for agent, host in zip(self.agents, self.hosts, strict=True):
            phases[agent.state.phase] += 1
            serving[host.serving().version] += 1
            connected += int(agent.link.connected)
            if agent.link.last_error and not agent.link.connected:
                errors[agent.link.last_error[:120]] += 1
        out: dict[str, Any] = {
            "devices": len(self.agents), "connected": connected, "phases": dict(phases),
            "serving": dict(serving), "link_errors": dict(errors.most_common(3)),
            "rss": proc.memory_info().rss, "rss_before": self.rss_before, "fds": proc.num_fds(),
            "threads": proc.num_threads(), "camera_frames": self.camera_frames,
            "camera_resets": self.camera_resets, "camera_busy_s": self.camera_busy_s,
            "start_s": self.start_s,
            "frames_per_device": [h.frames for h in self.hosts],
        }  # fmt: skip
        if detail:
            out["loaded"] = {h.device: list(h.loaded) for h in self.hosts if h.loaded}
            out["serving_by_device"] = {h.device: h.serving().version for h in self.hosts}
        return out

    def _capture(self) -> list[str]:
        """Shadow every outbox's ``put`` so the ``device:seq`` of each telemetry record is kept."""
        keys: list[str] = []
        for agent in self.agents:
            outbox, device = agent.outbox, agent.opts.device_id
            original = type(outbox).put.__get__(outbox)

            def put(
                stream: str, payload: Any, *a: Any, _o: Any = original, _d: str = device, **kw: Any
            ) -> int:
                seq = int(_o(stream, payload, *a, **kw))
                if stream == "telemetry":
                    keys.append(f"{_d}:{seq}")
                return seq

            outbox.put = put  # type: ignore[method-assign]
        return keys

    def _release(self) -> None:
        for agent in self.agents:
            with contextlib.suppress(AttributeError):
                del agent.outbox.put

    def telemetry_live(self, seconds: float) -> dict[str, Any]:
        """Every agent's real ``_telemetry_once``, round robin, back to back, for ``seconds``."""
        keys = self._capture()
        produced = 0
        t0 = time.monotonic()
        c0 = time.thread_time()
        try:
            while time.monotonic() - t0 < seconds:
                for agent in self.agents:
                    agent._telemetry_once()
                    produced += 1
                    if time.monotonic() - t0 >= seconds:
                        break
        finally:
            self._release()
        return {"produced": len(keys), "calls": produced, "seconds": time.monotonic() - t0,
                "cpu_s": time.thread_time() - c0, "keys": keys}  # fmt: skip

    def telemetry_prefill(self, per_device: int) -> dict[str, Any]:
        """Put ``per_device`` telemetry records (the shape ``_telemetry_once`` makes) in every
        outbox in one transaction each, then wake the senders."""
        t0 = time.monotonic()
        keys: list[str] = []
        for agent in self.agents:
            body = {"kind": "metrics", "device": agent.opts.device_id, "phase": agent.state.phase,
                    "pipeline": agent.host.summary(), "system": agent.metrics.collect(),
                    "outbox": agent.outbox.stats(), "drift": agent.drift.snapshot()}  # fmt: skip
            seqs = agent.outbox.put_many("telemetry", [body] * per_device, priority=PRIORITY_TELEMETRY)
            keys += [f"{agent.opts.device_id}:{seq}" for seq in seqs]
            agent._wake_sender.set()
        return {"produced": len(keys), "seconds": time.monotonic() - t0, "keys": keys}

    def stop(self) -> dict[str, Any]:
        t0 = time.monotonic()
        self._stop.set()
        if self._camera is not None:
            self._camera.join(5.0)
        with ThreadPoolExecutor(max_workers=min(64, max(1, len(self.agents)))) as pool:
            list(pool.map(_stop_agent, self.agents))
        for host in self.hosts:
            with contextlib.suppress(Exception):
                host.serving().close()
        return {"stop_s": time.monotonic() - t0}


def _stop_agent(agent: SyncAgent) -> None:
    try:
        agent.stop()
    except Exception:
        log.exception("stopping %s failed", agent.opts.device_id)
    finally:
        agent.outbox.close()


def worker_main(conn: Any, spec: WorkerSpec) -> None:
    """Entry point of a worker process: build and start the devices, then serve commands."""
    counter = _LogCounter()
    logging.basicConfig(level=logging.ERROR, format="worker %(process)d %(levelname)s %(name)s: %(message)s")
    logging.getLogger().addHandler(counter)
    logging.getLogger().setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        if handler is not counter:
            handler.setLevel(logging.ERROR)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator stops us
    worker = _Worker(spec)
    try:
        worker.build()
        conn.send(("ready", worker.status()))
    except BaseException as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        worker.stop()
        return
    while True:
        try:
            cmd, arg = conn.recv()
        except (EOFError, OSError):
            cmd, arg = "stop", None
        try:
            if cmd == "status":
                reply: Any = worker.status(bool(arg))
                reply["log_counts"] = dict(counter.counts)
                reply["log_samples"] = list(counter.samples)
            elif cmd == "pending":
                reply = {"pending": sum(int(a.outbox.stats()["pending"]) for a in worker.agents)}
            elif cmd == "telemetry_live":
                reply = worker.telemetry_live(float(arg))
            elif cmd == "telemetry_prefill":
                reply = worker.telemetry_prefill(int(arg))
            elif cmd == "stop":
                reply = worker.stop()
            else:
                reply = {"error": f"unknown command {cmd!r}"}
        except Exception as exc:
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        with contextlib.suppress(OSError, BrokenPipeError):
            conn.send(("ok", reply))
        if cmd == "stop":
            break
    conn.close()


# -- coordinator side -------------------------------------------------------------------------------
def _broker_module() -> Any:
    """``tests/mqtt_broker.py`` (a real mosquitto with generated PKI and ACL)."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    import mqtt_broker

    return mqtt_broker


def _quiet_broker_class(base: Any) -> Any:
    from edge_runtime.sync import broker_config

    class QuietBroker(base):  # type: ignore[misc, valid-type]
        """The test broker with ``log_type error warning notice`` instead of ``all``."""

        def _write_conf(self) -> None:
            conf = broker_config.render_mosquitto_conf(
                cafile=self.ca_path, certfile=self.server_cert, keyfile=self.server_key,
                acl_file=self.acl_path, port=self.port, bind_address="127.0.0.1",
                persistence_location=self.db_dir, user="root" if os.geteuid() == 0 else None,
                log_types=("error", "warning", "notice"),
            )  # fmt: skip
            self.conf_path.write_text(conf)

        def _wait_ready(self, timeout: float) -> None:
            super()._wait_ready(max(timeout, 30.0))  # a big ACL and a busy machine

    return QuietBroker


def device_ids(n: int) -> list[str]:
    return [f"sim-{i:05d}" for i in range(n)]


class Workers:
    """``n`` devices split evenly over worker processes (spawned)."""

    def __init__(self, ctx: Ctx, n: int, tag: str) -> None:
        self.ctx = ctx
        self.n = n
        self.devices = device_ids(n)
        k = ctx.cfg.workers_for(n)
        self.split = [self.devices[i::k] for i in range(k)]
        mpctx = mp.get_context("spawn")
        self.conns: list[Any] = []
        self.procs: list[Any] = []
        self.start_errors: list[str] = []
        self.ready_status: list[dict[str, Any]] = []
        work = ctx.work / "devices" / tag
        for i, devs in enumerate(self.split):
            parent, child = mpctx.Pipe()
            spec = WorkerSpec(
                index=i, devices=devs, port=ctx.broker.port, ca=str(ctx.broker.ca_path),
                pki=str(ctx.broker.pki_dir), factory=str(ctx.factory), trust_pub=str(ctx.pub_path),
                work=str(work), fps=ctx.cfg.fps_for(n), telemetry_interval_s=ctx.cfg.telemetry_interval_s,
                probe=ctx.cfg.probe,
            )  # fmt: skip
            proc = mpctx.Process(
                target=worker_main, args=(child, spec), name=f"fleet-worker-{i}", daemon=True
            )
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def wait_ready(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        for conn in self.conns:
            if not conn.poll(max(0.0, end - time.monotonic())):
                self.start_errors.append("worker did not build its devices in time")
                return False
            kind, body = conn.recv()
            if kind != "ready":
                self.start_errors.append(str(body))
                return False
            self.ready_status.append(body)
        return True

    def ask(self, cmd: str, arg: Any = None, timeout: float = 120.0) -> list[dict[str, Any]]:
        for conn in self.conns:
            conn.send((cmd, arg))
        out = []
        for conn in self.conns:
            if not conn.poll(timeout):
                raise RuntimeError(f"a worker did not answer {cmd!r} within {timeout} s")
            _kind, body = conn.recv()
            out.append(body)
        return out

    def status(self, detail: bool = False) -> dict[str, Any]:
        parts = self.ask("status", detail, timeout=60.0)
        total: dict[str, Any] = {"connected": 0, "devices": 0, "phases": Counter(), "serving": Counter(),
                                 "rss": 0, "rss_before": 0, "fds": 0, "threads": 0,
                                 "camera_frames": 0, "camera_resets": 0, "camera_busy_s": 0.0,
                                 "link_errors": Counter(), "log_counts": Counter(), "log_samples": [],
                                 "frames_per_device": [], "loaded": {}, "serving_by_device": {},
                                 "start_s": 0.0, "fds_per_worker": [], "rss_per_worker": []}  # fmt: skip
        for p in parts:
            for key in ("connected", "devices", "rss", "rss_before", "fds", "threads",
                        "camera_frames", "camera_resets", "camera_busy_s"):  # fmt: skip
                total[key] += p.get(key, 0)
            for key in ("phases", "serving", "link_errors", "log_counts"):
                total[key].update(p.get(key, {}))
            total["log_samples"] += p.get("log_samples", [])[:3]
            total["frames_per_device"] += p.get("frames_per_device", [])
            total["loaded"].update(p.get("loaded", {}))
            total["serving_by_device"].update(p.get("serving_by_device", {}))
            total["start_s"] = max(total["start_s"], p.get("start_s", 0.0))
            total["fds_per_worker"].append(p.get("fds", 0))
            total["rss_per_worker"].append(p.get("rss", 0))
        for key in ("phases", "serving", "link_errors", "log_counts"):
            total[key] = dict(total[key])
        return total

    def wait_connected(self, timeout: float) -> tuple[bool, float, dict[str, Any]]:
        t0 = time.monotonic()
        status: dict[str, Any] = {}
        while time.monotonic() - t0 < timeout:
            status = self.status()
            if status["connected"] >= self.n:
                return True, time.monotonic() - t0, status
            time.sleep(0.5)
        return False, time.monotonic() - t0, status

    def stop(self) -> float:
        t0 = time.monotonic()
        with contextlib.suppress(Exception):
            self.ask("stop", timeout=120.0)
        for proc in self.procs:
            proc.join(30.0)
            if proc.is_alive():
                proc.kill()
                proc.join(10.0)
        for conn in self.conns:
            conn.close()
        return time.monotonic() - t0


class UpdateLog:
    """Every ``update`` event the operator receives: ``(t, device, version, phase, reason)``."""

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self._lock = threading.Lock()
        self.events: list[tuple[float, str, str, str, str]] = []

    def __call__(self, topic: str, payload: bytes) -> None:
        if not topic.startswith(self._prefix) or not topic.endswith("/update"):
            return
        t = time.monotonic()
        device = topic[len(self._prefix) :].split("/", 1)[0]
        try:
            body = json.loads(payload)
        except ValueError:
            return
        with self._lock:
            self.events.append((t, device, str(body.get("version", "")), str(body.get("phase", "")),
                                str(body.get("reason", ""))))  # fmt: skip

    def first(self, phase: str, version: str, since: float) -> dict[str, float]:
        """Device -> time of its first ``phase`` event for ``version`` after ``since``."""
        out: dict[str, float] = {}
        with self._lock:
            rows = list(self.events)
        for t, device, v, p, _r in rows:
            if t >= since and p == phase and v == version and device not in out:
                out[device] = t
        return out

    def reasons(self, phase: str, version: str, since: float) -> dict[str, str]:
        with self._lock:
            return {d: r for t, d, v, p, r in self.events if t >= since and p == phase and v == version}

    def devices_with(self, version: str, since: float, phases: set[str]) -> set[str]:
        with self._lock:
            return {d for t, d, v, p, _r in self.events if t >= since and v == version and p in phases}


class CpuMeter:
    """CPU seconds of the broker, the workers, this process and the whole machine over a window."""

    def __init__(
        self, broker_pid: int | None, worker_pids: Sequence[int], extra_pids: Sequence[int] = ()
    ) -> None:
        self._broker = _proc(broker_pid)
        self._workers = [p for p in (_proc(x) for x in worker_pids) if p is not None]
        self._extra = [p for p in (_proc(x) for x in extra_pids) if p is not None]
        self._self = psutil.Process()
        self.t0 = time.monotonic()
        self._b0 = _cpu(self._broker)
        self._io0 = _io(self._broker)
        self._w0 = sum(_cpu(p) for p in self._workers)
        self._e0 = sum(_cpu(p) for p in self._extra)
        self._s0 = _cpu(self._self)
        self._m0 = _machine_busy()

    def stop(self) -> dict[str, Any]:
        wall = max(1e-9, time.monotonic() - self.t0)
        broker = _cpu(self._broker) - self._b0
        io1 = _io(self._broker)
        workers = sum(_cpu(p) for p in self._workers) - self._w0
        extra = sum(_cpu(p) for p in self._extra) - self._e0
        own = _cpu(self._self) - self._s0
        machine = _machine_busy() - self._m0
        ours = broker + workers + extra + own
        cores = os.cpu_count() or 1
        return {
            "wall_s": round(wall, 3),
            "broker_cpu_s": round(broker, 3),
            "broker_pct_of_core": round(100 * broker / wall, 1),
            "broker_bytes_out": io1[1] - self._io0[1],
            "broker_bytes_in": io1[0] - self._io0[0],
            "workers_cpu_s": round(workers, 3),
            "workers_cores": round(workers / wall, 2),
            "consumers_cpu_s": round(extra, 3),
            "coordinator_cpu_s": round(own, 3),
            "machine_busy_pct": round(100 * machine / (wall * cores), 1),
            "outside_cores": round(max(0.0, machine - ours) / wall, 2),
        }


def _proc(pid: int | None) -> psutil.Process | None:
    if pid is None:
        return None
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def _cpu(p: psutil.Process | None) -> float:
    if p is None:
        return 0.0
    try:
        t = p.cpu_times()
    except psutil.Error:
        return 0.0
    return float(t.user + t.system)


def _io(p: psutil.Process | None) -> tuple[int, int]:
    """(bytes read, bytes written) by ``p`` through read/write syscalls, sockets included."""
    if p is None:
        return 0, 0
    try:
        io = p.io_counters()
    except (psutil.Error, AttributeError):
        return 0, 0
    return int(getattr(io, "read_chars", io.read_bytes)), int(getattr(io, "write_chars", io.write_bytes))


def _machine_busy() -> float:
    t = psutil.cpu_times()
    idle = t.idle + getattr(t, "iowait", 0.0)
    return float(sum(t) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0) - idle)


def _broker_info(pid: int | None) -> dict[str, Any]:
    p = _proc(pid)
    if p is None:
        return {}
    try:
        limit = p.rlimit(psutil.RLIMIT_NOFILE)[0] if hasattr(p, "rlimit") else None
        return {"rss": p.memory_info().rss, "fds": p.num_fds(), "fd_limit": limit}
    except psutil.Error:
        return {}


def _pct(times: Sequence[float], q: float) -> float | None:
    if not times:
        return None
    ordered = sorted(times)
    k = max(0, min(len(ordered) - 1, math.ceil(q / 100.0 * len(ordered)) - 1))
    return round(ordered[k], 3)


def _quantiles(times: dict[str, float], t0: float, n: int) -> dict[str, Any]:
    """50/90/100 % of ``n`` devices (None where not reached) after ``t0``, in seconds."""
    rel = sorted(t - t0 for t in times.values())
    out: dict[str, Any] = {"count": len(rel)}
    for q in (50, 90, 100):
        need = math.ceil(q / 100.0 * n)
        out[f"p{q}_s"] = round(rel[need - 1], 3) if need and len(rel) >= need else None
    return out


_CONSUMER = r"""
import json, sys, threading, time
import paho.mqtt.client as mqtt

port, ca, cert, key, topic, client_id = sys.argv[1:7]
stamps = []
keys = []

def on_message(_c, _u, msg):
    p = msg.payload
    stamps.append(time.monotonic())
    keys.append(msg.topic.split("/")[-2] + ":" + p[7:p.index(b",")].decode())

subscribed = threading.Event()
client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
client.tls_set(ca_certs=ca, certfile=cert, keyfile=key)
client.on_message = on_message
client.on_subscribe = lambda *_a: subscribed.set()
client.connect("127.0.0.1", int(port), 30)
client.loop_start()
client.subscribe(topic, qos=1)
print("ready" if subscribed.wait(15) else "not subscribed", flush=True)
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "mark":
        print(json.dumps([len(stamps)]), flush=True)
    elif cmd == "dump":
        out = {"stamps": stamps[:], "keys": keys[:]}
        del stamps[:], keys[:]
        print(json.dumps(out), flush=True)
    elif cmd == "stop":
        break
client.disconnect()
client.loop_stop()
"""


class Consumer:
    """A telemetry consumer process (paho, MQTT 5, QoS 1, mutual TLS with the operator certificate)
    in the shared subscription group: it stamps every message with ``time.monotonic()`` (the same
    clock as this process) and keeps ``device:seq`` to find duplicates and losses."""

    def __init__(self, broker: Any, topic: str, name: str) -> None:
        cert, key = broker.client_cert(OPERATOR)
        args = [str(broker.port), str(broker.ca_path), str(cert), str(key), topic, name]
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _CONSUMER, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline().strip()
        if line != "ready":
            self.close()
            raise RuntimeError(f"the consumer {name} did not subscribe: {line!r}")

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _ask(self, cmd: str) -> Any:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(cmd + "\n")
        self._proc.stdin.flush()
        return json.loads(self._proc.stdout.readline())

    def count(self) -> int:
        return int(self._ask("mark")[0])

    def dump(self) -> dict[str, list[Any]]:
        return dict(self._ask("dump"))

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._proc.communicate("stop\n", timeout=30)
            except Exception:
                self._proc.kill()
                self._proc.communicate()
        else:
            self._proc.communicate()


@dataclass
class Ctx:
    """What the sections share."""

    cfg: BenchConfig
    work: Path
    broker: Any
    fleet: FleetClient
    updates: UpdateLog
    key: Any
    key_path: Path
    pub_path: Path
    trust: TrustStore
    factory: Path
    good: Path
    bad: Path
    log: Callable[[str], None]
    notes: list[str] = field(default_factory=list)


def _rollout_doc(cfg: BenchConfig, canary: float = 100.0, *, lenient: bool = False) -> Rollout:
    """The rollout of the bench's candidates; ``lenient`` (the ladder) switches off the probation's
    latency and fps rules, which on this machine measure how the co-located simulated devices starve
    each other (see the module doc), not the candidate."""
    extra: dict[str, Any] = {"max_latency_ratio": 1000.0, "min_fps_ratio": 0.0} if lenient else {}
    return Rollout(
        canary_percent=canary, probation_s=cfg.probation_s, probation_min_frames=cfg.probation_min_frames,
        **extra,
    )  # fmt: skip


def clear_group(fleet: FleetClient) -> None:
    """Remove the group's retained desired and previous documents (a fresh fleet for the next step)."""
    for leaf in ("desired", "previous"):
        info = fleet.link.publish(f"{fleet.topics.root}/group/{GROUP}/{leaf}", b"", qos=1, retain=True)
        if info is not None:
            info.wait_for_publish(10)


def rollout(
    ctx: Ctx, workers: Workers, packed: Path, timeout: float, *, lenient: bool = False
) -> dict[str, Any]:
    """Publish ``packed`` to the group (upload + signed document) and follow every device to
    ``committed``; times from the start of the publish."""
    cfg, n = ctx.cfg, workers.n
    meter = CpuMeter(ctx.broker.pid, workers.pids)
    t0 = time.monotonic()
    bundle, upload_s = ctx.fleet.upload_bundle(packed, chunk_size=cfg.chunk_kb * 1024)
    t_up = time.monotonic()
    doc = ctx.fleet.publish_document(
        f"group:{GROUP}", bundle, ctx.key, rollout=_rollout_doc(cfg, lenient=lenient), trust=ctx.trust
    )
    t_doc = time.monotonic()
    version = bundle.version
    end = t0 + timeout
    done: dict[str, float] = {}
    failed: dict[str, str] = {}
    while time.monotonic() < end:
        done = ctx.updates.first("committed", version, t0)
        failed = {
            **ctx.updates.reasons("rolled_back", version, t0),
            **ctx.updates.reasons("rejected", version, t0),
        }
        if len(set(done) | set(failed)) >= n:
            break
        time.sleep(0.1)
    cpu = meter.stop()
    phases = {
        "accepted (downloading)": ctx.updates.first("downloading", version, t0),
        "downloaded (verifying)": ctx.updates.first("verifying", version, t0),
        "swapped in (probation)": ctx.updates.first("probation", version, t0),
        "committed": done,
    }
    last_verified = max(phases["downloaded (verifying)"].values(), default=t_doc)
    fanout_s = max(1e-9, last_verified - t_doc)
    return {
        "n": n,
        "version": version,
        "bundle_bytes": bundle.size,
        "chunks": math.ceil(bundle.size / (cfg.chunk_kb * 1024)),
        "sequence": doc.sequence,
        "upload_s": round(upload_s, 3),
        "upload_and_document_s": round(t_doc - t0, 3),
        "document_s": round(t_doc - t_up, 3),
        "phases": {k: _quantiles(v, t0, n) for k, v in phases.items()},
        "committed": len(done),
        "failed": len(failed),
        "failed_reasons": dict(Counter(r[:100] for r in failed.values()).most_common(3)),
        "all_committed": len(done) >= n,
        "fanout_bytes": bundle.size * n,
        "fanout_mb_per_s": round(bundle.size * n / fanout_s / 1e6, 2),
        "cpu": cpu,
    }


def telemetry_section(ctx: Ctx, workers: Workers) -> dict[str, Any]:
    cfg = ctx.cfg
    topic = f"$share/{SHARE_GROUP}/{ctx.fleet.topics.all_devices('telemetry')}"
    consumers = [Consumer(ctx.broker, topic, f"bench-consumer-{i}") for i in range(2)]
    offered = round(workers.n / cfg.telemetry_interval_s, 1)
    out: dict[str, Any] = {"topic": topic, "consumers": len(consumers), "devices": workers.n,
                           "default_interval_s": cfg.telemetry_interval_s,
                           "offered_at_default_interval_per_s": offered}  # fmt: skip
    try:
        for mode in ("live", "drain"):
            for c in consumers:
                c.dump()  # start from nothing (the agents' own interval keeps sending)
            meter = CpuMeter(ctx.broker.pid, workers.pids, [c.pid for c in consumers])
            t0 = time.monotonic()
            if mode == "live":
                parts = workers.ask("telemetry_live", cfg.telemetry_s, timeout=cfg.telemetry_s + 120)
            else:
                parts = workers.ask("telemetry_prefill", cfg.prefill, timeout=120)
            t_prod = time.monotonic()
            produced_keys = {k for p in parts for k in p.get("keys", [])}
            produced = len(produced_keys)
            drained = False
            drain_end = time.monotonic() + 60.0 + produced / 500.0
            while time.monotonic() < drain_end:
                if sum(p["pending"] for p in workers.ask("pending")) == 0:
                    drained = True
                    break
                time.sleep(0.25)
            t_sent = time.monotonic()
            time.sleep(1.0)  # the last PUBACKs came; let the broker hand out the last messages
            cpu = meter.stop()
            dumps = [c.dump() for c in consumers]
            stamps = sorted(s for d in dumps for s in d["stamps"] if s >= t0)
            keys = [k for d in dumps for k in d["keys"]]
            unique = set(keys)
            per_consumer = [len(d["stamps"]) for d in dumps]
            busy = [s for s in stamps if s <= (t_prod if mode == "live" else t_sent)]
            span = (busy[-1] - busy[0]) if len(busy) > 1 else math.nan
            rate = (len(busy) - 1) / span if len(busy) > 1 and span > 0 else math.nan
            out[mode] = {
                "produced": produced,
                "produce_s": round(t_prod - t0, 3),
                "produced_per_s": round(produced / max(1e-9, t_prod - t0), 1),
                "received": len(keys),
                "unique": len(unique),
                "duplicates": len(keys) - len(unique),
                "lost": len(produced_keys - unique),
                "other_records": len(unique - produced_keys),
                "all_sent": drained,
                "sent_s": round(t_sent - t0, 3),
                "delivered_per_s": round(rate, 1),
                "per_consumer": per_consumer,
                "split": round(min(per_consumer) / max(1, *per_consumer), 3),
                "broker_us_per_msg": round(cpu["broker_cpu_s"] / max(1, len(keys)) * 1e6, 1),
                "cpu": cpu,
            }
    finally:
        for c in consumers:
            c.close()
    return out


def canary_section(ctx: Ctx, workers: Workers) -> dict[str, Any]:
    cfg, n = ctx.cfg, workers.n
    devices = workers.devices
    bundle, _ = ctx.fleet.upload_bundle(ctx.bad, chunk_size=cfg.chunk_kb * 1024)
    pct = cfg.canary_percent
    buckets = sorted(canary_bucket(d, bundle.sha256) for d in devices)
    expected = sum(1 for b in buckets if b < pct)
    raised = None
    if expected == 0:  # a small fleet: no device below the percentage
        raised = round(buckets[0] + 0.01, 2)
        ctx.notes.append(
            f"canary: no device of {n} is in the {pct:g}% canary of this bundle; canary_percent raised to "
            f"{raised} so that one device is (follow_rollout promotes nothing without canaries)"
        )
        pct = raised
    t0 = time.monotonic()
    doc = ctx.fleet.publish_document(
        f"group:{GROUP}", bundle, ctx.key, rollout=_rollout_doc(cfg, canary=pct), trust=ctx.trust
    )
    outcome = follow_rollout(
        ctx.fleet, doc, devices, ctx.key, abort_share=cfg.abort_share, timeout_s=cfg.commit_timeout(n),
        trust=ctx.trust,
    )  # fmt: skip
    t_decided = time.monotonic()
    canaries = set(outcome.canaries)
    # every device ends on the re-issued previous document (GOOD), canaries after their rollback
    settled: dict[str, float] = {}
    end = time.monotonic() + cfg.commit_timeout(n)
    while time.monotonic() < end and outcome.result == "aborted":
        settled = ctx.updates.first("committed", GOOD, t_decided - 0.5)
        if len(settled) >= n:
            break
        time.sleep(0.2)
    status = workers.status(detail=True)
    installing = {"downloading", "verifying", "staged", "selftest", "probation", "committed"}
    touched = ctx.updates.devices_with(BAD, t0, installing)
    loaded_bad = {d for d, versions in status["loaded"].items() if BAD in versions}
    rolled = ctx.updates.reasons("rolled_back", BAD, t0)
    skipped = ctx.updates.first("skipped", BAD, t0)
    committed_bad = ctx.updates.first("committed", BAD, t0)
    serving = Counter(status["serving_by_device"].values())
    return {
        "n": n,
        "canary_percent": pct,
        "canary_percent_raised_from": cfg.canary_percent if raised is not None else None,
        "result": outcome.result,
        "decided_s": round(t_decided - t0, 3),
        "settled_s": round(max(settled.values()) - t0, 3) if len(settled) >= n else None,
        "canaries": len(canaries),
        "canaries_rolled_back": len(set(rolled) & canaries),
        "canaries_committed_bad": len(set(committed_bad) & canaries),
        "rollback_reasons": dict(Counter(r.split(":")[0][:60] for r in rolled.values()).most_common(3)),
        "non_canaries": n - len(canaries),
        "non_canaries_skipped": len(set(skipped) - canaries),
        "non_canaries_touched_bad": len(touched - canaries),
        "non_canaries_loaded_bad": len(loaded_bad - canaries),
        "devices_loaded_bad": len(loaded_bad),
        "rollback_document": None if outcome.document is None else outcome.document.bundle.version,
        "serving_after": dict(serving),
        "all_back_on_previous": serving.get(GOOD, 0) == n,
        "acknowledged_reissued": len(settled),
        "not_acknowledged": sorted(set(devices) - set(settled))[:20],
        "not_acknowledged_count": n - len(settled),
        "phases_after": status["phases"],
    }


def _limit_of(step: dict[str, Any], cfg: BenchConfig) -> str:
    """What stopped a ladder step, in words, from its figures."""
    if step.get("skipped"):
        return str(step["skipped"])
    st = step.get("status", {})
    errors = " ".join(st.get("link_errors", {}))
    logs = " ".join(st.get("log_samples", []))
    if "Too many open files" in errors + logs or "EMFILE" in errors + logs:
        return "file descriptors (EMFILE in the device links or the broker)"
    if step.get("start_error"):
        return f"worker start: {step['start_error']}"
    mem = step.get("memory_available_mb")
    if mem is not None and mem < cfg.mem_reserve_mb / 2:
        return f"memory ({mem} MB left available)"
    cpu = step.get("cpu", {})
    broker_pct = cpu.get("broker_pct_of_core", 0.0)
    busy = cpu.get("machine_busy_pct", 0.0)
    cores = os.cpu_count() or 1
    if broker_pct >= 90.0:
        return (
            f"broker CPU: mosquitto (single-threaded) at {broker_pct:.0f} % of one core; machine "
            f"{busy:.0f} % busy"
        )
    if busy >= 85.0:
        return (
            f"CPU: machine {busy:.0f} % busy over {cores} cores (device simulation "
            f"{cpu.get('workers_cores', 0):.2f} cores, mosquitto {broker_pct:.0f} % of one core, outside "
            f"{cpu.get('outside_cores', 0):.2f} cores)"
        )
    return f"timeout without a saturated resource (machine {busy:.0f} % busy, broker {broker_pct:.0f} %)"


def fleet_step(
    ctx: Ctx,
    n: int,
    tag: str,
    sections: Callable[[Workers], dict[str, Any]] | None = None,
    *,
    lenient: bool = False,
) -> dict[str, Any]:
    """A fresh fleet of ``n`` devices: start, connect, one rollout of GOOD, (more sections), stop."""
    cfg = ctx.cfg
    clear_group(ctx.fleet)
    step: dict[str, Any] = {"n": n, "workers": cfg.workers_for(n), "lenient_probation": lenient}
    broker0 = _broker_info(ctx.broker.pid)
    mem0 = psutil.virtual_memory().available
    t0 = time.monotonic()
    workers = Workers(ctx, n, tag)
    step["split"] = [len(s) for s in workers.split]
    try:
        meter = CpuMeter(ctx.broker.pid, workers.pids)
        ok = workers.wait_ready(cfg.connect_timeout(n) + 60.0)
        step["build_s"] = round(time.monotonic() - t0, 2)
        if not ok:
            step["start_error"] = "; ".join(workers.start_errors)[:300]
            step["held"] = False
            return step
        connected, connect_s, status = workers.wait_connected(cfg.connect_timeout(n))
        step["connect_cpu"] = meter.stop()
        step["all_connected"] = connected
        step["connected"] = status.get("connected", 0)
        step["connect_s"] = round(time.monotonic() - t0, 2)
        step["connect_after_build_s"] = round(connect_s, 2)
        time.sleep(1.0)  # the retained state publishes and first subscriptions settle
        idle = CpuMeter(ctx.broker.pid, workers.pids)
        time.sleep(3.0)
        step["idle_cpu"] = idle.stop()
        step["idle_workers_ms_per_device_s"] = round(step["idle_cpu"]["workers_cpu_s"] / 3.0 / n * 1e3, 3)
        broker1 = _broker_info(ctx.broker.pid)
        step["broker"] = broker1
        if broker0 and broker1:
            step["broker_kb_per_connection"] = round((broker1["rss"] - broker0["rss"]) / 1024 / n, 1)
        step["memory_available_mb"] = round(psutil.virtual_memory().available / MIB)
        step["device_rss_kb"] = round((status["rss"] - status["rss_before"]) / 1024 / n, 1)
        step["worker_rss_mb"] = [round(r / MIB) for r in status["rss_per_worker"]]
        step["memory_used_mb"] = round((mem0 - psutil.virtual_memory().available) / MIB)
        step["fds_per_device"] = round(status["fds"] / n, 2)
        step["threads"] = status["threads"]
        if not connected:
            step["status"] = status
            step["held"] = False
            return step
        ro = rollout(ctx, workers, ctx.good, cfg.commit_timeout(n), lenient=lenient)
        step["rollout"] = ro
        step["cpu"] = ro["cpu"]
        status = workers.status()
        step["camera"] = _camera_figures(status, cfg, n, ro["cpu"]["wall_s"])
        step["held"] = bool(ro["all_committed"])
        if not step["held"]:
            step["status"] = status
        if sections is not None and step["held"]:
            step.update(sections(workers))
        return step
    finally:
        step["stop_s"] = round(workers.stop(), 2)


def _camera_figures(status: dict[str, Any], cfg: BenchConfig, n: int, wall: float) -> dict[str, Any]:
    frames = status["frames_per_device"]
    return {
        "frames_per_device_min": min(frames) if frames else 0,
        "frames_per_device_median": statistics.median(frames) if frames else 0,
        "camera_cpu_s": round(status["camera_busy_s"], 2),
        "camera_resets": status["camera_resets"],
        "target_fps": round(cfg.fps_for(n), 3),
    }


def _setup_bundles(work: Path, key_path: Path, cfg: BenchConfig) -> tuple[Path, Path, Path]:
    bundles = work / "bundles"
    bundles.mkdir(parents=True)
    payload = cfg.bundle_kb * 1024
    factory = make_bundle(bundles, FACTORY, key_path, pack=False)
    good = make_bundle(bundles, GOOD, key_path, payload_bytes=payload)
    bad = make_bundle(bundles, BAD, key_path, collapse=True, payload_bytes=payload)
    return factory, good, bad


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every section and return the figures (JSON-serialisable)."""
    started = time.monotonic()
    mqtt_broker = _broker_module()
    ladder = cfg.ladder()
    biggest = max([cfg.n, *ladder])
    report: dict[str, Any] = {
        "config": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
            "cpus": os.cpu_count(),
            "memory_total_mb": round(psutil.virtual_memory().total / MIB),
            "memory_available_mb_at_start": round(psutil.virtual_memory().available / MIB),
            "fd_limit": _fd_limit(),
            "mosquitto": _mosquitto_version(mqtt_broker.find_mosquitto()),
            "openssl": ssl.OPENSSL_VERSION,
            "python": sys.version.split()[0],
            "ladder": ladder,
            "load_at_start": [round(x, 2) for x in os.getloadavg()],
        }
    }
    tmp_ctx: Any = (
        contextlib.nullcontext(str(cfg.keep))
        if cfg.keep
        else tempfile.TemporaryDirectory(prefix="edgert-bench-fleet-")
    )
    with tmp_ctx as tmp:
        work = Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        key_path, pub_path = generate_keypair(work / "keys", name="bench")
        trust = TrustStore.from_files([pub_path])
        log(f"generating {biggest} device certificates and the broker ACL ...")
        t_pki = time.monotonic()
        broker = _quiet_broker_class(mqtt_broker.Broker)(
            work / "broker",
            fleet=FLEET,
            devices={d: [GROUP] for d in device_ids(biggest)},
            operators=[OPERATOR],
        )
        report["config"]["pki_s"] = round(time.monotonic() - t_pki, 1)
        fleet: FleetClient | None = None
        try:
            broker.start()
            report["config"]["broker_idle"] = _broker_info(broker.pid)
            op_cert, op_key = broker.client_cert(OPERATOR)
            fleet = FleetClient(
                LinkSettings(host="127.0.0.1", port=broker.port, client_id="bench-operator",
                             ca_file=broker.ca_path, cert_file=op_cert, key_file=op_key),
                FLEET,
            )  # fmt: skip
            fleet.connect()
            updates = UpdateLog(fleet.topics.root + "/device/")
            fleet.watch(["update"], updates)
            factory, good, bad = _setup_bundles(work, key_path, cfg)
            ctx = Ctx(cfg, work, broker, fleet, updates, load_private_key(key_path), key_path, pub_path,
                      trust, factory, good, bad, log)  # fmt: skip

            def main_sections(workers: Workers) -> dict[str, Any]:
                log(f"telemetry through a shared subscription group of 2 consumers ({workers.n} devices) ...")
                tel = telemetry_section(ctx, workers)
                log(f"canary abort with a bad candidate ({cfg.canary_percent:g}% canaries) ...")
                can = canary_section(ctx, workers)
                return {"telemetry": tel, "canary": can}

            log(
                f"fleet of {cfg.n} devices over {cfg.workers_for(cfg.n)} worker processes: connect, "
                "rollout ..."
            )
            report["main"] = fleet_step(ctx, cfg.n, f"n{cfg.n}", main_sections)
            steps: list[dict[str, Any]] = []
            held = [cfg.n] if report["main"].get("held") else []
            per_device = _memory_per_device(report["main"])
            for n in ladder:
                need_mb = per_device * n / MIB if per_device else 0.0
                avail = psutil.virtual_memory().available / MIB
                if per_device and avail - need_mb < cfg.mem_reserve_mb:
                    steps.append({"n": n, "held": False, "skipped": (
                        f"memory: ~{need_mb:.0f} MB needed (measured {per_device / 1024:.0f} KB per device, "
                        f"workers + broker) would leave {avail - need_mb:.0f} MB of {avail:.0f} MB "
                        "available, "
                        f"under the {cfg.mem_reserve_mb} MB reserve")})  # fmt: skip
                    break
                fd_need = n + 64
                limit = report["config"]["broker_idle"].get("fd_limit")
                if limit is not None and fd_need > limit:
                    steps.append({"n": n, "held": False, "skipped": (
                        f"file descriptors: mosquitto needs ~{fd_need} and may open {limit}")})  # fmt: skip
                    break
                log(f"ladder: fleet of {n} devices ...")
                step = fleet_step(ctx, n, f"n{n}", lenient=True)
                steps.append(step)
                if not step.get("held"):
                    break
                held.append(n)
                per_device = _memory_per_device(step) or per_device
            for step in steps:
                if not step.get("held"):
                    step["limit"] = _limit_of(step, cfg)
            report["ladder"] = steps
            report["largest_n"] = max(held) if held else 0
            last = steps[-1] if steps else None
            if last is not None and not last.get("held"):
                report["limit"] = last["limit"]
                report["limit_kind"] = str(last["limit"]).split(":")[0]
            else:
                report["limit"] = f"not reached: every step up to --max-n {cfg.max_n} held"
                report["limit_kind"] = "not reached"
            report["notes"] = ctx.notes
        finally:
            if fleet is not None:
                fleet.close()
            broker.close()
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    return report


def _memory_per_device(step: dict[str, Any]) -> float:
    """Bytes of machine memory one more device costs (workers' RSS growth + broker growth)."""
    used = step.get("memory_used_mb")
    n = step.get("n", 0)
    if not used or not n or used <= 0:
        return 0.0
    return float(used) * MIB / n


def _fd_limit() -> int | None:
    try:
        import resource

        return int(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    except (ImportError, OSError, ValueError):
        return None


def _mosquitto_version(path: str) -> str:
    try:
        proc = subprocess.run([path, "-h"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    first = (proc.stdout or proc.stderr).splitlines()
    return first[0].strip() if first else "unknown"


# -- report -----------------------------------------------------------------------------------------
Row = tuple[str, str, str, str]


def _mark(ok: bool | None) -> str:
    return "-" if ok is None else ("PASS" if ok else "FAIL")


def _s(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f} s"


def summary_rows(report: dict[str, Any]) -> list[Row]:
    """(figure, measured, goal, PASS/FAIL/-) rows."""
    rows: list[Row] = []
    m = report.get("main", {})
    n = m.get("n", 0)
    ro = m.get("rollout")
    if ro:
        ph = ro["phases"]
        c = ph["committed"]
        rows += [
            (f"rollout to N={n}: devices committed", f"{ro['committed']}/{n}", f"{n}/{n}",
             _mark(ro["all_committed"])),
            ("  publish start -> 50 % committed", _s(c["p50_s"]), "report", "-"),
            ("  publish start -> 90 % committed", _s(c["p90_s"]), "report", "-"),
            ("  publish start -> 100 % committed", _s(c["p100_s"]), "report", "-"),
            ("  publish start -> 100 % swapped in (probation started)",
             _s(ph["swapped in (probation)"]["p100_s"]), "report", "-"),
            ("  publish start -> 100 % downloaded", _s(ph["downloaded (verifying)"]["p100_s"]), "report",
             "-"),
            ("  broker CPU during the rollout",
             f"{ro['cpu']['broker_cpu_s']:.2f} s ({ro['cpu']['broker_pct_of_core']:.0f} %)", "report", "-"),
        ]  # fmt: skip
    t = m.get("telemetry")
    if t:
        for mode, label in (("live", "live _telemetry_once"), ("drain", "outbox drain")):
            x = t[mode]
            rows.append((f"telemetry msgs/s delivered to the 2-consumer share group ({label})",
                         f"{x['delivered_per_s']:.0f}/s", "report", "-"))  # fmt: skip
            rows.append((f"  {label}: lost / duplicates", f"{x['lost']} / {x['duplicates']}", "0 / report",
                         _mark(x["lost"] == 0)))  # fmt: skip
        x = t["drain"]
        rows.append(("  split between the 2 consumers (min/max)", f"{x['split']:.2f}", "report", "-"))
    cn = m.get("canary")
    if cn:
        rows += [
            (f"canary abort ({cn['canary_percent']:g} % canaries): follow_rollout", cn["result"], "aborted",
             _mark(cn["result"] == "aborted")),
            ("  canaries rolled back", f"{cn['canaries_rolled_back']}/{cn['canaries']}",
             f"{cn['canaries']}/{cn['canaries']}", _mark(cn["canaries_rolled_back"] == cn["canaries"])),
            ("  non-canaries that downloaded or loaded the bad candidate",
             f"{max(cn['non_canaries_touched_bad'], cn['non_canaries_loaded_bad'])}/{cn['non_canaries']}",
             "0",
             _mark(cn["non_canaries_touched_bad"] == 0 and cn["non_canaries_loaded_bad"] == 0)),
            ("  devices serving the previous version afterwards",
             f"{cn['serving_after'].get(GOOD, 0)}/{n}", f"{n}/{n}", _mark(cn["all_back_on_previous"])),
            ("  devices that acted on the re-issued previous document",
             f"{cn['acknowledged_reissued']}/{n}", f"{n}/{n}", _mark(cn["not_acknowledged_count"] == 0)),
        ]  # fmt: skip
    if "largest_n" in report:
        rows.append(("largest N held (all connected and committed)", str(report["largest_n"]), "report", "-"))
        rows.append(("  what limited it (details below)", report.get("limit_kind", "n/a"), "report", "-"))
    return rows


def _details(report: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    m = report.get("main", {})
    if m:
        lines.append(
            f"  fleet of {m['n']}: {m.get('workers')} worker processes x {m.get('split')} devices; built in "
            f"{m.get('build_s')} s, all connected {m.get('connect_s')} s after the start "
            f"({m.get('connected')}/{m['n']}); {m.get('threads')} threads; memory per device "
            f"{m.get('device_rss_kb')} KB (worker RSS growth), broker {m.get('broker_kb_per_connection')} "
            "KB per "
            f"connection, {m.get('fds_per_device')} fds per device in the workers"
        )
        if "connect_cpu" in m:
            c = m["connect_cpu"]
            lines.append(
                f"    connect: broker {c['broker_cpu_s']} s CPU, workers {c['workers_cpu_s']} s, machine "
                f"{c['machine_busy_pct']} % busy, outside load {c['outside_cores']} cores"
            )
        if "idle_cpu" in m:
            c = m["idle_cpu"]
            lines.append(
                f"    idle (connected, camera running, 3 s): workers {c['workers_cores']} cores "
                f"({m['idle_workers_ms_per_device_s']} ms CPU per device-second), broker "
                f"{c['broker_pct_of_core']} % of one core, outside load {c['outside_cores']} cores"
            )
    ro = m.get("rollout")
    if ro:
        lines.append(
            f"  rollout of {ro['version']} ({ro['bundle_bytes']:,} bytes, {ro['chunks']} chunks of "
            f"{report['config']['chunk_kb']} KiB): upload {ro['upload_s']} s, signed document "
            f"{ro['document_s']} s (publish_document reads the previous document first: 2 s wait when the "
            "topic has none)"
        )
        for name, q in ro["phases"].items():
            lines.append(
                f"    {name:<24} 50 % {_s(q['p50_s']):>8}  90 % {_s(q['p90_s']):>8}  100 % "
                f"{_s(q['p100_s']):>8}"
                f"  ({q['count']} devices)"
            )
        c = ro["cpu"]
        lines.append(
            f"    broker fan-out {ro['fanout_bytes'] / 1e6:.1f} MB of chunks at {ro['fanout_mb_per_s']} MB/s "
            f"(document -> last device downloaded); broker wrote {c['broker_bytes_out'] / 1e6:.1f} MB to its "
            f"sockets; CPU in the {c['wall_s']} s window: broker {c['broker_cpu_s']} s "
            f"({c['broker_pct_of_core']} % of one core), workers {c['workers_cpu_s']} s "
            f"({c['workers_cores']} "
            f"cores), machine {c['machine_busy_pct']} % busy, outside load {c['outside_cores']} cores"
        )
        cam = m.get("camera", {})
        lines.append(
            f"    probation: {report['config']['probation_s']} s and "
            f"{report['config']['probation_min_frames']} "
            f"frames, previous model beside at 25 %; camera {cam.get('target_fps')} fps per device, "
            "frames per "
            f"device median {cam.get('frames_per_device_median')} (min {cam.get('frames_per_device_min')}), "
            f"{cam.get('camera_resets')} camera resets"
        )
    t = m.get("telemetry")
    if t:
        lines.append(
            f"  telemetry: {t['devices']} devices, {t['consumers']} consumers on {t['topic']}; at the "
            "default "
            f"{t['default_interval_s']:g} s interval the fleet offers "
            f"{t['offered_at_default_interval_per_s']} msg/s"
        )
        for mode in ("live", "drain"):
            x = t[mode]
            c = x["cpu"]
            lines.append(
                f"    {mode}: produced {x['produced']} in {x['produce_s']} s ({x['produced_per_s']}/s), "
                "received "
                f"{x['received']} ({x['unique']} unique, {x['duplicates']} duplicates, {x['lost']} lost), "
                "per "
                f"consumer {x['per_consumer']}; all sent {x['all_sent']} after {x['sent_s']} s; broker "
                f"{c['broker_cpu_s']} s CPU ({c['broker_pct_of_core']} % of one core, "
                f"{x['broker_us_per_msg']} us "
                f"per delivered message incl. its inbound publish), workers {c['workers_cores']} cores, "
                f"consumers {c['consumers_cpu_s']} s, machine {c['machine_busy_pct']} % busy, outside "
                f"{c['outside_cores']} cores"
            )
    cn = m.get("canary")
    if cn:
        lines.append(
            f"  canary: {cn['canaries']} canaries of {cn['n']} ({cn['canary_percent']:g} %), follow_rollout "
            f"{cn['result']} after {cn['decided_s']} s (abort share {report['config']['abort_share']}); "
            "rollback "
            f"reasons {cn['rollback_reasons']}; non-canaries skipped {cn['non_canaries_skipped']}/"
            f"{cn['non_canaries']}; every device back on {GOOD} "
            f"{_s(cn['settled_s'])} after the publish; re-issued document {cn['rollback_document']}; serving "
            f"{cn['serving_after']}; phases {cn['phases_after']}"
        )
        if cn["not_acknowledged_count"]:
            lines.append(
                f"    {cn['not_acknowledged_count']} devices never acted on the re-issued document (state "
                f"still the bad candidate's outcome): {cn['not_acknowledged']}"
            )
    for step in report.get("ladder", []):
        if step.get("skipped"):
            lines.append(f"  ladder N={step['n']}: not run: {step['skipped']}")
            continue
        ro = step.get("rollout", {})
        c = step.get("cpu") or step.get("connect_cpu") or {}
        com = ro.get("phases", {}).get("committed", {})
        lines.append(
            f"  ladder N={step['n']}: {'held' if step.get('held') else 'did NOT hold'}; connected "
            f"{step.get('connected')}/{step['n']} in {step.get('connect_s')} s; committed "
            f"{ro.get('committed', 0)}/{step['n']} (50/90/100 %: {_s(com.get('p50_s'))} / "
            f"{_s(com.get('p90_s'))} / {_s(com.get('p100_s'))}); broker {c.get('broker_pct_of_core')} % "
            "of one core, workers "
            f"{c.get('workers_cores')} cores, machine {c.get('machine_busy_pct')} % busy, outside "
            f"{c.get('outside_cores')} cores; {step.get('device_rss_kb')} KB per device, broker "
            f"{step.get('broker_kb_per_connection')} KB per connection, broker fds "
            f"{step.get('broker', {}).get('fds')}; "
            f"{step.get('memory_available_mb')} MB available"
        )
        if "idle_cpu" in step:
            lines.append(
                f"    {step.get('workers')} workers x {step.get('split')} devices; probation latency/fps "
                f"rules {'off' if step.get('lenient_probation') else 'on'}; camera "
                f"{step.get('camera', {}).get('target_fps')} fps per device; idle: workers "
                f"{step['idle_cpu']['workers_cores']} cores ({step['idle_workers_ms_per_device_s']} ms CPU "
                f"per device-second), broker {step['idle_cpu']['broker_pct_of_core']} % of one core; "
                f"connect: broker {step.get('connect_cpu', {}).get('broker_cpu_s')} s CPU"
            )
        if ro.get("failed"):
            lines.append(f"    failed: {ro['failed']} ({ro.get('failed_reasons')})")
        if not step.get("held"):
            st = step.get("status", {})
            lines.append(f"    limit: {step.get('limit')}; link errors {st.get('link_errors')}; "
                         f"log {st.get('log_counts')}; phases {st.get('phases')}")  # fmt: skip
    if "limit" in report:
        lines.append(f"  largest N held: {report.get('largest_n')}; limit: {report['limit']}")
    for note in report.get("notes", []):
        lines.append(f"  note: {note}")
    return lines


def format_report(report: dict[str, Any], command: str) -> str:
    """The human-readable table (figures, goals, PASS/FAIL), details, the command."""
    c = report["config"]
    rows = summary_rows(report)
    w0 = max([len(r[0]) for r in rows] + [6])
    w1 = max([len(r[1]) for r in rows] + [8])
    w2 = max([len(r[2]) for r in rows] + [4])
    lines = [
        f"edgert fleet scale bench: {c['cpus']} CPUs, {c['memory_total_mb']} MB, {c['mosquitto']}, "
        f"{c['openssl']}, Python {c['python']}; load average at start {c['load_at_start']}",
        f"simulated devices: real SyncAgent each (MqttLink + mutual TLS, outbox, StateStore, ChunkAssembler, "
        f"probation) with a tiny ONNX model at {c['fps']:g} fps on a shared camera thread per worker; probe "
        f"subprocess {'ON' if c['probe'] else 'skipped'}",
        "",
        f"{'figure':<{w0}}  {'measured':>{w1}}  {'goal':>{w2}}  result",
        f"{'-' * w0}  {'-' * w1}  {'-' * w2}  ------",
    ]
    lines += [f"{a:<{w0}}  {b:>{w1}}  {g:>{w2}}  {r}" for a, b, g, r in rows]
    lines += ["", "details:", *_details(report)]
    lines += ["", f"elapsed {report.get('elapsed_s', 0)} s", f"command: {command}"]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument(
        "--n", type=int, default=None, help="devices of the rollout/telemetry/canary fleet (default 200)"
    )
    p.add_argument("--max-n", type=int, default=None,
                   help="the ladder doubles N from 2n up to this (default 3200; = n: no ladder)")  # fmt: skip
    p.add_argument("--workers", type=int, default=None, help="device worker processes (default 4)")
    p.add_argument("--fps", type=float, default=None, help="frames per second per device (default 5)")
    p.add_argument("--probation", type=float, default=None, help="probation_s of the candidates (default 2)")
    p.add_argument(
        "--bundle-kb", type=int, default=None, help="KiB of random payload in the candidates (1024)"
    )
    p.add_argument("--telemetry-seconds", type=float, default=None, help="live telemetry run (default 8)")
    p.add_argument(
        "--canary", type=float, default=None, help="canary_percent of the bad candidate (default 10)"
    )
    p.add_argument("--probe", action="store_true", help="run the probe subprocess on every install")
    p.add_argument(
        "--quick", action="store_true", help="N=20 and one ladder step of 40, short phases (the test)"
    )
    p.add_argument("--keep", type=Path, help="keep the work directory (broker log, device state) here")
    p.add_argument("--json", type=Path, help="also write the figures as JSON")
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    cfg = BenchConfig.quick_config() if args.quick else BenchConfig()
    for name, attr in (("n", "n"), ("max_n", "max_n"), ("workers", "workers"), ("fps", "fps"),
                       ("probation", "probation_s"), ("bundle_kb", "bundle_kb"),
                       ("telemetry_seconds", "telemetry_s"), ("canary", "canary_percent")):  # fmt: skip
        value = getattr(args, name)
        if value is not None:
            setattr(cfg, attr, value)
    if args.n is not None and args.max_n is None and not args.quick:
        cfg.max_n = max(cfg.max_n, args.n)
    cfg.max_n = max(cfg.max_n, cfg.n)
    cfg.probe = bool(args.probe)
    cfg.keep = args.keep
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the bench, print the table, optionally write JSON."""
    args = _parser().parse_args(argv)
    cfg = config_from_args(args)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    argv_list = list(sys.argv[1:] if argv is None else argv)
    command = " ".join(["PYTHONPATH=. python bench/fleet.py", *(shlex.quote(a) for a in argv_list)])
    report = run_bench(cfg, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    report["command"] = command
    print(format_report(report, command))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
