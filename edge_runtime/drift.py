"""Drift of live traffic against a bundle's reference statistics (population stability index).

A bundle's ``reference.json`` (written by :func:`edge_runtime.bundle.create.reference_statistics`)
holds binned distributions of what the model saw when it was built:

* ``input_frame_mean``: ``{"edges": [...], "fractions": [...]}`` of the per-frame mean of the
  preprocessed model input (see :func:`frame_mean`), in model-logical (float) values;
* ``class_histogram``: the share of each top-1 class (classifiers);
* ``score_hist``: ``{"edges", "fractions"}`` of the raw/anomaly score, computed as ``score_mode``
  (``first``, ``max`` or ``l2`` of output 0, like the raw decoder).

``edges`` are the inner cut points of quantile bins; the first and last bins are open-ended, so
``len(fractions) == len(edges) + 1`` and a value ``v`` falls in bin
``searchsorted(edges, v, side="right")`` (``bisect_right``).

:class:`DriftMonitor` bins every inference into those bins over a sliding window and reports the
PSI of each distribution against the reference. Rule of thumb: PSI below 0.1 is no shift,
0.1 to 0.25 a moderate shift (warn), above 0.25 a major shift (alert). A window of ``n`` frames
over ``k`` bins has a PSI of about ``(k - 1) / n`` from sampling noise alone, which is why alerts
wait for ``min_frames`` observations.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from edge_runtime.errors import BundleError, ConfigError

if TYPE_CHECKING:
    from edge_runtime.bundle.loader import Bundle
    from edge_runtime.types import TensorSpec

__all__ = [
    "DEFAULT_BINS",
    "SCORE_MODES",
    "DriftMonitor",
    "frame_mean",
    "frame_means",
    "load_reference",
    "psi",
    "quantile_histogram",
    "scores_of",
]

log = logging.getLogger(__name__)

DEFAULT_BINS = 10
"""Number of quantile bins of the reference histograms (fewer when edges coincide)."""

SCORE_MODES = ("first", "max", "l2")
"""How a raw/anomaly score is computed from output 0 (same as ``RawSpec.score``)."""

_SAMPLE_CAP = 4096  # at most this many input elements enter a frame mean
_MIN_PER_BIN = 5  # a reference of n values gets at most n // 5 bins (at least 2)
_LEVELS = ("ok", "warn", "alert")


# ---------------------------------------------------------------------------- shared helpers
def _stride(size: int, last_dim: int) -> int:
    """Sampling step for a frame of ``size`` elements: ``size / step <= 4096``, coprime with the
    last dimension so every channel (NHWC) or column (NCHW, sensor windows) is sampled evenly."""
    step = max(1, -(-size // _SAMPLE_CAP))
    while last_dim > 1 and math.gcd(step, last_dim) != 1:
        step += 1
    return step


def frame_mean(array: npt.NDArray[Any]) -> float:
    """Mean of one preprocessed input (any shape), over a strided sample of at most 4096 elements.

    :class:`DriftMonitor` and :func:`frame_means` (the reference) use the same elements and the same
    arithmetic, so a frame seen on the device falls in the same bin as in the reference.
    """
    flat = array.reshape(-1)
    if flat.size == 0:
        return math.nan
    sample = flat[:: _stride(flat.size, array.shape[-1] if array.ndim else 1)]
    return float(np.add.reduce(sample, dtype=np.float64)) / sample.size


def frame_means(batch: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    """:func:`frame_mean` of each ``batch[i]`` (the first axis counts frames), bit for bit."""
    return np.array([frame_mean(np.asarray(frame)) for frame in batch], dtype=np.float64)


def scores_of(output0: npt.NDArray[Any], mode: str = "first") -> npt.NDArray[np.float64]:
    """Per-frame score of a stacked output 0 ``(N, ...)``: ``first``, ``max`` or ``l2`` of each row."""
    if mode not in SCORE_MODES:
        raise ConfigError(f"score mode {mode!r} is not one of {list(SCORE_MODES)}")
    rows = np.asarray(output0).reshape(len(output0), -1).astype(np.float64)
    if rows.shape[1] == 0:
        return np.full(len(rows), math.nan)
    if mode == "first":
        return rows[:, 0].copy()
    if mode == "max":
        out: npt.NDArray[np.float64] = rows.max(axis=1)
        return out
    norms: npt.NDArray[np.float64] = np.sqrt(np.einsum("ij,ij->i", rows, rows))
    return norms


def quantile_histogram(values: npt.ArrayLike, bins: int = DEFAULT_BINS) -> dict[str, list[float]] | None:
    """Quantile-binned distribution ``{"edges": [...], "fractions": [...]}`` of ``values``.

    ``edges`` are the deduplicated inner quantile cut points (first and last bins open-ended);
    ``fractions`` the share of the finite values in each bin. A sample of ``n`` values gets at
    most ``n // 5`` bins (at least 2) so that no bin is nearly empty by construction. Returns
    None when no value is finite.
    """
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    flat = flat[np.isfinite(flat)]
    if flat.size == 0:
        return None
    k = max(2, min(bins, flat.size // _MIN_PER_BIN))
    edges = np.unique(np.quantile(flat, np.linspace(0.0, 1.0, k + 1)[1:-1]))
    counts = np.bincount(np.searchsorted(edges, flat, side="right"), minlength=edges.size + 1)
    return {
        "edges": [float(e) for e in edges],
        "fractions": [float(c) / flat.size for c in counts],
    }


def psi(
    expected_fractions: Sequence[float] | npt.NDArray[Any],
    actual_counts_or_fractions: Sequence[float] | npt.NDArray[Any],
    eps: float = 1e-4,
) -> float:
    """Population stability index ``sum((a - e) * ln(a / e))`` of two binned distributions.

    Both sides are normalised to sum 1 (so ``actual`` may be counts), then every share is raised
    to at least ``eps`` so empty bins give a large but finite contribution. Raises
    :class:`~edge_runtime.errors.BundleError` when the two do not fit (different bin counts,
    negative or non-finite values, nothing observed).
    """
    e = np.asarray(expected_fractions, dtype=np.float64)
    a = np.asarray(actual_counts_or_fractions, dtype=np.float64)
    if e.ndim != 1 or a.ndim != 1 or e.size == 0 or e.size != a.size:
        raise BundleError(
            f"psi: the reference has {e.size} bins but {a.size} were observed; bin the observations "
            "with the edges of the same reference (both must be 1-d with at least one bin)"
        )
    if not eps > 0.0:
        raise BundleError(f"psi: eps must be positive, got {eps}")
    for name, arr in (("reference fractions", e), ("observed counts", a)):
        if not bool(np.all(np.isfinite(arr))) or bool(np.any(arr < 0.0)) or float(arr.sum()) <= 0.0:
            raise BundleError(
                f"psi: the {name} must be finite, non-negative and not all zero, got {arr.tolist()}; "
                "check the bundle's reference.json or observe some frames first"
            )
    e = np.maximum(e / e.sum(), eps)
    a = np.maximum(a / a.sum(), eps)
    return float(np.sum((a - e) * np.log(a / e)))


def load_reference(bundle: Bundle) -> dict[str, Any]:
    """The bundle's reference statistics (``{}`` when its manifest names none)."""
    name = bundle.manifest.reference
    if name is None:
        return {}
    path = bundle.path(name)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(
            f"{path}: the reference statistics cannot be read ({exc}); rebuild the bundle"
        ) from exc
    if not isinstance(doc, dict):
        raise BundleError(f"{path}: the reference statistics must be a JSON object; rebuild the bundle")
    return doc


# ---------------------------------------------------------------------------- the monitor
def _fractions(raw: Any, what: str) -> list[float] | None:
    if not isinstance(raw, list) or not raw:
        return None
    try:
        vals = [float(v) for v in raw]
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) and v >= 0.0 for v in vals) or sum(vals) <= 0.0:
        log.warning("reference %s has invalid fractions; its drift is not monitored", what)
        return None
    return vals


def _binned(raw: Any, what: str) -> tuple[list[float], list[float]] | None:
    """``(edges, fractions)`` of a reference histogram, None when absent or malformed."""
    if not isinstance(raw, Mapping):
        return None
    edges_raw = raw.get("edges")
    fractions = _fractions(raw.get("fractions"), what)
    if fractions is None or not isinstance(edges_raw, list):
        return None
    try:
        edges = [float(v) for v in edges_raw]
    except (TypeError, ValueError):
        edges = []
    ok = len(edges) == len(edges_raw) and all(math.isfinite(v) for v in edges)
    if not ok or len(fractions) != len(edges) + 1 or edges != sorted(edges):
        log.warning("reference %s has malformed edges; its drift is not monitored", what)
        return None
    return edges, fractions


class _Channel:
    """Counts of one binned quantity over the sliding window (ring of bin indices, -1 = none)."""

    __slots__ = ("counts", "expected", "ring")

    def __init__(self, expected: list[float], window: int) -> None:
        self.expected = expected
        self.counts = [0] * len(expected)
        self.ring = [-1] * window

    def put(self, pos: int, b: int, evict: bool) -> None:
        ring = self.ring
        if evict:
            old = ring[pos]
            if old >= 0:
                self.counts[old] -= 1
        ring[pos] = b
        if b >= 0:
            self.counts[b] += 1

    def clear(self) -> None:
        self.counts = [0] * len(self.expected)
        self.ring = [-1] * len(self.ring)


class DriftMonitor:
    """PSI of live inputs, top-1 classes and scores against a bundle's reference statistics.

    ``observe`` is called by the inference thread once per inference and costs a few
    microseconds (a strided input mean, a bisection, an argmax); ``snapshot`` by a metrics
    thread. Counts cover the last ``window`` inferences. Parts missing from the reference (older
    bundles) are not monitored: their PSI is None. ``input_spec`` is the model's input tensor;
    when it is quantized the input mean is converted back to model-logical values, which is what
    the reference holds. Alerts are raised once a distribution has ``min_frames`` observations
    (at most ``window``): PSI above ``warn`` gives a ``warn`` alert, above ``alert`` an ``alert``.
    """

    def __init__(
        self,
        reference: Mapping[str, Any],
        *,
        window: int = 500,
        warn: float = 0.1,
        alert: float = 0.25,
        min_frames: int = 200,
        input_spec: TensorSpec | None = None,
    ) -> None:
        if window < 1:
            raise ConfigError(f"drift window must be at least 1 frame, got {window}")
        if not 0.0 < warn <= alert:
            raise ConfigError(f"drift thresholds need 0 < warn <= alert, got warn={warn}, alert={alert}")
        if min_frames < 1:
            raise ConfigError(f"drift min_frames must be at least 1, got {min_frames}")
        self.window = window
        self.warn = warn
        self.alert = alert
        self.min_frames = min(min_frames, window)
        self._scale = 1.0
        self._zero = 0.0
        if input_spec is not None and input_spec.quantized and input_spec.scale is not None:
            self._scale = float(input_spec.scale)
            self._zero = float(input_spec.zero_point or 0)
        self._lock = threading.Lock()
        self._pos = 0
        self._filled = 0
        self._total = 0

        inp = _binned(reference.get("input_frame_mean"), "input_frame_mean")
        self._in_edges: list[float] = inp[0] if inp else []
        self._input = _Channel(inp[1], window) if inp else None
        classes = _fractions(reference.get("class_histogram"), "class_histogram")
        self._classes = _Channel(classes, window) if classes else None
        self._n_classes = len(classes) if classes else 0
        score = _binned(reference.get("score_hist"), "score_hist")
        self._score_edges: list[float] = score[0] if score else []
        self._score = _Channel(score[1], window) if score else None
        mode = reference.get("score_mode", "first")
        self._score_mode = mode if mode in SCORE_MODES else "first"

    @property
    def monitored(self) -> list[str]:
        """Which distributions the reference allows to monitor (``input``, ``class``, ``score``)."""
        return [n for n, _ in self._named()]

    # -- inference thread ------------------------------------------------------------------
    def _input_bin(self, array: npt.NDArray[Any]) -> int:
        mean = (frame_mean(array) - self._zero) * self._scale
        return bisect_right(self._in_edges, mean) if math.isfinite(mean) else -1

    def _class_of(self, outputs: Sequence[npt.NDArray[Any]]) -> int:
        if not outputs or outputs[0].size == 0:
            return -1
        c = int(np.argmax(outputs[0]))
        return c if c < self._n_classes else -1

    def _score_bin(self, outputs: Sequence[npt.NDArray[Any]], decoded: Mapping[str, Any] | None) -> int:
        score: float | None = None
        if decoded is not None:
            raw = decoded.get("score")
            if isinstance(raw, (int, float)) and not isinstance(raw, bool):
                score = float(raw)
        if score is None:
            if not outputs or outputs[0].size == 0:
                return -1
            flat = outputs[0].reshape(-1)
            if self._score_mode == "first":
                score = float(flat[0])
            elif self._score_mode == "max":
                score = float(np.max(flat))
            else:
                f64 = flat.astype(np.float64)
                score = math.sqrt(float(np.dot(f64, f64)))
        if not math.isfinite(score):
            return -1
        return bisect_right(self._score_edges, score)

    def observe(
        self,
        input_array: npt.NDArray[Any] | None,
        outputs: Sequence[npt.NDArray[Any]],
        decoded: Mapping[str, Any] | None = None,
    ) -> None:
        """Count one inference: its preprocessed input (batch of 1), raw outputs, decoded payload.

        The score is the decoded payload's ``score`` when it has one, else computed from output 0.
        Values that cannot be binned (NaN, empty arrays, a class beyond the reference) are skipped
        for that distribution; this never raises for odd data.
        """
        in_bin = cls = sc_bin = -1
        try:
            if self._input is not None and input_array is not None:
                in_bin = self._input_bin(input_array)
            if self._classes is not None:
                cls = self._class_of(outputs)
            if self._score is not None:
                sc_bin = self._score_bin(outputs, decoded)
        except (ValueError, TypeError, AttributeError, IndexError) as exc:
            log.debug("drift: an inference could not be binned: %s", exc)
        with self._lock:
            pos = self._pos
            evict = self._filled == self.window
            if self._input is not None:
                self._input.put(pos, in_bin, evict)
            if self._classes is not None:
                self._classes.put(pos, cls, evict)
            if self._score is not None:
                self._score.put(pos, sc_bin, evict)
            if not evict:
                self._filled += 1
            self._pos = pos + 1 if pos + 1 < self.window else 0
            self._total += 1

    # -- metrics thread --------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every observation (e.g. after a model swap)."""
        with self._lock:
            for _, ch in self._named():
                ch.clear()
            self._pos = self._filled = self._total = 0

    def _named(self) -> list[tuple[str, _Channel]]:
        named = [("input", self._input), ("class", self._classes), ("score", self._score)]
        return [(n, c) for n, c in named if c is not None]

    def snapshot(self) -> dict[str, Any]:
        """Drift over the current window.

        ``{"frames", "observed", "input_psi", "class_psi", "score_psi", "top1_share",
        "top1_class", "alerts", "level"}``: ``frames`` in the window, ``observed`` since the
        last reset; a PSI is None when the reference lacks that distribution or nothing could be
        binned yet; ``top1_share`` is the share of the most frequent top-1 class (classifiers);
        ``alerts`` lists ``{"metric", "level", "value", "threshold"}`` for each PSI above ``warn``
        with at least ``min_frames`` observations; ``level`` is the worst of ``ok``, ``warn``,
        ``alert``.
        """
        with self._lock:
            frames, observed = self._filled, self._total
            counts = {name: list(ch.counts) for name, ch in self._named()}
        out: dict[str, Any] = {"frames": frames, "observed": observed, "window": self.window}
        alerts: list[dict[str, Any]] = []
        channels = dict(self._named())
        for name in ("input", "class", "score"):
            metric = f"{name}_psi"
            ch = channels.get(name)
            n = sum(counts.get(name, ()))
            out[metric] = round(psi(ch.expected, counts[name]), 6) if ch is not None and n else None
            value = out[metric]
            if value is not None and n >= self.min_frames and value > self.warn:
                level = "alert" if value > self.alert else "warn"
                threshold = self.alert if level == "alert" else self.warn
                alerts.append({"metric": metric, "level": level, "value": value, "threshold": threshold})
        cls_counts = counts.get("class", [])
        total = sum(cls_counts)
        top = int(np.argmax(cls_counts)) if total else None
        out["top1_share"] = round(cls_counts[top] / total, 6) if top is not None else None
        out["top1_class"] = top
        out["alerts"] = alerts
        out["level"] = max((a["level"] for a in alerts), key=_LEVELS.index, default="ok")
        return out
