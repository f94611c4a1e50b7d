"""The `edgert` command as a user runs it: real subprocesses, real files, real signals."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import REPO, write_video

ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def edgert(*args: str, timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_runtime", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=kw.pop("env", ENV),
        check=False,
        **kw,
    )


def summary_of(stderr: str) -> dict[str, Any]:
    for line in stderr.splitlines():
        if line.startswith('{"summary"'):
            return dict(json.loads(line)["summary"])
    raise AssertionError(f"no summary in stderr:\n{stderr}")


def spawn(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "edge_runtime", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env or ENV,
    )


def wait_for_lines(path: Path, n: int, timeout: float = 30.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            lines = [x for x in path.read_text().splitlines() if x.endswith("}")]
            if len(lines) >= n:
                return [json.loads(x) for x in lines]
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} result lines in {path} after {timeout}s")


def test_run_adhoc_with_signature_check(
    make_cnn_bundle: Callable[..., Path], video: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    out = tmp_path / "r.jsonl"
    proc = edgert(
        "run",
        "--bundle",
        str(make_cnn_bundle()),
        "--source",
        str(video),
        "--sink",
        f"jsonl:{out}",
        "--trust-key",
        str(keys[1]),
        "--max-frames",
        "7",
    )
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["frame"] for r in rows] == list(range(7))
    summary = summary_of(proc.stderr)
    assert summary["frames"] == 7 and summary["fps"] > 0
    assert summary["first_result_s"] is not None


def test_packed_bundle_and_stdout_sink(
    make_cnn_bundle: Callable[..., Path], video: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    packed = tmp_path / "b.edgebundle"
    make_cnn_bundle(pack=packed)
    proc = edgert("run", "--bundle", str(packed), "--source", str(video), "--trust-key", str(keys[1]))
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(x) for x in proc.stdout.splitlines()]
    assert len(rows) == 20 and rows[0]["model"] == "tiny-cnn@1.0.0"


@pytest.mark.parametrize(
    ("toml", "expect"),
    [
        ("[model]\nbundle='b'\n[source]\nkind='video'\nurii='x'\n", "source.urii: unknown field"),
        ("[model]\nbundle='b'\n", "source: required field is missing"),
        ("[model]\nbundle='b'\nthreads='many'\n[source]\nkind='video'\nuri='x'\n", "model.threads"),
        ("[model\nbundle=", "is not valid TOML"),
        ("[model]\nbundle='b'\n[source]\nkind='webcam'\nuri='0'\n", "source.kind"),
        (
            "[model]\nbundle='b'\n[source]\nkind='video'\nuri='x'\n[trust]\nrequire_signature=true\n",
            "no keys are listed",
        ),
    ],
)
def test_bad_config_exits_2_without_traceback(tmp_path: Path, toml: str, expect: str) -> None:
    cfg = tmp_path / "edgert.toml"
    cfg.write_text(toml)
    proc = edgert("run", "--config", str(cfg))
    assert proc.returncode == 2
    assert expect in proc.stderr
    assert "Traceback" not in proc.stderr


def test_corrupt_model_is_a_named_error(
    make_cnn_bundle: Callable[..., Path], video: Path, tmp_path: Path
) -> None:
    from edge_runtime.bundle import FileEntry, parse_manifest, sha256_file, write_manifest

    root = make_cnn_bundle(sign=False)
    model = root / "model.onnx"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    # Re-hash so that only the model content is wrong, not the manifest.
    man = parse_manifest((root / "manifest.json").read_bytes())
    files = dict(man.files)
    files["model.onnx"] = FileEntry(sha256=sha256_file(model), size=model.stat().st_size)
    write_manifest(root, man.model_copy(update={"files": files}))
    proc = edgert("run", "--bundle", str(root), "--source", str(video))
    assert proc.returncode == 1
    assert "cannot load model.onnx" in proc.stderr and "Traceback" not in proc.stderr


def test_tampered_bundle_is_refused(
    make_cnn_bundle: Callable[..., Path], video: Path, keys: tuple[Path, Path]
) -> None:
    root = make_cnn_bundle()
    labels = root / "labels.txt"
    labels.write_text(labels.read_text().replace("a", "z"))
    proc = edgert("run", "--bundle", str(root), "--source", str(video), "--trust-key", str(keys[1]))
    assert proc.returncode == 1
    assert "labels.txt" in proc.stderr and "sha256" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_video_is_a_named_error(make_cnn_bundle: Callable[..., Path], tmp_path: Path) -> None:
    proc = edgert("run", "--bundle", str(make_cnn_bundle()), "--source", f"video:{tmp_path / 'nope.avi'}")
    assert proc.returncode == 1
    assert "nope.avi" in proc.stderr and "Traceback" not in proc.stderr


def _config(
    tmp_path: Path, bundle: Path, video: Path, keys: tuple[Path, Path], out: Path, extra: str = ""
) -> Path:
    cfg = tmp_path / "edgert.toml"
    cfg.write_text(
        f"[model]\nbundle = '{bundle}'\n"
        f"[source]\nkind = 'video'\nuri = '{video}'\nloop = true\n"
        f"[pipeline]\nmax_fps = 100\n"
        f"[[sinks]]\nkind = 'jsonl'\npath = '{out}'\n"
        f"[trust]\nkeys = ['{keys[1]}']\n"
        f"[state]\ndir = '{tmp_path / 'state'}'\n{extra}"
    )
    return cfg


def test_sigterm_stops_gracefully(
    make_cnn_bundle: Callable[..., Path], video: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    out = tmp_path / "r.jsonl"
    proc = spawn("run", "--config", str(_config(tmp_path, make_cnn_bundle(), video, keys, out)))
    try:
        wait_for_lines(out, 30)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    summary = summary_of(stderr)
    lines = out.read_text().splitlines()
    assert len(lines) == summary["frames"] >= 30  # every result flushed, none half-written
    assert all(json.loads(x)["frame"] >= 0 for x in lines)
    assert not any((tmp_path / "state" / "tmp").iterdir())  # private unpack folder removed


def test_sighup_reloads_model_and_rejects_bad_config(
    make_cnn_bundle: Callable[..., Path], video: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    out = tmp_path / "r.jsonl"
    v1, v2 = make_cnn_bundle("1.0.0"), make_cnn_bundle("2.0.0")
    cfg = _config(tmp_path, v1, video, keys, out)
    proc = spawn("run", "--config", str(cfg))
    try:
        wait_for_lines(out, 10)
        good = cfg.read_text()
        cfg.write_text(good + "[bogus]\n")
        proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        assert proc.poll() is None  # a bad config on reload keeps the daemon running
        cfg.write_text(good.replace(str(v1), str(v2)))
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            rows = wait_for_lines(out, 1)
            if rows[-1]["model"] == "tiny-cnn@2.0.0":
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert "reload rejected" in stderr and "bogus" in stderr
    models = [json.loads(x)["model"] for x in out.read_text().splitlines()]
    switch = models.index("tiny-cnn@2.0.0")
    assert set(models[:switch]) == {"tiny-cnn@1.0.0"} and set(models[switch:]) == {"tiny-cnn@2.0.0"}
    assert summary_of(stderr)["model_swaps"] == 1


def test_sd_notify_ready_watchdog_stopping(
    make_cnn_bundle: Callable[..., Path], video: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(20)
    out = tmp_path / "r.jsonl"
    env = {**ENV, "NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "200000"}
    proc = spawn("run", "--config", str(_config(tmp_path, make_cnn_bundle(), video, keys, out)), env=env)
    messages: list[str] = []
    try:
        while not any(m.startswith("READY=1") for m in messages) or messages.count("WATCHDOG=1") < 3:
            messages.append(sock.recv(4096).decode())
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
        while "STOPPING=1" not in messages:
            messages.append(sock.recv(4096).decode())
    finally:
        proc.kill()
        sock.close()
    ready = next(m for m in messages if m.startswith("READY=1"))
    assert "STATUS=serving tiny-cnn 1.0.0" in ready
    assert messages.index(ready) < messages.index("WATCHDOG=1")
    assert proc.returncode == 0


def test_bundle_cli_round_trip(cnn_onnx: Path, tmp_path: Path) -> None:
    keydir = tmp_path / "keys"
    assert edgert("keys", "generate", "--out", str(keydir)).returncode == 0
    again = edgert("keys", "generate", "--out", str(keydir))
    assert again.returncode == 1 and "already exists" in again.stderr
    frames = tmp_path / "golden.npz"
    np.savez(frames, frames=np.random.default_rng(0).integers(0, 255, (3, 40, 40, 3), dtype=np.uint8))
    labels = tmp_path / "labels.txt"
    labels.write_text("w\nx\ny\nz\n")
    out = tmp_path / "bundle"
    proc = edgert(
        "bundle",
        "create",
        "--model",
        str(cnn_onnx),
        "--out",
        str(out),
        "--name",
        "cli-cnn",
        "--version",
        "0.3.0",
        "--labels",
        str(labels),
        "--decoder-opt",
        "top_k=1",
        "--golden",
        str(frames),
        "--sign-key",
        str(keydir / "edgert.key"),
        "--pack",
        str(tmp_path / "b.edgebundle"),
    )
    assert proc.returncode == 0, proc.stderr
    verify = edgert(
        "bundle", "verify", str(tmp_path / "b.edgebundle"), "--key", str(keydir / "edgert.pub"), "--selftest"
    )
    assert verify.returncode == 0, verify.stderr
    assert "OK: cli-cnn 0.3.0" in verify.stdout and "self-test onnx: passed 3/3" in verify.stdout
    inspect = edgert("bundle", "inspect", str(out), "--json")
    man = json.loads(inspect.stdout)
    assert man["decoder"]["top_k"] == 1 and man["version"] == "0.3.0"
    other = tmp_path / "other"
    edgert("keys", "generate", "--out", str(other))
    bad = edgert("bundle", "verify", str(out), "--key", str(other / "edgert.pub"))
    assert bad.returncode == 1 and "not trusted" in bad.stderr


def test_doctor_reports_backends_and_cpu() -> None:
    proc = edgert("doctor", "--json", "--no-cameras")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert "cpu" in report["backends"]["onnxruntime"]["providers"]
    assert report["backends"]["litert"]["module"] in ("ai_edge_litert", "tflite_runtime")
    flags = Path("/proc/cpuinfo").read_text()
    assert report["cpu"]["features"].get("avx2", False) == (" avx2" in flags)


def test_cuda_requested_but_absent_is_explained(
    make_cnn_bundle: Callable[..., Path], video: Path, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    out = tmp_path / "r.jsonl"
    cfg = _config(tmp_path, make_cnn_bundle(), video, keys, out)
    cfg.write_text(cfg.read_text().replace("[source]", "providers = ['cuda']\n[source]"))
    proc = edgert("run", "--config", str(cfg))
    assert proc.returncode == 1
    assert "'cuda' was requested" in proc.stderr and "onnxruntime-gpu" in proc.stderr


def test_video_that_does_not_loop_ends_cleanly(make_cnn_bundle: Callable[..., Path], tmp_path: Path) -> None:
    clip = write_video(tmp_path / "short.avi", frames=5)
    proc = edgert("run", "--bundle", str(make_cnn_bundle()), "--source", str(clip))
    assert proc.returncode == 0
    assert summary_of(proc.stderr)["frames"] == 5


def test_camera_that_vanishes_is_reconnected_and_the_daemon_stays_up(
    make_cnn_bundle: Callable[..., Path], keys: tuple[Path, Path], tmp_path: Path
) -> None:
    from test_sources import MjpegServer

    server = MjpegServer(value=40)
    out = tmp_path / "r.jsonl"
    cfg = tmp_path / "edgert.toml"
    cfg.write_text(
        f"[model]\nbundle = '{make_cnn_bundle()}'\n"
        f"[source]\nkind = 'stream'\nuri = '{server.url}'\nreconnect_min_s = 0.05\n"
        "reconnect_max_s = 0.3\nopen_timeout_s = 2\n"
        f"[[sinks]]\nkind = 'jsonl'\npath = '{out}'\n[trust]\nkeys = ['{keys[1]}']\n"
        f"[state]\ndir = '{tmp_path / 'state'}'\n"
    )
    proc = spawn("run", "--config", str(cfg))
    revived = None
    try:
        before = len(wait_for_lines(out, 5))
        server.stop()
        time.sleep(1.5)
        assert proc.poll() is None  # still running while the camera is gone
        offline_count = len(wait_for_lines(out, 1))
        revived = MjpegServer(value=200, port=server.port)
        wait_for_lines(out, offline_count + 5, timeout=30)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
    finally:
        proc.kill()
        if revived is not None:
            revived.stop()
    assert before >= 5
    assert "source offline" in stderr and proc.returncode == 0
    assert summary_of(stderr)["source_reconnects"] >= 1


def test_serial_sensor_with_garbage_lines(
    sensor_bundle: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    """A real pty as the serial port: garbage lines are counted and skipped, windows flow."""
    master, slave = os.openpty()
    port = os.ttyname(slave)
    out = tmp_path / "r.jsonl"
    proc = spawn(
        "run",
        "--bundle",
        str(sensor_bundle),
        "--source",
        f"serial:{port}?baud=115200",
        "--sink",
        f"jsonl:{out}",
        "--trust-key",
        str(keys[1]),
        "--max-frames",
        "6",
    )
    try:
        time.sleep(1.0)  # let the daemon open the port
        rng = np.random.default_rng(0)
        lines = []
        for i in range(200):
            amp = 1.0 if i < 100 else 3.0  # louder second half: energy 1 -> 9, threshold 4
            lines.append(",".join(f"{v:.4f}" for v in rng.standard_normal(3) * amp))
            if i % 17 == 5:
                lines.append("garbage \x00\xff not numbers")
            if i % 29 == 3:
                lines.append("1.0,2.0")  # wrong column count
        os.write(master, ("\n".join(lines) + "\n").encode("utf-8", "replace"))
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
        os.close(master)
        os.close(slave)
    assert proc.returncode == 0, stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 6 and all(r["task"] == "raw" for r in rows)
    summary = summary_of(stderr)
    assert summary["bad_lines"] >= 5
    # Window 0 covers samples 0..31 (after the first, possibly partial, line is dropped): quiet.
    assert rows[0]["anomaly"] is False and 0.3 < rows[0]["score"] < 2.5
