"""The outage soak (bench/outage.py) in a CI size: broker outages and daemon restarts lose no record.

A real mosquitto, the real daemon as a subprocess (SIGTERM and SIGKILL restarts, one of them in
an outage, one in the drain right after one) and a consumer with a persistent session. What is
checked is exact accounting (every seq produced arrives or is still in the outbox), never a time.
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("bench") is None:  # pytest run without the repo root on sys.path
    sys.path.insert(0, str(REPO))

from bench.outage import OutageConfig, format_report, make_plan, run_outage, summary_rows  # noqa: E402


@pytest.mark.parametrize("seed", range(20))
def test_the_plan_puts_restarts_in_outages_and_drains(seed: int) -> None:
    cfg = OutageConfig(minutes=5, cycles=6, restarts=4, kills=2, seed=seed)
    plan = make_plan(cfg, random.Random(seed))
    assert [s.at for s in plan] == sorted(s.at for s in plan)
    stops = [s.at for s in plan if s.action == "broker_stop"]
    starts = [s.at for s in plan if s.action == "broker_start"]
    assert len(stops) == len(starts) == 6
    assert all(a < b for a, b in zip(stops, starts, strict=True))
    assert all(b < a for b, a in zip(starts, stops[1:], strict=False))  # one outage at a time
    restarts = [s for s in plan if s.action == "restart"]
    assert len(restarts) == 4 and sum(s.kill for s in restarts) == 2
    assert any(not s.kill and s.where == "during outage" for s in restarts)
    assert any(s.kill and s.where.startswith("in the drain") for s in restarts)
    assert any(s.kill and s.where == "during outage" for s in restarts)
    for s in restarts:
        if s.where == "during outage":
            assert stops[s.outage] < s.at < starts[s.outage]
    total = cfg.minutes * 60
    assert max(s.at for s in plan) < total - 8  # the tail is free of outages and restarts


@pytest.mark.slow
def test_outages_and_restarts_lose_no_record(tmp_path: Path) -> None:
    cfg = OutageConfig(minutes=0.8, cycles=3, restarts=3, kills=2, seed=3, workdir=tmp_path)
    report = run_outage(cfg)
    assert report["produced"] > 0
    assert report["lost"] == 0, report["lost_seqs"]
    assert report["delivered"] + report["pending_at_end"] == report["produced"]
    assert report["unknown_seqs"] == 0 and report["conflicts"] == 0 and report["unparsed"] == 0
    assert report["dropped"] == 0 and report["expired"] == 0
    assert report["duplicates"] >= 0
    streams = report["streams"]
    assert streams["telemetry"]["produced"] > 0
    assert sum(v["produced"] for v in streams.values()) == report["produced"]
    # every planned restart happened: SIGTERM exits 0, SIGKILL -9, each boot opened the outbox
    restarts = report["restarts"]
    assert len(restarts) == 3
    assert sorted(r["exit_code"] for r in restarts if r["kill"]) == [-9, -9]
    assert all(c == 0 for c in report["graceful_exit_codes"])
    assert any(not r["broker_up"] for r in restarts)  # at least one restart during an outage
    assert len(report["daemon_boots"]) == 4
    # a restart during an outage keeps the backlog: the next boot finds it in the outbox
    assert any(boot[0] > 0 for boot in report["daemon_boots"][1:])
    assert report["hwm_rows"] > 0 and report["last_drain_s"] is not None and report["last_drain_s"] > 0
    assert all(o["backlog_rows"] > 0 for o in report["outages"])
    assert report["daemon_log"]["tracebacks"] == 0
    text = format_report(report, "cmd")
    assert "lost (produced - delivered - pending at end)" in text
    assert [row[3] for row in summary_rows(report) if row[3] != "-"] == ["PASS"] * 4
    assert text.rstrip().endswith("command: cmd")
    json.dumps(report)  # JSON-serialisable as written by --json
