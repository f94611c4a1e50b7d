"""What the live models do, for probation verdicts and shadow comparisons.

:class:`ModelWatch` is a pipeline observer (see :data:`edge_runtime.pipeline.TensorObserver`)
that keeps, per loaded model, a bounded window of (time, inference ms, top-1 class) samples;
:func:`probation_verdict` compares a candidate's window with the previous model's and with
the bundles' reference statistics, and names the first rule that fails.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_runtime.drift import psi as drift_psi
from edge_runtime.model import LoadedModel
from edge_runtime.sync.protocol import Rollout
from edge_runtime.types import Frame

__all__ = ["DriftWatch", "ModelWatch", "WindowStats", "probation_verdict", "psi", "reference_histogram"]

_EPS = 1e-4


def psi(expected: npt.NDArray[np.float64], actual: npt.NDArray[np.float64]) -> float:
    """:func:`edge_runtime.drift.psi` of two class histograms; 0 when either is empty."""
    e = np.asarray(expected, np.float64)
    a = np.asarray(actual, np.float64)
    if e.sum() <= 0 or a.sum() <= 0 or e.shape != a.shape:
        return 0.0
    return drift_psi(e, a, eps=_EPS)


def reference_histogram(model: LoadedModel) -> npt.NDArray[np.float64] | None:
    """The bundle's reference top-1 class histogram (classifiers), if it has one from >= 50 frames.

    Fewer frames (e.g. a handful of golden frames) make too coarse a reference to judge by.
    """
    name = model.bundle.manifest.reference
    if not name:
        return None
    try:
        ref = json.loads(model.bundle.path(name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    hist = ref.get("class_histogram") if isinstance(ref, dict) else None
    if not isinstance(hist, list) or not hist or int(ref.get("frames", 0) or 0) < 50:
        return None
    return np.asarray(hist, np.float64)


@dataclass
class WindowStats:
    """A model's recent behaviour."""

    frames: int
    seconds: float
    p50_ms: float
    fps: float
    histogram: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))

    def top1_share(self) -> float:
        total = float(self.histogram.sum())
        return float(self.histogram.max() / total) if total > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "frames": self.frames,
            "seconds": round(self.seconds, 2),
            "inference_p50_ms": round(self.p50_ms, 3),
            "fps": round(self.fps, 2),
            "top1_share": round(self.top1_share(), 3),
        }


class ModelWatch:
    """Pipeline observer: per-model windows of inference time and top-1 class."""

    def __init__(self, window: int = 4000) -> None:
        self._lock = threading.Lock()
        self._window = window
        self._samples: dict[int, deque[tuple[float, float, int]]] = {}

    def __call__(
        self,
        model: LoadedModel,
        _frame: Frame,
        _inputs: npt.NDArray[Any],
        outputs: list[npt.NDArray[np.float32]],
        inference_ms: float,
    ) -> None:
        first = outputs[0] if outputs else None
        cls = -1
        if first is not None and model.bundle.manifest.task == "classification" and first.size > 1:
            cls = int(np.argmax(first))
        with self._lock:
            buf = self._samples.get(id(model))
            if buf is None:
                buf = self._samples[id(model)] = deque(maxlen=self._window)
            buf.append((time.monotonic(), inference_ms, cls))

    def forget(self, model: LoadedModel) -> None:
        with self._lock:
            self._samples.pop(id(model), None)

    def stats(self, model: LoadedModel, since: float | None = None, classes: int = 0) -> WindowStats:
        """Window statistics of ``model`` (samples after monotonic time ``since`` only)."""
        with self._lock:
            rows = list(self._samples.get(id(model), ()))
        if since is not None:
            rows = [r for r in rows if r[0] >= since]
        if not rows:
            return WindowStats(0, 0.0, 0.0, 0.0, np.zeros(classes))
        t = np.array([r[0] for r in rows])
        ms = np.array([r[1] for r in rows])
        cls = np.array([r[2] for r in rows], np.int64)
        width = max(classes, int(cls.max()) + 1 if (cls >= 0).any() else 0)
        hist = np.bincount(cls[cls >= 0], minlength=width).astype(np.float64) if width else np.zeros(0)
        seconds = float(t[-1] - t[0])
        fps = (len(rows) - 1) / seconds if seconds > 0 else 0.0
        return WindowStats(len(rows), seconds, float(np.median(ms)), fps, hist)


def _pad(a: npt.NDArray[np.float64], n: int) -> npt.NDArray[np.float64]:
    return np.pad(a, (0, max(0, n - len(a)))) if len(a) < n else a


def probation_verdict(
    rollout: Rollout,
    candidate: WindowStats,
    baseline: WindowStats,
    *,
    errors: int,
    same_frames: tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]] | None = None,
    candidate_reference: npt.NDArray[np.float64] | None = None,
    baseline_reference: npt.NDArray[np.float64] | None = None,
) -> tuple[str | None, dict[str, Any]]:
    """``(reason to roll back or None, figures)`` for a candidate in probation.

    Rules, in order: error rate; inference p50 against the previous model's; fps against the
    previous model's; collapse of the output distribution (one class takes
    ``max_top1_share`` of the frames while it did not under the previous model); PSI of the
    output classes against the previous model's on the same frames; PSI against the
    candidate bundle's reference statistics when the previous model matched its own reference
    (so a stream that simply differs from the calibration data does not fail everyone).

    ``same_frames`` is ``(candidate, previous)`` class counts on the same sampled frames (the
    previous model runs beside the candidate during probation): a stream whose content changes
    over time would make windows taken before and after the swap differ for no fault of the
    model. Without it, the collapse and PSI-against-previous rules are skipped.
    """
    fig: dict[str, Any] = {"candidate": candidate.to_dict(), "previous": baseline.to_dict(), "errors": errors}
    total = candidate.frames + errors
    rate = errors / total if total else 0.0
    fig["error_rate"] = round(rate, 4)
    if total and rate > rollout.max_error_rate:
        return f"error rate {rate:.1%} over the limit {rollout.max_error_rate:.1%} ({errors} errors)", fig
    if baseline.p50_ms > 0 and candidate.frames:
        ratio = candidate.p50_ms / baseline.p50_ms
        fig["latency_ratio"] = round(ratio, 3)
        if ratio > rollout.max_latency_ratio:
            return (
                f"inference p50 {candidate.p50_ms:.2f} ms is {ratio:.1f}x the previous model's "
                f"{baseline.p50_ms:.2f} ms (limit {rollout.max_latency_ratio:g}x)",
                fig,
            )
    if baseline.fps > 0 and candidate.fps > 0:
        fps_ratio = candidate.fps / baseline.fps
        fig["fps_ratio"] = round(fps_ratio, 3)
        if fps_ratio < rollout.min_fps_ratio:
            return (
                f"{candidate.fps:.1f} fps is {fps_ratio:.0%} of the previous model's {baseline.fps:.1f} fps "
                f"(limit {rollout.min_fps_ratio:.0%})",
                fig,
            )
    # Windows taken before and after the swap see different content on a changing stream, so
    # the two models' outputs are only compared on the same frames.
    empty = np.zeros(0)
    cand_hist, base_hist = same_frames if same_frames is not None else (empty, empty)
    if same_frames is not None:
        fig["same_frames"] = int(cand_hist.sum())
    if cand_hist.size and cand_hist.sum() > 0:
        share = float(cand_hist.max() / cand_hist.sum())
        fig["top1_share"] = round(share, 3)
        base_share = float(base_hist.max() / base_hist.sum()) if base_hist.size and base_hist.sum() else 0.0
        if share >= rollout.max_top1_share and base_share < rollout.max_top1_share:
            k = int(np.argmax(cand_hist))
            return (
                f"output distribution collapsed: class {k} took {share:.0%} of {int(cand_hist.sum())} "
                f"frames (previous model: at most {base_share:.0%} for one class)",
                fig,
            )
        if base_hist.size and base_hist.sum() > 0:
            n = max(len(cand_hist), len(base_hist))
            shift = psi(_pad(base_hist, n), _pad(cand_hist, n))
            fig["output_psi_vs_previous"] = round(shift, 4)
            if shift > rollout.max_output_psi:
                return (
                    f"output distribution shifted: PSI {shift:.2f} against the previous model on the same "
                    f"frames (limit {rollout.max_output_psi:g})",
                    fig,
                )
    if same_frames is not None and candidate_reference is not None and baseline_reference is not None:
        n = max(len(candidate_reference), len(cand_hist))
        cand_ref = psi(_pad(candidate_reference, n), _pad(cand_hist, n))
        m = max(len(baseline_reference), len(base_hist))
        base_ref = psi(_pad(baseline_reference, m), _pad(base_hist, m))
        fig["output_psi_vs_reference"] = round(cand_ref, 4)
        fig["previous_psi_vs_reference"] = round(base_ref, 4)
        if cand_ref > rollout.max_output_psi and base_ref <= rollout.max_output_psi / 2:
            return (
                f"output distribution shifted: PSI {cand_ref:.2f} against the bundle's reference "
                f"statistics (limit {rollout.max_output_psi:g}; the previous model's was {base_ref:.2f} "
                "on the same frames)",
                fig,
            )
    return None, fig


class DriftWatch:
    """Pipeline observer: input and output drift of the serving model against its bundle's reference.

    One :class:`~edge_runtime.drift.DriftMonitor` per serving model (a swap starts a new one
    from the new bundle's reference). :meth:`snapshot` is what telemetry sends;
    :meth:`new_alert` returns a snapshot once each time the level rises to ``alert``.
    """

    def __init__(self, window: int = 500) -> None:
        self._window = window
        self._lock = threading.Lock()
        self._model: LoadedModel | None = None
        self._monitor: Any = None
        self._alerted = False

    def _monitor_for(self, model: LoadedModel) -> Any:
        from edge_runtime.drift import DriftMonitor, load_reference

        if self._model is not model:
            self._model = model
            self._alerted = False
            try:
                self._monitor = DriftMonitor(
                    load_reference(model.bundle), window=self._window, input_spec=model.backend.inputs[0]
                )
            except Exception:  # noqa: BLE001 - drift statistics must never stop inference
                self._monitor = None
        return self._monitor

    def __call__(
        self,
        model: LoadedModel,
        _frame: Frame,
        inputs: npt.NDArray[Any],
        outputs: list[npt.NDArray[np.float32]],
        _inference_ms: float,
    ) -> None:
        with self._lock:
            monitor = self._monitor_for(model)
        if monitor is not None:
            monitor.observe(inputs, outputs)

    def snapshot(self) -> dict[str, Any] | None:
        with self._lock:
            monitor, model = self._monitor, self._model
        if monitor is None or model is None:
            return None
        snap = dict(monitor.snapshot())
        snap["model"] = f"{model.name}@{model.version}"
        return snap

    def new_alert(self) -> dict[str, Any] | None:
        snap = self.snapshot()
        if snap is None:
            return None
        alert = snap.get("level") == "alert"
        with self._lock:
            fire = alert and not self._alerted
            self._alerted = alert
        return snap if fire else None
