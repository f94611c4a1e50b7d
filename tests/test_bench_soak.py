"""The long soak (bench/soak.py), run for ~40 s: structure of the samples and the analysis.

Only shapes and signs are checked (samples positive, every metric analysed, no record lost):
the CI machine is shared, so no absolute value and no growth limit is asserted on the real run;
the limits themselves are checked on synthetic samples.
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

from bench.soak import LIMITS, SoakConfig, analyse, format_report, main, run_soak, summary_rows  # noqa: E402


def _sample(t: float, **values: Any) -> dict[str, Any]:
    base = {
        "t_s": t, "rss_mib": 100.0, "fds": 14, "threads": 12, "outbox_kib": 500.0, "pending": 0,
        "inf_p50_ms": 0.5, "inf_p95_ms": 0.8, "fps": 15.0, "steady": True, "other_load": 0.1,
    }  # fmt: skip
    return {**base, **values}


def test_analysis_flags_growth_beyond_the_limits_and_not_a_flat_run() -> None:
    flat = [_sample(10.0 * i) for i in range(40)]
    result = analyse(flat, warmup_s=50)
    assert set(result["metrics"]) == set(LIMITS)
    assert not any(m["flagged"] for m in result["metrics"].values())
    assert result["metrics"]["rss_mib"]["slope_per_h"] == pytest.approx(0.0, abs=1e-6)
    leak = [
        _sample(10.0 * i, rss_mib=100.0 + i, fds=14 + i // 5, inf_p50_ms=0.5 + 0.05 * i, fps=15.0 - 0.2 * i)
        for i in range(40)
    ]
    result = analyse(leak, warmup_s=0)
    flagged = {k for k, m in result["metrics"].items() if m["flagged"]}
    assert flagged == {"rss_mib", "fds", "inf_p50_ms", "fps"}
    assert result["metrics"]["rss_mib"]["slope_per_h"] == pytest.approx(360.0)  # 1 MiB per 10 s
    # latency in an outage (not steady) is left out when the quarter has steady samples
    noisy = [_sample(10.0 * i, inf_p50_ms=5.0 if i % 2 else 0.5, steady=not i % 2) for i in range(40)]
    assert not analyse(noisy, warmup_s=0)["metrics"]["inf_p50_ms"]["flagged"]
    assert "note" in analyse(flat[:3], warmup_s=0)


def test_rss_steps_at_updates_are_told_apart_from_growth_between_them() -> None:
    # flat, +8 MiB across an update window at 100-130 s, flat, +2 MiB across one at 200-230 s
    rss = [100.0 if t < 110 else 108.0 if t < 210 else 110.0 for t in range(0, 300, 10)]
    samples = [_sample(float(t), rss_mib=v) for t, v in zip(range(0, 300, 10), rss, strict=True)]
    rb = analyse(samples, warmup_s=0, busy=[(100, 130), (200, 230)])["rss_between_updates"]
    assert rb["stretches"] == 3 and rb["steps_mib"] == [8.0, 2.0]
    assert rb["change_mib"] == pytest.approx(0.0)
    leak = [_sample(float(t), rss_mib=100.0 + t / 10) for t in range(0, 300, 10)]
    assert analyse(leak, warmup_s=0, busy=[(100, 130)])["rss_between_updates"]["per_h_mib"] == pytest.approx(
        360.0
    )


def test_cli_parses_its_options(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: dict[str, SoakConfig] = {}

    def fake_run(cfg: SoakConfig, log: object) -> dict[str, Any]:
        seen["cfg"] = cfg
        raise SystemExit(0)

    monkeypatch.setattr("bench.soak.run_soak", fake_run)
    with pytest.raises(SystemExit):
        main(["--minutes", "5", "--interval", "3", "--updates", "2", "--outage-every", "0",
              "--json", str(tmp_path / "o.json")])  # fmt: skip
    cfg = seen["cfg"]
    assert (cfg.minutes, cfg.interval_s, cfg.updates, cfg.outage_every_s) == (5.0, 3.0, 2, 0.0)


@pytest.mark.slow
def test_soak_samples_the_daemon_and_reports_growth(tmp_path: Path) -> None:
    cfg = SoakConfig(
        minutes=0.6, interval_s=2.0, telemetry_interval_s=1.0, outage_every_s=12.0, outage_min_s=2.0,
        outage_max_s=3.0, updates=1, probation_s=2.0, warmup_s=4.0, workdir=tmp_path,
    )  # fmt: skip
    report = run_soak(cfg)
    samples = report["samples"]
    assert len(samples) >= 10
    for s in samples:
        for key in ("rss_mib", "fds", "threads", "outbox_kib", "state_dir_mib"):
            assert s[key] > 0, (key, s)
        assert s["pending"] >= 0 and s["children"] >= 0
    measured = [s for s in samples if s["frames"] > 0]
    assert len(measured) >= len(samples) - 2
    for s in measured:
        assert s["fps"] > 0 and 0 < s["inf_p50_ms"] <= s["inf_p95_ms"]
    assert any(not s["broker_up"] for s in samples)  # sampled during an outage too
    assert report["outages"] and [o["index"] for o in report["outages"]] == list(
        range(len(report["outages"]))
    )
    assert all(o["down_s"] > 0 for o in report["outages"])
    metrics = report["analysis"]["metrics"]
    assert set(metrics) == set(LIMITS)
    for m in metrics.values():
        assert m["first"] is not None and m["last"] is not None and m["slope_per_h"] is not None
        assert math.isfinite(m["change"])
    assert metrics["rss_mib"]["first"] > 0 and metrics["fps"]["first"] > 0
    assert report["analysis"]["rss_between_updates"]["stretches"] >= 1
    (update,) = report["updates"]
    assert update["version"] == "1.1.0" and not update["publish_error"]
    assert update["outcome"] in ("committed", "rolled_back")
    e2e = report["end_to_end"]
    assert e2e["produced"] > 0 and e2e["lost"] == 0 and e2e["conflicts"] == 0
    assert e2e["dropped"] == 0 and e2e["expired"] == 0
    assert report["exit_code"] == 0 and report["daemon_log"]["tracebacks"] == 0
    text = format_report(report, "cmd")
    for label, *_ in LIMITS.values():
        assert label in text
    assert len(summary_rows(report)) == len(LIMITS) + 2
    assert text.rstrip().endswith("command: cmd")
    json.dumps(report)
