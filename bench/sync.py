"""Fleet sync figures: bundle transfer vs raw sockets, resume, publish to committed, telemetry rate.

Run from the repository root (the device venv plus paho-mqtt and onnx; mosquitto installed, see
``scripts/ensure-mosquitto.sh``)::

    PYTHONPATH=. python bench/sync.py [--rounds 7] [--bundle-mb 20] [--json out.json]

Everything is measured in ONE run against real mosquitto brokers started by
``tests/mqtt_broker.py`` (generated fleet PKI, mutual TLS, the fleet ACL, 127.0.0.1; note its
``log_type all``), with the real device agent and a real daemon in this process:

1. **Transfer.** A real packed bundle signed with a key made for the run: the demo shapes model
   plus ``--bundle-mb`` MB of random bytes as an extra file. It is uploaded retained with
   ``FleetClient.upload_bundle``, once per chunk size (chunk topics are keyed by the bundle's
   sha256, so each chunk size gets its own bundle with other random bytes). Every MQTT trial
   starts a fresh :class:`~edge_runtime.sync.agent.SyncAgent` (MqttLink, per-chunk subscriptions
   kept ``chunk_window`` deep, ChunkAssembler with per-chunk sha256, ``pwrite`` and batched
   ``fdatasync``, the whole-file check in ``finish``, then staging into a slot) with a stand-in
   model host that refuses to load, so the update ends ``rejected`` right after staging, and
   publishes a signed desired document for that device. The figure is the agent's ``download_s``
   (from accepting the document to the complete, verified file; taken unrounded, from
   ``_Download.started`` to the end of ``ChunkAssembler.finish``). The baseline is a plain socket
   pair on 127.0.0.1 moving the same bytes (``sendall`` -> ``recv_into`` a bytearray, TCP_NODELAY
   like MqttLink), and the same over mutual TLS with the broker's certificates. The arms alternate
   in every round (order reversed every other round); the table shows medians of per-round ratios
   (raw TCP seconds / arm seconds = throughput ratio).
   Where the time goes, from the same rounds: a timeline of each download (meta, chunks received
   and stored, finish; timestamps from a ChunkAssembler subclass installed in the agent module,
   otherwise unchanged), CPU seconds per thread and of mosquitto, and two partial paths: the
   transport alone (one MqttLink with one wildcard subscription, bytes counted in memory) and the
   assembler alone (chunks from memory to disk). Experiments (``--no-experiments`` skips them)
   try the suggested changes in the same rounds, monkeypatched in this process only: a second
   broker with ``set_tcp_nodelay true``, then also ``finish()`` without re-reading the file, then
   also ``sync_bytes`` of 8 MiB.
2. **Resume.** Trials whose connection is cut once half of the bytes arrived
   (``agent.link.abort()`` from the network thread): time from the cut to the verified file,
   bytes received and stored at the cut, bytes fetched twice. Then a daemon restart in the middle
   of a download (the agent stopped at half, a new agent on the same state directory): bytes
   fetched after the restart against what the journal left missing.
3. **Publish to committed.** A real daemon (demo shapes bundle, demo video looped at ``--fps``,
   ``[sync]`` on); an operator calls ``FleetClient.upload_bundle`` then ``publish_document`` (what
   ``FleetClient.publish`` does) for a candidate with a short probation; time from the start of
   the publish to the ``committed`` event received by the operator, by phase (the update events'
   ``ts``). Done for the group's first document and for a second one.
4. **Telemetry.** Records put one by one into the device agent's outbox (``put`` then wake the
   sender, as ``SyncAgent._telemetry_once`` does) while the agent's sender drains them to the
   broker and an operator subscriber in its own process counts them: messages/s end to end,
   records lost, the outbox put rate alone (no sender) and the drain rate of a pre-filled outbox
   (records acknowledged by the broker per second; also: received by the operator, and lost).

The machine is shared and noisy: before each transfer round the bench waits (``--max-load``,
``--quiet-budget``) for other processes to calm down, measures their CPU use during the round
(mosquitto and this process excluded), and uses only the rounds free of outside load when at least
3 are. No absolute time is a goal; the one goal is the transfer / raw TCP throughput ratio.
A full run takes about a minute.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import shlex
import shutil
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

if __package__ in (None, ""):  # run as a script: make ``bench`` and ``edge_runtime`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.pipeline import QuietWait
from edge_runtime.bundle import TrustStore, create_bundle, generate_keypair, load_private_key, open_bundle
from edge_runtime.bundle.archive import fsync_dir
from edge_runtime.errors import UpdateError
from edge_runtime.sync.agent import PRIORITY_TELEMETRY, AgentOptions, SyncAgent
from edge_runtime.sync.mqtt import LinkSettings, MqttLink
from edge_runtime.sync.outbox import Outbox
from edge_runtime.sync.protocol import DesiredBundle, DesiredDocument, Rollout, seal, utc_iso
from edge_runtime.sync.publisher import FleetClient
from edge_runtime.sync.slots import StateStore
from edge_runtime.sync.transfer import (
    DEFAULT_SYNC_BYTES,
    BundleMeta,
    ChunkAssembler,
    describe_bundle,
    iter_chunks,
)

__all__ = [
    "SECTIONS",
    "BenchConfig",
    "TransferHost",
    "assembler_only",
    "format_report",
    "main",
    "make_bundle",
    "raw_transfer",
    "run_bench",
    "summary_rows",
    "transport_only",
]

log = logging.getLogger("bench.sync")

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
DEMO = REPO / "models" / "demo"
FLEET = "bench"
DEVICE = "dev-xfer"  # transfer and resume trials
TEL_DEVICE = "dev-tel"  # telemetry
CAM_DEVICE = "cam1"  # the real daemon (group "cams")
OPERATOR = "fleet-admin"
GOAL_RATIO = 0.5
KIB = 1024
MIB = 1024 * 1024
SECTIONS: tuple[str, ...] = ("transfer", "resume", "publish", "telemetry")
_STALL_MS = 30.0
"""A subscribe round trip on loopback takes ~2 ms; one of 30 ms or more waited for a delayed ACK."""
_TIMELINE = ("meta", "first_chunk", "last_received", "last_chunk", "finish_start", "finished")


@dataclass
class BenchConfig:
    """What to run; the defaults are the documented configuration."""

    bundle_mb: float = 20.0
    """MB (10^6 bytes) of random payload added to the demo model (the bundle is ~0.7 MB larger)."""
    rounds: int = 7
    chunk_sizes: tuple[int, ...] = (256 * KIB, MIB)
    """The first one is the default configuration (the one with the goal)."""
    window: int = 32
    """``chunk_window`` of the default configuration (AgentOptions / ``[sync] chunk_window`` default)."""
    windows: tuple[int, ...] = (8, 128)
    """Other ``chunk_window`` values tried with the first chunk size."""
    experiments: bool = True
    resume_runs: int = 3
    probation_s: float = 2.0
    probation_min_frames: int = 30
    publishes: int = 2
    fps: float = 30.0
    telemetry_s: float = 6.0
    put_s: float = 2.0
    prefill: int = 10000
    max_load: float = 0.25
    quiet_budget_s: float = 30.0
    sections: tuple[str, ...] = SECTIONS


# -- measurement helpers ---------------------------------------------------------------------------
def _median(values: Sequence[float]) -> float:
    clean = [float(v) for v in values if v is not None and not math.isnan(v)]
    return float(statistics.median(clean)) if clean else math.nan


def _thread_cpu() -> dict[str, float]:
    """CPU seconds of every live thread of this process, summed by thread name."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, float] = {}
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/schedstat", encoding="ascii") as fh:
                ns = int(fh.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        name = names.get(int(tid), "other")
        out[name] = out.get(name, 0.0) + ns / 1e9
    return out


def _pid_cpu(pid: int | None) -> float:
    """CPU seconds of process ``pid`` (mosquitto is single-threaded: its schedstat is exact)."""
    if pid is None:
        return math.nan
    try:
        with open(f"/proc/{pid}/schedstat", encoding="ascii") as fh:
            return int(fh.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return math.nan


def _busy_s() -> float | None:
    """Seconds of CPU used by everything on the machine (all CPUs), from ``/proc/stat``."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


class OutsideLoad:
    """Share of the machine's CPUs (0..1) used between start and stop by processes other than this
    one and the brokers (``pids``)."""

    def __init__(self, pids: Sequence[int | None]) -> None:
        self._pids = [p for p in pids if p is not None]
        self._t0 = time.monotonic()
        self._busy0 = _busy_s()
        self._own0 = _own_cpu_s()
        self._kids0 = sum(_pid_cpu(p) for p in self._pids)

    def stop(self) -> float:
        wall = time.monotonic() - self._t0
        busy1 = _busy_s()
        if self._busy0 is None or busy1 is None or wall <= 0:
            return math.nan
        kids = sum(_pid_cpu(p) for p in self._pids) - self._kids0
        other = (busy1 - self._busy0) - (_own_cpu_s() - self._own0) - (0.0 if math.isnan(kids) else kids)
        return max(0.0, min(1.0, other / (wall * (os.cpu_count() or 1))))


def _roles(cpu: dict[str, float]) -> dict[str, float]:
    """Thread CPU seconds grouped into the roles of a download."""
    groups = {
        "sync-mqtt-net": "device network thread (TLS, paho)",
        "sync-agent": "device agent thread (sha256, write, fsync)",
        "sync-outbox": "device outbox sender",
    }
    out: dict[str, float] = {}
    for name, seconds in cpu.items():
        role = groups.get(name, "rest of this process")
        out[role] = out.get(role, 0.0) + seconds
    return {k: round(v, 4) for k, v in out.items()}


def _cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0) > 0}


# -- inputs ----------------------------------------------------------------------------------------
def _broker_module() -> Any:
    """``tests/mqtt_broker.py`` (a real mosquitto with generated PKI and ACL)."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    import mqtt_broker

    return mqtt_broker


def golden_frames(count: int = 4) -> np.ndarray:
    """A few frames of the demo video (the bundles' self-test inputs)."""
    import cv2

    cap = cv2.VideoCapture(str(DEMO / "shapes.avi"))
    frames: list[np.ndarray] = []
    try:
        while len(frames) < count:
            ok, frame = cap.read()
            if not ok:
                break
            frames.append(frame)
            for _ in range(20):
                cap.grab()
    finally:
        cap.release()
    return np.stack(frames)


def make_bundle(out: Path, version: str, key: Path, payload_bytes: int = 0, seed: int = 0) -> Path:
    """A packed bundle of the demo shapes model at ``version``, signed with ``key``, with
    ``payload_bytes`` random bytes as the extra file ``payload.bin`` (none when 0)."""
    demo = open_bundle(DEMO / "shapes", require_signature=False)
    extra: dict[str, Path] = {}
    if payload_bytes > 0:
        blob = out / f"payload-{version}.bin"
        blob.write_bytes(np.random.default_rng(seed).bytes(payload_bytes))
        extra["payload.bin"] = blob
    packed = out / f"shapes-{version}.edgebundle"
    create_bundle(
        out / f"shapes-{version}",
        models=[DEMO / "shapes" / "model.onnx"],
        name="shapes",
        version=version,
        task="classification",
        preprocess=demo.manifest.preprocess,
        decoder=demo.manifest.decoder,
        labels=demo.labels(),
        golden_frames=golden_frames(),
        extra_files=extra,
        sign_key=key,
        pack=packed,
    )
    for blob in extra.values():
        blob.unlink()
    shutil.rmtree(out / f"shapes-{version}")
    return packed


def link_settings(broker: Any, cert_name: str, client_id: str) -> LinkSettings:
    cert, key = broker.client_cert(cert_name)
    return LinkSettings(
        host="127.0.0.1", port=broker.port, client_id=client_id, ca_file=broker.ca_path, cert_file=cert,
        key_file=key,
    )  # fmt: skip


def tls_contexts(broker: Any, device: str = DEVICE) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) contexts with the broker's certificates, as mosquitto and MqttLink use them."""
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(broker.ca_path))
    server.load_cert_chain(str(broker.server_cert), str(broker.server_key))
    server.verify_mode = ssl.CERT_REQUIRED
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(broker.ca_path))
    client.minimum_version = ssl.TLSVersion.TLSv1_2
    cert, key = broker.client_cert(device)
    client.load_cert_chain(str(cert), str(key))
    return server, client


# -- the baseline and the partial paths -------------------------------------------------------------
def raw_transfer(payload: bytes, tls: tuple[ssl.SSLContext, ssl.SSLContext] | None = None) -> dict[str, Any]:
    """Move ``payload`` over a socket pair on 127.0.0.1 (``sendall`` -> ``recv_into`` a bytearray).

    Timed from the first ``sendall`` byte to the last byte received (connect and TLS handshake
    excluded). ``tls``: (server, client) contexts for mutual TLS.
    """
    size = len(payload)
    buf = bytearray(size)
    done: dict[str, Any] = {}
    ready = threading.Event()

    with socket.create_server(("127.0.0.1", 0)) as srv:
        port = srv.getsockname()[1]

        def receive() -> None:
            try:
                conn, _ = srv.accept()
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as MqttLink does
                with contextlib.ExitStack() as stack:
                    sock: Any = stack.enter_context(conn)
                    if tls is not None:
                        sock = stack.enter_context(tls[0].wrap_socket(conn, server_side=True))
                    ready.set()
                    view, got = memoryview(buf), 0
                    while got < size:
                        n = sock.recv_into(view[got:])
                        if n == 0:
                            break
                        got += n
                    done["t"], done["got"] = time.perf_counter(), got
            except OSError as exc:  # reported below
                done["error"] = exc
            finally:
                ready.set()

        thread = threading.Thread(target=receive, name="raw-receiver", daemon=True)
        thread.start()
        with contextlib.ExitStack() as stack:
            sock: Any = stack.enter_context(socket.create_connection(("127.0.0.1", port)))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls is not None:
                sock = stack.enter_context(tls[1].wrap_socket(sock, server_hostname="localhost"))
            ready.wait(10)
            t0 = time.perf_counter()
            sock.sendall(payload)
            thread.join(60)
            cipher = sock.cipher()[0] if tls is not None else None
    if "error" in done or done.get("got") != size:
        raise RuntimeError(f"raw transfer failed: {done}")
    return {"s": done["t"] - t0, "cipher": cipher}


def transport_only(broker: Any, bundle: DesiredBundle, device: str = DEVICE) -> dict[str, Any]:
    """The chunks of ``bundle`` through mosquitto to an MqttLink (the agent's link class, TLS,
    paho) with ONE wildcard subscription, counted in memory: no per-chunk subscriptions, no
    hashing, no disk. Timed from the SUBSCRIBE to the last chunk byte."""
    got: dict[str, float] = {"bytes": 0, "msgs": 0}
    done = threading.Event()

    def on_message(_topic: str, payload: bytes, _retained: bool) -> None:
        got["bytes"] += len(payload)
        got["msgs"] += 1
        if got["bytes"] >= bundle.size:
            got["t"] = time.perf_counter()
            done.set()

    link = MqttLink(
        link_settings(broker, device, f"{device}-transport"), on_message=on_message, name="transport"
    )
    link.start()
    try:
        if not link.wait_connected(15):
            raise RuntimeError(f"transport link could not connect: {link.last_error}")
        cipher = None
        with contextlib.suppress(AttributeError, OSError, TypeError):
            cipher = link._client.socket().cipher()[0]
        t0 = time.perf_counter()
        link.subscribe([f"edgert/{FLEET}/bundle/{bundle.sha256}/chunk/+"])
        if not done.wait(120):
            raise RuntimeError(f"transport trial got {got['bytes']} of {bundle.size} bytes")
    finally:
        link.stop()
    return {"s": got["t"] - t0, "msgs": int(got["msgs"]), "cipher": cipher}


def assembler_only(workdir: Path, meta: BundleMeta, chunks: Sequence[bytes]) -> dict[str, Any]:
    """The real ChunkAssembler (default ``sync_bytes``) fed from memory: per-chunk sha256,
    ``pwrite``, batched ``fdatasync``, then ``finish`` (read-back sha256, fsync, rename)."""
    work = workdir / "assembler-only"
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    asm = ChunkAssembler(work, meta)
    try:
        t1 = time.perf_counter()
        for index, data in enumerate(chunks):
            asm.add(index, data)
        t2 = time.perf_counter()
        asm.finish(work / "bundle.edgebundle")
        t3 = time.perf_counter()
    finally:
        asm.close()
        shutil.rmtree(work, ignore_errors=True)
    return {"s": t3 - t0, "open_s": t1 - t0, "add_s": t2 - t1, "finish_s": t3 - t2}


# -- the device agent, instrumented ----------------------------------------------------------------
@dataclass(frozen=True)
class _Serving:
    """Stands for the model the pipeline serves (what the agent reads of it)."""

    name: str = "shapes"
    version: str = "1.0.0"
    format: str = "onnx"


class TransferHost:
    """:class:`~edge_runtime.sync.agent.ModelHost` for the transfer and telemetry trials: serves a
    stand-in and refuses to load, so a trial ends ``rejected`` right after staging."""

    def serving(self) -> Any:
        return _Serving()

    def load(self, bundle_dir: Path) -> Any:
        raise UpdateError(f"bench transfer trial: {bundle_dir.name} is not loaded")

    def swap(self, model: Any) -> Any:
        return model

    def add_observer(self, observer: Any) -> None:
        del observer

    def remove_observer(self, observer: Any) -> None:
        del observer

    def errors(self) -> int:
        return 0

    def summary(self) -> dict[str, Any]:
        return {}


class _BenchAssembler(ChunkAssembler):
    """ChunkAssembler with timestamps (the download timeline) and the experiments' knobs.

    Installed as ``edge_runtime.sync.agent.ChunkAssembler`` during the trials. With the knobs at
    their defaults it behaves exactly as its base class. Times are ``time.monotonic()``, the
    clock of the agent's ``_Download.started``.
    """

    knobs: ClassVar[dict[str, Any]] = {"sync_bytes": None, "skip_readback": False}
    timeline: ClassVar[dict[str, float]] = {}

    def __init__(self, workdir: Path, meta: BundleMeta, *, sync_bytes: int = DEFAULT_SYNC_BYTES) -> None:
        tl = _BenchAssembler.timeline
        tl["meta"] = time.monotonic()
        override = _BenchAssembler.knobs["sync_bytes"]
        super().__init__(workdir, meta, sync_bytes=sync_bytes if override is None else int(override))
        tl["add_s"] = 0.0

    def add(self, index: int, data: bytes) -> bool:
        tl = _BenchAssembler.timeline
        t = time.monotonic()
        tl.setdefault("first_chunk", t)
        try:
            return super().add(index, data)
        finally:
            now = time.monotonic()
            tl["add_s"] = tl.get("add_s", 0.0) + now - t
            tl["last_chunk"] = now

    def finish(self, dest: Path) -> Path:
        tl = _BenchAssembler.timeline
        tl["finish_start"] = time.monotonic()
        if _BenchAssembler.knobs["skip_readback"] and self.complete:
            out = self._finish_without_readback(dest)
        else:
            out = super().finish(dest)
        tl["finished"] = time.monotonic()
        return out

    def _finish_without_readback(self, dest: Path) -> Path:
        """Experiment: ``ChunkAssembler.finish`` minus its read-back sha256 of the whole file
        (every chunk was already checked against the meta the signed document pins)."""
        self.flush()
        os.fsync(self._part_fd)
        self._close_fds()
        self._closed = True
        dest.parent.mkdir(parents=True, exist_ok=True)
        self.part_path.replace(dest)
        fsync_dir(dest.parent)
        if dest.parent.resolve() != self.workdir.resolve():
            fsync_dir(self.workdir)
        self.progress_path.unlink(missing_ok=True)
        return dest


@contextlib.contextmanager
def instrumented_agent() -> Iterator[None]:
    """Install :class:`_BenchAssembler` as the agent module's ChunkAssembler."""
    import edge_runtime.sync.agent as agent_module

    saved = agent_module.ChunkAssembler  # type: ignore[attr-defined]
    agent_module.ChunkAssembler = _BenchAssembler  # type: ignore[attr-defined]
    try:
        yield
    finally:
        agent_module.ChunkAssembler = saved  # type: ignore[attr-defined]


@contextlib.contextmanager
def knobs(**values: Any) -> Iterator[None]:
    """Set :class:`_BenchAssembler` experiment knobs for the duration of one trial."""
    saved = dict(_BenchAssembler.knobs)
    _BenchAssembler.knobs.update(values)
    try:
        yield
    finally:
        _BenchAssembler.knobs.clear()
        _BenchAssembler.knobs.update(saved)


def _journaled_bytes(progress: Path, meta_size: int, chunk_size: int) -> int:
    """Bytes the download journal claims (40-byte header, 8 bytes per chunk record)."""
    try:
        records = max(0, (progress.stat().st_size - 40) // 8)
    except OSError:
        return 0
    return int(min(meta_size, records * chunk_size))


class Recorder:
    """Timestamps (``time.monotonic()``) of one agent's update events, connects and chunk messages.

    Wraps ``agent._update_event`` and the link's message and connect callbacks (the agent still
    gets every call). ``cut_at`` (bytes): once that many chunk bytes arrived, the network thread
    records what is stored and journaled, then cuts the connection with ``agent.link.abort()``.
    """

    def __init__(self, agent: SyncAgent, *, cut_at: int | None = None, broker_pid: int | None = None) -> None:
        self.agent = agent
        self.cond = threading.Condition()
        self.events: list[tuple[float, str, dict[str, Any]]] = []
        self.connects: list[float] = []
        self.chunk_msgs = 0
        self.chunk_bytes = 0
        self.per_chunk: dict[int, int] = {}
        self.cut: dict[str, Any] | None = None
        self.last_received: float | None = None
        self.started: float | None = None
        """``_Download.started`` of the first download (the start of the agent's download_s)."""
        self.cpu_at_verified: tuple[dict[str, float], float] | None = None
        self._cut_at = cut_at
        self._broker_pid = broker_pid
        real_event = agent._update_event
        link = agent.link
        real_message = link._on_message_cb
        real_connect = link._on_connect_cb

        def update_event(phase: str, reason: str = "", **extra: Any) -> None:
            now = time.monotonic()
            if phase == "verifying":
                self.cpu_at_verified = (_thread_cpu(), _pid_cpu(self._broker_pid))
            if phase == "downloading" and self.started is None and agent._download is not None:
                self.started = agent._download.started
            with self.cond:
                self.events.append((now, phase, {"reason": reason, **extra}))
                self.cond.notify_all()
            real_event(phase, reason, **extra)

        def on_message(topic: str, payload: bytes, retained: bool) -> None:
            parsed = agent.topics.parse_chunk(topic)
            if parsed is not None:
                with self.cond:
                    self.last_received = time.monotonic()
                    self.chunk_msgs += 1
                    self.chunk_bytes += len(payload)
                    self.per_chunk[parsed[1]] = self.per_chunk.get(parsed[1], 0) + 1
                    due = self._cut_at is not None and self.cut is None and self.chunk_bytes >= self._cut_at
                if due:
                    self._do_cut()
            real_message(topic, payload, retained)

        def on_connect() -> None:
            with self.cond:
                self.connects.append(time.monotonic())
                self.cond.notify_all()
            if real_connect is not None:
                real_connect()

        agent._update_event = update_event  # type: ignore[method-assign]
        link._on_message_cb = on_message
        link._on_connect_cb = on_connect

    def _do_cut(self) -> None:
        dl = self.agent._download
        asm = dl.asm if dl is not None else None
        stored = journaled = 0
        if asm is not None:
            stored = asm.received_bytes
            journaled = _journaled_bytes(asm.progress_path, asm.meta.size, asm.meta.chunk_size)
        cut = {"t": time.monotonic(), "delivered": self.chunk_bytes, "stored": stored, "journaled": journaled}
        with self.cond:
            self.cut = cut
            self.cond.notify_all()
        self.agent.link.abort()

    def first(self, phase: str) -> tuple[float, dict[str, Any]] | None:
        with self.cond:
            for t, p, extra in self.events:
                if p == phase:
                    return t, extra
        return None

    def wait_phase(self, phases: set[str], timeout: float) -> tuple[float, str, dict[str, Any]]:
        with self.cond:
            ok = self.cond.wait_for(lambda: any(p in phases for _, p, _ in self.events), timeout)
            if not ok:
                seen = [p for _, p, _ in self.events]
                raise RuntimeError(f"no update phase in {sorted(phases)} within {timeout} s; saw {seen}")
            return next(e for e in self.events if e[1] in phases)

    def wait_cut(self, timeout: float) -> dict[str, Any]:
        with self.cond:
            if not self.cond.wait_for(lambda: self.cut is not None, timeout):
                raise RuntimeError(f"the download was not cut within {timeout} s ({self.chunk_bytes} bytes)")
            assert self.cut is not None
            return self.cut


def make_agent(
    broker: Any, device: str, state_dir: Path, trust: TrustStore, *, window: int = 32
) -> SyncAgent:
    """A SyncAgent for ``device`` on ``broker`` (no groups), with :class:`TransferHost`."""
    sync_dir = state_dir / "sync"
    options = AgentOptions(
        device_id=device,
        fleet=FLEET,
        groups=(),
        state_dir=sync_dir,
        factory_bundle=DEMO / "shapes",
        link=link_settings(broker, device, f"edgert-{FLEET}-{device}"),
        telemetry_interval_s=3600.0,
        chunk_window=window,
    )
    outbox = Outbox(sync_dir / "outbox.db", default_ttl_s=None)
    try:
        return SyncAgent(options, TransferHost(), trust, StateStore(sync_dir, trust=trust), outbox)
    except BaseException:
        outbox.close()
        raise


def _stop_agent(agent: SyncAgent) -> None:
    try:
        agent.stop()
    finally:
        agent.outbox.close()  # idempotent; agent.stop() closes it too


def publish_document_now(fleet: FleetClient, device: str, bundle: DesiredBundle, key: Any) -> None:
    """Sign and publish (retained, QoS 1) a desired document for one device.

    What :meth:`FleetClient.publish_document` does, minus its read of the previous document,
    which waits its full 2 s timeout when the topic has none (section 3 measures that).
    """
    now = time.time()
    doc = DesiredDocument(
        fleet=fleet.fleet, target=f"device:{device}", sequence=int(now * 1000), issued_at=utc_iso(now),
        expires_at=utc_iso(now + 86400.0), bundle=bundle, rollout=Rollout(),
    )  # fmt: skip
    info = fleet.link.publish(fleet.topics.device(device, "desired"), seal(doc, key), qos=1, retain=True)
    if info is None:
        raise RuntimeError("the operator link is not connected")
    info.wait_for_publish(10)


def clear_document(fleet: FleetClient, device: str) -> None:
    info = fleet.link.publish(fleet.topics.device(device, "desired"), b"", qos=1, retain=True)
    if info is not None:
        info.wait_for_publish(10)


@dataclass
class Rig:
    """One running broker with the bundles uploaded and an operator connection."""

    name: str
    broker: Any
    fleet: FleetClient
    bundles: dict[int, DesiredBundle] = field(default_factory=dict)
    upload_s: dict[int, float] = field(default_factory=dict)


@dataclass
class Ctx:
    """What the sections share."""

    cfg: BenchConfig
    work: Path
    key: Any
    key_path: Path
    pub_path: Path
    trust: TrustStore
    rigs: dict[str, Rig]
    packed: dict[int, Path]
    log: Callable[[str], None]
    counter: int = 0

    def state_dir(self, tag: str) -> Path:
        self.counter += 1
        return self.work / "states" / f"{self.counter:03d}-{tag}"

    @property
    def main(self) -> Rig:
        return self.rigs["default"]

    @property
    def pids(self) -> list[int | None]:
        return [r.broker.pid for r in self.rigs.values()]


_END_PHASES = {"rejected", "committed", "rolled_back"}


def download_trial(
    ctx: Ctx,
    rig: Rig,
    chunk_size: int,
    *,
    window: int = 32,
    cut_fraction: float | None = None,
    timeout: float = 120.0,
) -> dict[str, Any]:
    """One download by a fresh SyncAgent: publish the document, wait for the end of the update.

    ``s``: from ``_Download.started`` to the end of ``ChunkAssembler.finish`` (what the agent
    reports as ``download_s``, unrounded).
    """
    bundle = rig.bundles[chunk_size]
    state = ctx.state_dir(f"{rig.name}-{chunk_size // KIB}k-w{window}")
    agent = make_agent(rig.broker, DEVICE, state, ctx.trust, window=window)
    cut_at = None if cut_fraction is None else int(bundle.size * cut_fraction)
    rec = Recorder(agent, cut_at=cut_at, broker_pid=rig.broker.pid)
    _BenchAssembler.timeline.clear()
    try:
        agent.start()
        if not agent.link.wait_connected(15):
            raise RuntimeError(f"the agent could not connect: {agent.link.last_error}")
        time.sleep(0.2)  # the subscriptions and the first state message settle
        cpu0, mosq0 = _thread_cpu(), _pid_cpu(rig.broker.pid)
        t0 = time.monotonic()
        publish_document_now(rig.fleet, DEVICE, bundle, ctx.key)
        end_t, end_phase, end_extra = rec.wait_phase(_END_PHASES, timeout)
    finally:
        _stop_agent(agent)
        clear_document(rig.fleet, DEVICE)
        shutil.rmtree(state, ignore_errors=True)
    verifying = rec.first("verifying")
    started = rec.started
    if verifying is None or started is None or "bench transfer trial" not in end_extra["reason"]:
        raise RuntimeError(f"download trial ended {end_phase}: {end_extra.get('reason')}")
    tl = dict(_BenchAssembler.timeline)
    if rec.last_received is not None:
        tl["last_received"] = rec.last_received
    finished = tl.get("finished", math.nan)
    out: dict[str, Any] = {
        "s": finished - started if not math.isnan(finished) else float(verifying[1]["download_s"]),
        "download_s": float(verifying[1]["download_s"]),
        "doc_to_download_ms": (started - t0) * 1e3,
        "timeline_ms": {k: (tl[k] - started) * 1e3 for k in _TIMELINE if k in tl},
        "add_ms": tl.get("add_s", 0.0) * 1e3,
        "verified_to_end_ms": (end_t - verifying[0]) * 1e3,
        "chunk_msgs": rec.chunk_msgs,
        "chunk_bytes": rec.chunk_bytes,
        "chunks_twice": sum(1 for n in rec.per_chunk.values() if n > 1),
        "n_chunks": -(-bundle.size // chunk_size),
    }
    if rec.cpu_at_verified is not None:
        cpu1, mosq1 = rec.cpu_at_verified
        out["cpu_s"] = {**_roles(_cpu_delta(cpu0, cpu1)), "mosquitto": round(mosq1 - mosq0, 4)}
    if rec.cut is not None:
        cut = rec.cut
        after = [t for t in rec.connects if t > cut["t"]]
        out["cut"] = {
            "at_fraction": cut_fraction,
            "delivered_bytes": cut["delivered"],
            "stored_bytes": cut["stored"],
            "journaled_bytes": cut["journaled"],
            "cut_to_reconnected_s": (after[0] - cut["t"]) if after else math.nan,
            "cut_to_verified_s": finished - cut["t"],
            "fetched_after_cut_bytes": rec.chunk_bytes - cut["delivered"],
            "refetched_bytes": rec.chunk_bytes - bundle.size,
        }
    return out


def restart_trial(ctx: Ctx, chunk_size: int) -> dict[str, Any]:
    """An agent stopped once half of the bundle arrived, then a new agent on the same state dir
    (a daemon restart in the middle of a download)."""
    rig = ctx.main
    bundle = rig.bundles[chunk_size]
    state = ctx.state_dir("restart")
    first = make_agent(rig.broker, DEVICE, state, ctx.trust)
    rec1 = Recorder(first, cut_at=bundle.size // 2, broker_pid=rig.broker.pid)
    second: SyncAgent | None = None
    try:
        try:
            first.start()
            if not first.link.wait_connected(15):
                raise RuntimeError(f"the agent could not connect: {first.link.last_error}")
            time.sleep(0.2)
            publish_document_now(rig.fleet, DEVICE, bundle, ctx.key)
            rec1.wait_cut(60)
        finally:
            _stop_agent(first)  # closes the assembler: the journal records what was stored
        journal = state / "sync" / "downloads" / f"{bundle.sha256}.progress"
        on_disk = _journaled_bytes(journal, bundle.size, chunk_size)
        second = make_agent(rig.broker, DEVICE, state, ctx.trust)
        rec2 = Recorder(second, broker_pid=rig.broker.pid)
        with instrumented_agent():
            _BenchAssembler.timeline.clear()
            t0 = time.monotonic()
            second.start()
            rec2.wait_phase(_END_PHASES, 120)
        finished = _BenchAssembler.timeline.get("finished", math.nan)
        verifying = rec2.first("verifying")
        if verifying is None:
            raise RuntimeError(f"the restarted agent did not verify the bundle: {rec2.events[-1:]}")
        out = {
            "bundle_bytes": bundle.size,
            "delivered_before_bytes": rec1.chunk_bytes,
            "stored_at_cut_bytes": (rec1.cut or {}).get("stored", 0),
            "on_disk_bytes": on_disk,
            "missing_bytes": bundle.size - on_disk,
            "fetched_after_bytes": rec2.chunk_bytes,
            "refetched_bytes": rec1.chunk_bytes + rec2.chunk_bytes - bundle.size,
            "resumed_from_disk": any(
                p == "downloading" and "resumed" in e["reason"] for _, p, e in rec2.events
            ),
            "restart_to_verified_s": finished - t0,
            "download_s": float(verifying[1]["download_s"]),
        }
    finally:
        if second is not None:
            _stop_agent(second)
        clear_document(rig.fleet, DEVICE)
        shutil.rmtree(state, ignore_errors=True)
    return out


# -- sections ---------------------------------------------------------------------------------------
def _alternate(
    arms: dict[str, Callable[[], dict[str, Any]]],
    rounds: int,
    quiet: QuietWait,
    pids: Sequence[int | None],
    log: Callable[[str], None],
) -> tuple[dict[str, list[dict[str, Any]]], list[float]]:
    """Every arm once per round, order reversed every other round; outside load per round."""
    out: dict[str, list[dict[str, Any]]] = {k: [] for k in arms}
    loads: list[float] = []
    names = list(arms)
    for r in range(rounds):
        quiet.wait()
        meter = OutsideLoad(pids)
        for name in names if r % 2 == 0 else reversed(names):
            out[name].append(arms[name]())
        loads.append(meter.stop())
        log(
            f"  round {r + 1}/{rounds}: "
            + ", ".join(f"{k} {v[-1]['s'] * 1e3:.1f} ms" for k, v in out.items())
        )
    return out, loads


def _arm_summary(
    trials: Sequence[dict[str, Any]], raw: Sequence[dict[str, Any]], size: int
) -> dict[str, Any]:
    ratios = [b["s"] / a["s"] for a, b in zip(trials, raw, strict=True)]
    out: dict[str, Any] = {
        "ratio": _median(ratios),
        "ratio_per_round": [round(x, 4) for x in ratios],
        "s": _median([t["s"] for t in trials]),
        "s_per_round": [round(t["s"], 4) for t in trials],
        "mb_per_s": size / 1e6 / _median([t["s"] for t in trials]),
    }
    if "timeline_ms" in trials[0]:
        keys = dict.fromkeys(k for t in trials for k in t["timeline_ms"])
        out["timeline_ms"] = {
            k: round(_median([t["timeline_ms"].get(k, math.nan) for t in trials]), 1) for k in keys
        }
        out["add_ms"] = round(_median([t["add_ms"] for t in trials]), 1)
        out["doc_to_download_ms"] = round(_median([t["doc_to_download_ms"] for t in trials]), 1)
        out["stalled_rounds"] = sum(1 for t in trials if t["timeline_ms"].get("meta", 0.0) >= _STALL_MS)
        calm = [t["s"] for t in trials if t["timeline_ms"].get("meta", 0.0) < _STALL_MS]
        out["s_unstalled"] = _median(calm) if calm else math.nan
        roles = dict.fromkeys(k for t in trials for k in t.get("cpu_s", {}))
        out["cpu_s"] = {k: round(_median([t.get("cpu_s", {}).get(k, 0.0) for t in trials]), 4) for k in roles}
        out["chunk_msgs"] = trials[0]["chunk_msgs"]
        out["n_chunks"] = trials[0]["n_chunks"]
    for key in ("add_s", "finish_s", "open_s", "cipher", "msgs"):
        if key in trials[0]:
            vals = [t[key] for t in trials]
            out[key] = _median(vals) if isinstance(vals[0], float) else vals[0]
    return out


def transfer_section(ctx: Ctx, quiet: QuietWait) -> dict[str, Any]:
    cfg, main = ctx.cfg, ctx.main
    default_cs = cfg.chunk_sizes[0]
    payload = ctx.packed[default_cs].read_bytes()
    size = len(payload)
    meta = describe_bundle(ctx.packed[default_cs], default_cs)
    chunks = [data for _, data in iter_chunks(ctx.packed[default_cs], meta)]
    t = time.perf_counter()
    hashlib.sha256(payload).digest()
    sha_s = time.perf_counter() - t
    pair = tls_contexts(main.broker)
    arms: dict[str, Callable[[], dict[str, Any]]] = {
        "raw_tcp": lambda: raw_transfer(payload),
        "raw_tls": lambda: raw_transfer(payload, pair),
    }
    labels: dict[str, str] = {}
    for cs in cfg.chunk_sizes:
        name = f"mqtt_{cs // KIB}k_w{cfg.window}"
        arms[name] = functools.partial(download_trial, ctx, main, cs, window=cfg.window)
        labels[name] = f"{cs // KIB} KiB chunks, chunk_window {cfg.window}"
    for w in cfg.windows:
        name = f"mqtt_{default_cs // KIB}k_w{w}"
        arms[name] = functools.partial(download_trial, ctx, main, default_cs, window=w)
        labels[name] = f"{default_cs // KIB} KiB chunks, chunk_window {w}"
    arms["transport_only"] = lambda: transport_only(main.broker, main.bundles[default_cs])
    arms["assembler_only"] = lambda: assembler_only(ctx.work, meta, chunks)
    if cfg.experiments and "nodelay" in ctx.rigs:
        fast = ctx.rigs["nodelay"]
        arms["exp_nodelay"] = lambda: download_trial(ctx, fast, default_cs, window=cfg.window)

        def no_readback() -> dict[str, Any]:
            with knobs(skip_readback=True):
                return download_trial(ctx, fast, default_cs, window=cfg.window)

        def sync8() -> dict[str, Any]:
            with knobs(skip_readback=True, sync_bytes=8 * MIB):
                return download_trial(ctx, fast, default_cs, window=cfg.window)

        arms["exp_nodelay_noreadback"] = no_readback
        arms["exp_nodelay_noreadback_sync8m"] = sync8
    with instrumented_agent():
        trials, loads = _alternate(arms, cfg.rounds, quiet, ctx.pids, ctx.log)
    clean = [i for i, load in enumerate(loads) if not load >= cfg.max_load]
    used = clean if len(clean) >= min(3, cfg.rounds) else list(range(cfg.rounds))
    kept = {k: [v[i] for i in used] for k, v in trials.items()}
    raw = kept["raw_tcp"]
    out: dict[str, Any] = {
        "bundle_bytes": size,
        "default": f"mqtt_{default_cs // KIB}k_w{cfg.window}",
        "arms": {k: _arm_summary(v, raw, size) for k, v in kept.items()},
        "labels": labels,
        "sha256_s": sha_s,
        "upload_s": {f"{cs // KIB}k": round(s, 4) for cs, s in main.upload_s.items()},
        "rounds": {"rounds": cfg.rounds, "clean": len(clean), "used": len(used)},
        "outside_load_per_round": [round(x, 3) for x in loads],
    }
    if cfg.experiments:
        out["publish_document_ms"] = {
            name: operator_round_trips(rig, rig.bundles[default_cs], ctx.key)
            for name, rig in ctx.rigs.items()
        }
    return out


def operator_round_trips(rig: Rig, bundle: DesiredBundle, key: Any, calls: int = 5) -> dict[str, Any]:
    """``FleetClient.publish_document`` (a few request/reply exchanges with the broker) to a group
    with no device: the first call finds no previous document, the next ones do."""
    times = []
    for _ in range(calls + 1):
        t0 = time.monotonic()
        rig.fleet.publish_document("group:bench-latency", bundle, key)
        times.append((time.monotonic() - t0) * 1e3)
    return {
        "first": round(times[0], 1),
        "next_median": round(_median(times[1:]), 1),
        "next": [round(x, 1) for x in times[1:]],
    }


def resume_section(ctx: Ctx) -> dict[str, Any]:
    cs = ctx.cfg.chunk_sizes[0]
    cuts = []
    with instrumented_agent():
        for i in range(ctx.cfg.resume_runs):
            trial = download_trial(ctx, ctx.main, cs, window=ctx.cfg.window, cut_fraction=0.5)
            cuts.append(trial)
            ctx.log(f"  cut {i + 1}: {trial['cut']}")
    restart = restart_trial(ctx, cs)
    ctx.log(f"  restart: {restart}")
    keys = [k for k in cuts[0]["cut"] if k != "at_fraction"]
    return {
        "bundle_bytes": ctx.main.bundles[cs].size,
        "chunk_size": cs,
        "cut": {k: _median([c["cut"][k] for c in cuts]) for k in keys},
        "cut_runs": [c["cut"] for c in cuts],
        "download_s_with_cut": [round(c["s"], 3) for c in cuts],
        "restart": restart,
    }


def _daemon_config(ctx: Ctx, broker: Any, state: Path) -> Any:
    from edge_runtime.config import parse_config

    cert, key = broker.client_cert(CAM_DEVICE)
    return parse_config(
        {
            "model": {"bundle": str(DEMO / "shapes"), "format": "onnx", "threads": 1},
            "source": {"kind": "video", "uri": str(DEMO / "shapes.avi"), "loop": True},
            "pipeline": {"max_fps": ctx.cfg.fps},
            "sinks": [{"kind": "jsonl", "path": str(state / "results.jsonl")}],
            "trust": {"keys": [str(DEMO / "keys" / "demo.pub"), str(ctx.pub_path)]},
            "state": {"dir": str(state / "state")},
            "sync": {
                "enabled": True,
                "host": "127.0.0.1",
                "port": broker.port,
                "fleet": FLEET,
                "device_id": CAM_DEVICE,
                "groups": ["cams"],
                "ca_file": str(broker.ca_path),
                "cert_file": str(cert),
                "key_file": str(key),
            },
        },
        state,
    )


_PHASES = ("downloading", "verifying", "staged", "selftest", "probation", "committed")


def _probation_figures(fig: dict[str, Any]) -> dict[str, Any]:
    """What the committed event says about the probation (frames seen, by both models)."""
    cand = fig.get("candidate") or {}
    out = {"candidate_frames": cand.get("frames"), "same_frames": fig.get("same_frames")}
    if fig.get("note"):
        out["note"] = fig["note"]
    return out


def publish_section(ctx: Ctx) -> dict[str, Any]:
    """A real daemon; candidates published by an operator; publish start -> committed, by phase."""
    from edge_runtime.daemon import Daemon

    broker = ctx.main.broker
    state = ctx.work / "daemon"
    state.mkdir(parents=True, exist_ok=True)
    daemon = Daemon(_daemon_config(ctx, broker, state))
    thread = threading.Thread(
        target=daemon.run, kwargs={"install_signals": False}, name="bench-daemon", daemon=True
    )
    watcher = FleetClient(link_settings(broker, OPERATOR, "bench-watcher"), FLEET)
    publisher = FleetClient(link_settings(broker, OPERATOR, "bench-publisher"), FLEET)
    cond = threading.Condition()
    updates: list[tuple[float, dict[str, Any]]] = []

    def on_update(_topic: str, payload: bytes) -> None:
        with contextlib.suppress(ValueError):
            body = json.loads(payload)
            with cond:
                updates.append((time.time(), body))
                cond.notify_all()

    runs: list[dict[str, Any]] = []
    thread.start()
    try:
        end = time.monotonic() + 60
        while (daemon.agent is None or not daemon.agent.link.connected) and time.monotonic() < end:
            time.sleep(0.05)
        if daemon.agent is None or not daemon.agent.link.connected:
            raise RuntimeError("the daemon's sync agent did not connect to the broker")
        watcher.connect()
        publisher.connect()
        watcher.watch(["update"], on_update)
        time.sleep(1.0)  # the pipeline warms up
        rollout = Rollout(probation_s=ctx.cfg.probation_s, probation_min_frames=ctx.cfg.probation_min_frames)
        for i in range(ctx.cfg.publishes):
            version = f"1.{i + 1}.0"
            packed = make_bundle(ctx.work, version, ctx.key_path)
            t0 = time.time()
            bundle, _ = publisher.upload_bundle(packed)
            t_up = time.time()
            publisher.publish_document("group:cams", bundle, ctx.key, rollout=rollout)
            t_doc = time.time()

            def done(version: str = version) -> bool:
                return any(
                    b.get("version") == version and b.get("phase") in ("committed", "rolled_back", "rejected")
                    for _, b in updates
                )

            with cond:
                if not cond.wait_for(done, 120):
                    raise RuntimeError(f"{version} did not reach an end phase: {[b for _, b in updates]}")
                mine = [(rt, b) for rt, b in updates if b.get("version") == version]
            final_rt, final = next(
                (rt, b) for rt, b in mine if b["phase"] in ("committed", "rolled_back", "rejected")
            )
            if final["phase"] != "committed":
                raise RuntimeError(f"{version} ended {final['phase']}: {final.get('reason')}")
            at: dict[str, float] = {}
            for _rt, b in mine:
                at.setdefault(str(b["phase"]), float(b["ts"]))
            steps = {"upload (chunks + meta)": t_up - t0, "publish_document": t_doc - t_up}
            prev, prev_name = t_doc, "document published"
            for phase in _PHASES:
                if phase in at:
                    steps[f"{prev_name} -> {phase}"] = at[phase] - prev
                    prev, prev_name = at[phase], phase
            steps["committed -> received by the operator"] = final_rt - at["committed"]
            runs.append(
                {
                    "version": version,
                    "total_s": final_rt - t0,
                    "steps_s": {k: round(v, 4) for k, v in steps.items()},
                    "download_s": next(
                        (b.get("download_s") for _, b in mine if b["phase"] == "verifying"), None
                    ),
                    "bundle_bytes": packed.stat().st_size,
                    "first_document": i == 0,
                    "probation": _probation_figures(final.get("figures") or {}),
                }
            )
            ctx.log(f"  publish {version}: {runs[-1]['total_s']:.2f} s {runs[-1]['steps_s']}")
        summary = daemon.agent.host.summary()
    finally:
        watcher.close()
        publisher.close()
        daemon.stop_event.set()
        thread.join(60)
    return {
        "runs": runs,
        "probation_s": ctx.cfg.probation_s,
        "probation_min_frames": ctx.cfg.probation_min_frames,
        "fps": ctx.cfg.fps,
        "dropped": summary.get("dropped"),
        "model_swaps": summary.get("model_swaps"),
    }


def _telemetry_body(state: Path) -> dict[str, Any]:
    """A record shaped like the agent's metrics telemetry (``SyncAgent._telemetry_once``)."""
    from edge_runtime.sync.metrics import SystemMetrics

    lat = {"p50": 4.1, "p90": 5.3, "p99": 7.9, "max": 12.4, "mean": 4.4}
    return {
        "kind": "metrics",
        "device": TEL_DEVICE,
        "model": {"name": "shapes", "version": "1.0.0", "format": "onnx", "sha256": "0" * 64},
        "phase": "idle",
        "uptime_s": 3600.0,
        "pipeline": {
            "frames": 108000, "frames_in": 108000, "dropped": 0, "errors": {}, "elapsed_s": 3600.0,
            "fps": 30.0, "first_result_s": 0.41, "model_swaps": 0,
            "latency_ms": {"queue": lat, "preprocess": lat, "inference": lat, "decode": lat, "total": lat},
        },
        "system": SystemMetrics(state).collect(),
        "outbox": {"pending": 0, "bytes": 0, "produced": {}, "delivered": {}, "dropped": {}, "expired": {}},
    }  # fmt: skip


_SUBSCRIBER = r"""
import json, sys, threading, time
import paho.mqtt.client as mqtt

port, ca, cert, key, topic, client_id = sys.argv[1:7]
stamps = []
last = [time.monotonic()]

def on_message(_c, _u, msg):
    stamps.append((json.loads(msg.payload)["seq"], time.monotonic()))
    last[0] = time.monotonic()

subscribed = threading.Event()
client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
client.tls_set(ca_certs=ca, certfile=cert, keyfile=key)
client.on_message = on_message
client.on_subscribe = lambda *_a: subscribed.set()
client.connect("127.0.0.1", int(port), 30)
client.loop_start()
client.subscribe(topic, qos=1)
print("ready" if subscribed.wait(15) else "not subscribed", flush=True)
sys.stdin.readline()
end = time.monotonic() + 60
while time.monotonic() - last[0] < 1.0 and time.monotonic() < end:  # until 1 s without a message
    time.sleep(0.05)
client.disconnect()
client.loop_stop()
json.dump(stamps, sys.stdout)
"""


class Subscriber:
    """An operator subscriber in its own process (paho, mutual TLS, QoS 1) that stamps every
    message with ``time.monotonic()`` (the same clock as this process) and its ``seq``."""

    def __init__(self, broker: Any, topic: str, name: str) -> None:
        import subprocess

        cert, key = broker.client_cert(OPERATOR)
        args = [str(broker.port), str(broker.ca_path), str(cert), str(key), topic, name]
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _SUBSCRIBER, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline().strip()
        if line != "ready":
            self.close()
            raise RuntimeError(f"the operator subscriber did not subscribe: {line!r}")

    def close(self) -> list[tuple[int, float]]:
        """Disconnect once no message came for 1 s; the (seq, time) of every message received."""
        try:
            out, _ = self._proc.communicate("stop\n", timeout=90)
        except Exception:
            self._proc.kill()
            self._proc.communicate()
            raise
        return [(int(s), float(t)) for s, t in json.loads(out or "[]")]

    @property
    def pid(self) -> int:
        return self._proc.pid


def telemetry_section(ctx: Ctx) -> dict[str, Any]:
    cfg, rig = ctx.cfg, ctx.main
    work = ctx.work / "telemetry"
    work.mkdir(parents=True, exist_ok=True)
    body = _telemetry_body(work)
    topic = f"edgert/{FLEET}/device/{TEL_DEVICE}/telemetry"
    results: dict[str, Any] = {}
    # 1. the outbox alone: one record per put (what the agent's telemetry thread does), no sender
    with Outbox(work / "put-only.db", default_ttl_s=None, max_bytes=1 << 30) as outbox:
        n, t0 = 0, time.monotonic()
        while time.monotonic() - t0 < cfg.put_s and n < 50_000:
            outbox.put("telemetry", body, priority=PRIORITY_TELEMETRY)
            n += 1
        results["put_per_s"] = n / (time.monotonic() - t0)
        results["record_bytes"] = len(outbox.peek(1)[0].payload)
        m, t0 = 0, time.monotonic()
        while time.monotonic() - t0 < cfg.put_s / 2 and m < 200_000:
            outbox.put_many("telemetry", [body] * 100, priority=PRIORITY_TELEMETRY)
            m += 100
        results["put_many_per_s"] = m / (time.monotonic() - t0)
    (work / "put-only.db").unlink(missing_ok=True)

    drop_note = "Outgoing messages are being dropped"
    drop_notes0 = rig.broker.log().count(drop_note)

    # 2. drain: a pre-filled outbox, sent once the agent connects
    sub = Subscriber(rig.broker, topic, "bench-drain")
    state = ctx.state_dir("telemetry-drain")
    agent = make_agent(rig.broker, TEL_DEVICE, state, ctx.trust)
    try:
        agent.outbox.put_many("telemetry", [body] * cfg.prefill, priority=PRIORITY_TELEMETRY)
        agent.start()
        if not agent.link.wait_connected(15):
            raise RuntimeError(f"the agent could not connect: {agent.link.last_error}")
        t_conn = time.monotonic()
        drained = agent.flush(120)  # every record acknowledged by the broker (polled every 50 ms)
        t_acked = time.monotonic()
    finally:
        _stop_agent(agent)
        stamps = sub.close()
    times = sorted(t for _, t in stamps)
    seqs = {s for s, _ in stamps}
    results.update(
        {
            "drain_records": cfg.prefill,
            "drain_sent": drained,
            "drain_received": len(seqs),
            "drain_lost": cfg.prefill - len(seqs),
            "drain_per_s": cfg.prefill / (t_acked - t_conn),
            "drain_received_per_s": (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else math.nan,
        }
    )

    # 3. sustained: records put one by one while the sender drains them
    sub = Subscriber(rig.broker, topic, "bench-live")
    state = ctx.state_dir("telemetry-live")
    agent = make_agent(rig.broker, TEL_DEVICE, state, ctx.trust)
    produced = waits = 0
    try:
        agent.start()
        if not agent.link.wait_connected(15):
            raise RuntimeError(f"the agent could not connect: {agent.link.last_error}")
        time.sleep(0.3)
        cpu0, mosq0 = _thread_cpu(), _pid_cpu(rig.broker.pid)
        t0 = time.monotonic()
        pending = 0
        while time.monotonic() - t0 < cfg.telemetry_s:
            if produced % 256 == 0:
                pending = int(agent.outbox.stats()["pending"])
            if pending > 2000:  # back-pressure: keep the backlog bounded, the outbox never fills
                time.sleep(0.005)
                waits += 1
                pending = int(agent.outbox.stats()["pending"])
                continue
            agent.outbox.put("telemetry", body, priority=PRIORITY_TELEMETRY)
            agent._wake_sender.set()  # as SyncAgent._telemetry_once and SyncAgent.event do
            produced += 1
        t_stop = time.monotonic()
        pending_at_stop = int(agent.outbox.stats()["pending"])
        cpu1, mosq1 = _thread_cpu(), _pid_cpu(rig.broker.pid)
        drained = agent.flush(120)
        t_sent = time.monotonic()
    finally:
        _stop_agent(agent)
        stamps = sub.close()
    seqs = {s for s, _ in stamps}
    warm_from = t0 + min(0.5, cfg.telemetry_s / 4)
    warm = [t for _, t in stamps if warm_from <= t <= t_stop]
    last = max((t for _, t in stamps), default=math.nan)
    wall = t_stop - t0
    cpu = _cpu_delta(cpu0, cpu1)
    results.update(
        {
            "live_seconds": wall,
            "produced": produced,
            "received": len(seqs),
            "lost": produced - len(seqs),
            "broker_drop_notes": rig.broker.log().count(drop_note) - drop_notes0,
            "duplicates": len(stamps) - len(seqs),
            "producer_waits": waits,
            "pending_at_stop": pending_at_stop,
            "sent": drained,
            "e2e_per_s": len(warm) / max(1e-9, t_stop - warm_from),
            "sender_per_s": (produced - pending_at_stop) / wall,
            "drain_after_stop_s": t_sent - t_stop,
            "last_received_after_stop_s": last - t_stop,
            "cpu_share": {
                "producer (main thread)": round(cpu.get("MainThread", 0.0) / wall, 3),
                "device outbox sender": round(cpu.get("sync-outbox", 0.0) / wall, 3),
                "device network thread": round(cpu.get("sync-mqtt-net", 0.0) / wall, 3),
                "mosquitto": round((mosq1 - mosq0) / wall, 3),
            },
        }
    )
    return results


# -- setup and run ----------------------------------------------------------------------------------
def _nodelay_broker_class(base: Any) -> Any:
    class NoDelayBroker(base):  # type: ignore[misc]
        """The test broker plus ``set_tcp_nodelay true`` (experiment)."""

        def _write_conf(self) -> None:
            super()._write_conf()
            with self.conf_path.open("a", encoding="utf-8") as fh:
                fh.write(
                    "\n# bench experiment: no Nagle delay on the broker's sockets\nset_tcp_nodelay true\n"
                )

    return NoDelayBroker


def _start_rig(name: str, broker_cls: Any, ctx_work: Path) -> Rig:
    broker = broker_cls(
        ctx_work / f"broker-{name}",
        fleet=FLEET,
        devices={DEVICE: [], TEL_DEVICE: [], CAM_DEVICE: ["cams"]},
        operators=[OPERATOR],
    )
    broker.start()
    try:
        fleet = FleetClient(link_settings(broker, OPERATOR, f"bench-operator-{name}"), FLEET)
        fleet.connect()
    except BaseException:
        broker.close()
        raise
    return Rig(name, broker, fleet)


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the sections of ``cfg`` and return every figure (JSON-serialisable)."""
    started = time.monotonic()
    quiet = QuietWait(cfg.max_load, cfg.quiet_budget_s)
    mqtt_broker = _broker_module()
    report: dict[str, Any] = {
        "config": {
            "cpus": os.cpu_count(),
            "bundle_mb": cfg.bundle_mb,
            "rounds": cfg.rounds,
            "chunk_sizes": list(cfg.chunk_sizes),
            "window": cfg.window,
            "windows": list(cfg.windows),
            "experiments": cfg.experiments,
            "max_load": cfg.max_load,
            "sections": list(cfg.sections),
            "mosquitto": _mosquitto_version(mqtt_broker.find_mosquitto()),
            "openssl": ssl.OPENSSL_VERSION,
            "python": sys.version.split()[0],
        }
    }
    with tempfile.TemporaryDirectory(prefix="edgert-bench-sync-") as tmp:
        work = Path(tmp)
        key_path, pub_path = generate_keypair(work / "keys", name="bench")
        trust = TrustStore.from_files([pub_path])
        rigs: dict[str, Rig] = {}
        try:
            log("starting mosquitto and building the bundles ...")
            rigs["default"] = _start_rig("default", mqtt_broker.Broker, work)
            if cfg.experiments and "transfer" in cfg.sections:
                rigs["nodelay"] = _start_rig("nodelay", _nodelay_broker_class(mqtt_broker.Broker), work)
            packed: dict[int, Path] = {}
            if {"transfer", "resume"} & set(cfg.sections):
                for i, cs in enumerate(cfg.chunk_sizes):
                    packed[cs] = make_bundle(work, f"2.{i}.0", key_path, int(cfg.bundle_mb * 1e6), seed=i + 1)
                    for rig in rigs.values():
                        desc, seconds = rig.fleet.upload_bundle(packed[cs], chunk_size=cs)
                        rig.bundles[cs], rig.upload_s[cs] = desc, seconds
            ctx = Ctx(cfg, work, load_private_key(key_path), key_path, pub_path, trust, rigs, packed, log)
            if "transfer" in cfg.sections:
                log(f"transfer: {cfg.rounds} alternated rounds ...")
                report["transfer"] = transfer_section(ctx, quiet)
            if "resume" in cfg.sections:
                log("resume after a cut ...")
                report["resume"] = resume_section(ctx)
            if "publish" in cfg.sections:
                log("publish -> committed on a real daemon ...")
                report["publish"] = publish_section(ctx)
            if "telemetry" in cfg.sections:
                log("telemetry ...")
                report["telemetry"] = telemetry_section(ctx)
        finally:
            for rig in rigs.values():
                rig.fleet.close()
                rig.broker.close()
    report["quiet"] = {"waited_s": round(quiet.waited_s, 1), "rounds_started_busy": quiet.busy_starts}
    report["needed_changes"] = needed_changes(report)
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    return report


def _mosquitto_version(path: str) -> str:
    import subprocess

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


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def _stall_counts(arms: dict[str, Any]) -> tuple[int, int]:
    """(downloads with a stalled meta, downloads) over the default broker's MQTT arms."""
    mqtt = [a for n, a in arms.items() if n.startswith("mqtt_")]
    return sum(a["stalled_rounds"] for a in mqtt), sum(len(a["s_per_round"]) for a in mqtt)


def _round_trip_note(t: dict[str, Any]) -> str:
    rt = t.get("publish_document_ms", {})
    if "default" not in rt or "nodelay" not in rt:
        return ""
    return (
        f"; FleetClient.publish_document with a previous document {rt['default']['next_median']:.0f} -> "
        f"{rt['nodelay']['next_median']:.0f} ms"
    )


def needed_changes(report: dict[str, Any]) -> list[str]:
    """Concrete changes in edge_runtime/sync with their measured effect (from this run)."""
    out: list[str] = []
    t = report.get("transfer")
    if t:
        arms = t["arms"]
        base = arms[t["default"]]
        if "exp_nodelay" in arms:
            nd, nr, s8 = (
                arms["exp_nodelay"],
                arms["exp_nodelay_noreadback"],
                arms["exp_nodelay_noreadback_sync8m"],
            )
            stalled, n_trials = _stall_counts(arms)
            out.append(
                "broker_config.render_mosquitto_conf: add `set_tcp_nodelay true` (a global option of "
                f"mosquitto >= 2.0; systemd/mosquitto/edgert.conf is rendered from it). Without it {stalled} "
                f"of {n_trials} downloads got the meta >= {_STALL_MS:.0f} ms after subscribing instead of "
                "~2 ms (a small reply of mosquitto held by Nagle until the device's delayed ACK), and every "
                "request/reply with the broker can stall alike; measured: median download "
                f"{base['s'] * 1e3:.0f} -> {nd['s'] * 1e3:.0f} ms, stalled downloads {nd['stalled_rounds']} "
                f"of {len(nd['s_per_round'])}" + _round_trip_note(t)
            )
            tl = nd["timeline_ms"]
            finish_ms = tl.get("finished", math.nan) - tl.get("finish_start", math.nan)
            if nr["s"] < 0.95 * nd["s"]:
                out.append(
                    "transfer.ChunkAssembler.finish: drop the read-back sha256 of the whole file (it "
                    "re-reads the .part from the page cache right after writing it: memory, not disk; "
                    "every chunk's sha256 was checked against the meta the signed document pins, chunks "
                    "resumed from disk are re-hashed in _try_resume, and StateStore.stage hashes the whole "
                    f"file again before unpacking). finish took {finish_ms:.0f} ms after the last chunk; "
                    f"measured with a nodelay broker: {nd['s'] * 1e3:.0f} -> {nr['s'] * 1e3:.0f} ms, ratio "
                    f"{nd['ratio']:.3f} -> {nr['ratio']:.3f}"
                )
            if s8["s"] < 0.95 * nr["s"]:
                out.append(
                    "agent._on_meta: ChunkAssembler(..., sync_bytes=8 MiB) (or an AgentOptions/[sync] field; "
                    "the 1 MiB default fdatasyncs 20 times per 20 MB): measured on top of the two above: "
                    f"{nr['s'] * 1e3:.0f} -> {s8['s'] * 1e3:.0f} ms, ratio {nr['ratio']:.3f} -> "
                    f"{s8['ratio']:.3f} (a power cut then re-fetches up to 8 MiB)"
                )
    m = report.get("telemetry")
    if m and m["lost"] + m["drain_lost"] > 0:
        out.append(
            f"broker_config.render_mosquitto_conf: {m['lost'] + m['drain_lost']} of "
            f"{m['produced'] + m['drain_records']} telemetry records never reached the operator subscriber "
            "although the device got a PUBACK for each and the subscriber waited until 1 s passed without a "
            "message (mosquitto logged 'Outgoing messages are being dropped' "
            f"{m['broker_drop_notes']} times): "
            "mosquitto queues at most max_queued_messages (default 1000) QoS 1 messages per subscriber and "
            "drops the rest when a consumer lags behind a device draining its outbox; set "
            "max_queued_messages (e.g. 100000) or max_queued_bytes in the rendered config"
        )
    p = report.get("publish")
    if p and p["runs"]:
        first = p["runs"][0]
        doc_s = first["steps_s"]["publish_document"]
        later = [x["steps_s"]["publish_document"] for x in p["runs"][1:]]
        out.append(
            "publisher.FleetClient.read_retained waits its whole 2 s timeout when the topic has no retained "
            f"message: publish_document of the group's first document took {doc_s:.2f} s"
            + (f" (later ones {_median(later):.2f} s)" if later else "")
            + "; wait for the SUBACK and then one round trip (e.g. publish to a private topic and wait for "
            "it, since mosquitto sends retained messages right after the SUBACK) instead of the timeout"
        )
    return out


def summary_rows(report: dict[str, Any]) -> list[Row]:
    """(figure, measured, goal, PASS/FAIL/-) rows of every section present in ``report``."""
    rows: list[Row] = []
    t = report.get("transfer")
    if t:
        arms, size = t["arms"], t["bundle_bytes"]
        base = arms[t["default"]]
        rows.append(
            (f"bundle transfer / raw TCP throughput ({_mb(size)}, {t['labels'][t['default']]})",
             f"{base['ratio']:.3f}", f">= {GOAL_RATIO}", _mark(base["ratio"] >= GOAL_RATIO))
        )  # fmt: skip
        for name, label in t["labels"].items():
            if name == t["default"]:
                continue
            a = arms[name]
            rows.append(
                (f"  ... {label}", f"{a['ratio']:.3f}", f">= {GOAL_RATIO}", _mark(a["ratio"] >= GOAL_RATIO))
            )
        rows += [
            ("  raw TLS / raw TCP (same certificates; the TLS floor)", f"{arms['raw_tls']['ratio']:.3f}",
             "report", "-"),
            ("  bundle transfer / raw TLS", f"{arms['raw_tls']['s'] / base['s']:.3f}", "report", "-"),
            ("  transport only (MqttLink, 1 wildcard sub, no disk) / raw TCP",
             f"{arms['transport_only']['ratio']:.3f}", "report", "-"),
            ("  assembler only (sha256, write, fsync, finish) / raw TCP",
             f"{arms['assembler_only']['ratio']:.3f}", "report", "-"),
            ("  bundle download throughput (agent download_s)", f"{base['mb_per_s']:.0f} MB/s", "report",
             "-"),
        ]  # fmt: skip
        for name, label in (
            ("exp_nodelay", "experiment: broker set_tcp_nodelay"),
            ("exp_nodelay_noreadback", "experiment: + finish() without read-back"),
            ("exp_nodelay_noreadback_sync8m", "experiment: + sync_bytes 8 MiB"),
        ):
            if name in arms:
                a = arms[name]
                rows.append(
                    (f"  {label}", f"{a['ratio']:.3f}", f">= {GOAL_RATIO}", _mark(a["ratio"] >= GOAL_RATIO))
                )
    r = report.get("resume")
    if r:
        c, x = r["cut"], r["restart"]
        rows += [
            ("resume after a connection cut at 50%: cut -> verified", f"{c['cut_to_verified_s']:.2f} s",
             "report", "-"),
            ("  of which cut -> reconnected (back-off 0.25-0.5 s)", f"{c['cut_to_reconnected_s']:.2f} s",
             "report", "-"),
            ("  bytes received before the cut (stored on disk at the cut)",
             f"{_mb(c['delivered_bytes'])} ({_mb(c['stored_bytes'])})", "report", "-"),
            ("  bytes fetched twice", _mb(c["refetched_bytes"]), "< received",
             _mark(c["refetched_bytes"] < max(1, c["delivered_bytes"]))),
            ("agent restart at 50%: bytes fetched after the restart",
             f"{_mb(x['fetched_after_bytes'])} of {_mb(x['bundle_bytes'])}",
             f"<= {_mb(x['missing_bytes'])}", _mark(x["fetched_after_bytes"] <= x["missing_bytes"])),
        ]  # fmt: skip
    p = report.get("publish")
    if p:
        for run in p["runs"]:
            label = "first document of the group" if run["first_document"] else "next document"
            rows.append(
                (f"publish -> committed, 1 device ({label}, probation {p['probation_s']:g} s)",
                 f"{run['total_s']:.2f} s", "report", "-")
            )  # fmt: skip
    m = report.get("telemetry")
    if m:
        rows += [
            ("telemetry end to end, sustained (outbox -> sender -> mosquitto -> operator)",
             f"{m['e2e_per_s']:.0f} msg/s", "report", "-"),
            ("  records lost on the way", f"{m['lost']} of {m['produced']}", "0", _mark(m["lost"] == 0)),
            ("  sender rate (records acked by the broker)", f"{m['sender_per_s']:.0f} msg/s", "report", "-"),
            ("drain of a pre-filled outbox (records acked by the broker)", f"{m['drain_per_s']:.0f} msg/s",
             "report", "-"),
            ("  records lost on the way", f"{m['drain_lost']} of {m['drain_records']}", "0",
             _mark(m["drain_lost"] == 0)),
            ("  outbox put rate alone (one record per put)", f"{m['put_per_s']:.0f} /s", "report", "-"),
        ]  # fmt: skip
    return rows


def _details(report: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    t = report.get("transfer")
    if t:
        arms, size = t["arms"], t["bundle_bytes"]
        rr = t["rounds"]
        lines.append(
            f"  transfer of {size:,} bytes; rounds used {rr['used']}/{rr['rounds']} ({rr['clean']} free of "
            f"outside load; outside load per round {t['outside_load_per_round']}); upload with "
            f"FleetClient.upload_bundle {t['upload_s']} s"
        )
        lines.append(
            f"    raw TCP {arms['raw_tcp']['s'] * 1e3:.1f} ms ({arms['raw_tcp']['mb_per_s']:.0f} MB/s), "
            f"raw TLS {arms['raw_tls']['s'] * 1e3:.1f} ms ({arms['raw_tls'].get('cipher')}), "
            "one sha256 pass over the "
            f"bundle {t['sha256_s'] * 1e3:.1f} ms"
        )
        for name, a in arms.items():
            if not name.startswith(("mqtt_", "exp_")):
                continue
            tl = a["timeline_ms"]
            lines.append(
                f"    {name}: download_s median {a['s'] * 1e3:.1f} ms ({a['mb_per_s']:.0f} MB/s; "
                f"{a['s_unstalled'] * 1e3:.1f} ms without the stalled rounds), per round "
                f"{[round(x * 1e3, 1) for x in a['s_per_round']]} ms, ratio per round {a['ratio_per_round']}"
            )
            lines.append(
                f"      timeline (ms after 'downloading'): meta {tl.get('meta')}, first chunk "
                f"{tl.get('first_chunk')}, last chunk received {tl.get('last_received')} (network thread), "
                f"stored {tl.get('last_chunk')}, "
                f"finish {tl.get('finish_start')}"
                f" -> {tl.get('finished')}; ChunkAssembler.add total {a['add_ms']} ms; "
                f"{a['chunk_msgs']} chunk messages for {a['n_chunks']} chunks; meta >= {_STALL_MS:.0f} ms in "
                f"{a['stalled_rounds']} rounds"
            )
            lines.append(f"      CPU s until verified: {a['cpu_s']}")
        tr, asm = arms["transport_only"], arms["assembler_only"]
        lines.append(
            f"    transport only: {tr['s'] * 1e3:.1f} ms ({tr['mb_per_s']:.0f} MB/s, "
            f"{tr.get('msgs')} messages, "
            f"{tr.get('cipher')}); assembler only: {asm['s'] * 1e3:.1f} ms (add {asm['add_s'] * 1e3:.1f}, "
            f"finish {asm['finish_s'] * 1e3:.1f})"
        )
        for name, rt in t.get("publish_document_ms", {}).items():
            lines.append(
                f"    FleetClient.publish_document on the {name} broker: first (no previous document) "
                f"{rt['first']:.0f} ms, then {rt['next']} ms"
            )
        lines += ["  where the transfer time goes:", *[f"    {x}" for x in _diagnosis(t)]]
    r = report.get("resume")
    if r:
        lines.append(
            f"  resume ({r['chunk_size'] // KIB} KiB chunks, {_mb(r['bundle_bytes'])}), each cut run:"
        )
        for c in r["cut_runs"]:
            lines.append(
                f"    delivered {_mb(c['delivered_bytes'])}, stored {_mb(c['stored_bytes'])}, journaled "
                f"{_mb(c['journaled_bytes'])} at the cut; reconnected after "
                f"{c['cut_to_reconnected_s']:.3f} s, verified {c['cut_to_verified_s']:.3f} s after the cut; "
                f"fetched again {c['refetched_bytes']:,} bytes"
            )
        x = r["restart"]
        lines.append(
            f"    restart: received {_mb(x['delivered_before_bytes'])} before the stop "
            f"({_mb(x['stored_at_cut_bytes'])} stored at the cut), {_mb(x['on_disk_bytes'])} journaled on "
            "disk at the restart; resumed from "
            f"disk: {x['resumed_from_disk']}; fetched after {_mb(x['fetched_after_bytes'])}, twice in all "
            f"{_mb(x['refetched_bytes'])}; restart -> verified {x['restart_to_verified_s']:.3f} s"
        )
    p = report.get("publish")
    if p:
        lines.append(
            f"  publish: real daemon (demo shapes, {p['fps']:g} fps video), "
            f"probation {p['probation_s']:g} s / "
            f"{p['probation_min_frames']} frames; {p['model_swaps']} swaps, {p['dropped']} frames dropped"
        )
        for run in p["runs"]:
            lines.append(
                f"    {run['version']} ({_mb(run['bundle_bytes'])}), {run['total_s']:.3f} s in all; "
                f"committed with {run['probation']}:"
            )
            lines += [f"      {k:<42} {v:7.3f} s" for k, v in run["steps_s"].items()]
    m = report.get("telemetry")
    if m:
        lines.append(
            f"  telemetry: {m['record_bytes']} B records; live {m['live_seconds']:.1f} s: produced "
            f"{m['produced']}, received {m['received']} ({m['duplicates']} duplicates, {m['lost']} lost), "
            f"producer paused {m['producer_waits']} x 5 ms (outbox backlog > 2000), backlog at the end "
            f"{m['pending_at_stop']}, sent {m['drain_after_stop_s']:.2f} s later; CPU share of one core: "
            f"{m['cpu_share']}"
        )
        lines.append(
            f"    drain: {m['drain_received']} of {m['drain_records']} pre-filled records received, at "
            f"{m['drain_received_per_s']:.0f} msg/s; mosquitto logged 'Outgoing messages are being dropped' "
            f"{m['broker_drop_notes']} times; put_many(100) {m['put_many_per_s']:.0f} records/s; the "
            "operator "
            "subscriber is a separate process (paho, QoS 1, json.loads per message) that stops after 1 s "
            "without a message"
        )
    return lines


def _diagnosis(t: dict[str, Any]) -> list[str]:
    """Where the transfer time goes, in words, from the figures of this run."""
    arms = t["arms"]
    base = arms[t["default"]]
    raw, tls, transport = arms["raw_tcp"], arms["raw_tls"], arms["transport_only"]
    tl = base["timeline_ms"]
    cpu = base["cpu_s"]
    net = cpu.get("device network thread (TLS, paho)", 0.0)
    agent = cpu.get("device agent thread (sha256, write, fsync)", 0.0)
    mosq = cpu.get("mosquitto", 0.0)
    total_cpu = sum(cpu.values())
    nan = math.nan
    lag = tl.get("last_chunk", nan) - tl.get("last_received", nan)
    budget_ms = raw["s"] / GOAL_RATIO * 1e3
    sha_ms = t["sha256_s"] * 1e3
    finish_ms = tl.get("finished", nan) - tl.get("finish_start", nan)
    asm = arms["assembler_only"]
    lines = [
        f"the goal allows {budget_ms:.1f} ms for {_mb(t['bundle_bytes'])}; one sha256 pass over it "
        f"takes {sha_ms:.1f} ms (the agent makes two: per chunk, then in finish) and raw TLS alone "
        f"{tls['s'] * 1e3:.1f} ms (ratio {tls['ratio']:.2f}): with TLS and an integrity check, 0.5 "
        "of plain TCP is out of reach on this machine whatever the protocol",
        f"median download {base['s'] * 1e3:.0f} ms ({base['s_unstalled'] * 1e3:.0f} ms in the rounds "
        f"without a stalled meta): meta after {tl.get('meta', nan):.0f} ms (a subscribe round trip), "
        f"last chunk received by the network thread at {tl.get('last_received', nan):.0f} ms and "
        f"stored by the agent thread {lag:.0f} ms later, finish (flush, read-back sha256, fsync, "
        f"rename) {finish_ms:.0f} ms",
        f"CPU until verified {total_cpu * 1e3:.0f} ms in {base['s'] * 1e3:.0f} ms on {_cpus()} cores: "
        f"network thread {net * 1e3:.0f} ms (TLS decrypt, paho framing and callbacks), agent thread "
        f"{agent * 1e3:.0f} ms (add() {base['add_ms']:.0f} ms: sha256, pwrite, fdatasync every 1 MiB; "
        f"then finish), mosquitto {mosq * 1e3:.0f} ms (TLS encrypt of the retained chunks); these "
        "threads share 2 cores and one GIL",
        f"the partial paths: transport only {transport['s'] * 1e3:.0f} ms (raw TLS "
        f"{tls['s'] * 1e3:.0f} ms; the rest is mosquitto's relay and paho), assembler only "
        f"{asm['s'] * 1e3:.0f} ms (add {asm['add_s'] * 1e3:.0f} ms of which one sha256 pass "
        f"{sha_ms:.0f} ms, finish {asm['finish_s'] * 1e3:.0f} ms): the agent overlaps them only partly",
    ]
    prefix = t["default"].rsplit("_w", 1)[0] + "_w"
    windows = {n: a for n, a in arms.items() if n.startswith(prefix) and n != t["default"]}
    if windows:
        lines.append(
            "per-chunk subscribe round trips (rounds without a stalled meta): chunk_window "
            + ", ".join(
                f"{n.rsplit('_w', 1)[1]} -> {a['s_unstalled'] * 1e3:.0f} ms" for n, a in windows.items()
            )
            + f", {t['default'].rsplit('_w', 1)[1]} -> {base['s_unstalled'] * 1e3:.0f} ms"
        )
    stalled, n_trials = _stall_counts(arms)
    if stalled:
        lines.append(
            f"{stalled} of {n_trials} downloads from the default broker got the meta >= "
            f"{_STALL_MS:.0f} ms after subscribing (normally ~2 ms): Nagle on mosquitto's sockets (no "
            "set_tcp_nodelay) holding a small reply until the device's delayed ACK; none with "
            "set_tcp_nodelay true (experiments)"
        )
    if "exp_nodelay" in arms:
        nd, nr, s8 = (
            arms["exp_nodelay"],
            arms["exp_nodelay_noreadback"],
            arms["exp_nodelay_noreadback_sync8m"],
        )
        lines.append(
            f"experiments (medians): set_tcp_nodelay {base['s'] * 1e3:.0f} -> {nd['s'] * 1e3:.0f} ms; then "
            f"finish() without the read-back sha256 -> {nr['s'] * 1e3:.0f} ms; then sync_bytes 8 MiB -> "
            f"{s8['s'] * 1e3:.0f} ms (add() {nr['add_ms']:.0f} -> {s8['add_ms']:.0f} ms); a change under 5% "
            "is within this machine's noise"
        )
    return lines


def format_report(report: dict[str, Any], command: str) -> str:
    """The human-readable table (figures, goals, PASS/FAIL), details, suggested changes, command."""
    c = report["config"]
    rows = summary_rows(report)
    w0 = max([len(r[0]) for r in rows] + [6])
    w1 = max([len(r[1]) for r in rows] + [8])
    w2 = max([len(r[2]) for r in rows] + [4])
    lines = [
        f"edgert fleet sync bench: {c['cpus']} CPUs, {c['mosquitto']}, {c['openssl']}, Python {c['python']}",
        f"transfer: {c['rounds']} alternated rounds (raw sockets and MQTT trials), medians of per-round "
        "ratios "
        "(raw TCP seconds / trial seconds); MQTT figure = the agent's download_s",
        "",
        f"{'figure':<{w0}}  {'measured':>{w1}}  {'goal':>{w2}}  result",
        f"{'-' * w0}  {'-' * w1}  {'-' * w2}  ------",
    ]
    lines += [f"{a:<{w0}}  {b:>{w1}}  {g:>{w2}}  {r}" for a, b, g, r in rows]
    lines += ["", "details:", *_details(report)]
    if report.get("needed_changes"):
        lines += ["", "changes suggested in edge_runtime/sync (measured effect from this run):"]
        lines += [f"  - {x}" for x in report["needed_changes"]]
    q = report.get("quiet", {})
    lines += [
        "",
        f"waited {q.get('waited_s', 0)} s for a quiet machine (other load < {c['max_load']:.0%}); "
        f"{q.get('rounds_started_busy', 0)} rounds started busy; elapsed {report.get('elapsed_s', 0)} s",
        f"command: {command}",
    ]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7, help="alternated transfer rounds (default 7)")
    p.add_argument(
        "--bundle-mb", type=float, default=20.0, help="MB of random payload in the bundle (default 20)"
    )
    p.add_argument("--chunk-kib", default="256,1024",
                   help="chunk sizes in KiB; the first one has the goal (default 256,1024)")  # fmt: skip
    p.add_argument(
        "--window", type=int, default=32, help="chunk_window of the default configuration (default 32)"
    )
    p.add_argument("--windows", default="8,128",
                   help="other chunk_window values tried (default 8,128; '' for none)")  # fmt: skip
    p.add_argument("--no-experiments", action="store_true", help="skip the monkeypatched experiments")
    p.add_argument("--resume-runs", type=int, default=3, help="connection cuts to time (default 3)")
    p.add_argument("--probation", type=float, default=2.0, help="probation_s of the candidates (default 2)")
    p.add_argument("--publishes", type=int, default=2, help="candidates published to the daemon (default 2)")
    p.add_argument("--fps", type=float, default=30.0, help="frame rate of the daemon's video (default 30)")
    p.add_argument("--telemetry-seconds", type=float, default=6.0, help="sustained telemetry run (default 6)")
    p.add_argument("--only", help=f"comma-separated sections (default all: {','.join(SECTIONS)})")
    p.add_argument("--max-load", type=float, default=0.25,
                   help="before each round wait until other processes use less than this share of the CPUs "
                   "(default 0.25) ...")  # fmt: skip
    p.add_argument("--quiet-budget", type=float, default=30.0,
                   help="... but wait at most this long in all (default 30 s; 0: never wait)")  # fmt: skip
    p.add_argument("--json", type=Path, help="also write the figures as JSON")
    return p


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the bench, print the table, optionally write JSON."""
    args = _parser().parse_args(argv)
    sections = tuple(s.strip() for s in (args.only or ",".join(SECTIONS)).split(",") if s.strip())
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown section(s) {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    cfg = BenchConfig(
        bundle_mb=args.bundle_mb,
        rounds=args.rounds,
        chunk_sizes=tuple(k * KIB for k in _ints(args.chunk_kib)),
        window=args.window,
        windows=_ints(args.windows),
        experiments=not args.no_experiments,
        resume_runs=args.resume_runs,
        probation_s=args.probation,
        publishes=args.publishes,
        fps=args.fps,
        telemetry_s=args.telemetry_seconds,
        max_load=args.max_load,
        quiet_budget_s=args.quiet_budget,
        sections=sections,
    )
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    argv_list = list(sys.argv[1:] if argv is None else argv)
    command = " ".join(["PYTHONPATH=. python bench/sync.py", *(shlex.quote(a) for a in argv_list)])
    report = run_bench(cfg, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    report["command"] = command
    print(format_report(report, command))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
