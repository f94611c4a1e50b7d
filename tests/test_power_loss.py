"""Power loss on a device that committed an update: what a power cut can leave in the state directory.

A real daemon (``edgert run`` as a subprocess, the demo shapes bundle as the factory bundle, sync on
against a real mosquitto) commits 1.1.0 then 1.2.0 (``active`` 1.2.0 in one slot, ``previous``
1.1.0 in the other), the operator promotes 1.2.0 (one more save, so ``state.json.prev`` holds the
committed state too), then the power is cut (``kill -9``). That state directory is copied for every
case and damaged the way a power cut can damage it: ``state.json`` truncated, emptied or garbage,
``state.json.prev`` too, a slot swap interrupted between its renames, slot files truncated, the
outbox database or its WAL cut short, a partial download whose journal is torn.

Every start is a start after a reboot (the outbox sees a new Linux boot id, see
``bench.crash_trials.DaemonProcess``) and is done twice: the first one may repair what it finds,
the second must serve the same model (no crash loop), each must serve a good model (the
committed one when it is intact, else the previous one or the factory bundle) or exit with a named
``edgert: error:`` line, and never print a traceback. What was lost is reported to the fleet: a
boot note (``update`` event) for the device state and the slots, an outbox incident
(``outbox_dropped`` telemetry with ``quarantined``/``unclean_shutdown``) for the outbox, and no
outbox sequence number comes back with other content.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import DEMO
from mqtt_broker import Broker
from sync_helpers import DEMO_PUB, make_candidate

from edge_runtime.bundle import generate_keypair, load_private_key, pack_bundle
from edge_runtime.sync.mqtt import LinkSettings
from edge_runtime.sync.protocol import DesiredBundle, Rollout
from edge_runtime.sync.publisher import FleetClient

REPO = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("bench") is None:  # pytest run without the repo root on sys.path
    sys.path.insert(0, str(REPO))

from bench.crash_trials import DaemonProcess, ResultTail  # noqa: E402

FLEET, DEVICE, GROUP = "test", "dev1", "cams"
FACTORY, PREVIOUS, COMMITTED, NEXT = "1.0.0", "1.1.0", "1.2.0", "1.3.0"
ROLLOUT = Rollout(probation_s=1.0, probation_min_frames=10, max_latency_ratio=50.0, min_fps_ratio=0.02)
SEED = int(os.environ.get("EDGERT_POWER_SEED", secrets.randbelow(2**31)))


# -- the plant: one broker, an operator, the golden state directories ------------------------------
@dataclass
class Plant:
    work: Path
    broker: Broker
    fleet: FleetClient
    watcher: Any
    priv: Path
    pub: Path
    big: DesiredBundle | None = None
    golden: Path | None = None
    partial: Path | None = None
    seqs: dict[str, dict[int, bytes]] = field(default_factory=dict)
    """outbox seq -> payload the fleet received before each golden power cut"""

    def topic(self, leaf: str) -> str:
        return f"edgert/{FLEET}/device/{DEVICE}/{leaf}"

    def write_config(self, case: Path, **sync: Any) -> Path:
        cert, key = self.broker.client_cert(DEVICE)
        model = sync.pop("factory", DEMO / "shapes")
        extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in sync.items())
        config = case / "edgert.toml"
        config.write_text(
            f'[model]\nbundle = "{model}"\nformat = "onnx"\nthreads = 1\n'
            f'[source]\nkind = "video"\nuri = "{DEMO / "shapes.avi"}"\nloop = true\n'
            "[pipeline]\nmax_fps = 30\n"
            f'[[sinks]]\nkind = "jsonl"\npath = "{case / "results.jsonl"}"\nflush_every = 1\n'
            f'[trust]\nkeys = ["{DEMO_PUB}", "{self.pub}"]\n'
            f'[state]\ndir = "{case / "state"}"\n'
            "[log]\nstats_interval_s = 0\n"
            f'[sync]\nenabled = true\nhost = "127.0.0.1"\nport = {self.broker.port}\nfleet = "{FLEET}"\n'
            f'device_id = "{DEVICE}"\ngroups = ["{GROUP}"]\nca_file = "{self.broker.ca_path}"\n'
            f'cert_file = "{cert}"\nkey_file = "{key}"\ntelemetry_interval_s = 0.5\n{extra}'
        )
        return config

    def updates(self, since: int = 0) -> list[dict[str, Any]]:
        return [json.loads(m.payload) for m in self.watcher.messages(self.topic("update"))[since:]]

    def wait_update(
        self, phases: set[str], version: str, since: int, timeout: float = 90.0
    ) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for body in self.updates(since):
                if body.get("phase") in phases and body.get("version") == version:
                    return body
            time.sleep(0.05)
        raise AssertionError(
            f"no {phases} for {version} in {timeout} s: {[b.get('phase') for b in self.updates(since)]}"
        )

    def marks(self) -> int:
        return len(self.watcher.messages(f"edgert/{FLEET}/device/{DEVICE}/#"))

    def seq_payloads(self, since: int = 0) -> list[tuple[int, bytes]]:
        out = []
        for msg in self.watcher.messages(f"edgert/{FLEET}/device/{DEVICE}/#")[since:]:
            if msg.topic.rsplit("/", 1)[-1] not in ("update", "telemetry", "events"):
                continue
            try:
                seq = json.loads(msg.payload).get("seq")
            except ValueError:
                continue
            if isinstance(seq, int):
                out.append((seq, bytes(msg.payload)))
        return out

    def clear_desired(self) -> None:
        info = self.fleet.link.publish(f"edgert/{FLEET}/group/{GROUP}/desired", b"", qos=1, retain=True)
        assert info is not None
        info.wait_for_publish(10)


def _power_cut(daemon: DaemonProcess) -> None:
    daemon.kill()
    time.sleep(0.5)  # messages already on the wire reach the watcher


@pytest.fixture(scope="module")
def plant(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plant]:
    work = tmp_path_factory.mktemp("power")
    priv, pub = generate_keypair(work / "keys", "fleet")
    broker = Broker(work / "broker", fleet=FLEET, devices={DEVICE: [GROUP]}, operators=["fleet-admin"])
    broker.start()
    daemon: DaemonProcess | None = None
    try:
        cert, key = broker.client_cert("fleet-admin")
        settings = LinkSettings(
            host="127.0.0.1", port=broker.port, client_id="power-operator", ca_file=broker.ca_path,
            cert_file=cert, key_file=key,
        )  # fmt: skip
        with FleetClient(settings, FLEET) as fleet:
            watcher = broker.client("fleet-admin", client_id="power-watcher")
            watcher.subscribe_wait(f"edgert/{FLEET}/device/{DEVICE}/#")
            p = Plant(work, broker, fleet, watcher, priv, pub)
            signer = load_private_key(priv)
            # the golden device: commit 1.1.0, then 1.2.0, promote it, cut the power
            case = work / "golden"
            case.mkdir()
            daemon = DaemonProcess(p.write_config(case), case / "daemon.log")
            daemon.start()
            for version in (PREVIOUS, COMMITTED):
                since = len(p.updates())
                fleet.publish(make_candidate(work, priv, version), f"group:{GROUP}", signer, rollout=ROLLOUT)
                done = p.wait_update({"committed", "rolled_back", "rejected"}, version, since)
                assert done["phase"] == "committed", (done, daemon.log_tail())
            since = len(p.updates())
            fleet.promote(f"group:{GROUP}", signer)
            p.wait_update({"committed"}, COMMITTED, since)
            time.sleep(1.0)  # telemetry flows, the outbox has a history
            _power_cut(daemon)
            p.golden = case / "state"
            p.seqs["golden"] = dict(p.seq_payloads())
            state = json.loads((p.golden / "sync" / "state.json").read_text())
            prev = json.loads((p.golden / "sync" / "state.json.prev").read_text())
            assert (state["phase"], state["active"]["version"], state["previous"]["version"]) == (
                "committed", COMMITTED, PREVIOUS,
            )  # fmt: skip
            assert (prev["phase"], prev["active"]["version"]) == ("committed", COMMITTED)
            # the same device, cut in the middle of downloading 1.3.0 (a few MB in small chunks)
            pad = work / "pad.bin"
            pad.write_bytes(random.Random(0).randbytes(3 << 20))
            big = make_candidate(work, priv, NEXT, extra_files={"pad.bin": pad})
            p.big, _ = fleet.upload_bundle(big, chunk_size=16 << 10)
            case = work / "partial"
            shutil.copytree(work / "golden", case, ignore=shutil.ignore_patterns("results.jsonl", "*.log"))
            daemon = DaemonProcess(p.write_config(case, chunk_window=2), case / "daemon.log")
            daemon.start()
            since = len(p.updates())
            fleet.publish_document(f"group:{GROUP}", p.big, signer, rollout=ROLLOUT)
            end = time.monotonic() + 90
            while time.monotonic() < end and not any(
                b.get("phase") == "downloading" and b.get("progress", 0) >= 0.3 for b in p.updates(since)
            ):
                time.sleep(0.01)
            _power_cut(daemon)
            p.partial = case / "state"
            p.seqs["partial"] = dict(p.seq_payloads())
            parts = list((p.partial / "sync" / "downloads").glob("*.progress"))
            assert parts, f"no partial download on disk; updates {p.updates(since)}"
            p.clear_desired()
            yield p
    finally:
        if daemon is not None:
            daemon.stop()
        broker.close()


# -- one damaged device ----------------------------------------------------------------------------
@dataclass
class Boot:
    served: str = ""
    serve_s: float | None = None
    code: int | None = None
    log: str = ""
    notes: list[str] = field(default_factory=list)
    incidents: list[dict[str, Any]] = field(default_factory=list)
    reused: list[int] = field(default_factory=list)

    def describe(self) -> str:
        return (
            f"served {self.served or '-'} (after {self.serve_s} s), exit code {self.code}, "
            f"notes {self.notes}, incidents {[i.get('kind') for i in self.incidents]}, "
            f"reused seqs {self.reused[:10]}\n"
            f"log tail:\n{self.log[-2500:]}"
        )


class Device:
    """A copy of a golden state directory, damaged by the test, booted by :meth:`boot`."""

    def __init__(self, plant: Plant, root: Path, golden: Path, seqs: dict[int, bytes], **sync: Any) -> None:
        self.plant = plant
        self.root = root
        self.state = root / "state"
        shutil.copytree(golden, self.state)
        self.sync = self.state / "sync"
        self.results = ResultTail(root / "results.jsonl")
        self.daemon = DaemonProcess(plant.write_config(root, **sync), root / "daemon.log", root / "boot_id")
        self.seen = dict(seqs)

    def active_slot(self) -> Path:
        state = json.loads((self.sync / "state.json").read_text())
        return self.sync / "slots" / state["active"]["slot"]

    def previous_slot(self) -> Path:
        state = json.loads((self.sync / "state.json").read_text())
        return self.sync / "slots" / state["previous"]["slot"]

    def boot(
        self, *, note: bool = False, incident: bool = False, timeout: float = 60.0, settle: float = 1.5
    ) -> Boot:
        """Start after a power cut; wait for the first result (or the exit) and the reports; cut again."""
        b = Boot()
        self.results.reset()
        wall = time.time()
        mark = self.plant.marks()
        t0 = time.monotonic()
        self.daemon.start()
        end = t0 + timeout
        while time.monotonic() < end:
            tag = self.results.poll()
            if tag:
                b.served, b.serve_s = tag.rpartition("@")[2], round(time.monotonic() - t0, 2)
                break
            if not self.daemon.alive:
                break
            time.sleep(0.02)
        if b.served:
            # the reports come over MQTT right after the start (telemetry every 0.5 s)
            end = time.monotonic() + 20.0
            while time.monotonic() < end:
                self._reports(b, wall, mark)
                if (b.notes or not note) and (b.incidents or not incident):
                    break
                time.sleep(0.1)
            time.sleep(settle)  # still alive a moment later: no crash loop
            self._reports(b, wall, mark)
        if self.daemon.proc is not None and self.daemon.proc.poll() is not None:
            b.code = self.daemon.proc.returncode
        b.log = self.daemon.log_tail(20000)
        _power_cut(self.daemon)
        self._reports(b, wall, mark)
        return b

    def _reports(self, b: Boot, wall: float, mark: int) -> None:
        b.notes = [
            str(u.get("reason"))
            for u in self.plant.updates()
            if float(u.get("ts") or 0) >= wall and u.get("reason")
        ]
        b.incidents = []
        for msg in self.plant.watcher.messages(self.plant.topic("telemetry"))[0:]:
            body = json.loads(msg.payload)
            drop_report = "outbox_dropped" in (body.get("kind"), body.get("type"))
            if drop_report and float(body.get("ts") or 0) >= wall:
                b.incidents += body.get("incidents", [])
        for seq, payload in self.plant.seq_payloads(mark):
            if self.seen.setdefault(seq, payload) != payload and seq not in b.reused:
                b.reused.append(seq)

    def stop(self) -> None:
        self.daemon.stop()


@pytest.fixture
def device(plant: Plant, tmp_path: Path) -> Iterator[Callable[..., Device]]:
    made: list[Device] = []

    def make(golden: str = "golden", **sync: Any) -> Device:
        src = plant.golden if golden == "golden" else plant.partial
        assert src is not None
        dev = Device(plant, tmp_path / f"dev{len(made)}", src, plant.seqs[golden], **sync)
        made.append(dev)
        return dev

    yield make
    for dev in made:
        dev.stop()


def assert_good(boot: Boot, allowed: set[str]) -> None:
    assert "Traceback" not in boot.log, boot.describe()
    if boot.served:
        assert boot.served in allowed, boot.describe()
        assert boot.code is None, f"the daemon exited after serving: {boot.describe()}"
    else:
        assert boot.code not in (None, 0) and "edgert: error:" in boot.log, boot.describe()
    assert not boot.reused, f"outbox seqs came back with other content: {boot.describe()}"


def boot_twice(
    dev: Device, allowed: set[str], *, note: bool = False, incident: bool = False
) -> tuple[Boot, Boot]:
    first = dev.boot(note=note, incident=incident)
    assert_good(first, allowed)
    second = dev.boot()
    assert_good(second, allowed)
    assert (second.served, second.code is None) == (first.served, first.code is None), (
        f"first start: {first.describe()}\n\nsecond start: {second.describe()}"
    )
    return first, second


def _rng(case: str) -> random.Random:
    return random.Random(f"{SEED}-{case}")


def _cut(path: Path, rng: random.Random, low: int = 1) -> int:
    size = path.stat().st_size
    offset = rng.randrange(low, max(low + 1, size))
    os.truncate(path, offset)
    return offset


def _mentions(notes: list[str], *words: str) -> bool:
    return any(all(w in n for w in words) for n in notes)


# -- state.json ------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_a_damaged_state_file_falls_back_to_the_previous_save_and_says_so(
    device: Callable[..., Device], damage: str
) -> None:
    dev = device()
    path = dev.sync / "state.json"
    rng = _rng(damage)
    if damage == "truncated":
        _cut(path, rng)
    elif damage == "empty":
        os.truncate(path, 0)
    else:
        path.write_bytes(rng.randbytes(path.stat().st_size))
    first, _ = boot_twice(dev, {COMMITTED}, note=True)
    # state.json.prev held the committed state: the committed model keeps serving, the loss is reported
    assert _mentions(first.notes, "state.json"), f"seed {SEED}: {first.describe()}"


def test_both_state_files_damaged_rebuild_the_state_from_the_slots_and_say_so(
    device: Callable[..., Device],
) -> None:
    dev = device()
    rng = _rng("both")
    _cut(dev.sync / "state.json", rng)
    prev = dev.sync / "state.json.prev"
    prev.write_bytes(rng.randbytes(prev.stat().st_size))
    first, _ = boot_twice(dev, {PREVIOUS, COMMITTED}, note=True)
    # the oldest slot that verifies (a newer one may never have been committed)
    assert first.served == PREVIOUS, first.describe()
    assert _mentions(first.notes, "reconstructed"), f"seed {SEED}: {first.describe()}"
    state = json.loads((dev.sync / "state.json").read_text())
    assert state["active"]["version"] == PREVIOUS


# -- slot swaps interrupted between their renames --------------------------------------------------
def _partial_copy(src: Path, dest: Path, rng: random.Random) -> None:
    """What an interrupted unpack leaves: some files, the last one cut short."""
    dest.mkdir()
    files = sorted(p for p in src.iterdir() if p.is_file())
    for p in files[: rng.randrange(1, len(files))]:
        shutil.copy2(p, dest / p.name)
    last = sorted(dest.iterdir())[-1]
    _cut(last, rng)


def test_a_swap_cut_between_its_renames_puts_the_old_slot_back(device: Callable[..., Device]) -> None:
    dev = device()
    rng = _rng("swap")
    slot = dev.previous_slot()  # an install goes into the slot that is not active
    trash = slot.with_name(f".trash-{slot.name}-{secrets.token_hex(4)}")
    slot.rename(trash)
    _partial_copy(dev.active_slot(), slot.with_name(f".staging-{slot.name}-{secrets.token_hex(4)}"), rng)
    boot_twice(dev, {COMMITTED})
    slots = dev.sync / "slots"
    assert sorted(p.name for p in slots.iterdir()) == ["a", "b"]
    record = json.loads((slot / ".edgert-slot.json").read_text())
    assert record["version"] == PREVIOUS  # the rollback target is back, whole


def test_trash_left_after_a_finished_swap_is_removed(device: Callable[..., Device]) -> None:
    dev = device()
    slot = dev.previous_slot()
    trash = slot.with_name(f".trash-{slot.name}-{secrets.token_hex(4)}")
    shutil.copytree(slot, trash)
    boot_twice(dev, {COMMITTED})
    assert sorted(p.name for p in (dev.sync / "slots").iterdir()) == ["a", "b"]


def test_the_committed_slot_missing_with_a_staging_dir_left_falls_back_and_says_so(
    device: Callable[..., Device],
) -> None:
    dev = device()
    rng = _rng("missing")
    slot = dev.active_slot()
    _partial_copy(slot, slot.with_name(f".staging-{slot.name}-{secrets.token_hex(4)}"), rng)
    shutil.rmtree(slot)
    first, _ = boot_twice(dev, {PREVIOUS}, note=True)
    assert _mentions(first.notes, "missing", "falling back"), first.describe()


# -- slots whose files were cut short ----------------------------------------------------------------
@pytest.mark.parametrize("which", ["model", "record", "both slots"])
def test_truncated_slot_files_fall_back_to_a_good_model_and_say_so(
    device: Callable[..., Device], which: str
) -> None:
    dev = device()
    rng = _rng(which)
    active, previous = dev.active_slot(), dev.previous_slot()
    if which == "record":
        _cut(active / ".edgert-slot.json", rng, low=0)
        allowed = {PREVIOUS}
    else:
        for slot in (active, previous) if which == "both slots" else (active,):
            _cut(slot / "model.onnx", rng)
        allowed = {FACTORY} if which == "both slots" else {PREVIOUS}
    first, _ = boot_twice(dev, allowed, note=True)
    assert _mentions(first.notes, "falling back"), f"seed {SEED}: {first.describe()}"


# -- the outbox ------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["db", "db empty", "wal", "db and wal"])
def test_a_half_written_outbox_is_recovered_or_quarantined_and_reported(
    device: Callable[..., Device], damage: str
) -> None:
    dev = device()
    rng = _rng(damage)
    db = dev.sync / "outbox.db"
    wal = db.with_name("outbox.db-wal")
    (db.with_name("outbox.db-shm")).unlink(missing_ok=True)  # shared memory does not survive a reboot
    cuts = {}
    if damage == "db empty":
        os.truncate(db, 0)
        cuts["db"] = 0
    if damage in ("db", "db and wal"):
        cuts["db"] = _cut(db, rng, low=0)
    if damage in ("wal", "db and wal"):
        assert wal.exists() and wal.stat().st_size > 0, "the golden outbox has no WAL"
        cuts["wal"] = _cut(wal, rng, low=0)
    first, _ = boot_twice(dev, {COMMITTED}, incident=True)
    kinds = {i.get("kind") for i in first.incidents}
    quarantined = list(dev.sync.glob("outbox.db.corrupt-*"))
    # a power cut is a reboot: the outbox was not closed, so what it may have lost is reported
    assert kinds & {"quarantined", "unclean_shutdown"}, f"seed {SEED}, cuts {cuts}: {first.describe()}"
    assert ("quarantined" in kinds) == bool(quarantined), f"cuts {cuts}: {first.describe()}"


# -- a partial download with a torn journal --------------------------------------------------------
def test_a_torn_download_journal_resumes_with_the_chunks_that_verify(
    plant: Plant, device: Callable[..., Device]
) -> None:
    dev = device("partial", chunk_window=8)
    rng = _rng("journal")
    downloads = dev.sync / "downloads"
    (journal,) = downloads.glob("*.progress")
    part = journal.with_suffix(".part")
    header, record = 40, 8
    records = (journal.stat().st_size - header) // record
    assert records >= 4, f"only {records} chunks journaled"
    # the journal's tail is torn inside a record and followed by garbage; one journaled chunk rotted
    keep = rng.randrange(2, records)
    with journal.open("r+b") as fh:
        fh.truncate(header + keep * record + 3)
        fh.seek(0, os.SEEK_END)
        fh.write(rng.randbytes(21))
    with part.open("r+b") as fh:
        fh.seek(16 << 10)  # chunk 1 (chunks are journaled in order, so it is claimed)
        fh.write(rng.randbytes(512))
    first, _ = boot_twice(dev, {COMMITTED}, note=True)
    assert _mentions(first.notes, "restarted during downloading"), first.describe()
    # the document is back: the download resumes from what verifies on disk and the update commits
    assert plant.big is not None
    since = len(plant.updates())
    plant.fleet.publish_document(f"group:{GROUP}", plant.big, load_private_key(plant.priv), rollout=ROLLOUT)
    try:
        dev.results.reset()
        dev.daemon.start()
        done = plant.wait_update({"committed", "rolled_back", "rejected"}, NEXT, since)
        assert done["phase"] == "committed", done
        resumed = [u for u in plant.updates(since) if u.get("reason") == "resumed from disk"]
        assert resumed, plant.updates(since)
        assert 0 < resumed[0]["received_bytes"] <= keep * (16 << 10), resumed[0]
        log = dev.daemon.log_tail(50000)
        assert "do not verify on disk" in log and "torn or garbage tail" in log, log[-3000:]
        assert "Traceback" not in log
    finally:
        dev.stop()
        plant.clear_desired()


# -- repeated power cuts -----------------------------------------------------------------------------
def test_repeated_power_cuts_leave_no_unpacked_copies_behind(
    plant: Plant, device: Callable[..., Device], tmp_path: Path
) -> None:
    packed = pack_bundle(DEMO / "shapes", tmp_path / "factory.edgebundle")
    dev = device(factory=str(packed))
    state = json.loads((dev.sync / "state.json").read_text())
    state["active"] = state["previous"] = None  # serve the (packed) factory bundle
    (dev.sync / "state.json").write_text(json.dumps(state))
    (dev.sync / "state.json.prev").unlink()
    for _ in range(4):
        boot = dev.boot(settle=0.2)
        assert_good(boot, {FACTORY})
    unpacked = list((dev.state / "tmp").rglob("model.onnx"))
    # the running daemon's own copy is gone with it; at most the last cut's copy is left
    assert len(unpacked) <= 1, unpacked
