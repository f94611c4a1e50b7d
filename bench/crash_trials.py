"""Crash trials: ``kill -9`` the edgert daemon at random points of fleet updates, restart it, check it.

Run from the repository root (the device venv plus paho-mqtt and onnx; mosquitto installed, see
``scripts/ensure-mosquitto.sh``)::

    PYTHONPATH=. python bench/crash_trials.py --trials 200 [--seed N] [--json out.json]

Everything runs against real processes: one real mosquitto for the whole run (``tests/mqtt_broker.py``:
generated fleet PKI, mutual TLS, the fleet ACL), one operator :class:`FleetClient`, and one device
whose state directory is kept across all trials. The device is the real daemon,
``python -m edge_runtime run --config edgert.toml``, started as a subprocess in its own session: the
demo shapes bundle (``models/demo/shapes``, trusted with ``models/demo/keys/demo.pub``) is its
factory bundle, the demo video looped at ``--fps`` its source, a JSONL file its sink, ``[sync]`` on
(with the candidate probe child, as shipped).

Before the first trial the operator uploads, retained, a few signed candidates: good ones
``1.1.0 .. 1.N.0`` (the demo model re-packed with a ``--pad-kb`` pad file, so a download takes many
``--chunk-kb`` chunks) and a bad ``9.0.0`` whose outputs collapse onto one class
(``sync_helpers.collapse``), which probation must roll back. Every document uses a short probation
(``Rollout(probation_s=--probation, probation_min_frames=--min-frames)``; the latency and fps rules
are relaxed because the machine is shared, the output-distribution rules are the shipped ones).

One trial:

1. The target phase is drawn uniformly from :data:`PHASES` (balanced: every block of 7 trials is a
   random permutation of the 7 phases). The candidate is the bad one for ``rollback``, a good one for
   ``commit``, else bad with probability ``--bad-share``. A good candidate is never the serving one,
   and for ``download``/``verify``/``stage`` never the one still in the previous slot (that would
   skip the download).
2. The operator publishes a signed desired document for group ``cams`` (``rollback: true`` when the
   good version is lower than the serving one, as ``edgert fleet rollback`` does).
3. The harness polls ``state.json`` every few ms (and ``slots/`` more closely for the
   ``.unpack-*``/``.staging-*`` directory of an install).
   When the trial's document reaches the trigger of the target phase (:data:`TRIGGER`), it waits a
   random 0..N ms (:data:`DELAY_MS`, times ``--delay-scale``) and sends SIGKILL to the daemon's
   process group (as systemd kills a crashed unit's cgroup, the probe child included).
4. It reads the durable state left on disk (the phase at the kill) and restarts the daemon, then
   checks, with no further operator action:

   a. **serving**: the restarted daemon writes a result naming a model to its JSONL sink within
      ``--serve-timeout`` (restart-to-serving time: from the spawn to that first result);
   b. **self-test**: the bundle it serves (the slot whose record names the served version, or the
      factory bundle) passes ``edgert bundle verify DIR --key ... --selftest`` (run in-process);
   c. **convergence**: the device ends the trial's document in the expected outcome: a good
      candidate interrupted before probation is installed again and committed; one interrupted
      in probation is rolled back ("daemon restarted during probation": an uncommitted update never
      survives a restart, and the same document is not retried); one whose commit is on disk stays
      committed; the bad candidate always ends rolled back to the last good model. ``state.json``,
      the model the JSONL results name and the retained ``state`` message all agree;
   d. **reported**: when the restart changed the saved state (an update in flight was dropped or
      rolled back) the daemon reports it as a boot note (``update`` event).

Printed (and written with ``--json``): the seed (``--seed`` replays the same schedule of phases,
candidates and delays; the timing of the machine is not replayed), kills per target phase and per
phase on disk at the kill, devices without a working model, self-test failures, convergence
failures, unreported restarts, restart-to-serving times, the boot notes seen, tracebacks in the
daemon logs and files left behind by the kills.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import random
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``bench`` and ``edge_runtime`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge_runtime.bundle import generate_keypair, load_private_key
from edge_runtime.sync.mqtt import LinkSettings
from edge_runtime.sync.protocol import DesiredBundle, Rollout, semver_key
from edge_runtime.sync.publisher import FleetClient

__all__ = [
    "DELAY_MS",
    "PHASES",
    "TRIGGER",
    "CrashRig",
    "TrialResult",
    "TrialsConfig",
    "TrialsReport",
    "format_report",
    "main",
    "run_trials",
]

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
DEMO = REPO / "models" / "demo"
DEMO_PUB = DEMO / "keys" / "demo.pub"
FLEET = "test"
DEVICE = "dev1"
GROUP = "cams"
OPERATOR = "fleet-admin"
FACTORY_VERSION = "1.0.0"
BAD_VERSION = "9.0.0"

PHASES: tuple[str, ...] = ("download", "verify", "stage", "selftest", "probation", "commit", "rollback")
TRIGGER: dict[str, str] = {
    "download": "state.json phase downloading",
    "verify": "state.json phase verifying",
    "stage": "a slots/.unpack-* or .staging-* directory (the bundle is unpacked into a slot)",
    "selftest": "state.json phase selftest",
    "probation": "state.json phase probation",
    "commit": "state.json phase committed (outcome of the trial's document)",
    "rollback": "state.json phase rolled_back (outcome of the trial's document)",
}
_TRIGGER_PHASE: dict[str, str] = {
    "download": "downloading",
    "verify": "verifying",
    "selftest": "selftest",
    "probation": "probation",
    "commit": "committed",
    "rollback": "rolled_back",
}
DELAY_MS: dict[str, float] = {
    "download": 150.0,
    "verify": 20.0,
    "stage": 8.0,
    "selftest": 300.0,
    "probation": 500.0,
    "commit": 40.0,
    "rollback": 40.0,
}
"""Upper bound of the random delay between the trigger and the kill, per target phase."""

_ORDER = {"download": 0, "verify": 1, "stage": 2, "selftest": 3, "probation": 4, "commit": 5, "rollback": 5}
_PHASE_ORDER = {"downloading": 0, "verifying": 1, "staged": 2.5, "selftest": 3, "probation": 4}
_PRE_ACTIVE = frozenset({"downloading", "verifying", "staged", "selftest"})
_TERMINAL = frozenset({"committed", "rolled_back", "rejected"})
BOOT_NOTE_RE = re.compile(r"restarted during|falling back to|failed at boot|state reconstructed")
_VERSION_RE = re.compile(r"\d+\.\d+\.\d+")


def _tests_on_path() -> None:
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))


@dataclass
class TrialsConfig:
    """What to run; the defaults are the documented configuration."""

    trials: int = 200
    seed: int | None = None
    """None: a random seed (printed, so the schedule can be replayed)."""
    fps: float = 30.0
    probation_s: float = 1.0
    min_frames: int = 10
    good_versions: int = 4
    bad_share: float = 0.3
    pad_kb: int = 1024
    chunk_kb: int = 16
    delay_scale: float = 1.0
    probe: bool = True
    poll_s: float = 0.003
    trigger_timeout_s: float = 60.0
    serve_timeout_s: float = 60.0
    converge_timeout_s: float = 120.0
    workdir: Path | None = None
    """None: a temporary directory, removed at the end unless ``keep``."""
    keep: bool = False
    verbose: bool = True


@dataclass
class TrialResult:
    """One kill and what followed."""

    index: int
    target: str
    version: str
    good: bool
    base: str
    """the committed version before the trial (the last good model)"""
    sequence: int = 0
    delay_ms: float = 0.0
    trigger: str = ""
    """hit (the trigger was seen), passed (the update went past it first), timeout, died"""
    phase_at_kill: str = ""
    """the phase saved on disk when the daemon died (``+outcome`` when the document had ended)"""
    on_disk: list[str] = field(default_factory=list)
    """interrupted-operation files present right after the kill"""
    serving: bool = False
    serve_s: float | None = None
    served: str = ""
    selftest_ok: bool = False
    selftest: str = ""
    expected: str = ""
    expected_version: str = ""
    outcome: str = ""
    outcome_version: str = ""
    converged: bool = False
    converge_s: float | None = None
    boot_notes: list[str] = field(default_factory=list)
    note_expected: bool = False
    leftovers: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


@dataclass
class TrialsReport:
    """Everything a run measured."""

    seed: int
    config: dict[str, Any]
    results: list[TrialResult]
    duration_s: float
    tracebacks: list[str]
    final_leftovers: list[str]

    def summary(self) -> dict[str, Any]:
        """The counts the run is judged by."""
        rs = self.results
        serve = [r.serve_s for r in rs if r.serve_s is not None]
        conv = [r.converge_s for r in rs if r.converge_s is not None]
        notes: Counter[str] = Counter()
        for r in rs:
            for note in r.boot_notes:
                notes[_VERSION_RE.sub("X.Y.Z", note)] += 1
        return {
            "seed": self.seed,
            "trials": len(rs),
            "kills_per_target": {p: sum(r.target == p for r in rs) for p in PHASES},
            "triggers_hit_per_target": {
                p: sum(r.target == p and r.trigger == "hit" for r in rs) for p in PHASES
            },
            "phase_at_kill": dict(Counter(r.phase_at_kill for r in rs).most_common()),
            "interrupted_files_at_kill": dict(Counter(_kind(f) for r in rs for f in r.on_disk).most_common()),
            "outcomes": dict(Counter(f"{r.outcome or '-'} ({'good' if r.good else 'bad'})" for r in rs)),
            "good_rolled_back_by_kill_in_probation": sum(r.good and r.expected == "rolled_back" for r in rs),
            "without_working_model": sum(not r.serving for r in rs),
            "selftest_failures": sum(r.serving and not r.selftest_ok for r in rs),
            "convergence_failures": sum(not r.converged for r in rs),
            "unreported_restarts": sum(r.note_expected and not r.boot_notes for r in rs),
            "failed_trials": sum(bool(r.failures) for r in rs),
            "restart_to_serving_s": _dist(serve),
            "restart_to_converged_s": _dist(conv),
            "boot_notes": dict(notes.most_common()),
            "daemon_tracebacks": len(self.tracebacks),
            "leftovers_after_convergence": sum(len(r.leftovers) for r in rs),
            "final_leftovers": list(self.final_leftovers),
            "duration_s": round(self.duration_s, 1),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "summary": self.summary(),
            "config": self.config,
            "tracebacks": self.tracebacks,
            "trials": [asdict(r) for r in self.results],
        }


def _kind(name: str) -> str:
    for marker in (".staging-", ".trash-", ".unpack-", ".part", ".progress", ".edgebundle", "state.json.tmp"):
        if marker in name:
            return marker.strip(".-") if marker != "state.json.tmp" else marker
    return name


def _dist(values: Sequence[float]) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0, "median": None, "p90": None, "max": None}
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return {
        "n": len(ordered),
        "median": round(statistics.median(ordered), 3),
        "p90": round(p90, 3),
        "max": round(ordered[-1], 3),
    }


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# -- the device ------------------------------------------------------------------------------------
_REBOOTED = (
    "import pathlib, sys; import edge_runtime.sync.outbox as o; "
    "o._BOOT_ID_FILE = pathlib.Path(sys.argv.pop(1)); from edge_runtime.cli import main; sys.exit(main())"
)
"""``python -c`` program: the edgert command, reading the Linux boot id from the file in argv[1]."""


class DaemonProcess:
    """``python -m edge_runtime run --config FILE`` in its own session; stderr appended to a log.

    With ``boot_id_file``, every start is a start after a reboot, as after a power cut: the
    daemon is the same ``edgert run`` command, except that the outbox reads the Linux boot id
    from that file, which gets a new id before each start.
    """

    def __init__(self, config: Path, log_path: Path, boot_id_file: Path | None = None) -> None:
        self.config = config
        self.log_path = log_path
        self.boot_id_file = boot_id_file
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._log_offset = 0

    def start(self) -> None:
        self.starts += 1
        argv = [sys.executable, "-m", "edge_runtime", "run", "--config", str(self.config)]
        if self.boot_id_file is not None:
            self.boot_id_file.write_text(f"{uuid.uuid4()}\n")
            argv = [sys.executable, "-c", _REBOOTED, str(self.boot_id_file), *argv[3:]]
        with self.log_path.open("ab") as log:
            self._log_offset = log.tell()
            log.write(f"\n===== start {self.starts} at {time.time():.3f} =====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                argv,
                env={**os.environ, "PYTHONPATH": str(REPO)},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,
            )

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group (the daemon and a probe child), then reap the daemon."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        """SIGTERM (a clean stop), SIGKILL after 30 s; then make sure the group is gone."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)
        self.kill()

    def log_tail(self, chars: int = 3000) -> str:
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(self._log_offset)
                text = fh.read().decode(errors="replace")
        except OSError:
            return ""
        return text[-chars:]


class ResultTail:
    """Reads the daemon's JSONL results as they are appended (complete lines only)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._rest = b""
        self.lines = 0
        self.latest: str = ""

    def reset(self) -> None:
        """Forget the old results (call while the daemon is dead)."""
        self.path.unlink(missing_ok=True)
        self._offset = 0
        self._rest = b""
        self.lines = 0
        self.latest = ""

    def poll(self) -> str:
        """The model tag (``name@version``) of the newest complete result line; "" if none yet."""
        try:
            with self.path.open("rb") as fh:
                fh.seek(self._offset)
                data = fh.read()
        except FileNotFoundError:
            return self.latest
        self._offset += len(data)
        *complete, self._rest = (self._rest + data).split(b"\n")
        for line in complete:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("model"), str):
                self.lines += 1
                self.latest = row["model"]
        return self.latest


@dataclass(frozen=True)
class Candidate:
    version: str
    good: bool
    bundle: DesiredBundle


class CrashRig:
    """The broker, the operator, the candidates and the device daemon shared by all trials."""

    def __init__(self, cfg: TrialsConfig, work: Path) -> None:
        _tests_on_path()
        importlib.import_module("conftest")  # tests/sync_helpers imports it (test fixtures, DEMO)
        from mqtt_broker import Broker

        self.cfg = cfg
        self.work = work
        self.state_dir = work / "state"
        self.sync_dir = self.state_dir / "sync"
        self.state_path = self.sync_dir / "state.json"
        self.slots = self.sync_dir / "slots"
        self.downloads = self.sync_dir / "downloads"
        self.priv, self.pub = generate_keypair(work / "keys", "fleet")
        self.broker = Broker(work / "broker", fleet=FLEET, devices={DEVICE: [GROUP]}, operators=[OPERATOR])
        self.fleet: FleetClient | None = None
        self.watcher: Any = None
        self.candidates: dict[str, Candidate] = {}
        self.results = ResultTail(work / "results.jsonl")
        self.daemon = DaemonProcess(work / "edgert.toml", work / "daemon.log")
        self.rollout = Rollout(
            probation_s=cfg.probation_s,
            probation_min_frames=cfg.min_frames,
            max_latency_ratio=50.0,
            min_fps_ratio=0.02,
        )

    # -- setup -----------------------------------------------------------------------------------
    def start(self) -> None:
        self.broker.start()
        cert, key = self.broker.client_cert(OPERATOR)
        settings = LinkSettings(
            host="127.0.0.1", port=self.broker.port, client_id="crash-trials-operator",
            ca_file=self.broker.ca_path, cert_file=cert, key_file=key,
        )  # fmt: skip
        self.fleet = FleetClient(settings, FLEET)
        self.fleet.connect()
        self.watcher = self.broker.client(OPERATOR, client_id="crash-trials-watcher")
        for leaf in ("update", "state"):
            self.watcher.subscribe_wait(f"edgert/{FLEET}/device/{DEVICE}/{leaf}")
        self._make_candidates()
        self._write_config()

    def _make_candidates(self) -> None:
        from sync_helpers import collapse, make_candidate

        assert self.fleet is not None
        out = self.work / "candidates"
        out.mkdir(parents=True, exist_ok=True)
        pad = out / "pad.bin"
        pad.write_bytes(random.Random(0).randbytes(self.cfg.pad_kb * 1024))
        extra = {"pad.bin": pad} if self.cfg.pad_kb else {}
        versions = [(f"1.{i}.0", True) for i in range(1, self.cfg.good_versions + 1)] + [(BAD_VERSION, False)]
        for version, good in versions:
            packed = make_candidate(out, self.priv, version, None if good else collapse, extra_files=extra)
            bundle, _ = self.fleet.upload_bundle(packed, chunk_size=self.cfg.chunk_kb * 1024)
            self.candidates[version] = Candidate(version, good, bundle)

    def _write_config(self) -> None:
        cert, key = self.broker.client_cert(DEVICE)
        text = (
            f'[model]\nbundle = "{DEMO / "shapes"}"\nformat = "onnx"\nthreads = 1\n'
            f'[source]\nkind = "video"\nuri = "{DEMO / "shapes.avi"}"\nloop = true\n'
            f"[pipeline]\nmax_fps = {self.cfg.fps}\n"
            f'[[sinks]]\nkind = "jsonl"\npath = "{self.results.path}"\nflush_every = 1\n'
            f'[trust]\nkeys = ["{DEMO_PUB}", "{self.pub}"]\n'
            f'[state]\ndir = "{self.state_dir}"\n'
            "[log]\nstats_interval_s = 0\n"
            f'[sync]\nenabled = true\nhost = "127.0.0.1"\nport = {self.broker.port}\nfleet = "{FLEET}"\n'
            f'device_id = "{DEVICE}"\ngroups = ["{GROUP}"]\nca_file = "{self.broker.ca_path}"\n'
            f'cert_file = "{cert}"\nkey_file = "{key}"\ntelemetry_interval_s = 5.0\n'
            f"probe = {'true' if self.cfg.probe else 'false'}\n"
        )
        self.daemon.config.write_text(text)

    def close(self) -> None:
        self.daemon.stop()
        if self.fleet is not None:
            self.fleet.close()
        self.broker.close()

    # -- observations ----------------------------------------------------------------------------
    def state(self) -> dict[str, Any] | None:
        """``state.json`` as the daemon would load it (``.prev`` when it is missing or damaged)."""
        for path in (self.state_path, self.sync_dir / "state.json.prev"):
            data = _read_json(path)
            if data is not None and "phase" in data:
                return data
        return None

    def committed_version(self) -> str:
        st = self.state() or {}
        active = st.get("active") or {}
        return str(active.get("version") or FACTORY_VERSION)

    def previous_sha(self) -> str | None:
        st = self.state() or {}
        prev = st.get("previous") or {}
        sha = prev.get("sha256")
        return str(sha) if sha else None

    def interrupted_files(self) -> list[str]:
        """Files of interrupted operations in the state directory."""
        found: list[str] = []
        for directory in (self.slots, self.downloads):
            with contextlib.suppress(OSError):
                found += [
                    f"{directory.name}/{p.name}" for p in directory.iterdir() if p.name not in ("a", "b")
                ]
        if (self.sync_dir / "state.json.tmp").exists():
            found.append("state.json.tmp")
        return sorted(found)

    def stale_tmp_dirs(self) -> list[str]:
        """Unpack folders of daemons that died (``state/tmp/edgert-*``), the running one excluded."""
        tmp = self.state_dir / "tmp"
        try:
            dirs = sorted(p for p in tmp.iterdir() if p.name.startswith("edgert-"))
        except OSError:
            return []
        # the running daemon made the newest one
        return [f"tmp/{p.name}" for p in sorted(dirs, key=lambda p: p.stat().st_mtime)[:-1]]

    def update_events(self, since: int = 0) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for msg in self.watcher.messages(f"edgert/{FLEET}/device/{DEVICE}/update")[since:]:
            with contextlib.suppress(ValueError):
                out.append(json.loads(msg.payload))
        return out

    def n_updates(self) -> int:
        return len(self.watcher.messages(f"edgert/{FLEET}/device/{DEVICE}/update"))

    def retained_state(self) -> dict[str, Any]:
        msgs = self.watcher.messages(f"edgert/{FLEET}/device/{DEVICE}/state")
        if not msgs:
            return {}
        with contextlib.suppress(ValueError):
            body = json.loads(msgs[-1].payload)
            if isinstance(body, dict):
                return body
        return {}

    def served_bundle(self, version: str) -> Path | None:
        """The directory holding the served ``version``: the factory bundle or a slot."""
        if version == FACTORY_VERSION:
            return DEMO / "shapes"
        for slot in ("a", "b"):
            record = _read_json(self.slots / slot / ".edgert-slot.json")
            if record is not None and record.get("version") == version:
                return self.slots / slot
        return None

    def verify_bundle(self, path: Path) -> tuple[bool, str]:
        """``edgert bundle verify PATH --key demo.pub --key fleet.pub --selftest``, in this process."""
        from edge_runtime.cli import main as edgert

        out, err = io.StringIO(), io.StringIO()
        argv = ["bundle", "verify", str(path), "--key", str(DEMO_PUB), "--key", str(self.pub), "--selftest"]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = edgert(argv)
        text = (out.getvalue() + err.getvalue()).strip().replace("\n", " | ")
        return code == 0, text

    # -- the daemon ------------------------------------------------------------------------------
    def boot(self, timeout: float) -> tuple[bool, float | None, str, str]:
        """Start the daemon; ``(serving, seconds to the first result, model tag, why not)``."""
        self.results.reset()
        t0 = time.monotonic()
        self.daemon.start()
        end = t0 + timeout
        while time.monotonic() < end:
            tag = self.results.poll()
            if tag:
                return True, time.monotonic() - t0, tag, ""
            if not self.daemon.alive:
                return (
                    False,
                    None,
                    "",
                    f"the daemon exited with code {self.daemon.proc.returncode if self.daemon.proc else '?'}",
                )
            time.sleep(0.01)
        return False, None, "", f"no result within {timeout:g} s"

    def publish(self, cand: Candidate, serving: str) -> int:
        assert self.fleet is not None
        try:
            older = semver_key(cand.version) < semver_key(serving)
        except Exception:
            older = False
        doc = self.fleet.publish_document(
            f"group:{GROUP}", cand.bundle, load_private_key(self.priv), rollout=self.rollout, rollback=older
        )
        return doc.sequence

    def wait_trigger(self, target: str, seq: int, timeout: float) -> str:
        """Poll until the trial's document reaches the target's trigger: hit, passed, died, timeout."""
        want = _TRIGGER_PHASE.get(target)
        end = time.monotonic() + timeout
        poll = self.cfg.poll_s
        while time.monotonic() < end:
            if not self.daemon.alive:
                return "died"
            st = _read_json(self.state_path)
            doc = (st or {}).get("last_document") or {}
            if st is not None and doc.get("sequence") == seq:
                phase = str(st.get("phase"))
                outcome = doc.get("outcome")
                if target == "stage":
                    if phase in ("downloading", "verifying") and self._spin_for_staging(
                        time.monotonic() + poll
                    ):
                        return "hit"
                elif phase == want and (phase not in _TERMINAL or outcome == phase):
                    return "hit"
                if outcome is not None:
                    return "passed"
                if _PHASE_ORDER.get(phase, -1) > _ORDER[target]:
                    return "passed"
            time.sleep(poll)
        return "timeout"

    def _spin_for_staging(self, until: float) -> bool:
        """Watch ``slots/`` closely (an unpack takes a few ms) for ``.unpack-*`` or ``.staging-*``."""
        while True:
            with contextlib.suppress(OSError):
                if any(name.startswith((".unpack-", ".staging-")) for name in os.listdir(self.slots)):
                    return True
            if time.monotonic() >= until:
                return False
            time.sleep(0.0002)


def _expectation(
    st: dict[str, Any] | None, seq: int, cand: Candidate, base: str
) -> tuple[str, str, bool, str]:
    """``(outcome, version, boot note expected, phase label)`` from the state on disk at the kill."""
    if st is None:
        return (
            ("committed" if cand.good else "rolled_back"),
            (cand.version if cand.good else base),
            True,
            "none",
        )
    doc = st.get("last_document") or {}
    phase = str(st.get("phase"))
    if doc.get("sequence") != seq:
        label = f"{phase} (document not accepted yet)"
        return (
            ("committed" if cand.good else "rolled_back"),
            (cand.version if cand.good else base),
            False,
            label,
        )
    outcome = doc.get("outcome")
    if outcome is not None:
        version = cand.version if outcome == "committed" else base
        return str(outcome), version, False, f"{phase} (ended)"
    if phase == "probation":
        return "rolled_back", base, True, phase
    note = phase in _PRE_ACTIVE
    label = phase if note else f"{phase} (accepted)"
    return ("committed" if cand.good else "rolled_back"), (cand.version if cand.good else base), note, label


def _is_boot_note(reason: str) -> bool:
    """A reason set by ``StateStore.boot_choice`` or the daemon's boot (not a later repetition of it)."""
    return bool(BOOT_NOTE_RE.search(reason)) and not reason.startswith("not retrying")


def _version(tag: str) -> str:
    return tag.rpartition("@")[2]


class Trials:
    """The trial loop over one :class:`CrashRig`."""

    def __init__(self, rig: CrashRig, cfg: TrialsConfig, seed: int, say: Callable[[str], None]) -> None:
        self.rig = rig
        self.cfg = cfg
        self.rng = random.Random(seed)
        self.say = say
        self._schedule: list[str] = []

    def _next_target(self) -> str:
        if not self._schedule:
            self._schedule = list(PHASES)
            self.rng.shuffle(self._schedule)
        return self._schedule.pop()

    def _pick(self, target: str, base: str) -> Candidate:
        bad = self.rig.candidates[BAD_VERSION]
        if target == "rollback":
            return bad
        wants_bad = target != "commit" and self.rng.random() < self.cfg.bad_share
        if wants_bad:
            return bad
        previous = self.rig.previous_sha()
        goods = [
            c
            for c in self.rig.candidates.values()
            if c.good
            and c.version != base
            and not (target in ("download", "verify", "stage") and c.bundle.sha256 == previous)
        ]
        return self.rng.choice(sorted(goods, key=lambda c: semver_key(c.version)))

    def first_boot(self) -> None:
        serving, seconds, tag, why = self.rig.boot(self.cfg.serve_timeout_s)
        if not serving:
            raise RuntimeError(f"the daemon did not start serving: {why}\n{self.rig.daemon.log_tail()}")
        self.say(f"daemon serving {tag} after {seconds:.2f} s")

    def run_one(self, index: int) -> TrialResult:
        rig = self.rig
        base = rig.committed_version()
        target = self._next_target()
        cand = self._pick(target, base)
        delay = self.rng.uniform(0.0, DELAY_MS[target] * self.cfg.delay_scale)
        r = TrialResult(index, target, cand.version, cand.good, base, delay_ms=round(delay, 1))
        # 1. publish, wait for the trigger, kill -9
        r.sequence = rig.publish(cand, base)
        r.trigger = rig.wait_trigger(target, r.sequence, self.cfg.trigger_timeout_s)
        if r.trigger == "died":
            r.failures.append(f"the daemon exited by itself during the update: {rig.daemon.log_tail(800)}")
        elif r.trigger == "timeout":
            r.failures.append(f"the update did not reach {target} within {self.cfg.trigger_timeout_s:g} s")
        if r.trigger == "hit":
            time.sleep(delay / 1000.0)
        rig.daemon.kill()
        st = rig.state()
        r.on_disk = rig.interrupted_files()
        r.expected, r.expected_version, r.note_expected, r.phase_at_kill = _expectation(
            st, r.sequence, cand, base
        )
        # 2. restart: serving within the timeout
        wall = time.time()
        n_updates = rig.n_updates()
        r.serving, r.serve_s, tag, why = rig.boot(self.cfg.serve_timeout_s)
        t_served = time.monotonic()
        r.served = tag
        if not r.serving:
            r.failures.append(f"no working model after the restart: {why}; log: {rig.daemon.log_tail(1500)}")
            r.selftest = "not serving"
            return r
        # 3. the served bundle passes its self-test
        served_dir = rig.served_bundle(_version(tag))
        if served_dir is None:
            r.selftest = f"no slot holds the served {tag}"
        else:
            r.selftest_ok, r.selftest = rig.verify_bundle(served_dir)
        if not r.selftest_ok:
            r.failures.append(f"served bundle {tag} failed verification: {r.selftest}")
        st_now = rig.state() or {}
        active = (st_now.get("active") or {}).get("version") or FACTORY_VERSION
        candidate = (st_now.get("candidate") or {}).get("version")
        if _version(tag) not in (active, candidate):
            r.failures.append(f"serving {tag} but state.json says active {active}, candidate {candidate}")
        # 4. convergence without further intervention
        end = time.monotonic() + self.cfg.converge_timeout_s
        last = ""
        while time.monotonic() < end:
            if not rig.daemon.alive:
                r.failures.append(f"the daemon exited after the restart: {rig.daemon.log_tail(1500)}")
                break
            st = rig.state() or {}
            doc = st.get("last_document") or {}
            served = _version(rig.results.poll())
            active = (st.get("active") or {}).get("version") or FACTORY_VERSION
            retained = rig.retained_state()
            shown = (retained.get("model") or {}).get("version")
            fresh = float(retained.get("ts") or 0.0) >= wall and bool(retained.get("online"))
            if doc.get("sequence") == r.sequence and doc.get("outcome") in _TERMINAL:
                r.outcome = str(doc["outcome"])
                r.outcome_version = active
                last = (
                    f"outcome {r.outcome} (phase {st.get('phase')}, reason {st.get('reason')!r}), "
                    f"active {active}, JSONL {served}, retained state {shown} (fresh {fresh})"
                )
                if (
                    st.get("phase") == r.outcome
                    and r.outcome == r.expected
                    and active == served == shown == r.expected_version
                    and fresh
                ):
                    r.converged = True
                    r.converge_s = round(time.monotonic() - t_served + (r.serve_s or 0.0), 3)
                    break
                if r.outcome != r.expected:
                    break  # a different end is final: the document is not retried
            time.sleep(0.05)
        if not r.converged and rig.daemon.alive:
            r.failures.append(
                f"did not converge to {r.expected} {r.expected_version}: "
                + (last or f"state phase {(rig.state() or {}).get('phase')}, no outcome for the document")
            )
        # 5. the restart is reported when it changed the saved state
        end = time.monotonic() + (10.0 if r.note_expected else 0.5)
        while True:
            r.boot_notes = [
                str(e.get("reason"))
                for e in rig.update_events(n_updates)
                if float(e.get("ts") or 0.0) >= wall and _is_boot_note(str(e.get("reason") or ""))
            ]
            if r.boot_notes or time.monotonic() > end:
                break
            time.sleep(0.05)
        if r.note_expected and not r.boot_notes:
            r.failures.append(
                f"the restart after a kill in {r.phase_at_kill} was not reported (no boot note)"
            )
        r.leftovers = [f for f in rig.interrupted_files() if not f.endswith((".part", ".progress"))]
        return r


def _line(r: TrialResult, total: int) -> str:
    kind = "good" if r.good else "bad "
    serve = f"{r.serve_s:.2f} s" if r.serve_s is not None else "NOT SERVING"
    text = (
        f"[{r.index:>3}/{total}] {r.target:<9} {kind} {r.version:<6} +{r.delay_ms:>5.1f} ms {r.trigger:<7} "
        f"killed in {r.phase_at_kill:<26} serving {_version(r.served) or '-':<6} after {serve:<8} "
        f"-> {r.outcome or '-'} {r.outcome_version}"
    )
    if r.boot_notes:
        text += f"  [{r.boot_notes[0][:70]}]"
    if r.failures:
        text += "\n      FAIL: " + "\n      FAIL: ".join(f[:600] for f in r.failures)
    return text


def _tracebacks(log_path: Path) -> list[str]:
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return []
    found = []
    for match in re.finditer(r"Traceback \(most recent call last\):", text):
        start = text.rfind("\n", 0, match.start() - 1)
        found.append(text[max(0, start) : match.start() + 1500])
    return found


def run_trials(cfg: TrialsConfig, say: Callable[[str], None] | None = None) -> TrialsReport:
    """Run ``cfg.trials`` crash trials; return the report (failures are counted, not raised)."""
    emit = say or (print if cfg.verbose else (lambda _s: None))
    seed = cfg.seed if cfg.seed is not None else secrets.randbelow(2**31)
    emit(f"crash trials: seed {seed} (replay the schedule with --seed {seed}), {cfg.trials} trials")
    t0 = time.monotonic()
    own = cfg.workdir is None
    work = Path(tempfile.mkdtemp(prefix="edgert-crash-")) if cfg.workdir is None else cfg.workdir
    work.mkdir(parents=True, exist_ok=True)
    rig = CrashRig(cfg, work)
    results: list[TrialResult] = []
    try:
        rig.start()
        emit(f"work directory {work}; candidates {', '.join(rig.candidates)} uploaded")
        trials = Trials(rig, cfg, seed, emit)
        trials.first_boot()
        for index in range(1, cfg.trials + 1):
            result = trials.run_one(index)
            results.append(result)
            emit(_line(result, cfg.trials))
            if not result.serving or not rig.daemon.alive:
                rig.daemon.kill()
                serving, _s, _tag, why = rig.boot(cfg.serve_timeout_s)
                if not serving:
                    emit(f"the daemon cannot be brought back ({why}); stopping the run")
                    break
        final = rig.interrupted_files() + rig.stale_tmp_dirs()
    finally:
        rig.close()
        tracebacks = _tracebacks(rig.daemon.log_path)
        if own and not cfg.keep:
            shutil.rmtree(work, ignore_errors=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    config["seed"] = seed
    return TrialsReport(seed, config, results, time.monotonic() - t0, tracebacks, final)


def format_report(report: TrialsReport) -> str:
    s = report.summary()
    lines = [
        f"crash trials: {s['trials']} trials in {s['duration_s']:.0f} s, seed {s['seed']} "
        f"(replay: --seed {s['seed']})",
        "kills per target phase (trigger hit / total):",
    ]
    for p in PHASES:
        lines.append(
            f"  {p:<10} {s['triggers_hit_per_target'][p]:>3} / {s['kills_per_target'][p]:<3}  {TRIGGER[p]}"
        )
    lines.append("phase saved on disk at the kill:")
    lines += [f"  {k:<40} {v}" for k, v in s["phase_at_kill"].items()]
    if s["interrupted_files_at_kill"]:
        lines.append(
            "interrupted operations on disk at the kill: "
            + ", ".join(f"{k} {v}" for k, v in s["interrupted_files_at_kill"].items())
        )
    lines.append("outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(s["outcomes"].items())))
    lines.append(
        f"  good candidates rolled back because the kill hit their probation: "
        f"{s['good_rolled_back_by_kill_in_probation']}"
    )
    rs, cs = s["restart_to_serving_s"], s["restart_to_converged_s"]
    lines += [
        f"devices without a working model:  {s['without_working_model']}",
        f"served bundle self-test failures: {s['selftest_failures']}",
        f"convergence failures:             {s['convergence_failures']}",
        f"unreported restarts:              {s['unreported_restarts']}",
        f"failed trials:                    {s['failed_trials']}",
        f"restart to serving:   median {rs['median']} s, p90 {rs['p90']} s, max {rs['max']} s (n={rs['n']})",
        f"restart to converged: median {cs['median']} s, p90 {cs['p90']} s, max {cs['max']} s (n={cs['n']})",
        f"boot notes seen ({sum(s['boot_notes'].values())}):",
    ]
    lines += [f"  {v:>4} x {k}" for k, v in s["boot_notes"].items()]
    lines.append(f"tracebacks in the daemon logs: {s['daemon_tracebacks']}")
    lines.append(f"interrupted-operation files left after convergence: {s['leftovers_after_convergence']}")
    lines.append(
        f"left in the state directory at the end: {len(s['final_leftovers'])} "
        + (f"({', '.join(s['final_leftovers'][:8])}{' ...' if len(s['final_leftovers']) > 8 else ''})"
           if s["final_leftovers"] else "")
    )  # fmt: skip
    failed = [r for r in report.results if r.failures]
    if failed:
        lines.append("failures:")
        lines += [_line(r, s["trials"]) for r in failed]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    d = TrialsConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    p.add_argument("--trials", type=int, default=d.trials)
    p.add_argument("--seed", type=int, default=None, help="replay a run's schedule (printed by every run)")
    p.add_argument("--json", type=Path, default=None, help="write the report (and every trial) here")
    p.add_argument("--fps", type=float, default=d.fps, help="max_fps of the demo video")
    p.add_argument("--probation", type=float, default=d.probation_s, help="probation_s of every document")
    p.add_argument("--min-frames", type=int, default=d.min_frames, help="probation_min_frames")
    p.add_argument(
        "--bad-share", type=float, default=d.bad_share, help="share of bad candidates (other phases)"
    )
    p.add_argument("--pad-kb", type=int, default=d.pad_kb, help="pad file in every candidate, KiB")
    p.add_argument("--chunk-kb", type=int, default=d.chunk_kb, help="transfer chunk size, KiB")
    p.add_argument("--delay-scale", type=float, default=d.delay_scale, help="scales DELAY_MS")
    p.add_argument("--no-probe", action="store_true", help="[sync] probe = false (self-test in the daemon)")
    p.add_argument("--workdir", type=Path, default=None, help="keep everything here (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    p.add_argument("--quiet", action="store_true", help="no line per trial")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the trials, print the report; exit 1 when any trial failed."""
    args = _parser().parse_args(argv)
    cfg = TrialsConfig(
        trials=args.trials,
        seed=args.seed,
        fps=args.fps,
        probation_s=args.probation,
        min_frames=args.min_frames,
        bad_share=args.bad_share,
        pad_kb=args.pad_kb,
        chunk_kb=args.chunk_kb,
        delay_scale=args.delay_scale,
        probe=not args.no_probe,
        workdir=args.workdir,
        keep=args.keep,
        verbose=not args.quiet,
    )
    report = run_trials(cfg)
    print(format_report(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        print(f"report written to {args.json}")
    s = report.summary()
    bad = s["without_working_model"] + s["selftest_failures"] + s["convergence_failures"] + s["failed_trials"]
    return 1 if bad or s["trials"] < cfg.trials else 0


if __name__ == "__main__":
    sys.exit(main())
