"""Where results go: JSONL (file or stdout), an SQLite event log, JPEG snapshots.

Sinks run on the pipeline's ``sink`` thread, never on the inference thread.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, Protocol

import cv2

from edge_runtime.config import JsonlSinkConfig, SinkConfig, SnapshotSinkConfig, SqliteSinkConfig
from edge_runtime.errors import SinkError
from edge_runtime.types import Result

__all__ = ["SINKS", "JsonlSink", "Sink", "SnapshotSink", "SqliteSink", "is_event", "make_sinks"]

log = logging.getLogger(__name__)


class Sink(Protocol):
    """Receives every decoded result."""

    def write(self, result: Result) -> None: ...

    def flush(self) -> None:
        """Called after each burst of results: make them durable/visible."""
        ...

    def close(self) -> None: ...


def _line(result: Result) -> dict[str, Any]:
    return {"frame": result.frame_index, **result.payload, "latency_ms": result.timings_ms}


def is_event(payload: dict[str, Any]) -> bool:
    """Whether a result is worth keeping as an event (a detection or an anomaly)."""
    return bool(payload.get("detections")) or bool(payload.get("anomaly"))


class JsonlSink:
    """One JSON object per line."""

    def __init__(self, cfg: JsonlSinkConfig) -> None:
        self._flush_every = cfg.flush_every
        self._pending = 0
        self._own = cfg.path != "-"
        try:
            if self._own:
                Path(cfg.path).parent.mkdir(parents=True, exist_ok=True)
                self._fh: IO[str] = Path(cfg.path).open("a", encoding="utf-8")  # noqa: SIM115
            else:
                self._fh = sys.stdout
        except OSError as exc:
            raise SinkError(f"cannot open JSONL sink {cfg.path}: {exc.strerror or exc}") from exc

    def write(self, result: Result) -> None:
        try:
            self._fh.write(json.dumps(_line(result), separators=(",", ":")) + "\n")
            self._pending += 1
            if self._pending >= self._flush_every:
                self.flush()
        except (OSError, ValueError) as exc:
            raise SinkError(f"JSONL sink write failed: {exc}") from exc

    def flush(self) -> None:
        if not self._pending:
            return
        try:
            self._fh.flush()
        except (OSError, ValueError) as exc:
            raise SinkError(f"JSONL sink write failed: {exc}") from exc
        finally:
            self._pending = 0

    def close(self) -> None:
        try:
            self._fh.flush()
            if self._own:
                self._fh.close()
        except (OSError, ValueError):
            log.debug("jsonl sink already closed")


class SqliteSink:
    """Results in SQLite (WAL), committed in small batches, bounded to ``max_rows``."""

    def __init__(self, cfg: SqliteSinkConfig) -> None:
        self._cfg = cfg
        try:
            cfg.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(cfg.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS results (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                "ts REAL NOT NULL, frame INTEGER NOT NULL, event INTEGER NOT NULL, body TEXT NOT NULL)"
            )
        except sqlite3.Error as exc:
            raise SinkError(f"cannot open SQLite sink {cfg.path}: {exc}") from exc
        self._rows: list[tuple[float, int, int, str]] = []
        self._last_commit = time.monotonic()
        self._inserted = 0

    def write(self, result: Result) -> None:
        event = is_event(result.payload)
        if self._cfg.only_events and not event:
            return
        self._rows.append(
            (time.time(), result.frame_index, int(event), json.dumps(_line(result), separators=(",", ":")))
        )
        if len(self._rows) >= 64:
            self._commit()

    def flush(self) -> None:
        """Commit at most about once a second (results are batched into transactions)."""
        if time.monotonic() - self._last_commit > 1.0:
            self._commit()

    def _commit(self) -> None:
        if not self._rows:
            return
        try:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT INTO results (ts, frame, event, body) VALUES (?, ?, ?, ?)", self._rows
            )
            self._inserted += len(self._rows)
            if self._inserted >= max(1, self._cfg.max_rows // 10):
                self._db.execute(
                    "DELETE FROM results WHERE id <= (SELECT MAX(id) FROM results) - ?",
                    (self._cfg.max_rows,),
                )
                self._inserted = 0
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise SinkError(f"SQLite sink write failed: {exc}") from exc
        finally:
            self._rows.clear()
            self._last_commit = time.monotonic()

    def close(self) -> None:
        try:
            self._commit()
        finally:
            self._db.close()


class SnapshotSink:
    """Writes a JPEG with boxes drawn when a frame has a detection over ``min_score``."""

    def __init__(self, cfg: SnapshotSinkConfig) -> None:
        self._cfg = cfg
        try:
            cfg.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SinkError(f"cannot create snapshot folder {cfg.dir}: {exc.strerror}") from exc
        self._last = -1e9
        self._params = [int(cv2.IMWRITE_JPEG_QUALITY), cfg.quality]

    def write(self, result: Result) -> None:
        dets = [d for d in result.payload.get("detections", []) if d["score"] >= self._cfg.min_score]
        frame = result.frame
        if not dets or frame is None or frame.kind != "image":
            return
        now = time.monotonic()
        if now - self._last < self._cfg.min_interval_s:
            return
        self._last = now
        image = frame.data.copy()
        for det in dets:
            x1, y1, x2, y2 = (int(v) for v in det["box"])
            cv2.rectangle(image, (x1, y1), (x2, y2), (0, 255, 0), 2)
            cv2.putText(
                image,
                f"{det['label']} {det['score']:.2f}",
                (x1, max(12, y1 - 4)),
                cv2.FONT_HERSHEY_SIMPLEX,
                0.5,
                (0, 255, 0),
                1,
            )
        path = self._cfg.dir / f"{int(time.time() * 1000)}-{result.frame_index}.jpg"
        if not cv2.imwrite(str(path), image, self._params):
            raise SinkError(f"cannot write snapshot {path}")
        files = sorted(self._cfg.dir.glob("*.jpg"))
        for old in files[: max(0, len(files) - self._cfg.max_files)]:
            old.unlink(missing_ok=True)

    def flush(self) -> None:
        return None

    def close(self) -> None:
        return None


SINKS: dict[str, type[JsonlSink] | type[SqliteSink] | type[SnapshotSink]] = {
    "jsonl": JsonlSink,
    "sqlite": SqliteSink,
    "snapshots": SnapshotSink,
}


def make_sinks(configs: Sequence[SinkConfig]) -> list[Sink]:
    """Open every configured sink (closing those already opened if one fails)."""
    sinks: list[Sink] = []
    try:
        for cfg in configs:
            sinks.append(SINKS[cfg.kind](cfg))  # type: ignore[arg-type]
    except SinkError:
        for sink in sinks:
            sink.close()
        raise
    return sinks
