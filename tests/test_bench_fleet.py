"""Smoke test of the fleet scale bench (bench/fleet.py) in its quick mode: 20 simulated devices
(real SyncAgent each, 2 worker processes) and one ladder step of 40.

Structure and correctness only (every device committed, the canary abort contained, no telemetry
lost): no absolute time and no throughput is checked, the CI machine is shared and noisy.
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

from bench.fleet import (  # noqa: E402
    BenchConfig,
    _parser,
    config_from_args,
    format_report,
    run_bench,
    summary_rows,
    synthetic_frames,
)


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_synthetic_frames_cover_every_class() -> None:
    frames = synthetic_frames(9)
    assert frames.shape == (9, 16, 16, 3)
    dominant = [int(f.reshape(-1, 3).mean(0).argmax()) for f in frames]
    assert dominant == [0, 1, 2] * 3  # BGR channel i % 3 dominates frame i


def test_cli_options_map_onto_the_config() -> None:
    cfg = config_from_args(_parser().parse_args(["--n", "300", "--workers", "3", "--canary", "5"]))
    assert (cfg.n, cfg.workers, cfg.canary_percent) == (300, 3, 5.0)
    assert cfg.max_n >= cfg.n and cfg.ladder()[0] == 600
    quick = config_from_args(_parser().parse_args(["--quick"]))
    assert quick.quick and quick.n == 20 and quick.ladder() == [40]
    assert config_from_args(_parser().parse_args(["--n", "50", "--max-n", "50"])).ladder() == []
    assert BenchConfig(n=100, camera_budget=1000).fps_for(4000) == pytest.approx(0.25)


@pytest.mark.slow
def test_quick_bench_commits_every_device_and_contains_the_bad_canary() -> None:
    cfg = BenchConfig.quick_config()
    report = run_bench(cfg, log=lambda _msg: None)
    json.dumps(report, default=str)  # what --json writes

    main = report["main"]
    n = cfg.n
    assert main["held"] and main["all_connected"] and main["connected"] == n
    assert sum(main["split"]) == n and len(main["split"]) == cfg.workers
    ro = main["rollout"]
    assert ro["all_committed"] and ro["committed"] == n and ro["failed"] == 0
    for name in ("accepted (downloading)", "downloaded (verifying)", "swapped in (probation)", "committed"):
        q = ro["phases"][name]
        assert q["count"] == n, name
        assert _finite(q["p50_s"]) and _finite(q["p100_s"]) and 0 < q["p50_s"] <= q["p100_s"], name
    assert ro["phases"]["swapped in (probation)"]["p100_s"] <= ro["phases"]["committed"]["p100_s"]
    cpu = ro["cpu"]
    assert _finite(cpu["broker_cpu_s"]) and cpu["broker_cpu_s"] >= 0 and cpu["workers_cpu_s"] > 0
    assert ro["fanout_bytes"] == ro["bundle_bytes"] * n

    tel = main["telemetry"]
    for mode in ("live", "drain"):
        t = tel[mode]
        assert t["produced"] > 0 and t["all_sent"], mode
        assert t["lost"] == 0 and t["unique"] >= t["produced"], mode
        assert len(t["per_consumer"]) == 2 and min(t["per_consumer"]) > 0, mode  # the group splits
        assert _finite(t["delivered_per_s"]) and t["delivered_per_s"] > 0, mode

    can = main["canary"]
    assert can["result"] == "aborted"
    assert can["canaries"] >= 1 and can["canaries_rolled_back"] == can["canaries"]
    assert can["canaries_committed_bad"] == 0
    assert can["non_canaries_touched_bad"] == 0 and can["non_canaries_loaded_bad"] == 0
    assert can["devices_loaded_bad"] == can["canaries"]
    assert can["rollback_document"] == "1.1.0"
    assert can["serving_after"] == {"1.1.0": n} and can["all_back_on_previous"]
    assert can["not_acknowledged_count"] == 0  # canaries still in probation act on the re-issued document

    (step,) = report["ladder"]
    assert step["n"] == 40 and step["held"] and step["rollout"]["committed"] == 40
    assert report["largest_n"] == 40 and report["limit_kind"] == "not reached"

    rows = summary_rows(report)
    assert all(r[3] != "FAIL" for r in rows), [r for r in rows if r[3] == "FAIL"]
    text = format_report(report, "PYTHONPATH=. python bench/fleet.py --quick")
    assert "publish start -> 100 % committed" in text and "largest N held" in text
    assert "command: PYTHONPATH=. python bench/fleet.py --quick" in text
