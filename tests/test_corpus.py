"""The malicious/broken bundle corpus (tests/corpus.py) delivered to ONE running device.

A real daemon serves the demo shapes model from a looping video; a real mosquitto with mutual
TLS carries every case as an operator would publish it (retained chunks, chunk table, signed
document). Each case must be refused with its named reason in the device's ``update`` event
while the model keeps serving with no dropped frame and no model swap; the last case is a good
update whose chunk 1 was tampered on the broker: the chunk is refused by its hash, fetched again
once re-uploaded, and the update is committed.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from corpus import SERVING_VERSION, build_corpus, crashing_tflite
from mqtt_broker import Broker
from sync_helpers import Device, mark, updates, wait_phase

from edge_runtime.bundle import generate_keypair
from edge_runtime.sync.publisher import FleetClient

TERMINAL = {"rejected", "committed", "rolled_back", "skipped"}


def test_crashing_tflite_really_kills_the_runtime_in_a_plain_process(tmp_path: Path) -> None:
    """The corpus' crasher is a REAL crash of LiteRT (not an error): loaded with the LiteRT
    backend in a child process, the child dies by SIGSEGV; the unpatched model loads fine."""
    code = (
        "import sys; from pathlib import Path; from edge_runtime.backends import load_backend; "
        "load_backend('litert', Path(sys.argv[1])).close(); print('loaded')"
    )
    crash = tmp_path / "crash.tflite"
    crash.write_bytes(crashing_tflite())
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    for model, alive in ((crash, False), (Path("models/demo/shapes/model.tflite").resolve(), True)):
        proc = subprocess.run(
            [sys.executable, "-c", code, str(model)],
            check=False,
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        if alive:
            assert proc.returncode == 0 and "loaded" in proc.stdout, proc.stderr[-500:]
        else:
            assert proc.returncode == -signal.SIGSEGV, (proc.returncode, proc.stderr[-500:])


def test_every_corpus_case_is_refused_by_a_running_device_that_keeps_serving(
    tmp_path: Path,
    broker: Broker,
    keys: tuple[Path, Path],
    devices: Callable[..., Device],
    fleet: FleetClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="edge_runtime.sync.agent")
    rogue, _ = generate_keypair(tmp_path / "rogue")
    cases = build_corpus(tmp_path / "corpus", keys[0], rogue)
    assert len({c.name for c in cases}) == len(cases) >= 30
    # format auto: a tflite-only bundle (the crasher) is loaded with LiteRT, as on an Arm device
    dev = devices("dev1", model={"format": "auto"})
    watcher = updates(broker)
    frames_before = dev.agent.host.summary()["frames"]
    table: list[tuple[str, str, float, str]] = []
    for case in cases:
        n = mark(watcher)
        t0 = time.monotonic()
        for topic, payload in case.messages:
            fleet._publish_wait(f"edgert/test/{topic}", payload)
        if case.repair:
            # the fleet is told which chunk was refused and why ...
            told = _wait_reason(watcher, "downloading", case.log_words, since=n)
            assert "bundle chunk 1 refused" in told["reason"], told
            # ... and the device asks for it again with a back-off, not in a tight loop (it spun
            # at ~300 re-fetches a second of the same retained 256 KiB chunk before the fix)
            refusals = len(_records(caplog, case.log_words))
            time.sleep(1.2)
            during = len(_records(caplog, case.log_words)) - refusals
            assert during <= 3, f"{during} refusals of the same chunk in 1.2 s"
            assert dev.serving() == SERVING_VERSION and dev.agent._download is not None
            assert dev.agent._download.asm is not None and not dev.agent._download.asm.complete
            for topic, payload in case.repair:
                fleet._publish_wait(f"edgert/test/{topic}", payload)
        got = wait_phase(watcher, TERMINAL, timeout=90, since=n)
        seconds = time.monotonic() - t0
        assert got["phase"] == case.phase, (case.name, got)
        missing = [w for w in case.reason if w not in got["reason"]]
        assert not missing, (case.name, missing, got["reason"])
        if case.phase == "rejected":
            assert dev.serving() == SERVING_VERSION, case.name
        table.append((case.name, got["phase"], seconds, got["reason"]))
    print("\n" + "\n".join(f"{n:34} {p:9} {s:5.2f}s  {r[:150]}" for n, p, s, r in table))

    # the good update went in (chunk 1 refused by its hash, fetched again) and is the only swap
    assert dev.serving() == "2.1.0"
    state = dev.state_json()
    assert state["phase"] == "committed" and state["active"]["version"] == "2.1.0"
    summary = dev.agent.host.summary()
    assert summary["model_swaps"] == 1, summary
    assert summary["dropped"] == 0 and not summary["errors"], summary
    assert summary["frames"] - frames_before > 100, summary
    # not one frame lost over the whole corpus: the result stream's frame indices have no gap
    time.sleep(0.3)
    rows = [json.loads(line) for line in dev.results.read_text().splitlines() if line.strip()]
    frames = [r["frame"] for r in rows]
    assert frames == list(range(frames[0], frames[0] + len(frames)))
    assert {r["model"] for r in rows} == {"shapes@1.0.0", "shapes@2.1.0"}
    # nothing was written outside the state directory, and nothing refused was left behind
    sync_dir = dev.state / "sync"
    assert not list(tmp_path.rglob("cron.d")) and not Path("/etc/cron.d/edgert").exists()
    leftovers = [p.name for p in (sync_dir / "slots").iterdir() if p.name.startswith((".staging", ".unpack"))]
    assert leftovers == []
    assert [p.name for p in (sync_dir / "downloads").iterdir()] == []
    slot_versions = sorted(
        json.loads((p / ".edgert-slot.json").read_text())["version"]
        for p in (sync_dir / "slots").iterdir()
        if (p / ".edgert-slot.json").exists()
    )
    assert "2.1.0" in slot_versions


def _records(caplog: pytest.LogCaptureFixture, words: str) -> list[logging.LogRecord]:
    return [r for r in list(caplog.records) if words in r.getMessage()]


def _wait_reason(watcher: Any, phase: str, words: str, since: int, timeout: float = 30.0) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for msg in watcher.messages("edgert/test/device/dev1/update")[since:]:
            body = json.loads(msg.payload)
            if body["phase"] == phase and words in body.get("reason", ""):
                return dict(body)
        time.sleep(0.05)
    raise AssertionError(f"no {phase!r} update naming {words!r} within {timeout} s")


def test_bench_corpus_writes_every_case_and_its_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bench.corpus import main

    assert main([str(tmp_path / "out")]) == 0
    table = capsys.readouterr().out
    cases = sorted(p.parent.name for p in (tmp_path / "out").glob("*/case.json"))
    assert len(cases) >= 30 and all(name in table for name in cases)
    bomb = json.loads((tmp_path / "out" / "decompression-bomb" / "case.json").read_text())
    assert bomb["layer"] == "archive" and "the limit is 1048576" in bomb["reason_words"]
    assert any(p.name.endswith("desired.bin") for p in (tmp_path / "out" / "truncated").iterdir())
