"""A/B model slots and the device's update state, both crash-safe.

Layout under the state directory::

    slots/a/, slots/b/     an unpacked, verified bundle each, plus the slot record
                           .edgert-slot.json (a SlotInfo written before the slot appears)
    state.json             the DeviceState
    state.json.prev        the state before the last save (always one complete copy)

Update life cycle (the daemon drives it, these helpers keep the fields consistent)::

    idle -> downloading -> verifying -> staged -> selftest -> probation -> committed
                                 \\-> rejected (reject)        \\-> rolled_back (rollback)

``active`` is the committed model (None = the factory bundle shipped with the device),
``candidate`` the staged update; during ``probation`` the daemon serves the candidate while
``active`` stays the fallback, and :func:`commit` then makes it active (the old active becomes
``previous``, the rollback target). An uncommitted update never survives a restart
(:meth:`StateStore.boot_choice`, Mender semantics).

Crash safety: :meth:`StateStore.stage` never writes into the active slot; a slot is replaced
by renames (old to ``.trash-*``, staging in), and each slot carries the record of what was
staged into it, so a state that names an overwritten slot is detected rather than trusted.
:meth:`StateStore.save` writes a temporary file, fsyncs and renames it over ``state.json``
after renaming the previous good ``state.json`` to ``state.json.prev``.

Processes sharing the directory (the daemon and, say, a status command) are serialized with
``flock`` on ``.state.lock`` (saves) and ``.slots.lock`` (installs and the clean-up of their
leftovers), so opening a store never removes the files of an install in progress.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    ValidationError,
    field_validator,
    model_validator,
)

from edge_runtime.bundle.archive import fsync_dir, unpack_bundle
from edge_runtime.bundle.loader import open_bundle, sha256_file
from edge_runtime.bundle.manifest import format_validation_error
from edge_runtime.bundle.signing import TrustStore
from edge_runtime.errors import BundleError, StateError, UpdateError

__all__ = [
    "HISTORY_LIMIT",
    "SLOT_RECORD_NAME",
    "STATE_NAME",
    "DeviceState",
    "HistoryEntry",
    "Phase",
    "SlotInfo",
    "SlotName",
    "StateStore",
    "commit",
    "reject",
    "rollback",
    "transition",
]

log = logging.getLogger(__name__)

SlotName = Literal["a", "b"]
Phase = Literal[
    "idle",
    "downloading",
    "verifying",
    "staged",
    "selftest",
    "probation",
    "committed",
    "rejected",
    "rolled_back",
]
SLOTS: tuple[SlotName, ...] = get_args(SlotName)
HISTORY_LIMIT = 20
STATE_NAME = "state.json"
SLOT_RECORD_NAME = ".edgert-slot.json"
_PRE_ACTIVE: frozenset[str] = frozenset({"downloading", "verifying", "staged", "selftest"})
_MAX_STATE_BYTES = 1 << 20


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@contextlib.contextmanager
def _flock(path: Path, *, wait: bool) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``path``; yields False when ``wait`` is off and it is taken."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StateError(
            f"cannot open the lock file {path}: {exc}; make the state directory writable by the daemon"
        ) from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            acquired = False
        else:
            acquired = True
        yield acquired
    finally:
        os.close(fd)  # releases the lock (so does the death of the process)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SlotInfo(_Model):
    """A bundle installed into a slot."""

    slot: SlotName
    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the packed bundle")
    installed_at: AwareDatetime = Field(description="wall clock when it was staged")

    def label(self) -> str:
        """``name version (slot x)`` for messages."""
        return f"{self.name} {self.version} (slot {self.slot})"


class HistoryEntry(_Model):
    """One phase change."""

    phase: Phase
    version: str | None
    reason: str
    at: AwareDatetime


class DeviceState(_Model):
    """The device's update state (``state.json``)."""

    schema_version: Literal[1] = 1
    active: SlotInfo | None = Field(default=None, description="committed model; None = factory bundle")
    previous: SlotInfo | None = Field(default=None, description="last good model, the rollback target")
    candidate: SlotInfo | None = None
    phase: Phase = "idle"
    reason: str = ""
    last_document: dict[str, JsonValue] | None = Field(
        default=None,
        description="group, version, issued_at, sequence of the last accepted desired document",
    )
    history: list[HistoryEntry] = Field(default_factory=list)

    @field_validator("history")
    @classmethod
    def _bounded(cls, value: list[HistoryEntry]) -> list[HistoryEntry]:
        return value[-HISTORY_LIMIT:]

    @model_validator(mode="after")
    def _distinct_slots(self) -> DeviceState:
        used: dict[str, str] = {}
        for role in ("active", "previous", "candidate"):
            info: SlotInfo | None = getattr(self, role)
            if info is None:
                continue
            if info.slot in used:
                raise ValueError(f"{role} and {used[info.slot]} both claim slot {info.slot}")
            used[info.slot] = role
        return self

    def serving_version(self) -> str | None:
        """Version of the candidate in probation, else of the active model (None = factory)."""
        if self.phase == "probation" and self.candidate is not None:
            return self.candidate.version
        return None if self.active is None else self.active.version


_CHANGEABLE = frozenset({"active", "previous", "candidate", "last_document"})


def transition(state: DeviceState, phase: Phase, reason: str = "", **changes: Any) -> DeviceState:
    """The state after moving to ``phase`` with ``changes`` (pure; history is appended).

    ``changes`` may set ``active``, ``previous``, ``candidate`` and ``last_document``. A
    candidate staged into the slot of ``previous`` overwrote it, so ``previous`` is dropped.
    """
    unknown = sorted(set(changes) - _CHANGEABLE)
    if unknown:
        raise StateError(f"transition() cannot change {unknown}; it changes {sorted(_CHANGEABLE)}")
    data: dict[str, Any] = {
        "active": state.active,
        "previous": state.previous,
        "candidate": state.candidate,
        "last_document": state.last_document,
        **changes,
    }
    try:
        for role in ("active", "previous", "candidate"):
            if data[role] is not None and not isinstance(data[role], SlotInfo):
                data[role] = SlotInfo.model_validate(data[role])
        candidate, previous, active = data["candidate"], data["previous"], data["active"]
        if candidate is not None and previous is not None and candidate.slot == previous.slot:
            data["previous"] = None
        shown = candidate if candidate is not None else active
        entry = HistoryEntry(
            phase=phase, version=None if shown is None else shown.version, reason=reason, at=_now()
        )
        return DeviceState.model_validate(
            {**data, "phase": phase, "reason": reason, "history": [*state.history, entry]}
        )
    except ValidationError as exc:
        raise StateError(
            f"invalid state change to {phase!r}: {format_validation_error(exc)}; this is a bug in the caller"
        ) from exc


def commit(state: DeviceState, reason: str = "") -> DeviceState:
    """The candidate becomes active; the old active becomes ``previous`` (the rollback target)."""
    if state.candidate is None:
        raise UpdateError("nothing to commit: no candidate is staged")
    return transition(
        state, "committed", reason, active=state.candidate, previous=state.active, candidate=None
    )


def rollback(state: DeviceState, reason: str) -> DeviceState:
    """Back to the last good model.

    With a candidate, the candidate is dropped (``active`` never changed). Without one, the
    active model is given up for ``previous`` (the factory bundle when there is none).
    """
    if state.candidate is not None:
        return transition(state, "rolled_back", reason, candidate=None)
    if state.active is not None:
        return transition(state, "rolled_back", reason, active=state.previous, previous=None)
    raise UpdateError("nothing to roll back: no update is pending and the factory bundle is serving")


def reject(state: DeviceState, reason: str) -> DeviceState:
    """The candidate failed verification or its self-test: drop it, keep ``active``."""
    return transition(state, "rejected", reason, candidate=None)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class StateStore:
    """The state directory: slots, ``state.json`` and the operations that keep them consistent.

    ``trust``/``require_signature`` are used to verify slots at boot and when the state must
    be reconstructed. Opening removes leftovers of interrupted operations (``.staging-*``,
    ``.unpack-*``; a ``.trash-*`` is put back when its slot is missing).
    """

    def __init__(
        self, state_dir: Path, *, trust: TrustStore | None = None, require_signature: bool = True
    ) -> None:
        self.state_dir = state_dir
        self.slots_dir = state_dir / "slots"
        self.state_path = state_dir / STATE_NAME
        self.prev_path = state_dir / f"{STATE_NAME}.prev"
        self.tmp_path = state_dir / f"{STATE_NAME}.tmp"
        self._slots_lock = state_dir / ".slots.lock"
        self._state_lock = state_dir / ".state.lock"
        self.trust = trust
        self.require_signature = require_signature
        self.recovered: str | None = None
        """Set by :meth:`load` when ``state.json`` was damaged or missing: what was lost, and how."""
        self._check_dir()
        try:
            self.slots_dir.mkdir(parents=True, exist_ok=True)
            self._clean_stale()
        except OSError as exc:
            raise StateError(
                f"state directory {state_dir} is not usable: {exc}; make it a writable directory "
                "owned by the daemon's user"
            ) from exc

    # -- directory ----------------------------------------------------------------------

    def _check_dir(self) -> None:
        path = self.state_dir
        if path.exists() and not path.is_dir():
            raise StateError(f"state directory {path} is not a directory; remove it or choose another path")
        if not path.exists():
            try:
                path.mkdir(parents=True)
            except OSError as exc:
                raise StateError(
                    f"cannot create the state directory {path}: {exc}; create it writable by the daemon"
                ) from exc
        if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
            raise StateError(
                f"state directory {path} is not readable and writable by this user; fix its owner "
                "or mode (chown/chmod)"
            )

    def _clean_stale(self) -> None:
        with _flock(self._state_lock, wait=True):
            self.tmp_path.unlink(missing_ok=True)
        with _flock(self._slots_lock, wait=False) as mine:
            if mine:  # else another process is staging: its files are not stale
                self._clean_stale_slots()

    def _clean_stale_slots(self) -> None:
        restored = False
        for path in sorted(self.slots_dir.iterdir()):
            name = path.name
            if name.startswith((".staging-", ".unpack-")):
                log.info("removing %s left by an interrupted install", path)
                _remove(path)
            elif name.startswith(".trash-"):
                slot = name.split("-")[1] if name.count("-") >= 2 else ""
                target = self.slots_dir / slot
                if slot in SLOTS and not target.exists():
                    log.warning("putting back slot %s from %s (a slot swap was interrupted)", slot, path)
                    path.rename(target)
                    restored = True
                else:
                    _remove(path)
        if restored:
            fsync_dir(self.slots_dir)

    # -- state file ---------------------------------------------------------------------

    def _read(self, path: Path) -> DeviceState | None:
        """The state in ``path``; None when missing. Damage is raised as ValueError."""
        try:
            with path.open("rb") as fh:
                raw = fh.read(_MAX_STATE_BYTES + 1)
        except FileNotFoundError:
            return None
        except PermissionError as exc:
            raise StateError(
                f"cannot read {path}: {exc}; fix the owner or mode of the state directory"
            ) from exc
        except OSError as exc:
            raise ValueError(f"cannot read it ({exc})") from exc
        if len(raw) > _MAX_STATE_BYTES:
            raise ValueError(f"it is larger than {_MAX_STATE_BYTES} bytes")
        if not raw.strip():
            raise ValueError("it is empty (truncated)")
        try:
            return DeviceState.model_validate_json(raw)
        except ValidationError as exc:
            raise ValueError(format_validation_error(exc)[:500]) from exc

    def load(self) -> DeviceState:
        """The saved state; never raises for a damaged file.

        Order: ``state.json``, then ``state.json.prev``, then a state reconstructed from the
        slots that verify. Nothing saved at all gives a fresh idle state (factory bundle).
        When ``state.json`` could not be used, :attr:`recovered` says what was lost and how the
        state was recovered (None otherwise), so the caller can report it.
        """
        self._check_dir()
        self.recovered = None
        damaged: list[str] = []
        for path in (self.state_path, self.prev_path):
            try:
                state = self._read(path)
            except ValueError as exc:
                log.error("device state file %s is damaged: %s", path, exc)
                damaged.append(f"{path.name}: {exc}")
                continue
            if state is None:
                continue
            if path is self.prev_path:
                log.warning("using %s because %s is missing or damaged", path, self.state_path.name)
                lost = "; ".join(damaged) or f"{self.state_path.name} is missing"
                self.recovered = f"device state lost ({lost}); using {path.name}, the state before the save"
            return state
        if not damaged:
            return DeviceState()
        state = self.reconstruct("; ".join(damaged))
        self.recovered = state.reason
        return state

    def save(self, state: DeviceState) -> None:
        """Write ``state`` durably; the state it replaces is kept as ``state.json.prev``."""
        self._check_dir()
        data = state.model_dump_json(indent=2).encode() + b"\n"
        try:
            with _flock(self._state_lock, wait=True):
                self._save_locked(data)
        except OSError as exc:
            raise StateError(
                f"cannot save the device state to {self.state_path}: {exc}; check free space and "
                "permissions of the state directory"
            ) from exc

    def _save_locked(self, data: bytes) -> None:
        fd = os.open(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if self._current_is_good():
            self.state_path.replace(self.prev_path)
        self.tmp_path.replace(self.state_path)
        fsync_dir(self.state_dir)

    def _current_is_good(self) -> bool:
        try:
            return self._read(self.state_path) is not None
        except ValueError:
            return False

    def reconstruct(self, why: str = "") -> DeviceState:
        """A state rebuilt from the slots whose bundles verify (the oldest becomes active).

        The oldest is chosen because a newer one may be an update that was never committed.
        """
        found: list[SlotInfo] = []
        for slot in SLOTS:
            info = self._slot_record(slot)
            if info is not None and info.slot == slot and self.check_slot(info) is None:
                found.append(info)
        found.sort(key=lambda info: info.installed_at)
        active = found[0] if found else None
        serving = "the factory bundle" if active is None else active.label()
        reason = f"state reconstructed from the slots ({why}); serving {serving}"
        log.error("device state lost: %s", reason)
        return transition(DeviceState(), "idle", reason, active=active)

    # -- slots --------------------------------------------------------------------------

    def bundle_dir(self, info: SlotInfo | None) -> Path | None:
        """Directory of the bundle in ``info``'s slot; None for the factory bundle."""
        return None if info is None else self.slots_dir / info.slot

    def _slot_record(self, slot: str) -> SlotInfo | None:
        try:
            raw = (self.slots_dir / slot / SLOT_RECORD_NAME).read_bytes()
            return SlotInfo.model_validate_json(raw)
        except (OSError, ValidationError):
            return None

    def check_slot(self, info: SlotInfo) -> str | None:
        """None when ``info``'s slot holds exactly that bundle and it verifies; else why not."""
        root = self.slots_dir / info.slot
        if not root.is_dir():
            return f"{info.label()} is missing"
        record = self._slot_record(info.slot)
        if record is None:
            return f"{info.label()} has no readable slot record {SLOT_RECORD_NAME}"
        if record.sha256 != info.sha256 or record.slot != info.slot:
            return f"slot {info.slot} now holds {record.name} {record.version}, not {info.version}"
        try:
            bundle = open_bundle(root, trust=self.trust, require_signature=self.require_signature)
        except BundleError as exc:
            return f"{info.label()} fails verification: {exc}"
        if (bundle.name, bundle.version) != (info.name, info.version):
            return f"{info.label()} holds {bundle.name} {bundle.version}"
        return None

    def _pick_slot(self, state: DeviceState) -> SlotName:
        free = [s for s in SLOTS if state.active is None or s != state.active.slot]
        if state.previous is not None and len(free) > 1:
            free = [s for s in free if s != state.previous.slot]
        return free[0]

    def stage(
        self, packed_bundle: Path, trust: TrustStore | None, require_signature: bool = True
    ) -> SlotInfo:
        """Verify and unpack ``packed_bundle`` into the slot that is not active.

        The signature is checked before any payload byte is used (``unpack_bundle``); the
        slot is replaced only when everything verified. The slot is chosen from the *saved*
        state (save before staging). The caller records the result, e.g.
        ``store.save(transition(state, "staged", candidate=info))``. Raises
        :class:`UpdateError` (its ``__cause__`` is the BundleError) for a refused bundle.
        """
        with _flock(self._slots_lock, wait=False) as mine:
            if not mine:
                raise UpdateError(
                    f"another process is installing a bundle into {self.slots_dir}; try again when it is done"
                )
            return self._stage_locked(packed_bundle, trust, require_signature)

    def _stage_locked(
        self, packed_bundle: Path, trust: TrustStore | None, require_signature: bool
    ) -> SlotInfo:
        state = self.load()
        if state.phase == "probation" and state.candidate is not None:
            raise UpdateError(
                f"{state.candidate.label()} is in probation; commit or roll it back before staging another"
            )
        slot = self._pick_slot(state)
        try:
            sha256 = sha256_file(packed_bundle)
        except OSError as exc:
            raise UpdateError(f"cannot read the bundle {packed_bundle}: {exc}") from exc
        staging = self.slots_dir / f".staging-{slot}-{secrets.token_hex(4)}"
        try:
            try:
                manifest = unpack_bundle(
                    packed_bundle, staging, trust=trust, require_signature=require_signature
                )
            except BundleError as exc:
                raise UpdateError(f"bundle {packed_bundle.name} was refused: {exc}") from exc
            info = SlotInfo(
                slot=slot, name=manifest.name, version=manifest.version, sha256=sha256, installed_at=_now()
            )
            record = staging / SLOT_RECORD_NAME
            with record.open("xb") as fh:
                fh.write(info.model_dump_json().encode())
                fh.flush()
                os.fsync(fh.fileno())
            fsync_dir(staging)
            self._swap_in(staging, slot)
        except OSError as exc:
            raise UpdateError(
                f"cannot install bundle {packed_bundle.name} into slot {slot}: {exc}; check free space "
                f"in {self.slots_dir}"
            ) from exc
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        log.info("staged %s from %s", info.label(), packed_bundle.name)
        return info

    def _swap_in(self, staging: Path, slot: SlotName) -> None:
        target = self.slots_dir / slot
        trash: Path | None = None
        if target.exists():
            trash = self.slots_dir / f".trash-{slot}-{secrets.token_hex(4)}"
            target.rename(trash)
        staging.rename(target)
        fsync_dir(self.slots_dir)
        if trash is not None:
            shutil.rmtree(trash)

    # -- boot ---------------------------------------------------------------------------

    def boot_choice(self, state: DeviceState, factory: Path) -> tuple[Path, DeviceState, str | None]:
        """Which bundle to serve after a (re)start, the state to save, and why it changed.

        An update in probation is rolled back (it was never committed); one that was not
        yet serving is dropped. A slot that is missing or fails verification falls back to
        ``previous``, then to ``factory``. The state is not saved here.
        """
        reasons: list[str] = []
        if state.phase == "probation" and state.candidate is not None:
            reason = "daemon restarted during probation"
            state = rollback(state, reason)
            reasons.append(reason)
        elif state.phase in _PRE_ACTIVE:
            reason = f"daemon restarted during {state.phase}; the update will be tried again"
            state = transition(state, "idle", reason, candidate=None)
            reasons.append(reason)
        elif state.candidate is not None:
            state = transition(state, state.phase, state.reason, candidate=None)
        while state.active is not None:
            problem = self.check_slot(state.active)
            if problem is None:
                return self.slots_dir / state.active.slot, state, "; ".join(reasons) or None
            fallback = "the factory bundle" if state.previous is None else state.previous.label()
            reason = f"{problem}; falling back to {fallback}"
            log.error("%s", reason)
            reasons.append(reason)
            state = transition(state, "rolled_back", reason, active=state.previous, previous=None)
        return factory, state, "; ".join(reasons) or None
