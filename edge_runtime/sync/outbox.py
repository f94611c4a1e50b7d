"""The disk-backed outbox every telemetry record, event and update transition goes through.

Records are written to an SQLite database in WAL mode before the MQTT sender publishes them
with QoS 1; the sender calls :meth:`Outbox.ack` when the broker's PUBACK arrives.  A crash
between the publish and the ack re-sends the record after the restart (at-least-once), so
consumers drop duplicates by ``seq``::

    with Outbox(state_dir / "outbox.db") as outbox:
        outbox.put("telemetry", {"cpu": 0.4})              # -> seq, e.g. 1
        outbox.put_many("events", [{"label": "person"}], priority=1)
        for record in outbox.peek(100):                    # priority desc, then seq asc
            publish(record.stream, record.payload)         # bytes, JSON for dict payloads
        outbox.ack(seqs_whose_puback_arrived)
        report = outbox.take_drop_report()                 # None, or what was lost and why

Guarantees and how they are kept:

* **Sequence numbers** are one counter per device across all streams, kept in the ``state``
  row and advanced in the same transaction as the insert, so they are strictly increasing
  and never reused, also after acks, drops, an emptied table or ``kill -9``.
  ``synchronous=NORMAL`` may roll back the newest transactions after a *power loss*; a
  seq handed out (and maybe already sent) before such a loss must not be handed out again
  with other content, so with NORMAL sequence numbers are reserved in blocks of
  ``_SEQ_BLOCK`` by a transaction committed with ``synchronous=FULL`` (one fsync per block).
  When the database shows the last session did not close cleanly *and* the machine has
  rebooted since (a different Linux ``boot_id``), numbering resumes after the reserved block
  and the possibly lost range is reported.  After a plain ``kill -9`` (same boot) the
  operating system still had every committed page, so numbering continues without a gap.
* **Bound**: when the stored bytes (payload + stream name + ``RECORD_OVERHEAD_BYTES`` per
  record) would exceed ``max_bytes``, expired records go first, then the lowest priority and
  within it the oldest.  A new record never evicts records of a higher priority: if it only
  fits by doing so, the new record itself is dropped.  Every dropped record is counted per
  stream in the database, so the counts survive restarts.  A single record larger than
  ``max_bytes`` is refused with :class:`OutboxError`.
* **Nothing silent**: per stream ``produced == delivered + dropped + expired + pending``
  holds at every commit; :meth:`Outbox.take_drop_report` hands out the drops, expiries and
  incidents (a quarantined corrupt database, a possibly lost seq range after a power loss)
  not reported yet.
* **Corruption**: a file that is not an SQLite database or fails ``PRAGMA quick_check`` is
  moved aside to ``<name>.corrupt-<UTC time>`` (with its ``-wal``/``-shm``), an error is
  logged, a fresh outbox is created and the quarantine is reported.  Numbering resumes above
  anything salvageable from the bad file and above the wall clock in microseconds, so no
  seq is reused.  ``quick_check`` reads the whole file: opening a full 64 MiB outbox on an
  SD card takes a moment.
* **Disk usage**: the database uses ``auto_vacuum=INCREMENTAL``; when acks empty the
  outbox (at most once a minute unless the WAL is over 4 MiB) and on :meth:`Outbox.prune`,
  free pages are returned with ``PRAGMA incremental_vacuum`` and the WAL is truncated with
  ``PRAGMA wal_checkpoint(TRUNCATE)``; ``journal_size_limit`` caps the WAL left after
  automatic checkpoints (every 1000 pages), so the WAL stays around 4 MiB at most.  Every
  commit appends a few 4 KiB pages to the WAL: batch with :meth:`Outbox.put_many` to spare
  flash storage.

One :class:`Outbox` per database file: it is thread-safe (one connection, one lock), but
two daemons sharing a file are not supported (the sequence counter would still be correct,
the clean-close bookkeeping would not).
"""

from __future__ import annotations

import enum
import json
import logging
import math
import re
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from edge_runtime.errors import OutboxError

__all__ = ["DEFAULT_TTL", "RECORD_OVERHEAD_BYTES", "SCHEMA_VERSION", "Outbox", "Record"]

log = logging.getLogger(__name__)

SCHEMA_VERSION: Final = 1
"""``PRAGMA user_version`` of the database layout this module writes."""

RECORD_OVERHEAD_BYTES: Final = 48
"""Bytes charged per record on top of payload and stream name (row header, keys, index entries)."""

_SEQ_BLOCK: Final = 1024
_MAX_RESERVE_ATTEMPTS: Final = 8
_BUSY_TIMEOUT_S: Final = 10.0
_COMPACT_INTERVAL_S: Final = 60.0
_DROP_LOG_INTERVAL_S: Final = 60.0
_JOURNAL_SIZE_LIMIT: Final = 4 * 1024 * 1024
_IN_CHUNK: Final = 500
_MAX_PRIORITY: Final = 2**31
_SQLITE_HEADER_BYTES: Final = 100
# 2020-01-01T00:00:00Z.  A device without a real-time clock boots at the epoch (or at a
# stale saved time) until NTP steps the clock; TTLs are not applied to records created
# before the clock is plausible, or the first NTP step would expire every one of them.
_PLAUSIBLE_EPOCH: Final = 1_577_836_800.0
_STREAM_RE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
_BOOT_ID_FILE: Final = Path("/proc/sys/kernel/random/boot_id")  # Linux kernel interface

# SQLite primary result codes (sqlite3.h).
_SQLITE_PERM, _SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_READONLY = 3, 5, 6, 8
_SQLITE_IOERR, _SQLITE_CORRUPT, _SQLITE_FULL, _SQLITE_CANTOPEN, _SQLITE_NOTADB = 10, 11, 13, 14, 26

_SCHEMA: Final = (
    """CREATE TABLE records (
        seq INTEGER PRIMARY KEY,
        stream TEXT NOT NULL,
        priority INTEGER NOT NULL,
        created REAL NOT NULL,
        expires REAL,
        size INTEGER NOT NULL,
        payload BLOB NOT NULL
    )""",
    "CREATE INDEX records_by_priority ON records (priority DESC, seq)",
    "CREATE INDEX records_by_expiry ON records (expires) WHERE expires IS NOT NULL",
    """CREATE TABLE state (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        last_seq INTEGER NOT NULL,
        seq_reserved INTEGER NOT NULL,
        pending_rows INTEGER NOT NULL,
        pending_bytes INTEGER NOT NULL,
        hwm_rows INTEGER NOT NULL,
        hwm_bytes INTEGER NOT NULL,
        clean_close INTEGER NOT NULL,
        boot_id TEXT
    )""",
    "INSERT INTO state VALUES (1, 0, 0, 0, 0, 0, 0, 1, NULL)",
    """CREATE TABLE counters (
        stream TEXT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('produced', 'delivered', 'dropped', 'expired')),
        total INTEGER NOT NULL,
        reported INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (stream, kind)
    ) WITHOUT ROWID""",
    """CREATE TABLE incidents (
        id INTEGER PRIMARY KEY,
        at REAL NOT NULL,
        kind TEXT NOT NULL,
        detail TEXT NOT NULL,
        reported INTEGER NOT NULL DEFAULT 0
    )""",
)
_TABLES: Final = frozenset({"records", "state", "counters", "incidents"})
_KINDS: Final = ("produced", "delivered", "dropped", "expired")


class _Default(enum.Enum):
    TTL = "default"


DEFAULT_TTL: Final = _Default.TTL
"""Marker for ``ttl_s``: use the outbox's ``default_ttl_s`` (``None`` means never expire)."""


@dataclass(frozen=True, slots=True)
class Record:
    """One stored record as :meth:`Outbox.peek` returns it.

    ``payload`` is the bytes to publish: for dict payloads the JSON object with ``seq`` and
    ``ts`` (wall-clock seconds at :meth:`Outbox.put`) added, otherwise the bytes as given.
    """

    seq: int
    stream: str
    priority: int
    payload: bytes
    created: float


@dataclass(slots=True)
class _State:
    last_seq: int
    seq_reserved: int
    pending_rows: int
    pending_bytes: int
    hwm_rows: int
    hwm_bytes: int
    clean_close: int
    boot_id: str | None


@dataclass(frozen=True, slots=True)
class _Item:
    """A record ready to insert: ``body`` is raw bytes or a JSON object still without seq/ts."""

    stream: str
    priority: int
    body: bytes
    is_json: bool
    ttl_s: float | None


class _CorruptError(Exception):
    """The database file is damaged; it is quarantined and replaced."""


class _NeedReservationError(Exception):
    def __init__(self, count: int) -> None:
        super().__init__(count)
        self.count = count


def _boot_id() -> str | None:
    """This boot's id (Linux); ``None`` where unknown, which is treated as 'maybe rebooted'."""
    try:
        return _BOOT_ID_FILE.read_text(encoding="ascii").strip() or None
    except OSError:
        return None


def _primary_code(exc: sqlite3.Error) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF
    text = str(exc).lower()  # Python 3.10 has no sqlite_errorcode
    for needle, guess in (
        ("not a database", _SQLITE_NOTADB),
        ("malformed", _SQLITE_CORRUPT),
        ("readonly", _SQLITE_READONLY),
        ("unable to open", _SQLITE_CANTOPEN),
        ("locked", _SQLITE_BUSY),
        ("disk is full", _SQLITE_FULL),
        ("disk i/o", _SQLITE_IOERR),
    ):
        if needle in text:
            return guess
    return None


def _is_corruption(exc: sqlite3.Error) -> bool:
    return _primary_code(exc) in (_SQLITE_CORRUPT, _SQLITE_NOTADB)


def _rollback_quietly(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error as exc:  # the original error matters more
            log.warning("outbox rollback failed: %s", exc)


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """A write transaction: ``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back on any error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        _rollback_quietly(conn)
        raise


def _read_state(conn: sqlite3.Connection) -> _State:
    row = conn.execute(
        "SELECT last_seq, seq_reserved, pending_rows, pending_bytes, hwm_rows, hwm_bytes,"
        " clean_close, boot_id FROM state WHERE id = 1"
    ).fetchone()
    if row is None:
        raise _CorruptError("the state row is missing")
    return _State(*row)


def _write_state(conn: sqlite3.Connection, st: _State) -> None:
    conn.execute(
        "UPDATE state SET last_seq = ?, seq_reserved = ?, pending_rows = ?, pending_bytes = ?,"
        " hwm_rows = ?, hwm_bytes = ?, clean_close = ?, boot_id = ? WHERE id = 1",
        (
            st.last_seq,
            st.seq_reserved,
            st.pending_rows,
            st.pending_bytes,
            st.hwm_rows,
            st.hwm_bytes,
            st.clean_close,
            st.boot_id,
        ),
    )


def _bump(conn: sqlite3.Connection, kind: str, counts: Mapping[str, int]) -> None:
    conn.executemany(
        "INSERT INTO counters (stream, kind, total) VALUES (?, ?, ?)"
        " ON CONFLICT (stream, kind) DO UPDATE SET total = total + excluded.total",
        [(stream, kind, n) for stream, n in counts.items() if n],
    )


def _add_incident(conn: sqlite3.Connection, at: float, kind: str, detail: Mapping[str, Any]) -> None:
    conn.execute(
        "INSERT INTO incidents (at, kind, detail) VALUES (?, ?, ?)", (at, kind, json.dumps(dict(detail)))
    )


def _json_default(obj: object) -> Any:
    tolist = getattr(obj, "tolist", None)  # numpy scalars and arrays
    if callable(tolist):
        return tolist()
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def _finish_body(item: _Item, seq: int, now: float) -> bytes:
    if not item.is_json:
        return item.body
    head = b'{"seq":%d,"ts":%s' % (seq, json.dumps(now).encode("ascii"))
    return head + (b"}" if item.body == b"{}" else b"," + item.body[1:])


def _salvage(path: Path) -> tuple[int | None, int | None]:
    """Best effort on a damaged file: (highest seq it knows of, records it still held)."""
    best: int | None = None
    pending: int | None = None
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except (sqlite3.Error, OSError, ValueError):
        return None, None
    try:
        for query in ("SELECT MAX(last_seq, seq_reserved) FROM state", "SELECT MAX(seq) FROM records"):
            try:
                row = conn.execute(query).fetchone()
            except sqlite3.Error:
                continue
            if row is not None and isinstance(row[0], int):
                best = row[0] if best is None else max(best, row[0])
        try:
            row = conn.execute("SELECT COUNT(*) FROM records").fetchone()
            pending = int(row[0])
        except sqlite3.Error:
            pending = None
    finally:
        conn.close()
    return best, pending


class Outbox:
    """A bounded, crash-safe, disk-backed queue of records waiting for the MQTT sender.

    Args:
        path: the database file; parent directories are created.
        max_bytes: bound on stored bytes (payload + stream name + ``RECORD_OVERHEAD_BYTES``
            per record); the file on disk is larger by SQLite's page and index overhead.
        default_ttl_s: records older than this are deleted (and counted as expired) on
            :meth:`peek` / :meth:`prune`; ``None`` keeps records until acked or dropped.
        synchronous: ``"NORMAL"`` (fast; a power loss may lose the newest commits, which
            is detected and reported) or ``"FULL"`` (an fsync on every commit).
        clock: wall-clock seconds since the epoch.  TTLs and ``created``/``ts`` use the wall
            clock, not ``time.monotonic``, because records outlive the process and the boot:
            the monotonic clock restarts at every boot, so an age measured with it would be
            meaningless after a restart.  TTLs are only applied while the clock reads after
            2020 (see ``_PLAUSIBLE_EPOCH``).

    Raises:
        OutboxError: the path is unusable (a directory, not writable, a newer schema, a
            database of another program); the message names the path and the fix.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int = 64 * 1024 * 1024,
        default_ttl_s: float | None = 7 * 24 * 3600.0,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if (
            isinstance(max_bytes, bool)
            or not isinstance(max_bytes, int)
            or max_bytes <= RECORD_OVERHEAD_BYTES
        ):
            raise OutboxError(
                f"outbox max_bytes must be an integer above {RECORD_OVERHEAD_BYTES}, got {max_bytes!r}; "
                "use e.g. 67108864 (64 MiB)"
            )
        self._default_ttl = self._check_ttl(default_ttl_s, "default_ttl_s")
        if synchronous not in ("NORMAL", "FULL"):
            raise OutboxError(f"outbox synchronous must be 'NORMAL' or 'FULL', got {synchronous!r}")
        self._path = Path(path)
        self._max_bytes = max_bytes
        self._synchronous: Literal["NORMAL", "FULL"] = synchronous
        self._clock = clock
        self._lock = threading.Lock()
        self._last_compact = -math.inf
        self._last_drop_log = -math.inf
        self._warned_clock = False
        self._conn: sqlite3.Connection | None = self._open()

    # ------------------------------------------------------------------ properties

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    @property
    def max_bytes(self) -> int:
        """The bound on stored bytes."""
        return self._max_bytes

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._conn is None

    # ------------------------------------------------------------------ opening

    def _open(self) -> sqlite3.Connection:
        path = self._path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutboxError(
                f"cannot create the outbox directory {path.parent}: {exc.strerror or exc}; create it "
                "writable by the daemon user or point the outbox path at a writable directory"
            ) from exc
        if path.is_dir():
            raise OutboxError(
                f"outbox path {path} is a directory; the outbox needs a file path, e.g. {path / 'outbox.db'}"
            )
        if path.exists() and not path.is_file():
            raise OutboxError(f"outbox path {path} exists but is not a regular file; point it at a file path")
        try:
            size = path.stat().st_size if path.exists() else None
        except OSError:
            size = None
        if size is not None and size < _SQLITE_HEADER_BYTES:
            # SQLite opens an empty (or 1-byte) file as a new database: a file cut short by a power
            # loss would silently become an empty outbox numbering from 1 again. Our database
            # has its header from the first open (WAL mode is recorded in it).
            return self._replace_corrupt(f"the file is {size} bytes, shorter than an SQLite header")
        try:
            return self._connect(quarantine=None)
        except _CorruptError as bad:
            return self._replace_corrupt(str(bad))

    def _connect(self, quarantine: dict[str, Any] | None) -> sqlite3.Connection:
        """Open, check and configure the database and start a session; ``_CorruptError`` if damaged."""
        try:
            conn = sqlite3.connect(
                self._path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise self._error("open the database", exc) from exc
        try:
            self._configure(conn)
            self._begin_session(conn, quarantine)
        except sqlite3.Error as exc:
            conn.close()
            if _is_corruption(exc):
                raise _CorruptError(str(exc)) from exc
            raise self._error("open the database", exc) from exc
        except BaseException:
            conn.close()
            raise
        return conn

    def _configure(self, conn: sqlite3.Connection) -> None:
        conn.execute(f"PRAGMA busy_timeout = {int(_BUSY_TIMEOUT_S * 1000)}")
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise OutboxError(
                f"outbox {self._path} has schema version {version}, written by a newer edgert; this "
                f"version reads schema {SCHEMA_VERSION}. Upgrade edgert, or move the file aside to start "
                "an empty outbox (its pending records would not be sent)"
            )
        if version == 0:
            tables = sorted(r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))
            if tables:
                raise OutboxError(
                    f"{self._path} is an SQLite database of another program (tables: {', '.join(tables)}), "
                    "not an edgert outbox; point the outbox path at a new file"
                )
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")  # only takes effect before the first table
        mode = str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
        if mode.lower() != "wal":
            raise OutboxError(
                f"outbox {self._path} cannot use WAL journaling (SQLite kept {mode!r}); put it on a local "
                "filesystem (not NFS/SMB or a read-only mount)"
            )
        conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        conn.execute(f"PRAGMA journal_size_limit = {_JOURNAL_SIZE_LIMIT}")
        problems = [str(r[0]) for r in conn.execute("PRAGMA quick_check").fetchall()]
        if problems != ["ok"]:
            raise _CorruptError("quick_check: " + "; ".join(problems[:3]))
        if version == 0:
            with _transaction(conn):
                if int(conn.execute("PRAGMA user_version").fetchone()[0]) == 0:  # not created meanwhile
                    for statement in _SCHEMA:
                        conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        missing = _TABLES - {
            r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        if missing:
            raise _CorruptError(f"tables missing: {', '.join(sorted(missing))}")

    def _replace_corrupt(self, reason: str) -> sqlite3.Connection:
        path = self._path
        salvaged_seq, lost = _salvage(path)
        now = self._now()
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        target = path.with_name(f"{path.name}.corrupt-{stamp}")
        n = 0
        while target.exists():
            n += 1
            target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
        try:
            for suffix in ("", "-wal", "-shm"):
                src = path.with_name(path.name + suffix)
                if src.exists():
                    src.replace(target.with_name(target.name + suffix))
        except OSError as exc:
            raise OutboxError(
                f"outbox {path} is corrupt ({reason}) and could not be moved aside: {exc}; "
                "move or delete it (and its -wal/-shm files) by hand"
            ) from exc
        floor = salvaged_seq or 0
        uncertain = False
        if now >= _PLAUSIBLE_EPOCH:
            floor = max(floor, int(now * 1_000_000))
        elif salvaged_seq is None:
            uncertain = True
        log.error(
            "outbox %s is corrupt (%s); moved it to %s and started a fresh outbox: %s pending "
            "record(s) lost, numbering resumes after seq %d",
            path,
            reason,
            target,
            "an unknown number of" if lost is None else lost,
            floor,
        )
        if uncertain:
            log.error("outbox %s: no seq could be salvaged and the clock is not set; seqs may repeat", path)
        detail = {
            "moved_to": str(target),
            "reason": reason,
            "lost_pending": lost,
            "seq_resumed_after": floor,
            "seq_may_repeat": uncertain,
        }
        try:
            return self._connect(quarantine=detail)
        except _CorruptError as again:
            raise OutboxError(
                f"outbox {path} is corrupt again right after it was recreated ({again}); check the "
                "storage device"
            ) from again

    def _begin_session(self, conn: sqlite3.Connection, quarantine: dict[str, Any] | None) -> None:
        """Mark the session open (durably) and decide where numbering resumes."""
        boot = _boot_id()
        now = self._now()
        conn.execute("PRAGMA synchronous = FULL")
        with _transaction(conn):
            st = _read_state(conn)
            if quarantine is not None:
                st.last_seq = max(st.last_seq, int(quarantine["seq_resumed_after"]))
                _add_incident(conn, now, "quarantined", quarantine)
            elif (
                not st.clean_close and st.seq_reserved > st.last_seq and (boot is None or boot != st.boot_id)
            ):
                detail = {
                    "first_seq": st.last_seq + 1,
                    "last_seq": st.seq_reserved,
                    "reason": "the outbox was not closed and the machine restarted (power loss?); "
                    "seqs in this range were either never assigned or lost with the newest "
                    "commits (synchronous=NORMAL)",
                }
                log.warning(
                    "outbox %s was not closed before a reboot: seqs %d..%d may have been lost",
                    self._path,
                    st.last_seq + 1,
                    st.seq_reserved,
                )
                _add_incident(conn, now, "unclean_shutdown", detail)
                st.last_seq = st.seq_reserved
            st.seq_reserved = max(st.seq_reserved, st.last_seq)
            st.clean_close = 0
            st.boot_id = boot
            _write_state(conn, st)
        conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        log.info(
            "outbox %s open: %d record(s) pending (%d bytes), last seq %d",
            self._path,
            st.pending_rows,
            st.pending_bytes,
            st.last_seq,
        )

    # ------------------------------------------------------------------ helpers

    def _now(self) -> float:
        now = float(self._clock())
        if not math.isfinite(now):
            raise OutboxError(f"the outbox clock returned {now!r}; it must return finite epoch seconds")
        return now

    @staticmethod
    def _check_ttl(ttl_s: float | None, name: str) -> float | None:
        if ttl_s is None:
            return None
        if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or not (0 < ttl_s < math.inf):
            raise OutboxError(f"outbox {name} must be a positive number of seconds or None, got {ttl_s!r}")
        return float(ttl_s)

    def _require(self) -> sqlite3.Connection:
        if self._conn is None:
            raise OutboxError(f"outbox {self._path} is closed; open a new Outbox to use it")
        return self._conn

    def _error(self, action: str, exc: sqlite3.Error) -> OutboxError:
        code = _primary_code(exc)
        if code == _SQLITE_FULL:
            hint = "the disk is full: free space on the device or lower the outbox max_bytes"
        elif code in (_SQLITE_READONLY, _SQLITE_CANTOPEN, _SQLITE_PERM):
            hint = (
                f"make {self._path.parent} and the outbox files writable by the daemon user (WAL mode "
                f"creates {self._path.name}-wal and {self._path.name}-shm beside it), or use another path"
            )
        elif code in (_SQLITE_BUSY, _SQLITE_LOCKED):
            hint = "another process holds the outbox locked; run a single edgert daemon per outbox path"
        elif code in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
            hint = "the database is corrupt; restart the daemon, which moves it aside and starts a fresh one"
        elif code == _SQLITE_IOERR:
            hint = "an I/O error occurred: check the storage device (dmesg) and the free space"
        else:
            hint = "check the storage device and the outbox path"
        return OutboxError(f"outbox {self._path}: cannot {action}: {exc}; {hint}")

    def _prepare(
        self,
        stream: str,
        payload: Mapping[str, Any] | bytes,
        priority: int,
        ttl_s: float | Literal[_Default.TTL] | None,
    ) -> _Item:
        if not isinstance(stream, str) or not _STREAM_RE.fullmatch(stream):
            raise OutboxError(
                f"invalid outbox stream name {stream!r}: use 1-64 letters, digits, '_', '-' or '.', "
                "starting with a letter, digit or '_' (e.g. 'telemetry')"
            )
        if isinstance(priority, bool) or not isinstance(priority, int) or abs(priority) > _MAX_PRIORITY:
            raise OutboxError(f"outbox priority must be an integer within +-2**31, got {priority!r}")
        ttl = self._default_ttl if ttl_s is DEFAULT_TTL else self._check_ttl(ttl_s, "ttl_s")
        if isinstance(payload, (bytes, bytearray, memoryview)):
            return _Item(stream, priority, bytes(payload), False, ttl)
        if not isinstance(payload, Mapping):
            raise OutboxError(
                f"outbox payload for stream {stream!r} must be a mapping or bytes, "
                f"got {type(payload).__name__}"
            )
        clash = sorted(k for k in ("seq", "ts") if k in payload)
        if clash:
            raise OutboxError(
                f"outbox payload for stream {stream!r} uses the reserved key(s) {clash}: the outbox adds "
                "'seq' and 'ts' itself; rename them in the payload"
            )
        try:
            text = json.dumps(
                payload if isinstance(payload, dict) else dict(payload),
                separators=(",", ":"),
                ensure_ascii=False,
                allow_nan=False,
                default=_json_default,
            )
            body = text.encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise OutboxError(
                f"outbox payload for stream {stream!r} is not JSON-serialisable ({exc}); use dict, list, "
                "str, int, float, bool and None values (no NaN/Infinity), or pass bytes"
            ) from exc
        return _Item(stream, priority, body, True, ttl)

    def _ttl_applies(self, now: float) -> bool:
        if now >= _PLAUSIBLE_EPOCH:
            return True
        if not self._warned_clock:
            self._warned_clock = True
            log.warning("the wall clock reads %.0f (before 2020): records get no TTL until it is set", now)
        return False

    # ------------------------------------------------------------------ writing

    def _write(self, build: Callable[[sqlite3.Connection, _State], list[_Item]]) -> list[int]:
        """Run ``build`` and insert what it returns in one transaction; returns the seqs."""
        conn = self._require()
        for _ in range(_MAX_RESERVE_ATTEMPTS):
            try:
                with _transaction(conn):
                    st = _read_state(conn)
                    now = self._now()
                    items = build(conn, st)
                    self._check_reserved(st, len(items))
                    seqs = self._insert(conn, st, items, now)
                    if self._synchronous == "FULL":
                        st.seq_reserved = max(st.seq_reserved, st.last_seq)
                    _write_state(conn, st)
                return seqs
            except _NeedReservationError as need:
                self._reserve(conn, need.count)
        raise OutboxError(
            f"outbox {self._path}: could not reserve sequence numbers; another process keeps writing "
            "this outbox: run a single edgert daemon per outbox path"
        )

    def _check_reserved(self, st: _State, count: int) -> None:
        if self._synchronous == "NORMAL" and st.last_seq + count > st.seq_reserved:
            raise _NeedReservationError(count)

    def _reserve(self, conn: sqlite3.Connection, count: int) -> None:
        """Durably (synchronous=FULL) reserve seqs for ``count`` records and a block beyond."""
        conn.execute("PRAGMA synchronous = FULL")
        try:
            with _transaction(conn):
                st = _read_state(conn)
                target = st.last_seq + count + _SEQ_BLOCK
                if target > st.seq_reserved:
                    conn.execute("UPDATE state SET seq_reserved = ? WHERE id = 1", (target,))
        finally:
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")

    def _insert(self, conn: sqlite3.Connection, st: _State, items: list[_Item], now: float) -> list[int]:
        seqs: list[int] = []
        rows: list[tuple[int, str, int, float, float | None, int, bytes]] = []
        produced: Counter[str] = Counter()
        dropped: Counter[str] = Counter()
        expiry_done = False

        def flush() -> None:
            if rows:
                conn.executemany(
                    "INSERT INTO records (seq, stream, priority, created, expires, size, payload)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
                rows.clear()

        for item in items:
            st.last_seq += 1
            seq = st.last_seq
            seqs.append(seq)
            body = _finish_body(item, seq, now)
            size = len(body) + len(item.stream) + RECORD_OVERHEAD_BYTES
            if size > self._max_bytes:
                raise OutboxError(
                    f"outbox record for stream {item.stream!r} takes {size} bytes, more than the whole "
                    f"outbox bound max_bytes={self._max_bytes}; split the payload or raise max_bytes"
                )
            produced[item.stream] += 1
            if st.pending_bytes + size > self._max_bytes and not expiry_done:
                flush()
                expiry_done = True
                self._expire_in(conn, st, now)
            excess = st.pending_bytes + size - self._max_bytes
            if excess > 0:
                flush()
                victims = self._victims(conn, excess, item.priority)
                if victims is None:  # only records of a higher priority could make room
                    dropped[item.stream] += 1
                    continue
                conn.executemany("DELETE FROM records WHERE seq = ?", [(v[0],) for v in victims])
                for _, vstream, vsize in victims:
                    dropped[vstream] += 1
                    st.pending_rows -= 1
                    st.pending_bytes -= vsize
            expires = now + item.ttl_s if item.ttl_s is not None and self._ttl_applies(now) else None
            rows.append((seq, item.stream, item.priority, now, expires, size, body))
            st.pending_rows += 1
            st.pending_bytes += size
            st.hwm_rows = max(st.hwm_rows, st.pending_rows)
            st.hwm_bytes = max(st.hwm_bytes, st.pending_bytes)
        flush()
        _bump(conn, "produced", produced)
        if dropped:
            _bump(conn, "dropped", dropped)
            if time.monotonic() - self._last_drop_log >= _DROP_LOG_INTERVAL_S:
                self._last_drop_log = time.monotonic()
                log.warning(
                    "outbox %s is full (max_bytes=%d): dropped %s; the drops are counted and reported",
                    self._path,
                    self._max_bytes,
                    dict(dropped),
                )
        return seqs

    @staticmethod
    def _victims(conn: sqlite3.Connection, excess: int, priority: int) -> list[tuple[int, str, int]] | None:
        """The records to evict (lowest priority, then oldest) to free ``excess`` bytes.

        Only records with a priority up to ``priority`` are candidates; ``None`` when they
        do not free enough.  One priority level at a time, so every query uses the index.
        """
        victims: list[tuple[int, str, int]] = []
        freed = 0
        next_level = "SELECT MIN(priority) FROM records WHERE priority > ?"
        level = conn.execute("SELECT MIN(priority) FROM records").fetchone()[0]
        while level is not None and level <= priority:
            cur = conn.execute(
                "SELECT seq, stream, size FROM records WHERE priority = ? ORDER BY seq", (level,)
            )
            try:
                for seq, stream, size in cur:
                    victims.append((seq, stream, size))
                    freed += size
                    if freed >= excess:
                        return victims
            finally:
                cur.close()
            level = conn.execute(next_level, (level,)).fetchone()[0]
        return None

    @staticmethod
    def _expire_in(conn: sqlite3.Connection, st: _State, now: float) -> int:
        """Delete expired records inside the current transaction; returns how many."""
        groups = conn.execute(
            "SELECT stream, COUNT(*), SUM(size) FROM records WHERE expires <= ? GROUP BY stream", (now,)
        ).fetchall()
        if not groups:
            return 0
        conn.execute("DELETE FROM records WHERE expires <= ?", (now,))
        counts: dict[str, int] = {}
        for stream, count, size in groups:
            counts[stream] = count
            st.pending_rows -= count
            st.pending_bytes -= size
        _bump(conn, "expired", counts)
        return sum(counts.values())

    def _expire(self, conn: sqlite3.Connection) -> int:
        now = self._now()
        if conn.execute("SELECT 1 FROM records WHERE expires <= ? LIMIT 1", (now,)).fetchone() is None:
            return 0
        with _transaction(conn):
            st = _read_state(conn)
            expired = self._expire_in(conn, st, now)
            _write_state(conn, st)
        if expired:
            log.info("outbox %s: %d record(s) expired", self._path, expired)
        return expired

    def _compaction_due(self) -> bool:
        """Whether to compact now the outbox is empty: once a minute, or at once if the WAL is big."""
        if time.monotonic() - self._last_compact >= _COMPACT_INTERVAL_S:
            return True
        try:
            return self._path.with_name(self._path.name + "-wal").stat().st_size > _JOURNAL_SIZE_LIMIT
        except OSError:
            return False

    def _compact(self, conn: sqlite3.Connection) -> None:
        """Return free pages to the filesystem and truncate the WAL (best effort)."""
        self._last_compact = time.monotonic()
        try:
            conn.executescript("PRAGMA incremental_vacuum;")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.Error as exc:
            log.warning("outbox %s: compaction failed (will retry later): %s", self._path, exc)

    # ------------------------------------------------------------------ public API

    def put(
        self,
        stream: str,
        payload: Mapping[str, Any] | bytes,
        *,
        priority: int = 0,
        ttl_s: float | Literal[_Default.TTL] | None = DEFAULT_TTL,
    ) -> int:
        """Store one record and return its seq.

        Dict payloads are stored as JSON with ``seq`` and ``ts`` added; bytes as given.
        Higher ``priority`` is sent first and dropped last.  ``ttl_s=None`` never expires.
        If the outbox is full of records of a higher priority, the record is dropped at
        once (counted and reported) and its seq is still returned.

        Raises:
            OutboxError: invalid stream/priority/ttl/payload, a record larger than
                ``max_bytes``, or the database cannot be written (disk full, ...).
        """
        return self.put_many(stream, [payload], priority=priority, ttl_s=ttl_s)[0]

    def put_many(
        self,
        stream: str,
        payloads: Iterable[Mapping[str, Any] | bytes],
        *,
        priority: int = 0,
        ttl_s: float | Literal[_Default.TTL] | None = DEFAULT_TTL,
    ) -> list[int]:
        """Store a batch of records of one stream in one transaction; returns their seqs.

        All or nothing: if one payload is invalid or oversize, none is stored.
        """
        items = [self._prepare(stream, p, priority, ttl_s) for p in payloads]
        if not items:
            return []
        with self._lock:
            try:
                return self._write(lambda _conn, _st: items)
            except sqlite3.Error as exc:
                raise self._error("store records", exc) from exc

    def peek(self, limit: int = 100, *, exclude: Collection[int] = ()) -> list[Record]:
        """Up to ``limit`` pending records, highest priority first, then oldest (lowest seq).

        Expired records are deleted (and counted) first.  ``exclude`` skips seqs the sender
        already has in flight.  Peeking does not remove anything: only :meth:`ack` does.
        """
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise OutboxError(f"outbox peek limit must be a non-negative integer, got {limit!r}")
        with self._lock:
            conn = self._require()
            try:
                self._expire(conn)
                if limit == 0:
                    return []
                rows = conn.execute(
                    "SELECT seq, stream, priority, payload, created FROM records"
                    " ORDER BY priority DESC, seq LIMIT ?",
                    (limit + len(exclude),),
                ).fetchall()
            except sqlite3.Error as exc:
                raise self._error("read records", exc) from exc
        records = [
            Record(int(s), str(st), int(p), bytes(b), float(c)) for s, st, p, b, c in rows if s not in exclude
        ]
        return records[:limit]

    def ack(self, seqs: Iterable[int]) -> int:
        """Delete delivered records (the broker's PUBACK arrived); returns how many were pending.

        Unknown seqs (already acked, dropped or expired) are ignored, so re-acks after a
        re-send are harmless.  When the outbox becomes empty, free space is returned to the
        filesystem and the WAL truncated (at most once a minute, unless the WAL is over 4 MiB).
        """
        wanted: set[int] = set()
        for seq in seqs:
            if isinstance(seq, bool) or not isinstance(seq, int):
                raise OutboxError(f"outbox ack takes integer seqs, got {seq!r}")
            wanted.add(seq)
        if not wanted:
            return 0
        ordered = sorted(wanted)
        with self._lock:
            conn = self._require()
            try:
                with _transaction(conn):
                    st = _read_state(conn)
                    delivered: Counter[str] = Counter()
                    for start in range(0, len(ordered), _IN_CHUNK):
                        chunk = ordered[start : start + _IN_CHUNK]
                        marks = ",".join("?" * len(chunk))
                        for stream, count, size in conn.execute(
                            "SELECT stream, COUNT(*), SUM(size) FROM records"
                            f" WHERE seq IN ({marks}) GROUP BY stream",
                            chunk,
                        ).fetchall():
                            delivered[stream] += count
                            st.pending_rows -= count
                            st.pending_bytes -= size
                        conn.execute(f"DELETE FROM records WHERE seq IN ({marks})", chunk)
                    _bump(conn, "delivered", delivered)
                    _write_state(conn, st)
            except sqlite3.Error as exc:
                raise self._error("delete acknowledged records", exc) from exc
            acked = sum(delivered.values())
            if acked and st.pending_rows == 0 and self._compaction_due():
                self._compact(conn)
        return acked

    def prune(self) -> int:
        """Delete expired records (counted as expired) and compact the file; returns how many expired."""
        with self._lock:
            conn = self._require()
            try:
                expired = self._expire(conn)
            except sqlite3.Error as exc:
                raise self._error("delete expired records", exc) from exc
            self._compact(conn)
        return expired

    def stats(self) -> dict[str, Any]:
        """A snapshot for metrics.

        Keys: ``pending``, ``pending_bytes``, ``pending_by_stream``; per-stream dicts
        ``produced``, ``delivered``, ``dropped``, ``expired`` (all time, persisted);
        ``dropped_total``, ``expired_total``, ``unreported_dropped``, ``unreported_expired``;
        ``hwm_pending`` / ``hwm_pending_bytes`` (persisted high-water marks); ``last_seq``
        (the last seq assigned or skipped); ``max_bytes``; ``quarantined`` (corrupt
        databases moved aside); ``incidents`` (the latest 20); ``file_bytes`` (database +
        WAL on disk).
        """
        with self._lock:
            conn = self._require()
            try:
                st = _read_state(conn)
                counts = conn.execute("SELECT stream, kind, total, reported FROM counters").fetchall()
                quarantined = int(
                    conn.execute("SELECT COUNT(*) FROM incidents WHERE kind = 'quarantined'").fetchone()[0]
                )
                incidents = conn.execute(
                    "SELECT at, kind, detail, reported FROM incidents ORDER BY id DESC LIMIT 20"
                ).fetchall()
            except sqlite3.Error as exc:
                raise self._error("read statistics", exc) from exc
        per: dict[str, dict[str, int]] = {kind: {} for kind in _KINDS}
        unreported = {"dropped": 0, "expired": 0}
        for stream, kind, total, reported in counts:
            per[kind][stream] = int(total)
            if kind in unreported:
                unreported[kind] += int(total) - int(reported)
        pending_by_stream = {
            s: n
            for s in sorted(per["produced"])
            if (n := per["produced"][s] - sum(per[k].get(s, 0) for k in _KINDS[1:]))
        }
        file_bytes = 0
        for suffix in ("", "-wal"):
            with suppress(OSError):
                file_bytes += self._path.with_name(self._path.name + suffix).stat().st_size
        return {
            "pending": st.pending_rows,
            "pending_bytes": st.pending_bytes,
            "pending_by_stream": pending_by_stream,
            **{kind: dict(sorted(per[kind].items())) for kind in _KINDS},
            "dropped_total": sum(per["dropped"].values()),
            "expired_total": sum(per["expired"].values()),
            "unreported_dropped": unreported["dropped"],
            "unreported_expired": unreported["expired"],
            "hwm_pending": st.hwm_rows,
            "hwm_pending_bytes": st.hwm_bytes,
            "last_seq": st.last_seq,
            "max_bytes": self._max_bytes,
            "quarantined": quarantined,
            "incidents": [
                {"at": at, "kind": kind, "reported": bool(rep), **json.loads(detail)}
                for at, kind, detail, rep in reversed(incidents)
            ],
            "file_bytes": file_bytes,
        }

    def take_drop_report(self, *, enqueue: str | None = None, priority: int = 0) -> dict[str, Any] | None:
        """Drops, expiries and incidents not reported yet, marked reported; ``None`` if nothing new.

        The report: ``{"dropped": {stream: n}, "expired": {stream: n}, "dropped_total",
        "expired_total", "incidents": [...], "last_seq"}`` with only counts since the previous
        report, so summing every report gives the totals in :meth:`stats`.

        With ``enqueue="telemetry"`` the report is also stored as a record of that stream in
        the same transaction (its seq is in ``report["seq"]``), so a crash cannot lose it
        between taking it and storing it.
        """
        box: list[dict[str, Any]] = []  # the report built inside the transaction
        if enqueue is not None:
            self._prepare(enqueue, b"", priority, None)  # validate early

        def build(conn: sqlite3.Connection, st: _State) -> list[_Item]:
            box.clear()
            rows = conn.execute(
                "SELECT stream, kind, total - reported FROM counters"
                " WHERE kind IN ('dropped', 'expired') AND total > reported ORDER BY stream"
            ).fetchall()
            incidents = conn.execute(
                "SELECT id, at, kind, detail FROM incidents WHERE reported = 0 ORDER BY id"
            ).fetchall()
            if not rows and not incidents:
                return []
            dropped = {s: int(n) for s, k, n in rows if k == "dropped"}
            expired = {s: int(n) for s, k, n in rows if k == "expired"}
            report = {
                "dropped": dropped,
                "expired": expired,
                "dropped_total": sum(dropped.values()),
                "expired_total": sum(expired.values()),
                "incidents": [
                    {"at": at, "kind": kind, **json.loads(detail)} for _, at, kind, detail in incidents
                ],
                "last_seq": st.last_seq,
            }
            box.append(report)
            conn.execute("UPDATE counters SET reported = total WHERE kind IN ('dropped', 'expired')")
            conn.execute("UPDATE incidents SET reported = 1 WHERE reported = 0")
            if enqueue is None:
                return []
            return [self._prepare(enqueue, {"kind": "outbox_dropped", **report}, priority, None)]

        with self._lock:
            try:
                seqs = self._write(build)
            except sqlite3.Error as exc:
                raise self._error("take the drop report", exc) from exc
        if not box:
            return None
        if seqs:
            box[0]["seq"] = seqs[0]
        return box[0]

    def close(self) -> None:
        """Mark the session cleanly closed (durably), checkpoint and close; idempotent."""
        with self._lock:
            conn = self._conn
            if conn is None:
                return
            self._conn = None
            try:
                conn.execute("PRAGMA synchronous = FULL")
                with _transaction(conn):
                    # Every earlier commit is synced with this one: the reservation is not needed.
                    conn.execute("UPDATE state SET clean_close = 1, seq_reserved = last_seq WHERE id = 1")
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            except sqlite3.Error as exc:
                log.warning("outbox %s: could not record a clean close: %s", self._path, exc)
            finally:
                conn.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Outbox({str(self._path)!r}, max_bytes={self._max_bytes}, closed={self.closed})"
