"""Fleet sync under interruptions: cut links, restarts and kill -9 mid-update; drift alerts; MQTT 3.1.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from conftest import DEMO, REPO
from mqtt_broker import Broker
from sync_helpers import DEMO_PUB, FAST, Device, make_candidate, mark, updates, wait_phase

from edge_runtime.bundle import load_private_key
from edge_runtime.sync.publisher import FleetClient


def big_candidate(tmp_path: Path, key: Path, version: str, mb: int = 6) -> Path:
    """A candidate with a few MB of extra payload, so a download takes many chunks."""
    extra = tmp_path / f"pad-{version}.bin"
    extra.write_bytes(np.random.default_rng(1).integers(0, 256, mb << 20, dtype=np.uint8).tobytes())
    return make_candidate(tmp_path, key, version, extra_files={"pad.bin": extra})


def progress_events(watcher: Any, since: int = 0) -> list[dict[str, Any]]:
    msgs = watcher.messages("edgert/test/device/dev1/update")[since:]
    return [b for b in (json.loads(m.payload) for m in msgs) if b["phase"] == "downloading"]


def test_a_cut_link_and_a_restart_resume_the_download_from_disk(
    tmp_path: Path,
    broker: Broker,
    keys: tuple[Path, Path],
    devices: Callable[..., Device],
    fleet: FleetClient,
) -> None:
    dev = devices("dev1", sync={"chunk_window": 2})
    watcher = updates(broker)
    packed = big_candidate(tmp_path, keys[0], "1.1.0")
    fleet.publish(packed, "group:cams", load_private_key(keys[0]), rollout=FAST)
    # cut the connection once some chunks are on disk: the download goes on after reconnecting
    end = time.monotonic() + 30
    while time.monotonic() < end and not any(e.get("progress", 0) >= 0.1 for e in progress_events(watcher)):
        time.sleep(0.01)
    dev.agent.link.abort()
    # stop the daemon in the middle of the download, start it again: it resumes from the journal
    while time.monotonic() < end and not any(e.get("progress", 0) >= 0.3 for e in progress_events(watcher)):
        time.sleep(0.01)
    n = mark(watcher)
    dev.stop()
    dev.start()
    done = wait_phase(watcher, {"committed", "rolled_back", "rejected"}, since=n)
    assert done["phase"] == "committed", done
    resumed = [e for e in progress_events(watcher, n) if e.get("reason") == "resumed from disk"]
    assert resumed and resumed[0]["received_bytes"] > 0, progress_events(watcher, n)[:3]
    assert dev.serving() == "1.1.0"


def run_daemon(config: Path) -> subprocess.Popen[bytes]:
    log = (config.parent / "daemon.log").open("ab")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "edge_runtime", "run", "--config", str(config)],
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    finally:
        log.close()


def test_kill_9_during_probation_restarts_on_the_previous_model(
    tmp_path: Path, broker: Broker, keys: tuple[Path, Path], fleet: FleetClient
) -> None:
    cert, key = broker.client_cert("dev1")
    state = tmp_path / "state"
    config = tmp_path / "edgert.toml"
    config.write_text(
        f'[model]\nbundle = "{DEMO / "shapes"}"\nformat = "onnx"\nthreads = 1\n'
        f'[source]\nkind = "video"\nuri = "{DEMO / "shapes.avi"}"\nloop = true\n'
        "[pipeline]\nmax_fps = 30\n"
        f'[[sinks]]\nkind = "jsonl"\npath = "{tmp_path / "out.jsonl"}"\n'
        f'[trust]\nkeys = ["{DEMO_PUB}", "{keys[1]}"]\n'
        f'[state]\ndir = "{state}"\n'
        f'[sync]\nenabled = true\nhost = "127.0.0.1"\nport = {broker.port}\nfleet = "test"\n'
        'device_id = "dev1"\n'
        f'groups = ["cams"]\nca_file = "{broker.ca_path}"\ncert_file = "{cert}"\nkey_file = "{key}"\n'
    )
    watcher = updates(broker)
    proc = run_daemon(config)
    try:
        packed = make_candidate(tmp_path, keys[0], "1.1.0")
        long_probation = FAST.model_copy(update={"probation_s": 600.0})
        fleet.publish(packed, "group:cams", load_private_key(keys[0]), rollout=long_probation)
        wait_phase(watcher, {"probation"})
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        saved = json.loads((state / "sync" / "state.json").read_text())
        assert saved["phase"] == "probation" and saved["candidate"]["version"] == "1.1.0"
        proc = run_daemon(config)
        # back on the previous model; the crash is reported as the reason
        body = wait_phase(watcher, {"rolled_back"}, since=0, timeout=30)
        assert "restarted during probation" in body["reason"] or "restarted" in json.dumps(body)
        end = time.monotonic() + 30
        serving = ""
        while time.monotonic() < end and serving != "1.0.0":
            states = broker.client("fleet-admin")
            states.subscribe_wait("edgert/test/device/dev1/state")
            msg = states.wait_count("edgert/test/device/dev1/state", 1)[-1]
            serving = (json.loads(msg.payload).get("model") or {}).get("version", "")
            states.close()
            time.sleep(0.2)
        assert serving == "1.0.0"
        saved = json.loads((state / "sync" / "state.json").read_text())
        assert saved["candidate"] is None and saved["phase"] in ("rolled_back", "idle", "downloading")
    finally:
        proc.kill()
        proc.wait(10)


def test_input_drift_raises_an_alert_event(
    tmp_path: Path, broker: Broker, devices: Callable[..., Device]
) -> None:
    video = tmp_path / "white.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 30.0, (64, 64))
    for _ in range(30):
        writer.write(np.full((64, 64, 3), 255, np.uint8))
    writer.release()
    watcher = broker.client("fleet-admin")
    watcher.subscribe_wait("edgert/test/device/dev1/events")
    watcher.subscribe_wait("edgert/test/device/dev1/telemetry")
    devices("dev1", source={"uri": str(video)}, pipeline={"max_fps": 120})
    end = time.monotonic() + 60
    alerts: list[dict[str, Any]] = []
    while time.monotonic() < end and not alerts:
        alerts = [
            b
            for b in (json.loads(m.payload) for m in watcher.messages("edgert/test/device/dev1/events"))
            if b.get("kind") == "drift_alert"
        ]
        time.sleep(0.2)
    assert alerts, "no drift alert"
    alert = alerts[0]
    assert alert["level"] == "alert" and alert["alerts"]
    # white frames: one class only (the demo bundle's reference predates input histograms)
    assert alert["class_psi"] > 0.25 and alert["top1_share"] == 1.0
    telemetry = [json.loads(m.payload) for m in watcher.messages("edgert/test/device/dev1/telemetry")]
    metrics = [t for t in telemetry if t.get("kind") == "metrics"]
    assert metrics and metrics[-1]["drift"]["class_psi"] is not None
    sample = metrics[-1]
    for key in ("process_rss_bytes", "disk_free_bytes", "process_cpu_percent"):
        assert sample["system"][key] is not None
    assert sample["model"]["version"] == "1.0.0" and "latency_ms" in sample["pipeline"]


def test_mqtt_3_1_1_devices_update_too(
    tmp_path: Path,
    broker: Broker,
    keys: tuple[Path, Path],
    devices: Callable[..., Device],
    fleet: FleetClient,
) -> None:
    dev = devices("dev1", sync={"protocol": "3.1.1"})
    watcher = updates(broker)
    fleet.publish(
        make_candidate(tmp_path, keys[0], "1.1.0"), "group:cams", load_private_key(keys[0]), rollout=FAST
    )
    assert wait_phase(watcher, {"committed", "rolled_back", "rejected"})["phase"] == "committed"
    assert dev.serving() == "1.1.0"
