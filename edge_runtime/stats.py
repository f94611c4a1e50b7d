"""Counters and latency percentiles of the running pipeline (bounded memory, thread-safe)."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

__all__ = ["LatencyWindow", "PipelineStats"]


class LatencyWindow:
    """The last ``size`` samples of one stage's latency, in ms, in a preallocated ring."""

    def __init__(self, size: int = 4096) -> None:
        self._ring = np.zeros(size, np.float64)
        self._n = 0

    def add(self, ms: float) -> None:
        self._ring[self._n % len(self._ring)] = ms
        self._n += 1

    def percentiles(self) -> dict[str, float]:
        n = min(self._n, len(self._ring))
        if n == 0:
            return {}
        p50, p95, p99 = np.percentile(self._ring[:n], (50, 95, 99))
        return {"p50": round(float(p50), 3), "p95": round(float(p95), 3), "p99": round(float(p99), 3)}


class PipelineStats:
    """What the pipeline did: frames, drops, errors, fps and per-stage latency."""

    STAGES = ("queue", "preprocess", "inference", "decode", "total")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started = time.monotonic()
        self.first_result_at: float | None = None
        self.last_progress = self.started
        self.frames_in = 0
        self.frames = 0
        self.dropped = 0
        self.errors: dict[str, int] = {}
        self.swaps = 0
        self.latency = {stage: LatencyWindow() for stage in self.STAGES}

    def error(self, kind: str) -> None:
        with self.lock:
            self.errors[kind] = self.errors.get(kind, 0) + 1

    def record(self, timings: dict[str, float]) -> None:
        now = time.monotonic()
        with self.lock:
            self.frames += 1
            self.last_progress = now
            if self.first_result_at is None:
                self.first_result_at = now
            for stage, ms in timings.items():
                self.latency[stage].add(ms)

    def summary(self, **extra: Any) -> dict[str, Any]:
        with self.lock:
            elapsed = time.monotonic() - self.started
            busy = (time.monotonic() - self.first_result_at) if self.first_result_at is not None else 0.0
            out: dict[str, Any] = {
                "frames": self.frames,
                "frames_in": self.frames_in,
                "dropped": self.dropped,
                "errors": dict(self.errors),
                "elapsed_s": round(elapsed, 3),
                "fps": round((self.frames - 1) / busy, 2) if busy > 0 and self.frames > 1 else 0.0,
                "first_result_s": (
                    round(self.first_result_at - self.started, 4)
                    if self.first_result_at is not None
                    else None
                ),
                "model_swaps": self.swaps,
                "latency_ms": {k: v.percentiles() for k, v in self.latency.items()},
            }
        out.update(extra)
        return out
