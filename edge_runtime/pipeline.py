"""The inference pipeline: a capture thread, an inference thread and a sink thread.

``capture`` reads the source, cuts sensor samples into windows and preprocesses each frame
into a pooled input buffer, so decoding and preprocessing overlap with inference. Between
capture and inference sits a bounded :class:`FrameQueue`: for live sources (camera, stream,
serial) the latest frame wins and stale frames are dropped and counted; for file sources
capture waits (back-pressure) so every frame is processed. ``infer`` runs the model and the
decoder; ``sink`` writes results so slow disks never stall inference.

A model can be swapped while running (:meth:`Pipeline.swap_model`): the swap happens
between two inferences and frames already queued are re-preprocessed for the new model if
its input differs, so no frame is dropped.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_runtime.errors import (
    ConfigError,
    DecoderError,
    EdgeRuntimeError,
    InferenceError,
    PreprocessError,
    SinkError,
    SourceError,
)
from edge_runtime.model import LoadedModel
from edge_runtime.sinks import Sink
from edge_runtime.sources import Source, Windower
from edge_runtime.stats import PipelineStats
from edge_runtime.types import Frame, ImageTransform, Result

__all__ = ["BufferPool", "FrameQueue", "Pipeline", "PipelineOptions", "RateLimitedLog"]

log = logging.getLogger(__name__)


class RateLimitedLog:
    """Logs a recurring problem at most once per ``interval_s``, with how often it happened."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0) -> None:
        self._log = logger
        self._interval = interval_s
        self._last: dict[str, float] = {}
        self._count: dict[str, int] = {}

    def warning(self, key: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        self._count[key] = self._count.get(key, 0) + 1
        if now - self._last.get(key, -1e9) >= self._interval:
            n = self._count.pop(key)
            self._last[key] = now
            self._log.warning(msg + " (%d times since last report)", *args, n)


class BufferPool:
    """Preallocated model-input buffers shared by the capture and inference threads."""

    def __init__(self, model: LoadedModel, size: int) -> None:
        self.model = model
        self._free: deque[npt.NDArray[Any]] = deque(model.preprocessor.new_buffer() for _ in range(size))
        self.allocated = size

    def acquire(self) -> npt.NDArray[Any]:
        try:
            return self._free.pop()
        except IndexError:
            self.allocated += 1
            return self.model.preprocessor.new_buffer()

    def release(self, buf: npt.NDArray[Any]) -> None:
        self._free.append(buf)


@dataclass(slots=True)
class _Item:
    frame: Frame
    buffer: npt.NDArray[Any]
    transform: ImageTransform | None
    pool: BufferPool
    pre_ms: float
    t_enqueued: float


class FrameQueue:
    """Bounded FIFO; ``latest=True`` drops the oldest item when full, else ``put`` waits."""

    def __init__(self, capacity: int, latest: bool, on_drop: Callable[[_Item], None]) -> None:
        self._items: deque[_Item] = deque()
        self._capacity = capacity
        self._latest = latest
        self._on_drop = on_drop
        self._cond = threading.Condition()
        self._closed = False

    def put(self, item: _Item, stop: threading.Event) -> bool:
        with self._cond:
            while len(self._items) >= self._capacity:
                if self._latest:
                    self._on_drop(self._items.popleft())
                    break
                if stop.is_set() or self._closed:
                    return False
                self._cond.wait(0.2)
            self._items.append(item)
            self._cond.notify_all()
            return True

    def get(self, timeout: float) -> _Item | None:
        with self._cond:
            if not self._items and not self._closed:
                self._cond.wait(timeout)
            if self._items:
                item = self._items.popleft()
                self._cond.notify_all()
                return item
            return None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def finished(self) -> bool:
        with self._cond:
            return self._closed and not self._items

    def drain(self) -> list[_Item]:
        with self._cond:
            items = list(self._items)
            self._items.clear()
            self._cond.notify_all()
            return items


@dataclass(frozen=True)
class PipelineOptions:
    """Pacing and limits."""

    max_fps: float | None = None
    queue_size: int = 4
    max_frames: int | None = None
    keep_frames: bool = False
    batch: int = 1
    batch_timeout_s: float = 0.02


ResultHook = Callable[[Result, LoadedModel], None]
TensorObserver = Callable[
    [LoadedModel, Frame, "npt.NDArray[Any]", "list[npt.NDArray[np.float32]]", float], None
]
"""Called on the inference thread after each run: ``(model, frame, input, outputs, inference_ms)``.

``input`` is the model input of this one frame (a pooled buffer: copy what you keep). Observers
(drift statistics, probation watch, shadow sampling) must be cheap and must not raise.
"""


class Pipeline:
    """Runs one source through one (swappable) model into the sinks."""

    def __init__(
        self,
        model: LoadedModel,
        source: Source,
        sinks: list[Sink],
        options: PipelineOptions | None = None,
        *,
        windower: Windower | None = None,
        stats: PipelineStats | None = None,
        hooks: list[ResultHook] | None = None,
        stop_event: threading.Event | None = None,
        observers: list[TensorObserver] | None = None,
    ) -> None:
        self.options = options or PipelineOptions()
        self.source = source
        self.sinks = sinks
        self.windower = windower
        self.stats = stats or PipelineStats()
        self.hooks = list(hooks or [])
        self.observers: list[TensorObserver] = list(observers or [])
        self.stop_event = stop_event or threading.Event()
        batch = self.options.batch
        self.check_batch(model, batch)
        capacity = batch if source.live else max(self.options.queue_size, 2 * batch)
        self._queue = FrameQueue(capacity, source.live, self._dropped)
        self._model = model
        self._pool = BufferPool(model, capacity + 2)
        self._tag = f"{model.name}@{model.version}"
        self._batch_buf: tuple[LoadedModel, npt.NDArray[Any]] | None = None
        self._pending_swap: tuple[LoadedModel, threading.Event, list[LoadedModel]] | None = None
        self._swap_lock = threading.Lock()
        self._results: queue.Queue[Result | None] = queue.Queue(maxsize=1024)
        self._rlog = RateLimitedLog(log)
        self._threads: list[threading.Thread] = []
        self.source_ended = False

    @property
    def model(self) -> LoadedModel:
        return self._model

    # -- capture ---------------------------------------------------------------------------
    def _dropped(self, item: _Item) -> None:
        item.pool.release(item.buffer)
        with self.stats.lock:
            self.stats.dropped += 1

    def _capture(self) -> None:
        stop = self.stop_event
        try:
            while not stop.is_set():
                try:
                    frame = self.source.read()
                except SourceError as exc:
                    self.stats.error("source")
                    log.error("source failed: %s", exc)
                    break
                if frame is None:
                    self.source_ended = True
                    break
                with self.stats.lock:
                    self.stats.frames_in += 1
                if self.windower is not None:
                    try:
                        frames = self.windower.push(frame)
                    except SourceError as exc:
                        self.stats.error("window")
                        self._rlog.warning("window", "bad sensor samples: %s", exc)
                        continue
                else:
                    frames = [frame]
                for item_frame in frames:
                    item = self._prepare(item_frame)
                    if item is not None and not self._queue.put(item, stop):
                        item.pool.release(item.buffer)
        finally:
            self._queue.close()

    def _prepare(self, frame: Frame) -> _Item | None:
        pool = self._pool
        buf = pool.acquire()
        t0 = time.perf_counter()
        try:
            transform = pool.model.preprocessor(frame.data, buf)
        except PreprocessError as exc:
            pool.release(buf)
            self.stats.error("preprocess")
            self._rlog.warning("preprocess", "frame %d rejected: %s", frame.index, exc)
            return None
        t1 = time.perf_counter()
        return _Item(frame, buf, transform, pool, (t1 - t0) * 1000.0, time.monotonic())

    # -- inference ---------------------------------------------------------------------------
    def swap_model(self, new: LoadedModel) -> tuple[threading.Event, list[LoadedModel]]:
        """Ask the inference thread to switch to ``new`` before its next inference.

        Returns an event set once swapped and a list that then holds the previous model (the
        caller closes it).
        """
        self.check_batch(new, self.options.batch)
        done = threading.Event()
        old: list[LoadedModel] = []
        with self._swap_lock:
            self._pending_swap = (new, done, old)
        if not any(t.is_alive() for t in self._threads):
            self._apply_swap()
        return done, old

    def _apply_swap(self) -> None:
        with self._swap_lock:
            pending, self._pending_swap = self._pending_swap, None
        if pending is None:
            return
        new, done, old = pending
        old.append(self._model)
        self._model = new
        self._pool = BufferPool(new, self._pool.allocated)
        self._tag = f"{new.name}@{new.version}"
        with self.stats.lock:
            self.stats.swaps += 1
        log.info("now serving %s (%s)", self._tag, new.format)
        done.set()

    def _infer(self) -> None:
        opts = self.options
        interval = 1.0 / opts.max_fps if opts.max_fps else 0.0
        next_slot = time.monotonic()
        stats = self.stats
        while True:
            if self._pending_swap is not None:
                self._apply_swap()
            item = self._queue.get(0.25)
            with stats.lock:
                stats.last_progress = time.monotonic()
            if item is None:
                if self._queue.finished or self.stop_event.is_set():
                    break
                continue
            if interval:
                now = time.monotonic()
                if now < next_slot and self.stop_event.wait(next_slot - now):
                    item.pool.release(item.buffer)
                    break
                next_slot = max(next_slot + interval, time.monotonic())
            if opts.batch > 1:
                self._run_batch(self._collect(item))
            else:
                self._run_one(item)
            if opts.max_frames and stats.frames >= opts.max_frames:
                self.stop_event.set()
                break
        for left in self._queue.drain():
            left.pool.release(left.buffer)

    def _current(self, item: _Item, model: LoadedModel) -> _Item | None:
        """The item itself, or the frame preprocessed again for a model swapped in since."""
        if item.pool.model is model:
            return item
        item.pool.release(item.buffer)
        return self._prepare(item.frame)

    def _run_one(self, item: _Item) -> None:
        model = self._model
        current = self._current(item, model)
        if current is None:
            return
        item = current
        t_start = time.perf_counter()
        queue_ms = (time.monotonic() - item.t_enqueued) * 1000.0
        try:
            outputs = model.backend.run([item.buffer])
            inference_ms = (time.perf_counter() - t_start) * 1000.0
            self._observe(model, item.frame, item.buffer, outputs, inference_ms)
        except InferenceError as exc:
            self.stats.error("inference")
            self._rlog.warning("inference", "frame %d failed: %s", item.frame.index, exc)
            return
        finally:
            item.pool.release(item.buffer)
        self._decode(model, item, outputs, queue_ms, inference_ms)

    def _observe(
        self,
        model: LoadedModel,
        frame: Frame,
        inputs: npt.NDArray[Any],
        outputs: list[npt.NDArray[np.float32]],
        inference_ms: float,
    ) -> None:
        for observer in self.observers:
            try:
                observer(model, frame, inputs, outputs, inference_ms)
            except Exception as exc:  # noqa: BLE001 - an observer must never stop inference
                self._rlog.warning("observer", "observer %r failed: %s", observer, exc)

    def _decode(
        self,
        model: LoadedModel,
        item: _Item,
        outputs: list[npt.NDArray[np.float32]],
        queue_ms: float,
        inference_ms: float,
    ) -> None:
        t0 = time.perf_counter()
        frame = item.frame
        try:
            payload = model.decoder.decode(outputs, item.transform)
        except DecoderError as exc:
            self.stats.error("decode")
            self._rlog.warning("decode", "frame %d failed: %s", frame.index, exc)
            return
        timings = {
            "queue": queue_ms,
            "preprocess": item.pre_ms,
            "inference": inference_ms,
            "decode": (time.perf_counter() - t0) * 1000.0,
            "total": (time.monotonic() - frame.t_capture) * 1000.0,
        }
        self.stats.record(timings)
        payload["model"] = self._tag
        if frame.source_ts is not None:
            payload["t"] = round(frame.source_ts, 3)
        result = Result(
            frame.index,
            payload,
            frame.t_capture,
            {k: round(v, 3) for k, v in timings.items()},
            frame if self.options.keep_frames else None,
        )
        for hook in self.hooks:
            hook(result, model)
        self._results.put(result)

    # -- batching (sensor windows, or any model with a batch dimension) ---------------------
    def _collect(self, first: _Item) -> list[_Item]:
        """Up to ``batch`` items: those queued now, waiting at most ``batch_timeout_s`` for more."""
        items = [first]
        deadline = time.monotonic() + self.options.batch_timeout_s
        while len(items) < self.options.batch:
            nxt = self._queue.get(max(0.0, deadline - time.monotonic()))
            if nxt is None:
                break
            items.append(nxt)
        return items

    def _batch_input(self, model: LoadedModel, n: int) -> npt.NDArray[Any]:
        spec = model.backend.inputs[0]
        if self._batch_buf is None or self._batch_buf[0] is not model:
            rows = spec.shape[0] or self.options.batch
            one = model.preprocessor.new_buffer()
            self._batch_buf = (model, np.zeros((rows, *one.shape[1:]), one.dtype))
        buf = self._batch_buf[1]
        return buf if spec.shape[0] else buf[:n]

    def _run_batch(self, items: list[_Item]) -> None:
        model = self._model
        ready = [c for c in (self._current(i, model) for i in items) if c is not None]
        if not ready:
            return
        t_start = time.perf_counter()
        now = time.monotonic()
        batch = self._batch_input(model, len(ready))
        for row, item in enumerate(ready):
            batch[row] = item.buffer[0]
            item.pool.release(item.buffer)
        try:
            outputs = model.backend.run([batch])
        except InferenceError as exc:
            for _ in ready:
                self.stats.error("inference")
            self._rlog.warning("inference", "batch of %d failed: %s", len(ready), exc)
            return
        inference_ms = (time.perf_counter() - t_start) * 1000.0
        for row, item in enumerate(ready):
            queue_ms = (now - item.t_enqueued) * 1000.0
            if self.observers:
                self._observe(
                    model, item.frame, batch[row : row + 1], [o[row : row + 1] for o in outputs], inference_ms
                )
            self._decode(model, item, [o[row : row + 1] for o in outputs], queue_ms, inference_ms)

    @staticmethod
    def check_batch(model: LoadedModel, batch: int) -> None:
        """Raise :class:`ConfigError` if ``model`` cannot take batches of ``batch``."""
        first = model.backend.inputs[0].shape[0]
        if batch > 1 and first is not None and first != batch:
            raise ConfigError(
                f"pipeline.batch = {batch} but model input {model.backend.inputs[0].name!r} has a "
                f"fixed batch dimension of {first}; set pipeline.batch = {first} (or 1), or export "
                "the model with a dynamic batch dimension"
            )

    # -- sinks ---------------------------------------------------------------------------
    def _sink(self) -> None:
        """Write results as they come; drain what is queued in one go and flush once per drain."""
        results = self._results
        while True:
            batch = [results.get()]
            while batch[-1] is not None and len(batch) < 256:
                try:
                    batch.append(results.get_nowait())
                except queue.Empty:
                    break
            done = batch[-1] is None
            for sink in self.sinks:
                try:
                    for result in batch:
                        if result is not None:
                            sink.write(result)
                    sink.flush()
                except SinkError as exc:
                    self.stats.error("sink")
                    self._rlog.warning("sink", "%s", exc)
                except Exception:
                    self.stats.error("sink")
                    log.exception("sink %s failed", type(sink).__name__)
            if done:
                break

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Open the source and start the three threads."""
        self.source.open()
        self._threads = [
            threading.Thread(target=self._sink, name="edgert-sink", daemon=True),
            threading.Thread(target=self._infer, name="edgert-infer", daemon=True),
            threading.Thread(target=self._capture, name="edgert-capture", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the inference thread to finish (source ended, max frames, or stop)."""
        self._threads[1].join(timeout)
        return not self._threads[1].is_alive()

    def stop(self) -> None:
        """Stop capture and inference, flush the sinks, close the source."""
        self.stop_event.set()
        self._queue.close()
        try:
            self.source.close()
        except EdgeRuntimeError as exc:
            log.warning("closing source: %s", exc)
        infer, capture = self._threads[1], self._threads[2]
        infer.join(10.0)
        capture.join(5.0)
        self._results.put(None)
        self._threads[0].join(10.0)
        for sink in self.sinks:
            try:
                sink.close()
            except SinkError as exc:
                log.warning("closing sink: %s", exc)

    def run(self) -> dict[str, Any]:
        """Start, wait until the source ends or ``stop_event`` is set, stop; return the summary."""
        self.start()
        try:
            while not self.wait(0.5):
                if self.stop_event.is_set():
                    break
        finally:
            self.stop()
        return self.summary()

    def summary(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"model": self._tag, "format": self._model.format}
        reconnects = getattr(self.source, "reconnects", None)
        if reconnects is not None:
            extra["source_reconnects"] = reconnects
        bad = getattr(getattr(self.source, "inner", self.source), "bad_lines", None)
        if bad is not None:
            extra["bad_lines"] = bad
        return self.stats.summary(**extra)
