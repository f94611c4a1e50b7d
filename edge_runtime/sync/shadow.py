"""Shadow mode: run a candidate beside the live model on a sample of frames, report agreement.

The pipeline observer copies a sampled frame and the live model's outputs into a small queue
(never blocking inference: a full queue drops the sample); the ``sync-shadow`` thread runs
the candidate on the frame and compares: top-1 agreement for classifiers, the share of live
boxes matched by a candidate box of the same class with IoU >= 0.5 for detectors, and both
models' inference times. The candidate's results are never emitted.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.model import LoadedModel
from edge_runtime.types import Frame

__all__ = ["ShadowRunner", "box_match_rate"]

log = logging.getLogger(__name__)


def _iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def box_match_rate(live: list[dict[str, Any]], cand: list[dict[str, Any]], iou: float = 0.5) -> float | None:
    """Share of live detections matched (greedy, same class, IoU >= ``iou``); None if no live boxes."""
    if not live:
        return None
    used: set[int] = set()
    hits = 0
    for det in sorted(live, key=lambda d: -float(d.get("score", 0))):
        for j, other in enumerate(cand):
            if j in used or other.get("class_id") != det.get("class_id"):
                continue
            if _iou(det["box"], other["box"]) >= iou:
                used.add(j)
                hits += 1
                break
    return hits / len(live)


class ShadowRunner:
    """Observer + worker thread comparing ``candidate`` with the live model."""

    def __init__(self, candidate: LoadedModel, sample_rate: float, seed: int | None = None) -> None:
        self.candidate = candidate
        self.sample_rate = sample_rate
        self._rng = random.Random(seed)
        self._queue: queue.Queue[
            tuple[LoadedModel, npt.NDArray[Any], list[npt.NDArray[np.float32]], float]
        ] = queue.Queue(maxsize=8)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.frames = 0
        self.skipped = 0
        self.errors = 0
        self._top1_same = 0
        self._top1_n = 0
        self._box_rates: list[float] = []
        self._pairs: list[tuple[int, int]] = []
        self._live_ms: list[float] = []
        self._cand_ms: list[float] = []
        self._thread = threading.Thread(target=self._run, name="sync-shadow", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def __call__(
        self,
        model: LoadedModel,
        frame: Frame,
        _inputs: npt.NDArray[Any],
        outputs: list[npt.NDArray[np.float32]],
        inference_ms: float,
    ) -> None:
        if model is self.candidate or self._rng.random() >= self.sample_rate:
            return
        try:
            self._queue.put_nowait((model, frame.data.copy(), [o.copy() for o in outputs], inference_ms))
        except queue.Full:
            self.skipped += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                live_model, data, live_out, live_ms = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            t0 = time.perf_counter()
            try:
                cand_out, transform = self.candidate.infer(data)
                cand_ms = (time.perf_counter() - t0) * 1000.0
                live_dec = live_model.decoder.decode(live_out, None)
                cand_dec = self.candidate.decoder.decode(cand_out, None)
            except EdgeRuntimeError as exc:
                with self._lock:
                    self.errors += 1
                log.debug("shadow inference failed: %s", exc)
                continue
            del transform
            with self._lock:
                self.frames += 1
                self._live_ms.append(live_ms)
                self._cand_ms.append(cand_ms)
                if live_model.bundle.manifest.task == "classification" and live_out and cand_out:
                    self._pairs.append((int(np.argmax(live_out[0])), int(np.argmax(cand_out[0]))))
                if "top" in live_dec and "top" in cand_dec and live_dec["top"] and cand_dec["top"]:
                    self._top1_n += 1
                    self._top1_same += int(live_dec["top"][0].get("label") == cand_dec["top"][0].get("label"))
                if "detections" in live_dec and "detections" in cand_dec:
                    rate = box_match_rate(live_dec["detections"], cand_dec["detections"])
                    if rate is not None:
                        self._box_rates.append(rate)

    def histograms(self) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]] | None:
        """Top-1 class counts of ``(live model, shadowed model)`` on the same sampled frames."""
        with self._lock:
            pairs = np.array(self._pairs, np.int64).reshape(-1, 2)
        if not len(pairs):
            return None
        n = int(pairs.max()) + 1
        live = np.bincount(pairs[:, 0], minlength=n).astype(np.float64)
        cand = np.bincount(pairs[:, 1], minlength=n).astype(np.float64)
        return live, cand

    def report(self) -> dict[str, Any]:
        """Agreement so far."""
        with self._lock:
            out: dict[str, Any] = {"frames": self.frames, "errors": self.errors, "skipped": self.skipped}
            if self._top1_n:
                out["top1_agreement"] = round(self._top1_same / self._top1_n, 4)
            if self._box_rates:
                out["box_match_rate"] = round(float(np.mean(self._box_rates)), 4)
            if self._live_ms:
                out["live_p50_ms"] = round(float(np.median(self._live_ms)), 3)
                out["candidate_p50_ms"] = round(float(np.median(self._cand_ms)), 3)
        return out
