"""Sliding windows over sensor sample rows (``size`` samples every ``hop`` samples)."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from edge_runtime.errors import SampleParseError, SourceError
from edge_runtime.sources.specs import WindowSpec
from edge_runtime.types import Frame

__all__ = ["Windower"]


class Windower:
    """Turns ``"samples"`` frames (any number of rows each) into fixed windows.

    The first window is emitted once ``size`` samples have arrived, then one every ``hop``
    samples (``hop < size`` overlaps, ``hop > size`` skips samples between windows). Each
    emitted :class:`~edge_runtime.types.Frame` has ``data`` of shape ``(size, channels)``
    float32 (oldest row first), ``index`` = number of windows emitted before it, and the
    ``t_capture``/``source_ts`` of the frame that delivered the newest sample.

    Rows are kept in a ring buffer allocated once (on the first push, when the channel count
    becomes known); the only allocation per window is the emitted copy.
    """

    def __init__(self, spec: WindowSpec) -> None:
        self.size = spec.size
        self.hop = spec.hop if spec.hop is not None else spec.size
        self.channels: int | None = None
        self._ring: npt.NDArray[np.float32] | None = None
        self._head = 0  # ring slot the next row goes to (= oldest row once the ring is full)
        self._total = 0  # samples consumed since the last reset
        self._next_emit = self.size  # value of _total at which the next window is complete
        self.windows = 0

    def reset(self) -> None:
        """Forget buffered samples (after a source reconnect); the channel count is kept."""
        self._head = 0
        self._total = 0
        self._next_emit = self.size

    def push(self, frame: Frame) -> list[Frame]:
        """Add the frame's sample rows; return the windows completed by them (often none)."""
        rows = self._rows(frame)
        out: list[Frame] = []
        n = rows.shape[0]
        pos = 0
        while pos < n:
            take = min(n - pos, self._next_emit - self._total)
            self._write(rows[pos : pos + take])
            self._total += take
            pos += take
            if self._total == self._next_emit:
                out.append(self._emit(frame))
                self._next_emit += self.hop
        return out

    def _rows(self, frame: Frame) -> npt.NDArray[Any]:
        if frame.kind != "samples":
            raise SourceError(
                f"a window ([window] size={self.size}) needs sensor samples, but the source "
                f"delivers {frame.kind!r} frames; remove [window] for image sources"
            )
        rows = np.asarray(frame.data)
        if rows.ndim == 1:
            rows = rows.reshape(1, -1)
        if rows.ndim != 2 or rows.shape[1] == 0:
            raise SourceError(f"sample frame {frame.index} has shape {rows.shape}; expected (rows, channels)")
        if self.channels is None:
            self.channels = rows.shape[1]
            self._ring = np.zeros((self.size, self.channels), dtype=np.float32)
        elif rows.shape[1] != self.channels:
            raise SampleParseError(
                f"sample frame {frame.index} has {rows.shape[1]} channels but earlier samples "
                f"had {self.channels}; the sensor's line format changed - fix the sender or "
                "set 'columns' in the [source] config"
            )
        return rows

    def _write(self, chunk: npt.NDArray[Any]) -> None:
        """Copy rows into the ring; only the last ``size`` rows of a long chunk matter."""
        ring = self._ring
        assert ring is not None
        n = chunk.shape[0]
        if n > self.size:
            self._head = (self._head + n - self.size) % self.size
            chunk = chunk[n - self.size :]
            n = self.size
        first = min(n, self.size - self._head)
        ring[self._head : self._head + first] = chunk[:first]
        if first < n:
            ring[: n - first] = chunk[first:]
        self._head = (self._head + n) % self.size

    def _emit(self, frame: Frame) -> Frame:
        ring = self._ring
        assert ring is not None
        window = np.empty_like(ring)
        tail = self.size - self._head
        window[:tail] = ring[self._head :]
        window[tail:] = ring[: self._head]
        out = Frame(
            data=window,
            index=self.windows,
            t_capture=frame.t_capture,
            kind="samples",
            source_ts=frame.source_ts,
        )
        self.windows += 1
        return out
