"""Smoke test of the fleet sync bench (bench/sync.py) in a reduced mode: a 1 MB bundle, one round.

Structure and sane (finite, positive) figures only: no absolute time, no ratio and no goal is
checked, the CI machine is noisy.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("bench") is None:  # pytest run without the repo root on sys.path
    sys.path.insert(0, str(REPO))

from bench.sync import KIB, SECTIONS, BenchConfig, format_report, main, raw_transfer, run_bench  # noqa: E402


def _positive(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _cfg() -> BenchConfig:
    return BenchConfig(
        bundle_mb=1.0,
        rounds=1,
        chunk_sizes=(256 * KIB, 512 * KIB),
        windows=(8,),
        resume_runs=1,
        probation_s=0.5,
        probation_min_frames=5,
        publishes=1,
        telemetry_s=1.0,
        put_s=0.3,
        prefill=300,
        quiet_budget_s=0.0,
    )


def test_raw_transfer_moves_every_byte() -> None:
    payload = bytes(range(256)) * 4096
    assert _positive(raw_transfer(payload)["s"])


def test_bench_runs_every_section_and_reports_positive_figures() -> None:
    report = run_bench(_cfg(), log=lambda _msg: None)

    t = report["transfer"]
    arms: dict[str, Any] = t["arms"]
    expected = {"raw_tcp", "raw_tls", "mqtt_256k_w32", "mqtt_512k_w32", "mqtt_256k_w8"}
    expected |= {"transport_only", "assembler_only", "exp_nodelay", "exp_nodelay_noreadback"}
    assert expected | {"exp_nodelay_noreadback_sync8m"} == set(arms)
    for name, arm in arms.items():
        assert _positive(arm["s"]) and _positive(arm["ratio"]) and _positive(arm["mb_per_s"]), name
        if name.startswith(("mqtt_", "exp_")):
            tl = arm["timeline_ms"]
            assert {"meta", "first_chunk", "last_chunk", "finish_start", "finished"} <= set(tl), name
            assert tl["meta"] <= tl["finished"]
            assert arm["chunk_msgs"] >= arm["n_chunks"] > 0
            assert _positive(arm["cpu_s"]["device agent thread (sha256, write, fsync)"])
    assert _positive(t["bundle_bytes"]) and _positive(t["sha256_s"])
    assert t["rounds"]["used"] == 1
    for rt in t["publish_document_ms"].values():  # the default and the nodelay broker
        assert _positive(rt["first"]) and _positive(rt["next_median"])

    r = report["resume"]
    cut = r["cut"]
    assert _positive(cut["cut_to_verified_s"]) and _positive(cut["delivered_bytes"])
    assert cut["refetched_bytes"] >= 0
    restart = r["restart"]
    assert restart["fetched_after_bytes"] + restart["on_disk_bytes"] >= restart["bundle_bytes"] > 0
    assert _positive(restart["restart_to_verified_s"])

    p = report["publish"]
    assert len(p["runs"]) == 1
    run = p["runs"][0]
    assert _positive(run["total_s"])
    assert {"upload (chunks + meta)", "publish_document"} <= set(run["steps_s"])
    assert any(k.endswith("-> committed") for k in run["steps_s"])
    assert p["model_swaps"] == 1

    m = report["telemetry"]
    for key in ("e2e_per_s", "sender_per_s", "drain_per_s", "put_per_s", "put_many_per_s"):
        assert _positive(m[key]), key
    assert m["received"] + m["lost"] == m["produced"] > 0
    assert m["drain_received"] + m["drain_lost"] == m["drain_records"] == 300
    assert _positive(m["drain_received_per_s"]) and m["broker_drop_notes"] >= 0

    assert report["needed_changes"], "the experiments yield suggested changes"
    text = format_report(report, "PYTHONPATH=. python bench/sync.py --rounds 1")
    assert "bundle transfer / raw TCP throughput" in text
    assert text.count("PASS") + text.count("FAIL") >= 5
    assert "where the transfer time goes:" in text
    assert text.rstrip().endswith("command: PYTHONPATH=. python bench/sync.py --rounds 1")
    json.dumps(report)  # JSON-serialisable as written by --json


def test_cli_parses_its_options(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: dict[str, BenchConfig] = {}

    def fake_run(cfg: BenchConfig, log: object) -> dict[str, object]:
        seen["cfg"] = cfg
        raise SystemExit(0)

    monkeypatch.setattr("bench.sync.run_bench", fake_run)
    with pytest.raises(SystemExit):
        main(["--rounds", "2", "--chunk-kib", "64,1024", "--windows", "", "--no-experiments",
              "--only", "transfer,telemetry", "--json", str(tmp_path / "o.json")])  # fmt: skip
    cfg = seen["cfg"]
    assert cfg.rounds == 2 and cfg.chunk_sizes == (64 * KIB, 1024 * KIB) and cfg.windows == ()
    assert not cfg.experiments and cfg.sections == ("transfer", "telemetry")
    with pytest.raises(SystemExit, match="unknown section"):
        main(["--only", "nope"])
    assert set(SECTIONS) == {"transfer", "resume", "publish", "telemetry"}
