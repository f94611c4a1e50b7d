"""Sensor sample sources fed by text lines: a serial port, a recorded file, or stdin.

Every line is one sample row: CSV (``0.1,0.2,9.8``, optionally preceded by a header line
``ax,ay,az``) or JSON (``{"ax": 0.1, "ay": 0.2}`` or ``[0.1, 0.2]``). Lines that are not
valid samples (noise on the wire, partial lines, binary junk, NaN) are skipped and counted in
``bad_lines``; a rate-limited warning is logged. A garbage line never stops a source.

Each :meth:`read` returns a :class:`~edge_runtime.types.Frame` of kind ``"samples"`` whose
``data`` is a ``(1, channels)`` float32 array; :class:`~edge_runtime.sources.window.Windower`
turns these rows into model-sized windows.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
import numpy.typing as npt

from edge_runtime.errors import (
    MissingDependencyError,
    SampleParseError,
    SourceDisconnectedError,
    SourceError,
)
from edge_runtime.sources.specs import SourceSpec
from edge_runtime.types import Frame

__all__ = [
    "LineParser",
    "ReplaySource",
    "SerialSource",
    "StdinSource",
    "parse_line",
]

log = logging.getLogger(__name__)

LineFormat = Literal["csv", "json"]

_F32_MAX = float(np.finfo(np.float32).max)
_SHOW = 80
#: a serial "line" longer than this without a newline is junk and dropped
MAX_LINE_BYTES = 4096
#: at most one bad-line warning per source in this many seconds
WARN_INTERVAL_S = 10.0


def _show(line: str) -> str:
    """The line as it appears in error messages: repr'd and truncated to 80 characters."""
    text = line if len(line) <= _SHOW else line[: _SHOW - 3] + "..."
    return repr(text)


def _finite_row(values: Sequence[float], line: str) -> npt.NDArray[np.float32]:
    row = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(row)):
        raise SampleParseError(f"bad sample line {_show(line)}: NaN or infinite value")
    if np.any(np.abs(row) > _F32_MAX):
        raise SampleParseError(f"bad sample line {_show(line)}: value out of float32 range")
    return row.astype(np.float32)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _as_float(value: float, line: str) -> float:
    """``float(value)``; a JSON integer too large for a float is a bad line, not a crash."""
    try:
        return float(value)
    except OverflowError:
        raise SampleParseError(f"bad sample line {_show(line)}: value out of float32 range") from None


def _parse_csv(line: str, columns: Sequence[str] | None) -> list[float]:
    fields = [f.strip() for f in line.split(",")]
    values: list[float] = []
    for i, field in enumerate(fields):
        try:
            values.append(float(field))
        except ValueError:
            raise SampleParseError(
                f"bad sample line {_show(line)}: field {i + 1} ({field[:20]!r}) is not a "
                "number; expected comma-separated numbers"
            ) from None
    if columns is not None and len(values) != len(columns):
        raise SampleParseError(
            f"bad sample line {_show(line)}: {len(values)} values, expected {len(columns)} "
            f"({','.join(columns)})"
        )
    return values


def _parse_json(line: str, columns: Sequence[str] | None) -> list[float]:
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):
        raise SampleParseError(
            f"bad sample line {_show(line)}: not valid JSON; expected an object such as "
            '{"ax": 0.1, "ay": 0.2} or a list of numbers'
        ) from None
    if isinstance(obj, dict):
        if columns is None:
            values = [_as_float(v, line) for v in obj.values() if _is_number(v)]
            if not values:
                raise SampleParseError(
                    f"bad sample line {_show(line)}: the JSON object has no numeric values"
                )
            return values
        out: list[float] = []
        for name in columns:
            if name not in obj:
                raise SampleParseError(
                    f"bad sample line {_show(line)}: key {name!r} missing; expected keys {list(columns)}"
                )
            if not _is_number(obj[name]):
                raise SampleParseError(
                    f"bad sample line {_show(line)}: {name!r} is {obj[name]!r}, expected a number"
                )
            out.append(_as_float(obj[name], line))
        return out
    if isinstance(obj, list):
        if not obj or not all(_is_number(v) for v in obj):
            raise SampleParseError(f"bad sample line {_show(line)}: expected a non-empty list of numbers")
        if columns is not None and len(obj) != len(columns):
            raise SampleParseError(
                f"bad sample line {_show(line)}: {len(obj)} values, expected {len(columns)} "
                f"({','.join(columns)})"
            )
        return [_as_float(v, line) for v in obj]
    if _is_number(obj):
        if columns is not None and len(columns) != 1:
            raise SampleParseError(f"bad sample line {_show(line)}: one value, expected {len(columns)}")
        return [_as_float(obj, line)]
    raise SampleParseError(f"bad sample line {_show(line)}: expected a JSON object or a list of numbers")


def parse_line(
    line: str,
    fmt: LineFormat,
    columns: Sequence[str] | None = None,
    *,
    expected: int | None = None,
) -> npt.NDArray[np.float32]:
    """Parse one text line into a float32 row of samples, shape ``(channels,)``.

    * CSV: numbers separated by commas; with ``columns`` the count must match.
    * JSON: an object -> the ``columns`` keys in that order (or, without columns, every
      numeric value in key order); a list of numbers; or a single number.

    ``expected`` is the channel count of earlier good lines. Raises
    :class:`SampleParseError` naming the (truncated) line and what was expected for
    non-numeric fields, wrong counts, NaN/inf and empty lines. Header detection is stateful
    and lives in :class:`LineParser`.
    """
    text = line.strip()
    if not text:
        raise SampleParseError("bad sample line '': empty line")
    values = _parse_csv(text, columns) if fmt == "csv" else _parse_json(text, columns)
    if expected is not None and len(values) != expected:
        raise SampleParseError(
            f"bad sample line {_show(text)}: {len(values)} values, expected {expected} like the earlier lines"
        )
    return _finite_row(values, text)


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_ .()\[\]/%#:+-]*")
_NOT_NAMES = frozenset({"nan", "inf", "infinity", "+inf", "-inf", "+nan", "-nan"})


def _looks_like_header(fields: list[str]) -> bool:
    """True if every field is a column name (ASCII identifier-like, not ``nan``/``inf``)."""
    return all(_NAME.fullmatch(f) and f.lower() not in _NOT_NAMES for f in fields)


class LineParser:
    """Stateful line parsing for one source: CSV header handling and channel-count tracking.

    A CSV header (a line of names such as ``t,ax,ay`` before any data) sets :attr:`header`;
    with ``columns`` the named columns are selected from every line in that order, otherwise
    all columns are used. The header is confirmed by the first data line having as many
    fields; if it does not, the "header" was a boot banner (``sensor ready``) and is dropped.
    The same header repeated later (a looping file, a device that rebooted) is ignored. The
    first good line fixes the channel count; later lines with another count are garbage.
    """

    def __init__(self, fmt: LineFormat, columns: Sequence[str] | None = None) -> None:
        self.fmt: LineFormat = fmt
        self.columns = list(columns) if columns is not None else None
        self.header: list[str] | None = None
        self.channels: int | None = None
        self._select: list[int] | None = None
        self._confirmed = False
        self._data_seen = False
        #: discard the next data line (set by serial sources on open: it may be partial)
        self.skip_next_data = False

    @property
    def names(self) -> list[str] | None:
        """Channel names: the configured columns, else the CSV header, else None."""
        return self.columns if self.columns is not None else self.header

    def parse(self, line: str) -> npt.NDArray[np.float32] | None:
        """Return the sample row, ``None`` for a header line, or raise :class:`SampleParseError`."""
        if self.fmt == "json":
            if self.skip_next_data:
                self.skip_next_data = False
                return None
            row = parse_line(line, "json", self.columns, expected=self.channels)
            self.channels = row.shape[0]
            return row
        text = line.strip()
        fields = [f.strip() for f in text.split(",")]
        if text and _looks_like_header(fields):
            self._on_header(fields, text)
            return None
        if self.skip_next_data:
            self.skip_next_data = False
            return None
        if self.header is not None and not self._confirmed:
            if len(fields) == len(self.header):
                self._confirmed = True
            else:
                log.info("ignoring header-like line %s: the data has another width", self.header)
                self.header = None
                self._select = None
        if self.header is None:
            row = parse_line(text, "csv", self.columns, expected=self.channels)
        else:
            values = parse_line(text, "csv", None, expected=len(self.header))
            row = values if self._select is None else values[self._select]
        self.channels = row.shape[0]
        self._data_seen = True
        return row

    def _on_header(self, fields: list[str], text: str) -> None:
        if self.header is not None and fields == self.header:
            return  # repeated header: looping file or rebooted device
        if self._data_seen:
            raise SampleParseError(
                f"bad sample line {_show(text)}: not numbers; expected comma-separated numbers"
            )
        if self.columns is not None:
            missing = [c for c in self.columns if c not in fields]
            if missing:
                raise SampleParseError(
                    f"bad sample line {_show(text)}: CSV header {fields} lacks the configured "
                    f"column(s) {missing}; fix 'columns' in the [source] config or the data"
                )
            self._select = [fields.index(c) for c in self.columns]
        else:
            self._select = None
        self.header = fields
        self._confirmed = False


class _BadLines:
    """Counts bad lines and logs a warning at most every :data:`WARN_INTERVAL_S` seconds."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.count = 0
        self._last_warn = -math.inf
        self._since_warn = 0

    def report(self, exc: SampleParseError) -> None:
        self.count += 1
        self._since_warn += 1
        now = time.monotonic()
        if now - self._last_warn >= WARN_INTERVAL_S:
            log.warning(
                "%s: skipped %d bad line(s) (%d in total); latest: %s",
                self.what,
                self._since_warn,
                self.count,
                exc,
            )
            self._last_warn = now
            self._since_warn = 0


class _LineSource:
    """Shared parts of the line-fed sources: parser, bad-line counter, frame building."""

    live: bool = False

    def __init__(self, spec: SourceSpec, fmt: LineFormat, what: str) -> None:
        self.spec = spec
        self.parser = LineParser(fmt, spec.columns)
        self._bad = _BadLines(what)
        self._index = 0
        self._closed = threading.Event()
        self._closed.set()  # not open yet

    @property
    def bad_lines(self) -> int:
        """Number of lines skipped because they were not valid samples."""
        return self._bad.count

    @property
    def channel_names(self) -> list[str] | None:
        """Configured columns or the CSV header's names, once known."""
        return self.parser.names

    def _frame(self, line: str, t_capture: float) -> Frame | None:
        """Parse one line; a Frame, or None for a header or a (counted) bad line."""
        try:
            row = self.parser.parse(line)
        except SampleParseError as exc:
            self._bad.report(exc)
            return None
        if row is None:
            return None
        frame = Frame(data=row.reshape(1, -1), index=self._index, t_capture=t_capture, kind="samples")
        self._index += 1
        return frame


class SerialSource(_LineSource):
    """Lines from a serial port (``/dev/ttyUSB0``, ``COM3`` or a pyserial URL); live.

    Partial lines are joined across read timeouts; undecodable bytes become U+FFFD and the
    line counts as bad. The first data line after each (re)open is discarded because the
    port may have been opened in the middle of it (a header line is still recognised).
    The port vanishing (unplugged USB adapter, or its device node disappearing) raises
    :class:`SourceDisconnectedError`. :meth:`read` blocks until a good line arrives, the
    port is lost, or :meth:`close` is called (from another thread) - then it returns None.
    """

    live = True
    poll_s = 0.2

    def __init__(self, spec: SourceSpec) -> None:
        super().__init__(spec, spec.format, f"serial {spec.uri}")
        self._port: Any = None
        self._lock = threading.Lock()
        self._buf = bytearray()
        self._serial_errors: tuple[type[BaseException], ...] = (OSError,)

    def open(self) -> None:
        """Open the port at ``baudrate``; :class:`SourceError` says how to fix a failure."""
        try:
            import serial
        except ImportError as exc:
            raise MissingDependencyError("pyserial", "serial", "Serial sources") from exc
        self._serial_errors = (serial.SerialException, OSError)
        with self._lock:
            self._close_port_locked()
            try:
                self._port = serial.serial_for_url(
                    self.spec.uri, baudrate=self.spec.baudrate, timeout=self.poll_s
                )
            except (serial.SerialException, OSError, ValueError) as exc:
                raise SourceError(
                    f"cannot open serial port {self.spec.uri!r} at {self.spec.baudrate} baud: "
                    f"{exc}. Check that the device is plugged in (ls /dev/ttyUSB* /dev/ttyACM*), "
                    "that this user is in the 'dialout' group and that no other program holds "
                    "the port"
                ) from exc
            self._buf.clear()
            self.parser.skip_next_data = True  # the first line may start mid-line
            self._closed.clear()
        log.info("serial %s opened at %d baud", self.spec.uri, self.spec.baudrate)

    def read(self) -> Frame | None:
        """Block until the next good sample line; None once closed."""
        while not self._closed.is_set():
            line = self._readline()
            if line is None:
                continue
            frame = self._frame(line, time.monotonic())
            if frame is not None:
                return frame
        return None

    def _readline(self) -> str | None:
        """One complete line, or None after a timeout / a dropped overlong line."""
        with self._lock:
            port = self._port
            if port is None or self._closed.is_set():
                return None
            try:
                chunk: bytes = port.readline()
            except self._serial_errors as exc:
                if self._closed.is_set():
                    return None
                raise SourceDisconnectedError(
                    f"serial port {self.spec.uri!r} was lost: {exc}; is the device unplugged?"
                ) from exc
            except (TypeError, AttributeError):  # pyserial internals after a concurrent close
                if self._closed.is_set():
                    return None
                raise
            if not chunk:
                if self.spec.uri.startswith("/") and not Path(self.spec.uri).exists():
                    raise SourceDisconnectedError(
                        f"serial port {self.spec.uri!r} disappeared; is the device unplugged?"
                    )
                return None
            self._buf += chunk
            if not self._buf.endswith(b"\n"):
                if len(self._buf) > MAX_LINE_BYTES:
                    self._buf.clear()
                    self._bad.report(
                        SampleParseError(
                            f"serial {self.spec.uri}: over {MAX_LINE_BYTES} bytes without a "
                            "newline; wrong baud rate?"
                        )
                    )
                return None
            raw = bytes(self._buf)
            self._buf.clear()
        return raw.decode("utf-8", errors="replace").replace("\x00", "\ufffd")

    def close(self) -> None:
        """Close the port; idempotent, safe while another thread is in :meth:`read`."""
        self._closed.set()
        with self._lock:
            self._close_port_locked()

    def _close_port_locked(self) -> None:
        port, self._port = self._port, None
        if port is not None:
            try:
                port.close()
            except self._serial_errors as exc:
                log.debug("closing serial %s: %s", self.spec.uri, exc)

    def __repr__(self) -> str:
        return f"SerialSource({self.spec.uri!r}, baudrate={self.spec.baudrate})"


def _replay_format(spec: SourceSpec) -> LineFormat:
    """The spec's format if set explicitly, else guessed from the file extension."""
    if "format" in spec.model_fields_set:
        return spec.format
    suffix = Path(spec.uri).suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "json"
    return spec.format


class ReplaySource(_LineSource):
    """Replays a recorded ``.csv`` or ``.jsonl`` file of sample lines; not live.

    ``rate_hz`` paces the lines on a fixed monotonic deadline schedule (line *n* is due at
    ``start + n / rate_hz``, so sleeping never accumulates drift; a consumer that falls more
    than one period behind re-anchors the schedule instead of receiving a burst). Without
    ``rate_hz`` lines come as fast as they are read. ``loop=True`` restarts at the end.
    Waiting is interrupted by :meth:`close`.
    """

    live = False

    def __init__(self, spec: SourceSpec) -> None:
        fmt = _replay_format(spec)
        super().__init__(spec, fmt, f"replay {spec.uri}")
        self.format: LineFormat = fmt
        self._file: IO[str] | None = None
        self._lock = threading.Lock()
        self._next_due: float | None = None
        self._good_in_pass = 0
        self.loops = 0

    def open(self) -> None:
        """Open the file; :class:`SourceError` if it is missing or unreadable."""
        path = Path(self.spec.uri)
        if not path.is_file():
            what = "is a folder" if path.is_dir() else "does not exist"
            raise SourceError(
                f"replay file {self.spec.uri!r} {what}; give a .csv or .jsonl file of sample "
                "lines (one sample per line)"
            )
        with self._lock:
            self._close_file_locked()
            try:
                self._file = path.open(encoding="utf-8", errors="replace", newline=None)
            except OSError as exc:
                raise SourceError(
                    f"cannot open replay file {self.spec.uri!r}: {exc}; check its permissions"
                ) from exc
            self._next_due = None
            self._good_in_pass = 0
            self._closed.clear()

    def read(self) -> Frame | None:
        """Next sample row (paced by ``rate_hz``); None at the end or once closed."""
        frame = self._next_frame()
        if frame is None or self.spec.rate_hz is None:
            return frame
        period = 1.0 / self.spec.rate_hz
        now = time.monotonic()
        if self._next_due is None or now - self._next_due > period:
            self._next_due = now  # first line, or consumer too slow: re-anchor
        while (delay := self._next_due - time.monotonic()) > 0:
            if self._closed.wait(delay):
                return None
        self._next_due += period
        frame.t_capture = time.monotonic()
        return frame

    def _next_frame(self) -> Frame | None:
        with self._lock:
            while not self._closed.is_set() and self._file is not None:
                line = self._file.readline()
                if not line:
                    if not self.spec.loop:
                        return None
                    if self._good_in_pass == 0:
                        log.warning("replay %s: no good line in the file; ending", self.spec.uri)
                        return None
                    self._file.seek(0)
                    self._good_in_pass = 0
                    self.loops += 1
                    continue
                frame = self._frame(line, time.monotonic())
                if frame is not None:
                    self._good_in_pass += 1
                    return frame
            return None

    def close(self) -> None:
        """Close the file and wake a pacing wait; idempotent."""
        self._closed.set()
        with self._lock:
            self._close_file_locked()

    def _close_file_locked(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            f.close()

    def __repr__(self) -> str:
        return f"ReplaySource({self.spec.uri!r}, rate_hz={self.spec.rate_hz})"


class StdinSource(_LineSource):
    """Sample lines from standard input (``sensor-reader | edgert run --source stdin:csv``).

    Live: lines are produced by another program. End of input returns None. ``stream``
    replaces ``sys.stdin`` (tests, embedding). :meth:`close` does not close the stream and
    cannot interrupt a blocked read; the daemon's reader thread ends at the next line or EOF.
    """

    live = True

    def __init__(self, spec: SourceSpec, stream: IO[str] | None = None) -> None:
        super().__init__(spec, spec.format, "stdin")
        self._stream = stream

    def open(self) -> None:
        """Attach to stdin (or the given stream)."""
        if self._stream is None:
            if sys.stdin is None:
                raise SourceError(
                    "stdin source: this process has no standard input; pipe sample lines into "
                    "it, e.g. sensor-reader | edgert run --source stdin:csv"
                )
            self._stream = sys.stdin
        self._closed.clear()

    def read(self) -> Frame | None:
        """Block for the next good line; None at EOF or once closed."""
        stream = self._stream
        while stream is not None and not self._closed.is_set():
            try:
                line = stream.readline()
            except (OSError, ValueError) as exc:
                if self._closed.is_set():
                    return None
                raise SourceDisconnectedError(f"stdin could not be read: {exc}") from exc
            if not line:
                return None
            frame = self._frame(line, time.monotonic())
            if frame is not None:
                return frame
        return None

    def close(self) -> None:
        """Stop reading; idempotent; stdin itself stays open."""
        self._closed.set()
