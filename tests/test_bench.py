"""Smoke test of the pipeline bench on a tiny MobileNetV2: structure and sane ratios only.

No absolute time and no goal threshold is checked: the CI machine is noisy.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("bench") is None:  # pytest run without the repo root on sys.path
    sys.path.insert(0, str(REPO))

from bench.models import (  # noqa: E402
    MobileNetV2Config,
    build_mobilenet_v2_onnx,
    count_params,
    ensure_bundle,
    ensure_onnx_model,
    verify_onnx,
)
from bench.pipeline import BenchConfig, format_report, main, run_bench  # noqa: E402

TINY = MobileNetV2Config(width=0.35, size=32, classes=10)


def _finite_positive(x: object) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_mobilenet_v2_has_the_reference_size(tmp_path: Path) -> None:
    path = build_mobilenet_v2_onnx(tmp_path / "mnv2.onnx")
    # MobileNetV2 1.0 / 224: 3.50 M parameters with batch norm, 3.49 M with BN folded
    assert 3_400_000 < count_params(path) < 3_600_000
    probs = verify_onnx(path)
    assert probs.shape == (1, 1000)


def test_bundle_is_cached(tmp_path: Path) -> None:
    model = ensure_onnx_model(TINY, tmp_path)
    assert ensure_onnx_model(TINY, tmp_path) == model
    bundle = ensure_bundle(model, size=TINY.size, build_dir=tmp_path)
    stamp = (bundle / "manifest.json").stat().st_mtime_ns
    assert ensure_bundle(model, size=TINY.size, build_dir=tmp_path) == bundle
    assert (bundle / "manifest.json").stat().st_mtime_ns == stamp


def test_bench_runs_and_reports_ratios(tmp_path: Path) -> None:
    cfg = BenchConfig(
        model=TINY,
        threads=2,
        seconds=0.2,
        rounds=2,
        video_frames=8,
        big_video_frames=8,
        big_video=(160, 120),
        cold_runs=1,
        litert=False,
        quiet_budget_s=0.0,
        build_dir=tmp_path,
    )
    report = run_bench(cfg, log=lambda _msg: None)
    onnx = report["onnx"]
    for key in ("ratio", "bare_fps", "backend_fps", "daemon_fps"):
        assert _finite_positive(onnx[key]), (key, onnx[key])
    assert len(onnx["ratio_per_round"]) == 2
    for key in ("overhead_wall_us", "overhead_stages_us", "untimed_us"):
        assert math.isfinite(onnx[key]), key
    assert set(onnx["daemon_stage_means_ms"]) >= {"inference", "decode", "preprocess"}
    assert onnx["daemon_errors"] == 0
    serial = report["serial"]
    assert _finite_positive(serial["ratio"])
    assert 0.0 < serial["capture_share"] < 1.0
    cold = report["cold_start"]
    assert _finite_positive(cold["first_result_s"])
    assert _finite_positive(cold["peak_rss_mib"])
    assert "skipped" in report["litert"]
    if "onnx_spare" in report:  # fewer CPUs than threads + 1: the spare-core figures too
        assert report["onnx_spare"]["threads"] < report["onnx"]["threads"]
        assert _finite_positive(report["onnx_spare"]["ratio"])
    text = format_report(report, "cmd")
    assert "daemon fps / bare session.run fps" in text
    assert text.count("PASS") + text.count("FAIL") >= 5
    assert text.rstrip().endswith("command: cmd")
    json.dumps(report)  # JSON-serialisable as written by --json


def test_cli_parses_its_options(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: dict[str, BenchConfig] = {}

    def fake_run(cfg: BenchConfig, log: object) -> dict[str, object]:
        seen["cfg"] = cfg
        raise SystemExit(0)

    monkeypatch.setattr("bench.pipeline.run_bench", fake_run)
    with pytest.raises(SystemExit):
        main(["--threads", "1", "--seconds", "3", "--json", str(tmp_path / "o.json"), "--no-litert"])
    assert seen["cfg"].threads == 1
    assert seen["cfg"].seconds == 3.0
    assert not seen["cfg"].litert
