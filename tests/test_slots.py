"""Tests for edge_runtime.sync.slots: A/B slots and the crash-safe device state.

Everything is real: bundles are created from a real ONNX model, signed with real Ed25519
keys and packed; state files are damaged on disk; child processes are killed with SIGKILL in
the middle of ``stage()`` and ``save()``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.bundle import (
    TrustStore,
    create_bundle,
    generate_keypair,
    open_bundle,
    pack_bundle,
    sha256_file,
    sign_bundle,
)
from edge_runtime.decoders.specs import ClassificationSpec
from edge_runtime.errors import BundleError, IntegrityError, SignatureError, StateError, UpdateError
from edge_runtime.preprocess_spec import ImagePreprocess
from edge_runtime.sync.slots import (
    HISTORY_LIMIT,
    SLOT_RECORD_NAME,
    DeviceState,
    SlotInfo,
    StateStore,
    commit,
    reject,
    rollback,
    transition,
)

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
VERSIONS = ("1.0.0", "2.0.0", "3.0.0")


@pytest.fixture(scope="module")
def packs(
    tmp_path_factory: pytest.TempPathFactory,
    cnn_onnx: Path,
    keys: tuple[Path, Path],
    golden_images: np.ndarray,
) -> dict[str, Path]:
    """Signed packed bundles of the tiny CNN, one per version."""
    base = tmp_path_factory.mktemp("packs")
    out = {}
    for version in VERSIONS:
        root = create_bundle(
            base / f"src-{version}",
            models=[cnn_onnx],
            name="tiny-cnn",
            version=version,
            task="classification",
            preprocess=ImagePreprocess(resize="stretch"),
            decoder=ClassificationSpec(top_k=2),
            labels=["a", "b", "c", "d"],
            golden_frames=golden_images[:2],
            sign_key=keys[0],
        )
        out[version] = pack_bundle(root, base / f"tiny-{version}.edgebundle")
    return out


@pytest.fixture
def trust(keys: tuple[Path, Path]) -> TrustStore:
    return TrustStore.from_files([keys[1]])


@pytest.fixture
def factory(tmp_path: Path) -> Path:
    path = tmp_path / "factory-bundle"
    path.mkdir()
    return path


def install(store: StateStore, pack: Path, trust: TrustStore) -> DeviceState:
    """The daemon's happy path: stage, self-test, probation, commit; saved at every step."""
    state = store.load()
    info = store.stage(pack, trust)
    for phase in ("staged", "selftest", "probation"):
        state = transition(state, phase, candidate=info)
        store.save(state)
    state = commit(state)
    store.save(state)
    return state


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_stage_goes_into_the_inactive_slot(tmp_path: Path, packs: dict[str, Path], trust: TrustStore) -> None:
    store = StateStore(tmp_path / "state", trust=trust)
    assert store.load() == DeviceState()
    state = install(store, packs["1.0.0"], trust)
    assert state.active is not None
    assert (state.active.slot, state.active.version, state.previous) == ("a", "1.0.0", None)
    assert state.active.sha256 == sha256_file(packs["1.0.0"])
    slot_a = tree(store.slots_dir / "a")

    info = store.stage(packs["2.0.0"], trust)
    assert (info.slot, info.name, info.version) == ("b", "tiny-cnn", "2.0.0")
    assert tree(store.slots_dir / "a") == slot_a  # the active slot is never written
    bundle = open_bundle(store.slots_dir / "b", trust=trust)
    assert bundle.version == "2.0.0"
    assert bundle.signed_by is not None
    record = SlotInfo.model_validate_json((store.slots_dir / "b" / SLOT_RECORD_NAME).read_bytes())
    assert record == info
    state = commit(transition(state, "probation", candidate=info))
    store.save(state)
    assert state.active == info
    assert state.previous is not None
    assert state.previous.version == "1.0.0"

    info3 = store.stage(packs["3.0.0"], trust)
    assert info3.slot == "a"  # the only slot that is not active: previous is given up
    staged = transition(state, "staged", candidate=info3)
    assert staged.previous is None
    assert staged.active == info
    assert sorted(p.name for p in store.slots_dir.iterdir()) == ["a", "b"]


def test_stage_prefers_a_slot_that_previous_does_not_use(
    tmp_path: Path, packs: dict[str, Path], trust: TrustStore
) -> None:
    store = StateStore(tmp_path / "state", trust=trust)
    state = install(store, packs["1.0.0"], trust)
    state = rollback(state, "operator asked for the factory model")
    store.save(state)
    assert state.active is None
    assert state.previous is None
    state = install(store, packs["2.0.0"], trust)  # factory active: slot a is free
    assert state.active is not None
    assert state.active.slot == "a"
    # now: active None (factory) but previous in a -> the new candidate goes to b
    state = transition(state, "rolled_back", "test", active=None, previous=state.active)
    store.save(state)
    assert store.stage(packs["3.0.0"], trust).slot == "b"


def _tampered(pack: Path, out: Path) -> Path:
    data = bytearray(pack.read_bytes())
    at = data.find(b"tiny_cnn")  # the graph name inside model.onnx: a payload byte
    assert at > 0
    data[at] ^= 0x20
    out.write_bytes(bytes(data))
    return out


@pytest.mark.parametrize("kind", ["unsigned", "tampered", "untrusted key", "truncated"])
def test_refused_bundle_leaves_the_active_slot_untouched(
    tmp_path: Path,
    packs: dict[str, Path],
    trust: TrustStore,
    make_cnn_bundle: Callable[..., Path],
    kind: str,
) -> None:
    store = StateStore(tmp_path / "state", trust=trust)
    install(store, packs["1.0.0"], trust)
    before = tree(store.state_dir)
    if kind == "unsigned":
        bad = pack_bundle(make_cnn_bundle(version="9.0.0", sign=False), tmp_path / "bad.edgebundle")
        cause: type[Exception] = SignatureError
    elif kind == "tampered":
        bad = _tampered(packs["2.0.0"], tmp_path / "bad.edgebundle")
        cause = IntegrityError
    elif kind == "untrusted key":
        other_key, _pub = generate_keypair(tmp_path / "other-keys")
        root = make_cnn_bundle(version="9.0.0", sign=False)
        sign_bundle(root, other_key)
        bad = pack_bundle(root, tmp_path / "bad.edgebundle")
        cause = SignatureError
    else:
        data = packs["2.0.0"].read_bytes()
        bad = tmp_path / "bad.edgebundle"
        bad.write_bytes(data[: len(data) // 2])
        cause = BundleError
    with pytest.raises(UpdateError, match=r"bad\.edgebundle was refused") as info:
        store.stage(bad, trust)
    assert isinstance(info.value.__cause__, cause)
    assert tree(store.state_dir) == before
    assert sorted(p.name for p in store.slots_dir.iterdir()) == ["a"]
    state = store.load()
    path, _state, why = store.boot_choice(state, tmp_path / "factory")
    assert (path, why) == (store.slots_dir / "a", None)


def test_stage_is_refused_during_probation(tmp_path: Path, packs: dict[str, Path], trust: TrustStore) -> None:
    store = StateStore(tmp_path / "state", trust=trust)
    state = install(store, packs["1.0.0"], trust)
    info = store.stage(packs["2.0.0"], trust)
    store.save(transition(state, "probation", candidate=info))
    before = tree(store.slots_dir)
    with pytest.raises(UpdateError, match="in probation; commit or roll it back"):
        store.stage(packs["3.0.0"], trust)
    assert tree(store.slots_dir) == before


def _rich_state() -> DeviceState:
    at = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.timezone.utc)
    a = SlotInfo(slot="a", name="m", version="1.0.0", sha256="1" * 64, installed_at=at)
    b = SlotInfo(slot="b", name="m", version="2.0.0", sha256="2" * 64, installed_at=at)
    state = transition(DeviceState(), "committed", active=a)
    state = transition(state, "staged", "new release", candidate=b)
    return transition(
        state,
        "selftest",
        last_document={
            "group": "cams",
            "version": "2.0.0",
            "issued_at": "2024-05-01T12:00:00Z",
            "sequence": 7,
        },
    )


def test_save_load_round_trip_keeps_the_prior_copy(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    first = _rich_state()
    store.save(first)
    assert store.load() == first
    assert not store.prev_path.exists()
    second = reject(first, "self-test failed: outputs differ")
    store.save(second)
    assert store.load() == second
    assert DeviceState.model_validate_json(store.prev_path.read_bytes()) == first
    assert second.candidate is None
    assert second.last_document == first.last_document
    assert [h.phase for h in second.history] == ["committed", "staged", "selftest", "rejected"]
    assert second.history[-1].reason == "self-test failed: outputs differ"
    assert second.history[-1].version == "1.0.0"
    assert sorted(p.name for p in store.state_dir.iterdir()) == [
        ".slots.lock",
        ".state.lock",
        "slots",
        "state.json",
        "state.json.prev",
    ]


def test_history_is_bounded() -> None:
    state = DeviceState()
    for i in range(HISTORY_LIMIT + 7):
        state = transition(state, "downloading" if i % 2 else "idle", f"step {i}")
    assert len(state.history) == HISTORY_LIMIT
    assert state.history[-1].reason == f"step {HISTORY_LIMIT + 6}"
    assert state.history[0].reason == "step 7"


@pytest.mark.parametrize(
    "damage",
    [
        lambda raw: raw[: len(raw) // 2],
        lambda raw: b"",
        lambda raw: b"\x00" * len(raw),
        lambda raw: raw.replace(b'"phase": "idle"', b'"phase": "exploded"'),
        lambda raw: json.dumps({**json.loads(raw), "schema_version": 2}).encode(),
    ],
    ids=["truncated", "empty", "zeros", "bad-phase", "future-schema"],
)
def test_damaged_state_json_falls_back_to_the_prior_copy(
    tmp_path: Path, damage: Callable[[bytes], bytes], caplog: pytest.LogCaptureFixture
) -> None:
    store = StateStore(tmp_path / "state")
    first = _rich_state()
    store.save(first)
    second = transition(first, "idle", "something")
    store.save(second)
    store.state_path.write_bytes(damage(store.state_path.read_bytes()))
    with caplog.at_level(logging.ERROR):
        assert store.load() == first
    assert f"device state file {store.state_path} is damaged" in caplog.text
    # the next save keeps the good prior copy instead of the damaged file
    third = transition(first, "downloading")
    store.save(third)
    assert store.load() == third
    assert DeviceState.model_validate_json(store.prev_path.read_bytes()) == first


def test_missing_state_json_with_prior_copy_uses_it(tmp_path: Path) -> None:
    """The window inside save() between its two renames."""
    store = StateStore(tmp_path / "state")
    first = _rich_state()
    store.save(first)
    store.save(transition(first, "idle"))
    store.state_path.unlink()
    assert store.load() == first


def test_both_copies_damaged_reconstructs_from_verified_slots(
    tmp_path: Path, packs: dict[str, Path], trust: TrustStore, caplog: pytest.LogCaptureFixture
) -> None:
    store = StateStore(tmp_path / "state", trust=trust)
    install(store, packs["1.0.0"], trust)
    state = install(store, packs["2.0.0"], trust)
    assert state.active is not None
    assert state.previous is not None
    assert (state.active.slot, state.previous.slot) == ("b", "a")
    store.state_path.write_bytes(b'{"schema_version": 1, "active": {"slot": "a"')
    store.prev_path.write_bytes(b"garbage")
    with caplog.at_level(logging.ERROR):
        rebuilt = store.load()
    assert "state.json.prev is damaged" in caplog.text
    # the older slot is chosen: the newer one might be an update that was never committed
    assert rebuilt.active == state.previous
    assert rebuilt.phase == "idle"
    assert "reconstructed from the slots" in rebuilt.reason
    path, _, why = store.boot_choice(rebuilt, tmp_path / "factory")
    assert (path, why) == (store.slots_dir / "a", None)
    (store.slots_dir / "a" / "model.onnx").write_bytes(b"rotten")
    rebuilt = store.load()
    assert rebuilt.active is not None
    assert rebuilt.active.version == "2.0.0"
    shutil.rmtree(store.slots_dir / "b")
    assert store.load().active is None  # nothing verifies: the factory bundle
    untrusted = StateStore(store.state_dir, trust=None)
    shutil.rmtree(store.slots_dir / "a")
    install(store, packs["1.0.0"], trust)
    store.state_path.write_bytes(b"")
    store.prev_path.unlink()
    assert untrusted.load().active is None  # signed slots do not verify without trusted keys
    assert store.load().active is not None


ALL_PHASES = (
    "idle",
    "downloading",
    "verifying",
    "staged",
    "selftest",
    "probation",
    "committed",
    "rejected",
    "rolled_back",
)


@pytest.mark.parametrize("phase", ALL_PHASES)
def test_boot_choice_in_every_phase(
    tmp_path: Path, packs: dict[str, Path], trust: TrustStore, factory: Path, phase: str
) -> None:
    store = StateStore(tmp_path / "state", trust=trust)
    state = install(store, packs["1.0.0"], trust)
    info = store.stage(packs["2.0.0"], trust)
    with_candidate = transition(state, phase, candidate=info)  # type: ignore[arg-type]
    path, chosen, why = store.boot_choice(with_candidate, factory)
    assert path == store.slots_dir / "a"
    assert open_bundle(path, trust=trust).version == "1.0.0"
    assert chosen.active == state.active
    assert chosen.candidate is None
    if phase == "probation":
        assert chosen.phase == "rolled_back"
        assert why == "daemon restarted during probation"
        assert chosen.history[-1].reason == why
    elif phase in ("downloading", "verifying", "staged", "selftest"):
        assert chosen.phase == "idle"
        assert why is not None
        assert f"daemon restarted during {phase}" in why
    else:
        assert chosen.phase == phase
        assert why is None
    # without a candidate, a committed state boots unchanged
    done = commit(transition(state, "probation", candidate=info))
    path, chosen, why = store.boot_choice(done, factory)
    assert (path, chosen, why) == (store.slots_dir / "b", done, None)


def test_boot_choice_falls_back_to_previous_then_factory(
    tmp_path: Path, packs: dict[str, Path], trust: TrustStore, factory: Path
) -> None:
    store = StateStore(tmp_path / "state", trust=trust)
    install(store, packs["1.0.0"], trust)
    state = install(store, packs["2.0.0"], trust)
    # the active slot fails verification -> previous
    model = store.slots_dir / "b" / "model.onnx"
    model.write_bytes(model.read_bytes()[:-1] + b"X")
    path, chosen, why = store.boot_choice(state, factory)
    assert path == store.slots_dir / "a"
    assert chosen.active == state.previous
    assert chosen.previous is None
    assert chosen.phase == "rolled_back"
    assert why is not None
    assert "slot b" in why
    assert "fails verification" in why
    # the active slot deleted -> previous
    shutil.rmtree(store.slots_dir / "b")
    path, chosen, why = store.boot_choice(state, factory)
    assert path == store.slots_dir / "a"
    assert why is not None
    assert "tiny-cnn 2.0.0 (slot b) is missing" in why
    # everything gone -> factory
    shutil.rmtree(store.slots_dir / "a")
    path, chosen, why = store.boot_choice(state, factory)
    assert path == factory
    assert (chosen.active, chosen.previous, chosen.candidate) == (None, None, None)
    assert why is not None
    assert "falling back to the factory bundle" in why


def test_boot_choice_does_not_trust_an_overwritten_previous(
    tmp_path: Path, packs: dict[str, Path], trust: TrustStore, factory: Path
) -> None:
    """A state saved before stage() reused previous's slot must not serve what is there now."""
    store = StateStore(tmp_path / "state", trust=trust)
    install(store, packs["1.0.0"], trust)
    state = install(store, packs["2.0.0"], trust)  # active b, previous a
    assert store.stage(packs["3.0.0"], trust).slot == "a"  # then the daemon died before saving
    shutil.rmtree(store.slots_dir / "b")
    path, chosen, why = store.boot_choice(state, factory)
    assert path == factory  # slot a holds 3.0.0, never self-tested: not served as 1.0.0
    assert why is not None
    assert "slot a now holds tiny-cnn 3.0.0, not 1.0.0" in why
    assert chosen.active is None


def test_open_cleans_leftovers_and_restores_an_interrupted_swap(
    tmp_path: Path, packs: dict[str, Path], trust: TrustStore, factory: Path
) -> None:
    store = StateStore(tmp_path / "state", trust=trust)
    install(store, packs["1.0.0"], trust)
    state = install(store, packs["2.0.0"], trust)
    slots = store.slots_dir
    (slots / "b").rename(slots / ".trash-b-1234")  # died between the two renames of a swap
    (slots / ".staging-b-5678").mkdir()
    (slots / ".staging-b-5678" / "model.onnx").write_bytes(b"half")
    (slots / ".unpack-x").write_bytes(b"")
    (slots / ".trash-a-9999").mkdir()  # slot a exists: plain garbage
    store.tmp_path.write_bytes(b"{")
    reopened = StateStore(store.state_dir, trust=trust)
    assert sorted(p.name for p in slots.iterdir()) == ["a", "b"]
    assert not reopened.tmp_path.exists()
    path, chosen, why = reopened.boot_choice(reopened.load(), factory)
    assert (path, chosen, why) == (slots / "b", state, None)


def test_a_concurrent_install_is_neither_cleaned_nor_overlapped(
    tmp_path: Path, packs: dict[str, Path], trust: TrustStore
) -> None:
    store = StateStore(tmp_path / "state", trust=trust)
    install(store, packs["1.0.0"], trust)
    busy = store.slots_dir / ".staging-b-0000"
    fd = os.open(store.state_dir / ".slots.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a daemon in the middle of stage() holds it
        busy.mkdir()
        StateStore(store.state_dir, trust=trust)  # e.g. a status command opening the state
        assert busy.is_dir()
        with pytest.raises(UpdateError, match="another process is installing a bundle"):
            store.stage(packs["2.0.0"], trust)
    finally:
        os.close(fd)
    StateStore(store.state_dir, trust=trust)
    assert not busy.exists()
    assert store.stage(packs["2.0.0"], trust).slot == "b"


def test_unusable_state_dir_raises_state_error(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "state"
    not_a_dir.write_text("oops")
    with pytest.raises(StateError, match=f"state directory {not_a_dir} is not a directory"):
        StateStore(not_a_dir)
    inside_a_file = not_a_dir / "sub"
    with pytest.raises(StateError, match="cannot create the state directory"):
        StateStore(inside_a_file)


def test_pure_helpers_move_candidate_active_previous() -> None:
    state = _rich_state()
    assert state.active is not None
    assert state.candidate is not None
    done = commit(state, "self-test passed")
    assert (done.active, done.previous, done.candidate) == (state.candidate, state.active, None)
    assert done.phase == "committed"
    back = rollback(done, "operator rollback")
    assert (back.active, back.previous, back.candidate) == (state.active, None, None)
    to_factory = rollback(back, "again")
    assert to_factory.active is None
    with pytest.raises(UpdateError, match="nothing to roll back"):
        rollback(to_factory, "once more")
    with pytest.raises(UpdateError, match="nothing to commit"):
        commit(done)
    dropped = rollback(state, "probation failed")
    assert (dropped.active, dropped.candidate, dropped.phase) == (state.active, None, "rolled_back")
    with pytest.raises(StateError, match="cannot change"):
        transition(state, "idle", history=[])
    with pytest.raises(StateError, match="candidate and active both claim slot a"):
        transition(state, "staged", candidate=state.active)
    assert state.history[-1].phase == "selftest"  # the inputs are never modified


_WORKER = """
import sys
from pathlib import Path
from edge_runtime.bundle import TrustStore
from edge_runtime.sync.slots import StateStore, commit, transition

state_dir, pub, factory = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
packs = [Path(p) for p in sys.argv[4:]]
trust = TrustStore.from_files([pub])
store = StateStore(state_dir, trust=trust)
_path, state, _why = store.boot_choice(store.load(), factory)
store.save(state)
print("ready", flush=True)
n = 0
while True:
    state = transition(state, "downloading")
    store.save(state)
    info = store.stage(packs[n % len(packs)], trust)
    n += 1
    for phase in ("staged", "selftest", "probation"):
        state = transition(state, phase, candidate=info)
        store.save(state)
    state = commit(state)
    store.save(state)
"""


def test_kill_9_during_stage_and_save_always_leaves_a_servable_bundle(
    tmp_path: Path, packs: dict[str, Path], trust: TrustStore, keys: tuple[Path, Path], factory: Path
) -> None:
    store = StateStore(tmp_path / "state", trust=trust)
    install(store, packs["1.0.0"], trust)
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    cmd = [sys.executable, str(script), str(store.state_dir), str(keys[1]), str(factory)]
    cmd += [str(p) for p in packs.values()]
    rng = random.Random(2024)
    seen_phases: set[str] = set()
    leftovers = 0
    for _trial in range(30):
        with subprocess.Popen(
            cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        ) as proc:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line == "ready\n", proc.stderr.read() if proc.stderr else ""
            time.sleep(rng.uniform(0, 0.15))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            assert proc.returncode == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""
        leftovers += any(p.name.startswith(".") for p in store.slots_dir.iterdir())
        # at least one complete state file survives every kill: nothing is reconstructed
        copies = [p for p in (store.state_path, store.prev_path) if p.exists()]
        good = []
        for copy in copies:
            with contextlib.suppress(ValueError):
                good.append(DeviceState.model_validate_json(copy.read_bytes()))
        assert good, [c.read_bytes()[:200] for c in copies]
        reopened = StateStore(store.state_dir, trust=trust)
        state = reopened.load()
        seen_phases.add(state.phase)
        path, chosen, _why = reopened.boot_choice(state, factory)
        assert path != factory, chosen
        bundle = open_bundle(path, trust=trust)
        assert bundle.version in VERSIONS
        assert chosen.active is not None
        assert chosen.active.version == bundle.version
        assert reopened.check_slot(chosen.active) is None
    assert len(seen_phases) >= 2, seen_phases
    print(f"phases at kill: {sorted(seen_phases)}; slot swaps interrupted: {leftovers}")
