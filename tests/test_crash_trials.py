"""kill -9 at random points of fleet updates: the device always comes back serving a good model.

Runs the harness of ``bench/crash_trials.py`` (see its docstring): a real mosquitto, an operator
publishing signed updates (good versions, and a collapsed model that probation must roll back),
the real daemon as a subprocess killed with SIGKILL at a random point of download, verify,
unpack/stage, self-test, probation, commit or rollback, then restarted. ``EDGERT_CRASH_TRIALS``
sets the number of trials (default 50), ``EDGERT_CRASH_SEED`` replays a failed run's schedule
(the seed is in every failure message).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("bench") is None:  # pytest run without the repo root on sys.path
    sys.path.insert(0, str(REPO))

from bench.crash_trials import PHASES, TrialsConfig, format_report, run_trials  # noqa: E402

TRIALS = int(os.environ.get("EDGERT_CRASH_TRIALS", "50"))
SEED = int(os.environ["EDGERT_CRASH_SEED"]) if os.environ.get("EDGERT_CRASH_SEED") else None


def test_kill_9_at_random_points_of_updates_never_leaves_the_device_without_a_good_model(
    tmp_path: Path,
) -> None:
    report = run_trials(TrialsConfig(trials=TRIALS, seed=SEED, workdir=tmp_path / "trials"))
    text = format_report(report)
    print(text)
    s = report.summary()
    why = f"replay with EDGERT_CRASH_SEED={s['seed']}\n{text}"
    assert s["trials"] == TRIALS, why
    # (a) serving after every restart, (b) a bundle that passes its self-test, (c) converged
    assert s["without_working_model"] == 0, why
    assert s["restart_to_serving_s"]["n"] == TRIALS, why
    assert s["selftest_failures"] == 0, why
    assert s["convergence_failures"] == 0, why
    assert s["unreported_restarts"] == 0, why
    assert s["failed_trials"] == 0, why
    # every phase was really interrupted: the trigger of each target phase was hit at least once
    for phase in PHASES:
        assert s["kills_per_target"][phase] >= TRIALS // len(PHASES), why
        assert s["triggers_hit_per_target"][phase] >= 1, f"{phase} never interrupted; {why}"
    outcomes = s["outcomes"]
    assert outcomes.get("committed (good)", 0) >= 1 and outcomes.get("rolled_back (bad)", 0) >= 1, why
    # no unhandled exception in any daemon, nothing left behind by the kills
    assert s["daemon_tracebacks"] == 0, f"{report.tracebacks[:3]}\n{why}"
    assert s["leftovers_after_convergence"] == 0, why
    assert s["final_leftovers"] == [], why
