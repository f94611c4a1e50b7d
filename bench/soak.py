"""Long soak: one daemon with fleet sync for 30 minutes; do memory, fds, threads, outbox or latency drift?

Run from the repository root (the device venv plus paho-mqtt and onnx; mosquitto installed, see
``scripts/ensure-mosquitto.sh``); ``make soak`` runs the full 30 minutes::

    PYTHONPATH=. python bench/soak.py [--minutes 30] [--interval 10] [--fps 15] [--updates 3]
                                      [--outage-every 150] [--json out.json]

What runs (all real, on 127.0.0.1; helpers shared with ``bench/outage.py``):

* mosquitto from ``tests/mqtt_broker.py`` (fleet PKI, mutual TLS, the fleet ACL, persistence);
* ONE daemon process for the whole run, ``python -m edge_runtime run --config edgert.toml``: the
  demo shapes bundle on the demo video looped at ``--fps`` (15 = the video's own rate), a JSONL sink
  flushed per result, ``[sync]`` on with telemetry every ``--telemetry-interval`` s and events on;
* every ``--outage-every`` s the broker is stopped for a random ``--outage-min``..``--outage-max`` s
  (the outbox keeps the records, the device reconnects with its back-off and drains);
* ``--updates`` good candidates (the demo model re-signed with a key generated for the run, versions
  1.1.0, 1.2.0, ...) are published by an operator at evenly spaced moments, away from outages, with a
  ``--probation`` s probation; their outcome comes from the device's update events;
* a consumer with a persistent session counts every seq end to end (as ``bench/outage.py`` does).

Every ``--interval`` s a sample of the daemon process (psutil): RSS, open file descriptors,
threads, child processes (the candidate probe), CPU; the outbox on disk (database + WAL) and its
pending rows (read-only SQLite connection); the results the sink wrote since the previous sample:
fps and the inference latency p50/p95 (and the pipeline's total p95, which includes the pacing
queue) of exactly those frames; and the latest telemetry's own latency percentiles (the daemon's
rolling window of 4096 frames). Also the CPU share of *other* processes on this shared machine.

The analysis drops a warm-up (``--warmup``, default 20 % of the run, at most 120 s) and splits the
rest into quarters. For each metric: first- and last-quarter medians, the change, and the slope per
hour (least squares over every post-warm-up sample). Latency and fps use only *steady* samples
(broker up for 20 s, no update in flight) when a quarter has some. A change beyond the limits is
flagged (and the exit status is 1):

* RSS: last quarter > first quarter + 10 %;  fds, threads: > first + 2;
* outbox on disk: > first + 4 MiB (the WAL is capped around 4 MiB);  pending rows: > first + 10;
* inference p50: x1.5, p95: x2.0 of the first quarter;  fps: below x0.9;
* end to end: any lost seq; any drop or expiry in the outbox.

Short runs (``--minutes 5``) show gross leaks only: a slope per hour from a few minutes is noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import random
import shlex
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make ``bench`` and ``edge_runtime`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.outage import (
    DEMO,
    DEMO_PUB,
    DEVICE,
    FLEET,
    GROUP,
    OPERATOR,
    DaemonProcess,
    SeqConsumer,
    broker_module,
    read_outbox,
    write_config,
)

__all__ = [
    "LIMITS",
    "SoakConfig",
    "analyse",
    "format_report",
    "main",
    "make_candidate",
    "run_soak",
    "summary_rows",
]

MIB = 1024 * 1024
_STEADY_AFTER_OUTAGE_S = 20.0

# metric: (label, kind, limit); kind "abs" = last - first <= limit, "pct" = growth <= limit %,
# "ratio_max" = last / first <= limit, "ratio_min" = last / first >= limit
LIMITS: dict[str, tuple[str, str, float]] = {
    "rss_mib": ("daemon RSS (MiB)", "pct", 10.0),
    "fds": ("open file descriptors", "abs", 2.0),
    "threads": ("threads", "abs", 2.0),
    "outbox_kib": ("outbox on disk, db + WAL (KiB)", "abs", 4096.0),
    "pending": ("outbox pending rows (steady)", "abs", 10.0),
    "inf_p50_ms": ("inference p50 (ms)", "ratio_max", 1.5),
    "inf_p95_ms": ("inference p95 (ms)", "ratio_max", 2.0),
    "fps": ("fps at the sink", "ratio_min", 0.9),
}
_STEADY_ONLY = {"pending", "inf_p50_ms", "inf_p95_ms", "fps"}


@dataclass
class SoakConfig:
    """What the soak does (see the module doc)."""

    minutes: float = 30.0
    interval_s: float = 10.0
    fps: float = 15.0
    telemetry_interval_s: float = 2.0
    outage_every_s: float = 150.0
    outage_min_s: float = 3.0
    outage_max_s: float = 12.0
    updates: int = 3
    probation_s: float = 15.0
    warmup_s: float | None = None
    seed: int = 1
    workdir: Path | None = None


# -- candidates ------------------------------------------------------------------------------------
def _golden_frames(count: int = 8) -> np.ndarray:
    import cv2

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


def make_candidate(out: Path, key: Path, version: str) -> Path:
    """A packed bundle of the demo shapes model at ``version``, signed with ``key`` (a good candidate)."""
    from edge_runtime.bundle import create_bundle, open_bundle

    demo = open_bundle(DEMO / "shapes", require_signature=False)
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
        golden_frames=_golden_frames(),
        sign_key=key,
        pack=packed,
        threads=1,
    )
    return packed


# -- sampling --------------------------------------------------------------------------------------
class _ResultsTail:
    """Reads the JSONL lines the sink appended since the previous call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._pos = 0
        self._rest = b""
        self.model = ""

    def read(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as fh:
                fh.seek(self._pos)
                data = fh.read()
        except OSError:
            return []
        self._pos += len(data)
        data = self._rest + data
        lines = data.split(b"\n")
        self._rest = lines.pop()
        out = []
        for line in lines:
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        if out:
            self.model = str(out[-1].get("model", self.model))
        return out


def _pct(values: Sequence[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 4) if values else None


class _Cpu:
    """CPU seconds of the machine, the daemon, mosquitto and this process, for the 'other load'."""

    def __init__(self) -> None:
        import psutil

        self.psutil = psutil
        self.cpus = psutil.cpu_count() or 1
        self.last: tuple[float, float, float] | None = None

    def _proc_s(self, pid: int | None) -> float:
        if pid is None:
            return 0.0
        try:
            t = self.psutil.Process(pid).cpu_times()
        except (self.psutil.Error, OSError):
            return 0.0
        return float(t.user + t.system)

    def other_share(self, pids: Sequence[int | None]) -> float | None:
        """Share of all CPUs (0..1) other processes used since the previous call."""
        t = self.psutil.cpu_times()
        busy = sum(t) - t.idle - getattr(t, "iowait", 0.0)
        own = os.times()
        ours = own.user + own.system + sum(self._proc_s(p) for p in pids)
        now = (time.monotonic(), busy, ours)
        last, self.last = self.last, now
        if last is None or now[0] <= last[0]:
            return None
        other = (now[1] - last[1]) - (now[2] - last[2])
        return round(max(0.0, min(1.0, other / ((now[0] - last[0]) * self.cpus))), 3)


def _dir_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += (Path(root) / name).stat().st_size
    return total


# -- the run ---------------------------------------------------------------------------------------
def _schedule(
    cfg: SoakConfig, rng: random.Random, warmup: float
) -> tuple[list[tuple[float, float]], list[float]]:
    """Outages ``(start, end)`` and update publish times, in seconds from the start."""
    total = cfg.minutes * 60.0
    margin = max(10.0, min(30.0, 0.1 * total))  # the end of the run is free of outages
    outages: list[tuple[float, float]] = []
    t = cfg.outage_every_s
    while cfg.outage_every_s > 0 and t + cfg.outage_max_s < total - margin:
        outages.append((t, t + rng.uniform(cfg.outage_min_s, cfg.outage_max_s)))
        t += cfg.outage_every_s

    def free(at: float) -> bool:  # the broker is up to publish, and stays up for a few seconds
        return warmup <= at <= total - 10.0 and not any(a - 4.0 <= at <= b + 3.0 for a, b in outages)

    updates: list[float] = []
    span = total - warmup
    for j in range(cfg.updates):
        want = warmup + span * (j + 0.5) / cfg.updates
        options = [want, *(b + 5.0 for _, b in outages), *(a - 5.0 for a, _ in outages)]
        at = min(
            (x for x in options if free(x) and x not in updates), key=lambda x: abs(x - want), default=None
        )
        if at is not None:
            updates.append(at)
    return outages, updates


def run_soak(cfg: SoakConfig, log: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """Run the soak; returns the report (samples, updates, outages, end-to-end counts, analysis)."""
    import psutil

    from edge_runtime.bundle import generate_keypair, load_private_key
    from edge_runtime.sync.mqtt import LinkSettings
    from edge_runtime.sync.protocol import Rollout
    from edge_runtime.sync.publisher import FleetClient

    rng = random.Random(cfg.seed)
    total = cfg.minutes * 60.0
    warmup = cfg.warmup_s if cfg.warmup_s is not None else min(120.0, 0.2 * total)
    outages, update_times = _schedule(cfg, rng, warmup)
    mb = broker_module()
    telemetry: list[dict[str, Any]] = []
    update_events: list[tuple[float, dict[str, Any]]] = []
    lock = threading.Lock()

    def on_record(stream: str, body: dict[str, Any], wall: float) -> None:
        with lock:
            if stream == "telemetry" and body.get("kind") == "metrics":
                lat = (body.get("pipeline") or {}).get("latency_ms", {}).get("inference", {})
                telemetry.append({"ts": body.get("ts"), "p50": lat.get("p50"), "p95": lat.get("p95")})
                del telemetry[:-4]
            elif stream == "update":
                update_events.append((wall, body))

    with contextlib.ExitStack() as stack:
        if cfg.workdir is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edgert-soak-")))
        else:
            work = cfg.workdir
            work.mkdir(parents=True, exist_ok=True)
        priv, pub = generate_keypair(work / f"keys-{os.getpid()}-{time.time_ns()}")
        candidates = []
        for j in range(len(update_times)):
            candidates.append(make_candidate(work, priv, f"1.{j + 1}.0"))
        broker = mb.Broker(work / "broker", fleet=FLEET, devices={DEVICE: [GROUP]}, operators=[OPERATOR])
        stack.callback(broker.close)
        broker.start()
        consumer = SeqConsumer(broker, client_id="soak-consumer", on_record=on_record)
        stack.callback(consumer.close)
        state_dir = work / "state"
        results = work / "results.jsonl"
        config = write_config(
            work / "edgert.toml", broker, state_dir=state_dir, results=results, fps=cfg.fps,
            telemetry_interval_s=cfg.telemetry_interval_s, trust_keys=(DEMO_PUB, pub),
        )  # fmt: skip
        db = state_dir / "sync" / "outbox.db"
        daemon = DaemonProcess(config, work / "daemon.log")
        stack.callback(daemon.close)
        daemon.start()
        proc = psutil.Process(daemon.pid)
        proc.cpu_percent(None)
        cpu = _Cpu()
        cpu.other_share([daemon.pid, broker.pid])
        tail = _ResultsTail(results)
        t0 = time.monotonic()
        tail.read()
        events: list[tuple[float, str, int]] = []
        for i, (a, b) in enumerate(outages):
            events += [(a, "broker_stop", i), (b, "broker_start", i)]
        events += [(at, "update", j) for j, at in enumerate(update_times)]
        events.sort()
        log(
            f"soak: {total:.0f} s, {len(outages)} outages, {len(update_times)} updates, sample every "
            f"{cfg.interval_s:g} s, warm-up {warmup:.0f} s; work dir {work}"
        )
        samples: list[dict[str, Any]] = []
        updates: list[dict[str, Any]] = []
        outage_log: list[dict[str, Any]] = []
        broker_up = True
        last_up = 0.0
        next_sample = t0 + cfg.interval_s
        last_sample_at = t0
        end = t0 + total
        settings = LinkSettings(
            host="127.0.0.1", port=broker.port, client_id="soak-publisher", ca_file=broker.ca_path,
            cert_file=broker.client_cert(OPERATOR)[0], key_file=broker.client_cert(OPERATOR)[1],
        )  # fmt: skip
        key = load_private_key(priv)
        while True:
            now = time.monotonic()
            if now >= end:
                break
            due = min([next_sample, end] + [t0 + e[0] for e in events[:1]])
            if due > now:
                time.sleep(min(due - now, 0.5))
                continue
            if events and now >= t0 + events[0][0]:
                _at, action, index = events.pop(0)
                rel = now - t0
                if action == "broker_stop":
                    broker.stop()
                    broker_up = False
                    outage_log.append({"index": index, "at_s": round(rel, 1)})
                    log(f"{rel:7.1f} s  broker down")
                elif action == "broker_start":
                    state = read_outbox(db) or {}
                    broker.start()
                    broker_up, last_up = True, time.monotonic() - t0
                    outage_log[-1].update(down_s=round(last_up - outage_log[-1]["at_s"], 1),
                                          backlog_rows=state.get("pending"))  # fmt: skip
                    log(f"{last_up:7.1f} s  broker up ({state.get('pending')} pending)")
                else:
                    version = f"1.{index + 1}.0"
                    rss = proc.memory_info().rss / MIB
                    rollout = Rollout(probation_s=cfg.probation_s, probation_min_frames=30)
                    wall = time.time()
                    try:
                        with FleetClient(settings, FLEET) as fleet:
                            fleet.publish(candidates[index], f"group:{GROUP}", key, rollout=rollout)
                        error = ""
                    except Exception as exc:  # report it; the soak goes on
                        error = f"{type(exc).__name__}: {exc}"
                    updates.append({"version": version, "at_s": round(rel, 1), "wall": wall,
                                    "rss_before_mib": round(rss, 2), "publish_error": error})  # fmt: skip
                    log(f"{rel:7.1f} s  published {version}{' FAILED: ' + error if error else ''}")
                continue
            # a sample
            rows = tail.read()
            dt = now - last_sample_at
            last_sample_at = now
            next_sample += cfg.interval_s
            inf = [
                float(r["latency_ms"]["inference"]) for r in rows if "inference" in r.get("latency_ms", {})
            ]
            tot = [float(r["latency_ms"]["total"]) for r in rows if "total" in r.get("latency_ms", {})]
            try:
                mem = proc.memory_info().rss
                fds = proc.num_fds()
                threads = proc.num_threads()
                children = len(proc.children(recursive=True))
                cpu_pct = proc.cpu_percent(None)
            except psutil.Error as exc:
                raise RuntimeError(f"the daemon died during the soak; log: {daemon.log_path}") from exc
            state = read_outbox(db) or {}
            with lock:
                tel = telemetry[-1] if telemetry else {}
                seen = list(update_events)
            rel = now - t0
            in_update = any(_outcome(seen, u["version"], u["wall"]) is None for u in updates)
            sample = {
                "t_s": round(rel, 1),
                "rss_mib": round(mem / MIB, 2),
                "fds": fds,
                "threads": threads,
                "children": children,
                "cpu_pct": round(cpu_pct, 1),
                "outbox_kib": round(state.get("file_bytes", 0) / 1024, 1),
                "pending": state.get("pending"),
                "state_dir_mib": round(_dir_bytes(state_dir) / MIB, 2),
                "frames": len(rows),
                "fps": round(len(rows) / dt, 2) if dt > 0 else None,
                "inf_p50_ms": _pct(inf, 50),
                "inf_p95_ms": _pct(inf, 95),
                "total_p95_ms": _pct(tot, 95),
                "tel_inf_p50_ms": tel.get("p50"),
                "tel_inf_p95_ms": tel.get("p95"),
                "model": tail.model,
                "broker_up": broker_up,
                "steady": broker_up and rel - last_up >= _STEADY_AFTER_OUTAGE_S and not in_update,
                "other_load": cpu.other_share([daemon.pid, broker.pid]),
            }
            samples.append(sample)
            log(
                f"{rel:7.1f} s  rss {sample['rss_mib']:.1f} MiB, fds {fds}, threads {threads}, outbox "
                f"{sample['outbox_kib']:.0f} KiB / {sample['pending']} rows, {sample['fps']} fps, inference "
                f"p50/p95 {sample['inf_p50_ms']}/{sample['inf_p95_ms']} ms, other load {sample['other_load']}"
            )
        # the end: published updates end (bounded), every seq produced arrives; then a graceful stop
        wait_end = time.monotonic() + 120.0
        while time.monotonic() < wait_end:
            with lock:
                seen = list(update_events)
            if all(
                _outcome(seen, u["version"], u["wall"]) is not None for u in updates if not u["publish_error"]
            ):
                break
            time.sleep(0.2)
        state = read_outbox(db) or {}
        final_wait = consumer.wait_contiguous(int(state.get("last_seq", 0)), 90.0)
        code, stop_s = daemon.stop()
        final = read_outbox(db, seqs=True)
        if not final:  # never report "lost 0" from an outbox that could not be read
            raise RuntimeError(f"cannot read the outbox {db} after the final stop")
        produced = int(final.get("last_seq", 0))
        pending = set(final.get("pending_seqs", []))
        settle = time.monotonic() + 5.0
        while (
            time.monotonic() < settle and set(range(1, produced + 1)) - consumer.snapshot()["seqs"] - pending
        ):
            time.sleep(0.1)
        snap = consumer.snapshot()
        log_text = daemon.log_text()
        elapsed = time.monotonic() - t0
    for u in updates:
        outcome = _outcome(update_events, u["version"], u["wall"])
        u["outcome"] = None if outcome is None else outcome[1].get("phase")
        u["reason"] = None if outcome is None else outcome[1].get("reason")
        u["to_outcome_s"] = None if outcome is None else round(outcome[0] - u["wall"], 2)
        after = [s for s in samples if outcome is not None and s["t_s"] >= u["at_s"] + u["to_outcome_s"] + 10]
        u["rss_after_mib"] = after[0]["rss_mib"] if after else None
    seqs: set[int] = snap["seqs"]
    counters = final.get("counters", {})
    lost = sorted(set(range(1, produced + 1)) - seqs - pending)
    report: dict[str, Any] = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "warmup_s": warmup,
        "samples": samples,
        "updates": updates,
        "outages": outage_log,
        "end_to_end": {
            "produced": produced,
            "delivered": len(seqs & set(range(1, produced + 1))),
            "pending_at_end": len(pending),
            "lost": len(lost),
            "lost_seqs": lost[:50],
            "duplicates": snap["messages"] - snap["distinct"] - snap["unparsed"],
            "conflicts": len(snap["conflicts"]),
            "dropped": sum(counters.get("dropped", {}).values()),
            "expired": sum(counters.get("expired", {}).values()),
            "hwm_rows": final.get("hwm_rows"),
            "hwm_bytes": final.get("hwm_bytes"),
            "final_wait_s": None if final_wait is None else round(final_wait, 3),
        },
        "exit_code": code,
        "stop_s": round(stop_s, 3),
        "daemon_log": {
            "errors": sum(1 for line in log_text.splitlines() if " ERROR " in line),
            "warnings": sum(1 for line in log_text.splitlines() if " WARNING " in line),
            "tracebacks": log_text.count("Traceback (most recent call last)"),
        },
        "elapsed_s": round(elapsed, 1),
    }
    busy = [
        (u["at_s"], u["at_s"] + (u["to_outcome_s"] if u["to_outcome_s"] is not None else total) + 10.0)
        for u in updates
    ]
    report["analysis"] = analyse(samples, warmup, busy)
    return report


def _outcome(
    events: list[tuple[float, dict[str, Any]]], version: str, since: float
) -> tuple[float, dict[str, Any]] | None:
    for wall, body in events:
        if (
            wall >= since
            and body.get("version") == version
            and body.get("phase")
            in (
                "committed",
                "rolled_back",
                "rejected",
            )
        ):
            return wall, body
    return None


# -- analysis --------------------------------------------------------------------------------------
def _slope_per_hour(points: Sequence[tuple[float, float]]) -> float | None:
    if len(points) < 3:
        return None
    t = np.array([p[0] for p in points]) / 3600.0
    y = np.array([p[1] for p in points])
    if float(np.ptp(t)) <= 0:
        return None
    return round(float(np.polyfit(t, y, 1)[0]), 4)


def rss_between_updates(
    samples: Sequence[dict[str, Any]], warmup_s: float, busy: Sequence[tuple[float, float]]
) -> dict[str, Any]:
    """RSS growth inside the stretches free of updates vs the step across each update window.

    A leak grows inside the stretches too; memory kept by the allocator after two models were
    loaded at once shows as steps that shrink from one update to the next.
    """
    post = [s for s in samples if s["t_s"] >= warmup_s]
    stretches: list[list[dict[str, Any]]] = [[]]
    steps: list[float] = []
    for s in post:
        if any(a <= s["t_s"] <= b for a, b in busy):
            if stretches[-1]:
                stretches.append([])
            continue
        stretches[-1].append(s)
    stretches = [x for x in stretches if len(x) >= 2]
    for before, after in itertools.pairwise(stretches):
        steps.append(round(after[0]["rss_mib"] - before[-1]["rss_mib"], 2))
    change = sum(x[-1]["rss_mib"] - x[0]["rss_mib"] for x in stretches)
    span = sum(x[-1]["t_s"] - x[0]["t_s"] for x in stretches)
    return {
        "stretches": len(stretches),
        "seconds": round(span, 1),
        "change_mib": round(change, 2),
        "per_h_mib": round(change / span * 3600.0, 2) if span > 0 else None,
        "steps_mib": steps,
    }


def analyse(
    samples: Sequence[dict[str, Any]], warmup_s: float, busy: Sequence[tuple[float, float]] = ()
) -> dict[str, Any]:
    """First- vs last-quarter medians, change, slope per hour and flag of every metric in LIMITS.

    ``busy`` are the update windows (publish to outcome + 10 s), for :func:`rss_between_updates`.
    """
    post = [s for s in samples if s["t_s"] >= warmup_s]
    out: dict[str, Any] = {"samples_used": len(post), "metrics": {}}
    out["rss_between_updates"] = rss_between_updates(samples, warmup_s, busy)
    if len(post) < 4:
        out["note"] = "fewer than 4 samples after the warm-up: nothing to compare"
        return out
    n = len(post)
    q = max(1, n // 4)
    quarters = {"first": post[:q], "last": post[n - q :]}
    loads = {k: [s["other_load"] for s in v if s["other_load"] is not None] for k, v in quarters.items()}
    out["other_load"] = {k: round(statistics.median(v), 3) if v else None for k, v in loads.items()}
    for key, (label, kind, limit) in LIMITS.items():
        vals: dict[str, float | None] = {}
        steady_used = True
        for name, group in quarters.items():
            chosen = [s for s in group if s["steady"]] if key in _STEADY_ONLY else group
            if not chosen:
                chosen, steady_used = group, False
            xs = [float(s[key]) for s in chosen if s.get(key) is not None]
            vals[name] = statistics.median(xs) if xs else None
        pts = [(s["t_s"], float(s[key])) for s in post if s.get(key) is not None]
        first, last = vals["first"], vals["last"]
        change: float | None = None
        flagged = False
        if first is not None and last is not None:
            if kind == "abs":
                change = last - first
                flagged = change > limit
            elif kind == "pct":
                change = 100.0 * (last - first) / first if first else math.inf
                flagged = change > limit
            elif first > 0:
                change = last / first
                flagged = change > limit if kind == "ratio_max" else change < limit
        out["metrics"][key] = {
            "label": label,
            "kind": kind,
            "limit": limit,
            "first": None if first is None else round(first, 4),
            "last": None if last is None else round(last, 4),
            "change": None if change is None else round(change, 4),
            "slope_per_h": _slope_per_hour(pts),
            "flagged": flagged,
            "steady_only": key in _STEADY_ONLY and steady_used,
        }
    return out


# -- the report ------------------------------------------------------------------------------------
def _fmt(v: float | None, digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _limit_text(kind: str, limit: float) -> str:
    return {"abs": f"<= +{limit:g}", "pct": f"<= +{limit:g} %", "ratio_max": f"<= x{limit:g}",
            "ratio_min": f">= x{limit:g}"}[kind]  # fmt: skip


def _change_text(kind: str, change: float | None) -> str:
    if change is None:
        return "n/a"
    if kind == "abs":
        return f"{change:+.2f}"
    if kind == "pct":
        return f"{change:+.1f} %"
    return f"x{change:.3f}"


def summary_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str, str, str, str]]:
    """(metric, first q, last q, change, slope/h, limit, result) rows of the table."""
    rows = []
    for m in r["analysis"].get("metrics", {}).values():
        rows.append(
            (
                m["label"],
                _fmt(m["first"]),
                _fmt(m["last"]),
                _change_text(m["kind"], m["change"]),
                "n/a" if m["slope_per_h"] is None else f"{m['slope_per_h']:+.2f}",
                _limit_text(m["kind"], m["limit"]),
                "FLAG" if m["flagged"] else "ok",
            )
        )
    e = r["end_to_end"]
    rows.append(("records lost end to end", "", "", str(e["lost"]), "", "0", "FLAG" if e["lost"] else "ok"))
    bad = e["dropped"] + e["expired"] + e["conflicts"]
    rows.append(
        ("outbox drops + expiries + seq conflicts", "", "", str(bad), "", "0", "FLAG" if bad else "ok")
    )
    return rows


def format_report(r: dict[str, Any], command: str) -> str:
    """The table (first vs last quarter, slope, limit, flag) and the details under it."""
    c, a, e = r["config"], r["analysis"], r["end_to_end"]
    rows = summary_rows(r)
    head = ("metric", "first q", "last q", "change", "slope/h", "limit", "result")
    widths = [max(len(str(x[i])) for x in [head, *rows]) for i in range(len(head))]
    done = sum(1 for u in r["updates"] if u["outcome"] == "committed")
    downs = [o.get("down_s", 0.0) for o in r["outages"]]
    lines = [
        f"edge-runtime soak: {c['minutes']:g} min, demo shapes at {c['fps']:g} fps, telemetry every "
        f"{c['telemetry_interval_s']:g} s, {len(r['outages'])} broker outages"
        + (f" ({min(downs):.0f}-{max(downs):.0f} s)" if downs else "")
        + f", {len(r['updates'])} model updates ({done} committed); {len(r['samples'])} samples every "
        f"{c['interval_s']:g} s, warm-up {r['warmup_s']:.0f} s excluded, {a.get('samples_used', 0)} compared",
        "",
        "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths, strict=True))
        ),
        "  ".join("-" * w for w in widths),
    ]
    for row in rows:
        lines.append(
            "  ".join(
                x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    if "note" in a:
        lines.append(f"note: {a['note']}")
    load = a.get("other_load", {})
    lines += [
        "",
        "details:",
        "  first/last quarter = medians of the first/last quarter of the samples after the warm-up; "
        f"latency and "
        f"fps from steady samples (broker up >= {_STEADY_AFTER_OUTAGE_S:g} s, no update in flight)",
        f"  other processes used {_fmt(load.get('first'), 3)} / {_fmt(load.get('last'), 3)} "
        "of the CPUs in the "
        "first / last quarter (a shared machine: latency moves with it)",
        f"  end to end: produced {e['produced']}, delivered {e['delivered']}, pending at the end "
        f"{e['pending_at_end']}, lost {e['lost']}, duplicates {e['duplicates']}, conflicts {e['conflicts']}; "
        f"outbox high-water mark {e['hwm_rows']} rows / {(e['hwm_bytes'] or 0) / 1024:.0f} KiB; dropped "
        f"{e['dropped']}, expired {e['expired']}",
    ]
    for o in r["outages"]:
        lines.append(
            f"  outage at {o['at_s']:7.1f} s: down {o.get('down_s', 'n/a')} s, "
            f"{o.get('backlog_rows')} rows pending"
        )
    for u in r["updates"]:
        lines.append(
            f"  update {u['version']} at {u['at_s']:7.1f} s: {u['outcome'] or 'no outcome'}"
            + (f" after {u['to_outcome_s']:.1f} s" if u["to_outcome_s"] is not None else "")
            + (f" ({u['reason']})" if u["reason"] else "")
            + f"; RSS {u['rss_before_mib']:.1f} -> {_fmt(u['rss_after_mib'], 1)} MiB"
            + (f"; publish failed: {u['publish_error']}" if u["publish_error"] else "")
        )
    rb = a.get("rss_between_updates", {})
    if rb.get("stretches"):
        lines.append(
            f"  RSS inside the {rb['stretches']} stretches free of updates ({rb['seconds']:.0f} s): "
            f"{rb['change_mib']:+.2f} MiB ({_fmt(rb['per_h_mib'])} MiB/h); step across each update: "
            f"{', '.join(f'{x:+.2f}' for x in rb['steps_mib']) or 'none'} MiB"
        )
    samples = r["samples"]
    step = max(1, len(samples) // 12)
    lines.append(
        f"  samples (every {step}.): t s, RSS MiB, fds, threads, outbox KiB/rows, fps, inference "
        "p50/p95 ms (telemetry p50/p95), model, steady, other load"
    )
    for s in [*samples[::step], *([samples[-1]] if samples and (len(samples) - 1) % step else [])]:
        lines.append(
            f"    {s['t_s']:7.1f} {s['rss_mib']:7.1f} {s['fds']:4d} {s['threads']:3d} {s['outbox_kib']:7.0f}/"
            f"{s['pending']} {_fmt(s['fps'], 1):>5} {_fmt(s['inf_p50_ms'], 3)}/{_fmt(s['inf_p95_ms'], 3)} "
            f"({_fmt(s['tel_inf_p50_ms'], 3)}/{_fmt(s['tel_inf_p95_ms'], 3)}) {s['model']} "
            f"{'y' if s['steady'] else 'n'} {_fmt(s['other_load'], 2)}"
        )
    dl = r["daemon_log"]
    lines += [
        f"  daemon: exit code {r['exit_code']} after SIGTERM ({r['stop_s']:.2f} s); "
        f"log {dl['errors']} ERROR, "
        f"{dl['warnings']} WARNING lines, {dl['tracebacks']} tracebacks; elapsed {r['elapsed_s']} s",
        "",
        f"command: {command}",
    ]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    d = SoakConfig()
    p.add_argument("--minutes", type=float, default=d.minutes, help=f"run time (default {d.minutes:g})")
    p.add_argument(
        "--interval", type=float, default=d.interval_s, help=f"s between samples ({d.interval_s:g})"
    )
    p.add_argument("--fps", type=float, default=d.fps, help=f"video pace (default {d.fps:g})")
    p.add_argument(
        "--telemetry-interval",
        type=float,
        default=d.telemetry_interval_s,
        help=f"s between telemetry records (default {d.telemetry_interval_s:g})",
    )
    p.add_argument(
        "--outage-every",
        type=float,
        default=d.outage_every_s,
        help=f"s between broker outages, 0 = none (default {d.outage_every_s:g})",
    )
    p.add_argument("--outage-min", type=float, default=d.outage_min_s, help="shortest outage, s")
    p.add_argument("--outage-max", type=float, default=d.outage_max_s, help="longest outage, s")
    p.add_argument("--updates", type=int, default=d.updates, help=f"model updates (default {d.updates})")
    p.add_argument("--probation", type=float, default=d.probation_s, help="probation of each update, s")
    p.add_argument("--warmup", type=float, help="s left out of the comparison (default 20%%, at most 120)")
    p.add_argument("--seed", type=int, default=d.seed, help="outage lengths seed")
    p.add_argument("--workdir", type=Path, help="keep broker, state and logs here (default: a temp dir)")
    p.add_argument("--json", type=Path, help="also write the samples and figures as JSON")
    return p  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the soak, print the table, optionally write JSON; exit 1 if something is flagged."""
    args = _parser().parse_args(argv)
    cfg = SoakConfig(
        minutes=args.minutes, interval_s=args.interval, fps=args.fps,
        telemetry_interval_s=args.telemetry_interval, outage_every_s=args.outage_every,
        outage_min_s=args.outage_min, outage_max_s=args.outage_max, updates=args.updates,
        probation_s=args.probation, warmup_s=args.warmup, seed=args.seed, workdir=args.workdir,
    )  # fmt: skip
    argv_list = list(sys.argv[1:] if argv is None else argv)
    command = " ".join(["PYTHONPATH=. python bench/soak.py", *(shlex.quote(a) for a in argv_list)])
    report = run_soak(cfg, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    report["command"] = command
    print(format_report(report, command))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    return 1 if any(row[-1] == "FLAG" for row in summary_rows(report)) else 0


if __name__ == "__main__":
    raise SystemExit(main())
