"""Outage soak: every telemetry, event and update record survives broker outages and daemon restarts.

Run from the repository root (the device venv plus paho-mqtt and onnx; mosquitto installed, see
``scripts/ensure-mosquitto.sh``)::

    PYTHONPATH=. python bench/outage.py [--minutes 5] [--cycles 6] [--restarts 4] [--kills 2]
                                        [--seed 1] [--json out.json]

Everything is real and local (127.0.0.1):

* **Broker**: mosquitto started by ``tests/mqtt_broker.py`` (generated fleet PKI, mutual TLS, the
  fleet ACL, persistence in its ``db/``).
* **Daemon**: ``python -m edge_runtime run --config edgert.toml`` as a SUBPROCESS, so it can be
  stopped with SIGTERM and killed with SIGKILL: the demo shapes bundle on the demo video (looped,
  paced at ``--fps``), ``[sync]`` on with telemetry every ``--telemetry-interval`` seconds and
  events on (a change of the top class is an event).
* **Consumer**: an operator client with a persistent MQTT 5 session (clean start off, session
  expiry 1 h, reconnect delay 1 s) subscribed with QoS 1 to the device's ``telemetry``,
  ``events``, ``update`` and ``state`` topics. It keeps every ``seq`` it sees with a digest of the
  payload, so a duplicate (an at-least-once re-send) is told apart from a *conflict* (one seq
  carried by two different payloads, which would mean a seq was reused).

The schedule is random (``--seed``): ``--cycles`` broker cycles of random lengths, each up for a
while and then down (``mosquitto`` stopped with SIGTERM, which saves its sessions; started again
on the same port and database). ``--restarts`` daemon restarts at random moments, ``--kills`` of
them with SIGKILL and the rest graceful (SIGTERM), placed so that one graceful stop falls inside an
outage, one SIGKILL hits the drain right after an outage (when the device has just reconnected and
records are in flight without their PUBACK) and, with 3 or more restarts, one SIGKILL falls inside
an outage. After each restart the bench waits until the new process has opened its outbox. The
last part of the run (``--tail``) has no outage and no restart, to time the last drain.

While it runs, the outbox database is read every 0.2 s (read-only SQLite connection: ``state``
row) for the pending rows, and the daemon log for its connects. At the end the bench waits until
the consumer holds every seq up to the outbox's ``last_seq``, stops the daemon with SIGTERM, reads
the outbox once more and counts end to end:

* **produced**: the outbox's ``last_seq`` (one counter per device across all streams, from 1);
* **delivered**: distinct seqs the consumer received; **pending at the end**: records still in the
  outbox after the final stop (made after the last send; they go out at the next start);
* **lost** = produced - delivered - pending at the end: must be 0, also for records that a SIGKILL
  left without PUBACK (re-sent after the restart);
* **duplicates** (messages - distinct seqs), **conflicts** (must be 0), outbox drops and expiries
  (must be 0), the outbox **high-water mark** (its persisted ``hwm_rows``/``hwm_bytes``), and for
  every outage the backlog when the broker came back, the device's reconnect delay (its back-off)
  and the **drain time**: from the broker being back until the consumer holds every seq produced
  before that moment.

The machine is shared: no absolute time is a goal; the goals are lost = 0, conflicts = 0, no outbox
drop or expiry, every graceful stop exiting 0.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import re
import shlex
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``bench`` and ``edge_runtime`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

__all__ = [
    "DaemonProcess",
    "OutageConfig",
    "SeqConsumer",
    "Step",
    "broker_module",
    "format_report",
    "main",
    "make_plan",
    "read_outbox",
    "run_outage",
    "write_config",
]

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
DEMO = REPO / "models" / "demo"
DEMO_PUB = DEMO / "keys" / "demo.pub"
FLEET = "bench"
DEVICE = "dev1"
GROUP = "cams"
OPERATOR = "fleet-admin"
STREAMS = ("telemetry", "events", "update")
_OPEN_RE = re.compile(r"outbox \S+ open: (\d+) record\(s\) pending \((\d+) bytes\), last seq (\d+)")
_CONNECTED_RE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \S+ \S+ \S+: sync-mqtt: connected to")
_POLL_S = 0.2


# -- shared building blocks (bench/soak.py uses them too) ------------------------------------------
def broker_module() -> Any:
    """``tests/mqtt_broker.py`` (a real mosquitto with generated PKI and ACL)."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    import mqtt_broker

    return mqtt_broker


def _toml(value: object) -> str:
    """A TOML basic string (JSON string escaping is valid TOML for these paths)."""
    return json.dumps(str(value))


def write_config(
    path: Path,
    broker: Any,
    *,
    state_dir: Path,
    results: Path | str,
    fps: float,
    telemetry_interval_s: float,
    trust_keys: Sequence[Path] = (DEMO_PUB,),
    device: str = DEVICE,
    group: str = GROUP,
    stats_interval_s: float = 60.0,
    flush_every: int = 1,
) -> Path:
    """The daemon's ``edgert.toml``: demo shapes on the demo video, ``[sync]`` on against ``broker``."""
    cert, key = broker.client_cert(device)
    keys = ", ".join(_toml(k) for k in trust_keys)
    path.write_text(
        "[model]\n"
        f'bundle = {_toml(DEMO / "shapes")}\nformat = "onnx"\nthreads = 1\n'
        "[source]\n"
        f'kind = "video"\nuri = {_toml(DEMO / "shapes.avi")}\nloop = true\n'
        f"[pipeline]\nmax_fps = {fps}\n"
        f'[[sinks]]\nkind = "jsonl"\npath = {_toml(results)}\nflush_every = {flush_every}\n'
        f"[trust]\nkeys = [{keys}]\n"
        f"[state]\ndir = {_toml(state_dir)}\n"
        f"[log]\nstats_interval_s = {stats_interval_s}\n"
        "[sync]\nenabled = true\n"
        f'host = "127.0.0.1"\nport = {broker.port}\nfleet = {_toml(broker.fleet)}\n'
        f"device_id = {_toml(device)}\ngroups = [{_toml(group)}]\n"
        f"ca_file = {_toml(broker.ca_path)}\ncert_file = {_toml(cert)}\nkey_file = {_toml(key)}\n"
        f"telemetry_interval_s = {telemetry_interval_s}\n",
        encoding="utf-8",
    )
    return path


def read_outbox(db: Path, *, seqs: bool = False) -> dict[str, Any] | None:
    """The outbox's ``state`` row (and counters) through a read-only connection; None if unreadable.

    Read-only: the daemon keeps its own connection, and a read-only one never checkpoints or
    deletes the WAL when it closes. With ``seqs`` the pending seqs are listed too.
    """
    if not db.exists():
        return None
    try:
        conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=5.0)
    except sqlite3.Error:
        return None
    try:
        row = conn.execute(
            "SELECT last_seq, pending_rows, pending_bytes, hwm_rows, hwm_bytes, clean_close FROM state"
        ).fetchone()
        if row is None:
            return None
        out: dict[str, Any] = dict(
            zip(
                ("last_seq", "pending", "pending_bytes", "hwm_rows", "hwm_bytes", "clean_close"),
                row,
                strict=True,
            )
        )
        counters: dict[str, dict[str, int]] = {}
        for stream, kind, total in conn.execute("SELECT stream, kind, total FROM counters"):
            counters.setdefault(kind, {})[stream] = int(total)
        out["counters"] = counters
        if seqs:
            out["pending_seqs"] = [int(r[0]) for r in conn.execute("SELECT seq FROM records ORDER BY seq")]
    except sqlite3.Error:
        return None
    finally:
        conn.close()
    out["file_bytes"] = sum(p.stat().st_size for p in (db, db.with_name(db.name + "-wal")) if p.exists())
    return out


class DaemonProcess:
    """``python -m edge_runtime run --config CONFIG`` as a subprocess, stderr appended to ``log_path``."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.config = config
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def boots(self) -> list[tuple[int, int, int]]:
        """(pending rows, pending bytes, last seq) from each 'outbox ... open' log line, in order."""
        return [(int(a), int(b), int(c)) for a, b, c in _OPEN_RE.findall(self.log_text())]

    def connects(self) -> list[float]:
        """Wall-clock times (epoch s) of the daemon's MQTT connects, from its log."""
        out = []
        for line in self.log_text().splitlines():
            m = _CONNECTED_RE.match(line)
            if m:
                out.append(datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp())
        return out

    def start(self, *, wait_s: float = 60.0) -> float:
        """Start the daemon; returns once it opened its outbox (seconds it took)."""
        if self.alive:
            raise RuntimeError("the daemon is already running")
        before = len(self.boots())
        t0 = time.monotonic()
        with self.log_path.open("ab") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edge_runtime", "run", "--config", str(self.config)],
                env={**os.environ, "PYTHONPATH": str(REPO)},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log_file,
                start_new_session=True,  # a Ctrl-C of the bench must not reach it: the bench stops it
            )
        self.starts += 1
        while len(self.boots()) <= before:
            if not self.alive:
                raise RuntimeError(f"the daemon exited at start; log:\n{self.log_text()[-3000:]}")
            if time.monotonic() - t0 > wait_s:
                raise RuntimeError(f"the daemon did not open its outbox within {wait_s} s: {self.log_path}")
            time.sleep(0.02)
        return time.monotonic() - t0

    def stop(self, timeout: float = 60.0) -> tuple[int | None, float]:
        """SIGTERM and wait: (exit code, seconds); SIGKILL after ``timeout`` (exit code then None)."""
        if self.proc is None:
            return None, 0.0
        t0 = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code: int | None = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            code = None
        return code, time.monotonic() - t0

    def kill(self) -> int:
        """SIGKILL (kill -9) and reap: the exit code (-9)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        return int(self.proc.wait(10))

    def close(self) -> None:
        """Kill the daemon if it still runs (cleanup on errors)."""
        if self.proc is not None and self.proc.poll() is None:
            self.kill()


class SeqConsumer:
    """An operator client with a persistent MQTT 5 session that records every seq of one device.

    ``on_record(stream, body, wall_time)`` (optional) is called for every telemetry/events/update
    message on paho's network thread.
    """

    def __init__(
        self,
        broker: Any,
        *,
        device: str = DEVICE,
        client_id: str = "seq-consumer",
        on_record: Callable[[str, dict[str, Any], float], None] | None = None,
    ) -> None:
        mb = broker_module()
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self._lock = threading.Lock()
        self.seen: dict[int, tuple[str, bytes]] = {}
        self.messages = 0
        self.by_stream: dict[str, int] = dict.fromkeys(STREAMS, 0)
        self.conflicts: list[int] = []
        self.unparsed = 0
        self.states: list[tuple[float, bool]] = []
        self.last_message_at = 0.0
        self._low = 0  # every seq 1.._low was received
        self._on_record = on_record
        base = f"{broker.topic('device', device)}/"
        self.prefix = base
        consumer = self

        class _Client(mb.BrokerClient):  # type: ignore[misc, name-defined]
            def _record_message(self, _c: Any, _u: Any, msg: Any) -> None:
                consumer._message(msg.topic, bytes(msg.payload))

            def _record_connect(self, c: Any, u: Any, f: Any, rc: Any, p: Any) -> None:
                super()._record_connect(c, u, f, rc, p)
                consumer.connect_times.append(time.time())

        self.connect_times: list[float] = []
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client = _Client(client_id)
        self.client.reconnect_delay_set(min_delay=1, max_delay=1)
        mb.connect_client(
            self.client,
            broker.port,
            broker.ca_path,
            broker.client_cert(OPERATOR),
            clean_start=False,
            properties=props,
        )
        for leaf in (*STREAMS, "state"):
            self.client.subscribe_wait(base + leaf)

    def _message(self, topic: str, payload: bytes) -> None:
        now = time.time()
        leaf = topic.rsplit("/", 1)[-1]
        try:
            body = json.loads(payload)
        except ValueError:
            body = None
        if leaf == "state":
            with self._lock:
                self.states.append((now, bool(isinstance(body, dict) and body.get("online"))))
            return
        if leaf not in self.by_stream:
            return
        seq = body.get("seq") if isinstance(body, dict) else None
        digest = hashlib.blake2b(payload, digest_size=12).digest()
        with self._lock:
            self.messages += 1
            self.by_stream[leaf] += 1
            self.last_message_at = now
            if not isinstance(seq, int):
                self.unparsed += 1
                return
            old = self.seen.get(seq)
            if old is None:
                self.seen[seq] = (leaf, digest)
                while self._low + 1 in self.seen:
                    self._low += 1
            elif old != (leaf, digest):
                self.conflicts.append(seq)
        if self._on_record is not None and isinstance(body, dict):
            self._on_record(leaf, body, now)

    def contiguous(self) -> int:
        """The highest n such that every seq 1..n arrived."""
        with self._lock:
            return self._low

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            streams: dict[str, int] = dict.fromkeys(STREAMS, 0)
            for leaf, _ in self.seen.values():
                streams[leaf] += 1
            return {
                "messages": self.messages,
                "distinct": len(self.seen),
                "seqs": set(self.seen),
                "messages_by_stream": dict(self.by_stream),
                "distinct_by_stream": streams,
                "conflicts": sorted(set(self.conflicts)),
                "unparsed": self.unparsed,
            }

    def wait_contiguous(self, seq: int, timeout: float) -> float | None:
        """Wait until every seq 1..``seq`` arrived: the seconds it took, None on timeout."""
        t0 = time.monotonic()
        while self.contiguous() < seq:
            if time.monotonic() - t0 > timeout:
                return None
            time.sleep(0.02)
        return time.monotonic() - t0

    def close(self) -> None:
        self.client.close()


# -- the plan --------------------------------------------------------------------------------------
@dataclass
class OutageConfig:
    """What the outage soak does (see the module doc)."""

    minutes: float = 5.0
    cycles: int = 6
    restarts: int = 4
    kills: int = 2
    seed: int = 1
    fps: float = 15.0
    telemetry_interval_s: float = 0.5
    lead_s: float | None = None
    tail_s: float | None = None
    drain_timeout_s: float = 120.0
    workdir: Path | None = None


@dataclass
class Step:
    """One scheduled action: ``broker_stop``/``broker_start`` (outage ``outage``), or ``restart``."""

    at: float
    action: str
    outage: int = -1
    kill: bool = False
    where: str = ""
    gap_s: float = 0.0


def _windows(cfg: OutageConfig) -> tuple[float, float, float]:
    total = cfg.minutes * 60.0
    lead = cfg.lead_s if cfg.lead_s is not None else min(15.0, max(3.0, 0.05 * total))
    tail = cfg.tail_s if cfg.tail_s is not None else min(45.0, max(8.0, 0.12 * total))
    if total - lead - tail < 4.0 * max(1, cfg.cycles):
        raise ValueError(
            f"{cfg.minutes} min is too short for {cfg.cycles} cycles (lead {lead:.0f} s, tail {tail:.0f} s): "
            "give more --minutes or fewer --cycles"
        )
    return total, lead, tail


def make_plan(cfg: OutageConfig, rng: random.Random) -> list[Step]:
    """Broker cycles of random lengths and daemon restarts at random moments, sorted by time."""
    if cfg.cycles < 1 or cfg.restarts < 0 or not 0 <= cfg.kills <= cfg.restarts:
        raise ValueError("need cycles >= 1 and 0 <= kills <= restarts")
    total, lead, tail = _windows(cfg)
    active = total - lead - tail
    weights = [rng.uniform(0.6, 1.4) for _ in range(cfg.cycles)]
    steps: list[Step] = []
    outages: list[tuple[float, float]] = []
    t = lead
    for i, w in enumerate(weights):
        length = active * w / sum(weights)
        down = max(1.5, length * rng.uniform(0.35, 0.65))
        stop, start = t + length - down, t + length
        outages.append((stop, start))
        steps += [Step(stop, "broker_stop", i), Step(start, "broker_start", i)]
        t = start
    # restarts: a graceful stop inside an outage, a SIGKILL in the drain after one, a SIGKILL
    # inside another outage, then anywhere; SIGKILLs go to the most interesting slots first
    kinds = (["outage", "drain", "outage"] + ["any"] * cfg.restarts)[: cfg.restarts]
    kill_order = [i for i in (1, 2, *range(3, cfg.restarts), 0) if i < cfg.restarts]
    kill_slots = set(kill_order[: cfg.kills])
    by_length = sorted(range(cfg.cycles), key=lambda i: outages[i][1] - outages[i][0], reverse=True)
    used: list[float] = []

    def free(at: float) -> bool:
        return all(abs(at - u) >= 6.0 for u in used) and lead + 1.0 <= at <= lead + active

    for slot, kind in enumerate(kinds):
        kill = slot in kill_slots
        step: Step | None = None
        if kind == "outage":
            for i in by_length:
                stop, start = outages[i]
                at = stop + (start - stop) * rng.uniform(0.3, 0.6)
                if start - stop >= 3.0 and free(at):
                    step = Step(at, "restart", i, kill, "during outage", round(rng.uniform(0.5, 2.0), 2))
                    break
        elif kind == "drain":
            for i in by_length:
                at = outages[i][1] + 0.01
                if free(at):
                    step = Step(
                        at, "restart", i, kill, "in the drain after outage", round(rng.uniform(0.5, 2.0), 2)
                    )
                    break
        for _ in range(200 if step is None else 0):
            at = rng.uniform(lead + 1.0, lead + active)
            if free(at):
                inside = next((i for i, (a, b) in enumerate(outages) if a <= at <= b), -1)
                where = "during outage" if inside >= 0 else "broker up"
                step = Step(at, "restart", inside, kill, where, round(rng.uniform(0.5, 3.0), 2))
                break
        if step is None:
            raise ValueError("no room for all the restarts: give more --minutes or fewer --restarts")
        used.append(step.at)
        steps.append(step)
    steps.sort(key=lambda s: (s.at, s.action != "broker_start"))
    return steps


# -- the run ---------------------------------------------------------------------------------------
@dataclass
class _Outage:
    index: int
    down_at: float = math.nan
    up_at: float = math.nan
    up_wall: float = math.nan
    backlog_rows: int = 0
    backlog_seq: int = 0
    max_pending: int = 0
    reconnect_s: float | None = None
    drain_s: float | None = None
    drain_note: str = ""
    restarts: list[str] = field(default_factory=list)


class _Monitor(threading.Thread):
    """Reads the outbox every ``_POLL_S`` and times the drains the consumer completes."""

    def __init__(self, db: Path, consumer: SeqConsumer, t0: float) -> None:
        super().__init__(name="outage-monitor", daemon=True)
        self.db = db
        self.consumer = consumer
        self.t0 = t0
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.max_pending = 0
        self.max_pending_bytes = 0
        self.max_file_bytes = 0
        self.polls = 0
        self.open_drains: list[_Outage] = []
        self.current: _Outage | None = None

    def run(self) -> None:
        while not self.stop_event.wait(_POLL_S):
            state = read_outbox(self.db)
            now = time.monotonic() - self.t0
            with self.lock:
                if state is not None:
                    self.polls += 1
                    self.max_pending = max(self.max_pending, state["pending"])
                    self.max_pending_bytes = max(self.max_pending_bytes, state["pending_bytes"])
                    self.max_file_bytes = max(self.max_file_bytes, state["file_bytes"])
                    if self.current is not None:
                        self.current.max_pending = max(self.current.max_pending, state["pending"])
                low = self.consumer.contiguous()
                for o in list(self.open_drains):
                    if low >= o.backlog_seq:
                        o.drain_s = round(now - o.up_at, 3)
                        self.open_drains.remove(o)


def run_outage(cfg: OutageConfig, log: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """Run the outage soak and return the report (see :func:`format_report`)."""
    rng = random.Random(cfg.seed)
    plan = make_plan(cfg, rng)
    total, lead, tail = _windows(cfg)
    mb = broker_module()
    with contextlib.ExitStack() as stack:
        if cfg.workdir is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edgert-outage-")))
        else:
            work = cfg.workdir
            work.mkdir(parents=True, exist_ok=True)
        broker = mb.Broker(work / "broker", fleet=FLEET, devices={DEVICE: [GROUP]}, operators=[OPERATOR])
        stack.callback(broker.close)
        broker.start()
        consumer = SeqConsumer(broker)
        stack.callback(consumer.close)
        state_dir = work / "state"
        config = write_config(
            work / "edgert.toml", broker, state_dir=state_dir, results=os.devnull, fps=cfg.fps,
            telemetry_interval_s=cfg.telemetry_interval_s,
        )  # fmt: skip
        db = state_dir / "sync" / "outbox.db"
        daemon = DaemonProcess(config, work / "daemon.log")
        stack.callback(daemon.close)
        boot_s = [daemon.start()]
        t0 = time.monotonic()
        wall0 = time.time()
        monitor = _Monitor(db, consumer, t0)
        monitor.start()
        stack.callback(monitor.stop_event.set)
        outages = [_Outage(i) for i in range(cfg.cycles)]
        timeline: list[dict[str, Any]] = []
        restarts: list[dict[str, Any]] = []
        log(
            f"plan: {len(plan)} steps over {total:.0f} s (lead {lead:.0f} s, tail {tail:.0f} s); "
            f"work dir {work}"
        )
        for step in plan:
            delay = step.at - (time.monotonic() - t0)
            if delay > 0:
                time.sleep(delay)
            now = time.monotonic() - t0
            entry: dict[str, Any] = {
                "planned_s": round(step.at, 2),
                "at_s": round(now, 2),
                "action": step.action,
            }
            if step.action == "broker_stop":
                o = outages[step.outage]
                with monitor.lock:
                    for late in monitor.open_drains:  # the next outage began before this drain ended
                        late.drain_note = "not drained before the next outage"
                    monitor.open_drains.clear()
                broker.stop()
                o.down_at = now
                with monitor.lock:
                    monitor.current = o
                entry["outage"] = step.outage
                log(f"{now:7.1f} s  broker down (outage {step.outage})")
            elif step.action == "broker_start":
                o = outages[step.outage]
                state = read_outbox(db) or {}
                broker.start()
                now = time.monotonic() - t0
                o.up_at, o.up_wall = now, time.time()
                o.backlog_rows = int(state.get("pending", 0))
                o.backlog_seq = int(state.get("last_seq", 0))
                with monitor.lock:
                    monitor.current = None
                    monitor.open_drains.append(o)
                entry.update(outage=step.outage, at_s=round(now, 2), backlog_rows=o.backlog_rows)
                log(f"{now:7.1f} s  broker up (outage {step.outage}: {now - o.down_at:.1f} s, "
                    f"{o.backlog_rows} pending)")  # fmt: skip
            else:
                info = _restart(step, daemon, consumer, db, broker, t0, outages, log)
                boot_s.append(info["boot_s"])
                restarts.append(info)
                entry.update(info)
            timeline.append(entry)
        # the tail: no outage, no restart; then every seq produced so far must arrive
        end = t0 + total
        while time.monotonic() < end:
            time.sleep(0.1)
        last = outages[-1]
        wait_end = time.monotonic() + cfg.drain_timeout_s
        while last.drain_s is None and time.monotonic() < wait_end:
            time.sleep(0.1)
        state = read_outbox(db) or {}
        final_wait = consumer.wait_contiguous(int(state.get("last_seq", 0)), cfg.drain_timeout_s)
        monitor.stop_event.set()
        monitor.join(5)
        code, stop_s = daemon.stop()
        final = read_outbox(db, seqs=True)
        if not final:  # never report "lost 0" from an outbox that could not be read
            raise RuntimeError(f"cannot read the outbox {db} after the final stop")
        # records sent just before the stop may still be on their way to the consumer
        produced = int(final.get("last_seq", 0))
        pending = set(final.get("pending_seqs", []))
        settle = time.monotonic() + 5.0
        while time.monotonic() < settle:
            got = consumer.snapshot()["seqs"]
            if not (set(range(1, produced + 1)) - got - pending):
                break
            time.sleep(0.1)
        elapsed = time.monotonic() - t0
        snap = consumer.snapshot()
        log_text = daemon.log_text()
        broker_log = broker.log()
        connects = daemon.connects()
    for o in outages:  # the device's first connect after the broker came back
        after = [c for c in connects if c >= o.up_wall - 0.05]
        if after:
            o.reconnect_s = round(after[0] - o.up_wall, 3)
    seqs: set[int] = snap["seqs"]
    expected = set(range(1, produced + 1))
    lost = sorted(expected - seqs - pending)
    counters = final.get("counters", {})
    graceful = [r for r in restarts if not r["kill"]]
    report: dict[str, Any] = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "plan": {"total_s": total, "lead_s": lead, "tail_s": tail},
        "produced": produced,
        "delivered": len(seqs & expected),
        "pending_at_end": len(pending),
        "lost": len(lost),
        "lost_seqs": lost[:50],
        "unknown_seqs": len(seqs - expected),
        "messages": snap["messages"],
        "duplicates": snap["messages"] - snap["distinct"] - snap["unparsed"],
        "conflicts": len(snap["conflicts"]),
        "unparsed": snap["unparsed"],
        "streams": {
            s: {
                "produced": counters.get("produced", {}).get(s, 0),
                "delivered": snap["distinct_by_stream"].get(s, 0),
                "messages": snap["messages_by_stream"].get(s, 0),
                "acked": counters.get("delivered", {}).get(s, 0),
            }
            for s in STREAMS
        },
        "dropped": sum(counters.get("dropped", {}).values()),
        "expired": sum(counters.get("expired", {}).values()),
        "hwm_rows": int(final.get("hwm_rows", 0)),
        "hwm_bytes": int(final.get("hwm_bytes", 0)),
        "max_pending_seen": monitor.max_pending,
        "max_pending_bytes_seen": monitor.max_pending_bytes,
        "max_file_bytes_seen": monitor.max_file_bytes,
        "outages": [
            {
                "index": o.index,
                "down_s": round(o.up_at - o.down_at, 2),
                "at_s": round(o.down_at, 2),
                "backlog_rows": o.backlog_rows,
                "backlog_seq": o.backlog_seq,
                "max_pending": o.max_pending,
                "reconnect_s": o.reconnect_s,
                "drain_s": o.drain_s,
                "drain_note": o.drain_note,
                "restarts": o.restarts,
            }
            for o in outages
        ],
        "last_drain_s": last.drain_s,
        "final_wait_s": None if final_wait is None else round(final_wait, 3),
        "restarts": restarts,
        "graceful_exit_codes": [r["exit_code"] for r in graceful] + [code],
        "final_stop_s": round(stop_s, 3),
        "boot_s": [round(b, 3) for b in boot_s],
        "daemon_boots": [[int(x) for x in b] for b in _OPEN_RE.findall(log_text)],
        "daemon_log": {
            "errors": sum(1 for line in log_text.splitlines() if " ERROR " in line),
            "tracebacks": log_text.count("Traceback (most recent call last)"),
            "warnings": sum(1 for line in log_text.splitlines() if " WARNING " in line),
        },
        "broker_dropped_warnings": broker_log.count("Outgoing messages are being dropped"),
        "consumer_connects": len(consumer.connect_times),
        "timeline": timeline,
        "elapsed_s": round(elapsed, 1),
        "wall_start": wall0,
    }
    return report


def _restart(
    step: Step,
    daemon: DaemonProcess,
    consumer: SeqConsumer,
    db: Path,
    broker: Any,
    t0: float,
    outages: list[_Outage],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Stop (SIGTERM or SIGKILL) and start the daemon; for a drain slot, strike when it sends."""
    waited = 0.0
    if step.where.startswith("in the drain"):
        # strike while the backlog is in flight: right after the device's first post-outage message
        up_wall = outages[step.outage].up_wall
        while (
            consumer.last_message_at < up_wall and time.monotonic() - t0 - outages[step.outage].up_at < 40.0
        ):
            time.sleep(0.005)
        waited = time.monotonic() - t0 - outages[step.outage].up_at
    at = time.monotonic() - t0
    before_state = read_outbox(db) or {}
    if step.kill:
        code: int | None = daemon.kill()
        stop_s = 0.0
    else:
        code, stop_s = daemon.stop()
    after = read_outbox(db) or {}
    time.sleep(step.gap_s)
    boot = daemon.start()
    broker_up = broker.running
    label = f"{'kill -9' if step.kill else 'SIGTERM'} {step.where}"
    if 0 <= step.outage < len(outages):
        outages[step.outage].restarts.append(label)
    info = {
        "at_s": round(at, 2),
        "kill": step.kill,
        "where": step.where,
        "outage": step.outage,
        "broker_up": broker_up,
        "waited_for_traffic_s": round(waited, 3),
        "exit_code": code,
        "stop_s": round(stop_s, 3),
        "gap_s": step.gap_s,
        "boot_s": round(boot, 3),
        "pending_before": before_state.get("pending"),
        "pending_after_stop": after.get("pending"),
        "last_seq_at_stop": after.get("last_seq"),
    }
    log(f"{at:7.1f} s  daemon {label}: exit {code}, {after.get('pending')} pending, back in "
        f"{step.gap_s + boot:.1f} s")  # fmt: skip
    return info


# -- the report ------------------------------------------------------------------------------------
def _mark(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _s(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f} s"


def summary_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(figure, measured, goal, result) rows of the table."""
    drains = [o["drain_s"] for o in r["outages"] if o["drain_s"] is not None]
    reconnects = [o["reconnect_s"] for o in r["outages"] if o["reconnect_s"] is not None]
    codes = r["graceful_exit_codes"]
    return [
        ("seqs produced (outbox last_seq)", str(r["produced"]), "report", "-"),
        ("seqs delivered (distinct seqs at the consumer)", str(r["delivered"]), "report", "-"),
        ("seqs pending in the outbox after the final stop", str(r["pending_at_end"]), "report", "-"),
        ("lost (produced - delivered - pending at end)", str(r["lost"]), "0", _mark(r["lost"] == 0)),
        ("duplicates (messages - distinct seqs)", str(r["duplicates"]), "report", "-"),
        ("conflicts (one seq, two payloads)", str(r["conflicts"]), "0", _mark(r["conflicts"] == 0)),
        ("outbox dropped + expired", str(r["dropped"] + r["expired"]), "0",
         _mark(r["dropped"] + r["expired"] == 0)),
        ("outbox high-water mark (persisted)", f"{r['hwm_rows']} rows / {r['hwm_bytes'] / 1024:.0f} KiB",
         "report", "-"),
        ("drain after the last outage", _s(r["last_drain_s"]), "report", "-"),
        ("drain after an outage, median / max",
         f"{statistics.median(drains):.2f} / {max(drains):.2f} s" if drains else "n/a", "report", "-"),
        ("device reconnect after the broker is back, median / max",
         f"{statistics.median(reconnects):.2f} / {max(reconnects):.2f} s" if reconnects else "n/a",
         "report", "-"),
        ("graceful stops exiting 0", f"{sum(1 for c in codes if c == 0)}/{len(codes)}", "all",
         _mark(all(c == 0 for c in codes))),
    ]  # fmt: skip


def format_report(r: dict[str, Any], command: str) -> str:
    """The table (figures, goals, PASS/FAIL) and the details under it."""
    c = r["config"]
    rows = summary_rows(r)
    w0 = max(len(a) for a, *_ in rows)
    w1 = max(10, *(len(b) for _, b, *_ in rows))
    downs = [o["down_s"] for o in r["outages"]]
    kills = sum(1 for x in r["restarts"] if x["kill"])
    lines = [
        f"edge-runtime outage soak: {r['plan']['total_s'] / 60:.1f} min, {len(downs)} broker outages "
        f"({sum(downs):.0f} s down, {min(downs):.1f}-{max(downs):.1f} s each), {len(r['restarts'])} daemon "
        f"restarts ({len(r['restarts']) - kills} SIGTERM, {kills} kill -9), telemetry every "
        f"{c['telemetry_interval_s']:g} s, {c['fps']:g} fps, seed {c['seed']}",
        "",
        f"{'figure':<{w0}}  {'measured':>{w1}}  {'goal':>6}  result",
        f"{'-' * w0}  {'-' * w1}  {'-' * 6}  ------",
    ]
    lines += [f"{a:<{w0}}  {b:>{w1}}  {g:>6}  {res}" for a, b, g, res in rows]
    lines += [
        "",
        "details:",
        "  per stream: produced / delivered (distinct) / messages / acked by the broker:",
    ]
    for s, v in r["streams"].items():
        lines.append(
            f"    {s:<10} {v['produced']:>7} / {v['delivered']:>7} / {v['messages']:>7} / {v['acked']:>7}"
        )
    lines.append(
        "  outages (s from start; down s; rows pending when the broker came back; device reconnect; drain):"
    )
    for o in r["outages"]:
        extra = f"; restarts: {', '.join(o['restarts'])}" if o["restarts"] else ""
        lines.append(
            f"    #{o['index']} at {o['at_s']:7.1f}: down {o['down_s']:5.1f}, "
            f"backlog {o['backlog_rows']:4d} rows "
            f"(seq <= {o['backlog_seq']}), peak {o['max_pending']:4d}, reconnect {_s(o['reconnect_s'])}, "
            f"drain {_s(o['drain_s'])}{' (' + o['drain_note'] + ')' if o['drain_note'] else ''}{extra}"
        )
    lines.append(
        "  restarts (s from start; pending rows before / after the stop; exit code; stop s; boot s):"
    )
    for x in r["restarts"]:
        lines.append(
            f"    {x['at_s']:7.1f}: {'kill -9' if x['kill'] else 'SIGTERM':<7} {x['where']:<26} "
            f"(broker {'up' if x['broker_up'] else 'down'}) pending {x['pending_before']} -> "
            f"{x['pending_after_stop']}, exit {x['exit_code']}, stop {x['stop_s']:.2f}, "
            f"boot {x['boot_s']:.2f}, gap {x['gap_s']:.2f}"
            + (f", struck {x['waited_for_traffic_s']:.2f} s after the broker came back"
               if x["where"].startswith("in the drain") else "")
        )  # fmt: skip
    boots = ", ".join(f"{p} rows/seq {s}" for p, _b, s in r["daemon_boots"])
    dl = r["daemon_log"]
    lines += [
        f"  outbox at each daemon start (pending rows / last seq): {boots}",
        f"  peak seen by the 0.2 s poll: {r['max_pending_seen']} rows, "
        f"{r['max_pending_bytes_seen'] / 1024:.0f} KiB "
        f"pending; database + WAL at most {r['max_file_bytes_seen'] / 1024:.0f} KiB",
        f"  consumer: {r['messages']} messages, {r['consumer_connects']} connects; "
        f"{r['unknown_seqs']} seqs above "
        f"last_seq, {r['unparsed']} without seq; mosquitto 'messages are being dropped' warnings: "
        f"{r['broker_dropped_warnings']}",
        f"  daemon log: {dl['errors']} ERROR lines, {dl['warnings']} WARNING lines, "
        f"{dl['tracebacks']} tracebacks",
        f"  final: every seq up to last_seq at the consumer {_s(r['final_wait_s'])} after the tail; "
        f"SIGTERM took {r['final_stop_s']:.2f} s; elapsed {r['elapsed_s']} s",
    ]
    if r["lost"]:
        lines.append(f"  LOST seqs (first 50): {r['lost_seqs']}")
    lines += ["", f"command: {command}"]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    d = OutageConfig()
    p.add_argument("--minutes", type=float, default=d.minutes, help=f"total run time (default {d.minutes:g})")
    p.add_argument("--cycles", type=int, default=d.cycles, help=f"broker outages (default {d.cycles})")
    p.add_argument("--restarts", type=int, default=d.restarts, help=f"daemon restarts (default {d.restarts})")
    p.add_argument("--kills", type=int, default=d.kills, help=f"of which SIGKILL (default {d.kills})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"random schedule seed (default {d.seed})")
    p.add_argument("--fps", type=float, default=d.fps, help=f"video pace (default {d.fps:g})")
    p.add_argument(
        "--telemetry-interval",
        type=float,
        default=d.telemetry_interval_s,
        help=f"seconds between telemetry records (default {d.telemetry_interval_s:g})",
    )
    p.add_argument("--tail", type=float, help="seconds without outage or restart at the end (default 12%%)")
    p.add_argument("--workdir", type=Path, help="keep broker, state and logs here (default: a temp dir)")
    p.add_argument("--json", type=Path, help="also write the figures as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the soak, print the table, optionally write JSON; exit 1 if a goal failed."""
    args = _parser().parse_args(argv)
    cfg = OutageConfig(
        minutes=args.minutes, cycles=args.cycles, restarts=args.restarts, kills=args.kills, seed=args.seed,
        fps=args.fps, telemetry_interval_s=args.telemetry_interval, tail_s=args.tail, workdir=args.workdir,
    )  # fmt: skip
    argv_list = list(sys.argv[1:] if argv is None else argv)
    command = " ".join(["PYTHONPATH=. python bench/outage.py", *(shlex.quote(a) for a in argv_list)])
    report = run_outage(cfg, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    report["command"] = command
    print(format_report(report, command))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    failed = any(row[3] == "FAIL" for row in summary_rows(report))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
