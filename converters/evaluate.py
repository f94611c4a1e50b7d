"""Accuracy, agreement, latency and size of model files, measured the device's way.

Models run in the edge runtime's own backends (:class:`~edge_runtime.backends.OnnxRuntimeBackend`
for ``.onnx``, :class:`~edge_runtime.backends.LiteRTBackend` for ``.tflite``), so quantized
inputs and outputs are handled exactly as on the device: float inputs are quantized with the
model's own scale/zero point (:func:`edge_runtime.preprocess.quantize`) when the model input is
int8/uint8, and outputs come back dequantized to float32.

Metrics:

* task metric: top-1 accuracy against labels (classifiers), or mAP@0.5 through the detector
  helper ``converters.detection_metrics.map50(outputs, eval_set)`` when that module exists;
* agreement with a reference model's outputs (usually the fp32 model): top-1 agreement, mean
  cosine similarity, and SQNR = 10 log10(sum(ref^2) / sum((ref - q)^2)) in dB;
* latency: p50 over N runs at a thread count; :func:`compare_latency` interleaves models;
* file size.

Timing on a shared machine: :func:`compare_latency` runs the models in alternating rounds
(order rotated every round) so slow phases of the machine hit every model alike, and reports
medians plus per-round medians for paired ratios (:func:`paired_speedup`). Before each model's
turn it sleeps ``settle_s`` and gives a few untimed runs: ONNX Runtime's worker threads keep
spinning after a run, and the *other* loaded sessions' spinning threads steal the cores from
the timed one. Measured on 2 cores, MobileNetV2 224 fp32 alone 2.1-2.6 ms; interleaved with
three int8 variants 3.5-8.3 ms with untimed runs only, 2.2-2.6 ms with a 50 ms settle.
"""

from __future__ import annotations

import importlib
import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from converters.types import CalibrationSet
from edge_runtime.errors import CalibrationError, ConversionError, EdgeRuntimeError

__all__ = [
    "SQNR_CAP_DB",
    "Agreement",
    "DetectionTask",
    "EvalResult",
    "LatencyStats",
    "Metric",
    "accuracy_drop",
    "agreement",
    "compare_latency",
    "evaluate",
    "file_size",
    "load_backend_for",
    "map50_score",
    "measure_latency",
    "paired_speedup",
    "run_model",
    "sqnr_db",
    "top1_accuracy",
]

log = logging.getLogger(__name__)

Metric = Literal["top1", "map50"]

SQNR_CAP_DB = 120.0
"""SQNR reported when the difference is zero (or below float32 resolution): no measurable error."""

_FORMATS = {".onnx": "onnxruntime", ".tflite": "litert"}


@dataclass(frozen=True)
class Agreement:
    """How closely a model's outputs follow a reference model's on the same inputs."""

    top1: float
    """Share of samples with the same argmax (classifiers)."""
    cosine: float
    """Mean per-sample cosine similarity of the (first) output."""
    sqnr_db: float
    """Signal-to-quantization-noise ratio over the whole output, in dB (higher is better)."""


@dataclass(frozen=True)
class LatencyStats:
    """Latency of one model at a thread count."""

    path: Path
    p50_ms: float
    p90_ms: float
    mean_ms: float
    runs: int
    threads: int
    round_medians_ms: tuple[float, ...] = ()
    """Median of each round's timed block (:func:`compare_latency`), for paired comparisons."""


def paired_speedup(base: LatencyStats, other: LatencyStats) -> float:
    """Median over rounds of ``base / other`` latency (> 1: ``other`` is faster).

    Both must come from the same :func:`compare_latency` call: round *i* of each model ran
    back to back, so a busy phase of a shared machine slows both alike and cancels out.
    """
    pairs = list(zip(base.round_medians_ms, other.round_medians_ms, strict=False))
    if not pairs:
        return base.p50_ms / other.p50_ms
    return statistics.median(b / o for b, o in pairs)


@dataclass
class EvalResult:
    """Everything measured for one model file on one evaluation set."""

    path: Path
    outputs: list[npt.NDArray[np.float32]]
    """One array per model output, shape ``(N, *output_shape[1:])``."""
    metric: str | None
    score: float | None
    """Top-1 accuracy (0..1) or mAP@0.5; None without labels."""
    agreement: Agreement | None
    size_bytes: int
    latency: LatencyStats | None = None


# --------------------------------------------------------------------------- running


def file_size(path: Path) -> int:
    """Size of a model file in bytes."""
    return Path(path).stat().st_size


def load_backend_for(path: Path, threads: int = 2, warmup_runs: int = 1) -> Any:
    """The edge runtime backend for ``path`` (``.onnx`` -> ONNX Runtime, ``.tflite`` -> LiteRT), CPU only."""
    from edge_runtime.backends import BackendOptions, load_backend

    path = Path(path)
    name = _FORMATS.get(path.suffix.lower())
    if name is None:
        raise ConversionError(f"{path.name}: model files must end in .onnx or .tflite")
    providers = ("cpu",) if name == "onnxruntime" else ("auto",)
    try:
        return load_backend(
            name, path, BackendOptions(threads=threads, providers=providers, warmup_runs=warmup_runs)
        )
    except EdgeRuntimeError as exc:
        raise ConversionError(f"cannot load {path.name} for evaluation: {exc}") from exc


def _feed(backend: Any, sample: npt.NDArray[np.float32]) -> list[npt.NDArray[Any]]:
    """One float sample (1, ...) in the model's own input dtype (quantized the device's way)."""
    from edge_runtime.preprocess import quantize

    spec = backend.inputs[0]
    if spec.quantized:
        return [quantize(sample, spec)]
    if spec.dtype != "float32":
        return [sample.astype(spec.dtype)]
    return [sample]


def run_model(model: Path | Any, data: CalibrationSet, threads: int = 2) -> list[npt.NDArray[np.float32]]:
    """Run every sample (batch 1) through ``model`` (a path or a loaded backend); stacked outputs."""
    backend = load_backend_for(Path(model), threads) if isinstance(model, (str, Path)) else model
    try:
        if len(backend.inputs) != 1:
            raise ConversionError(
                f"evaluation supports single-input models; this one has {len(backend.inputs)}"
            )
        want = list(backend.inputs[0].shape[1:])
        got = list(data.inputs.shape[1:])
        if len(want) != len(got) or any(w is not None and w != g for w, g in zip(want, got, strict=False)):
            raise CalibrationError(
                f"evaluation samples have shape {got} but the model takes {want} per sample; build the "
                "evaluation set with the model's input size"
            )
        if len(data) == 0:
            raise CalibrationError("the evaluation set is empty; give at least one sample")
        per_output: list[list[npt.NDArray[np.float32]]] = [[] for _ in backend.outputs]
        for batch in data.batches(1):
            outs = backend.run(_feed(backend, np.ascontiguousarray(batch, np.float32)))
            for acc, out in zip(per_output, outs, strict=True):
                acc.append(np.array(out, dtype=np.float32, copy=True))
        return [np.concatenate(acc, axis=0) for acc in per_output]
    finally:
        if isinstance(model, (str, Path)):
            backend.close()


# --------------------------------------------------------------------------- metrics


def _flat(outputs: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    return np.asarray(outputs, np.float64).reshape(len(outputs), -1)


def top1_accuracy(outputs: npt.NDArray[Any], labels: npt.NDArray[Any]) -> float:
    """Share of samples whose highest-scoring class is the label."""
    flat = _flat(outputs)
    labels = np.asarray(labels).reshape(-1)
    if flat.shape[0] != labels.shape[0]:
        raise CalibrationError(f"{flat.shape[0]} outputs but {labels.shape[0]} labels")
    return float(np.mean(flat.argmax(axis=1) == labels))


def sqnr_db(ref: npt.NDArray[Any], q: npt.NDArray[Any]) -> float:
    """10 log10(sum(ref^2) / sum((ref - q)^2)) in dB; :data:`SQNR_CAP_DB` when there is no error."""
    r = np.asarray(ref, np.float64)
    d = r - np.asarray(q, np.float64)
    signal = float(np.sum(r * r))
    noise = float(np.sum(d * d))
    if noise <= signal * 10 ** (-SQNR_CAP_DB / 10):
        return SQNR_CAP_DB
    if signal == 0.0:
        return -SQNR_CAP_DB
    return 10.0 * math.log10(signal / noise)


def agreement(ref: npt.NDArray[Any], out: npt.NDArray[Any]) -> Agreement:
    """Top-1 agreement, mean cosine similarity and SQNR of ``out`` against ``ref`` (same shape)."""
    a, b = _flat(ref), _flat(out)
    if a.shape != b.shape:
        raise ConversionError(f"cannot compare outputs of shapes {list(ref.shape)} and {list(out.shape)}")
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    dots = np.sum(a * b, axis=1)
    both_zero = (na == 0) & (nb == 0)
    cos = np.where(both_zero, 1.0, dots / np.maximum(na * nb, 1e-300))
    top1 = float(np.mean(a.argmax(axis=1) == b.argmax(axis=1))) if a.shape[1] > 1 else 1.0
    return Agreement(top1, float(np.mean(cos)), sqnr_db(a, b))


@dataclass(frozen=True)
class DetectionTask:
    """What mAP@0.5 needs besides the model outputs (for ``metric="map50"``).

    ``decode`` turns one sample's raw outputs (a list with one ``(1, ...)`` array per model
    output) into its predictions: ``(M, 6)`` rows ``class, score, x1, y1, x2, y2`` or a
    detection decoder payload ``{"detections": [...]}``; ``ground_truth`` holds per sample
    ``(K, 5)`` rows ``class, x1, y1, x2, y2`` in the same coordinates.
    """

    ground_truth: Sequence[Any]
    num_classes: int
    decode: Callable[[list[npt.NDArray[np.float32]]], Any]


def map50_score(outputs: Sequence[npt.NDArray[np.float32]], task: DetectionTask) -> float:
    """mAP@0.5 of stacked model outputs, through ``converters.detection_metrics.map50``."""
    try:
        module = importlib.import_module("converters.detection_metrics")
    except ModuleNotFoundError as exc:
        if exc.name != "converters.detection_metrics":
            raise
        raise ConversionError(
            "mAP@0.5 needs converters.detection_metrics (the detector helper), which is not "
            "present; evaluate with metric='top1' or agreement only"
        ) from exc
    n = len(outputs[0])
    if len(task.ground_truth) != n:
        raise CalibrationError(f"{len(task.ground_truth)} ground-truth entries for {n} evaluation samples")
    predictions = [task.decode([o[i : i + 1] for o in outputs]) for i in range(n)]
    return float(module.map50(predictions, task.ground_truth, task.num_classes))


def accuracy_drop(
    ref_outputs: npt.NDArray[Any] | Sequence[npt.NDArray[Any]],
    outputs: npt.NDArray[Any] | Sequence[npt.NDArray[Any]],
    labels: npt.NDArray[Any] | None,
    *,
    detection: DetectionTask | None = None,
) -> tuple[float, str]:
    """How much worse ``outputs`` are than the reference's, as a fraction (0.01 = 1 point).

    With ``detection``: the mAP@0.5 drop (all model outputs are needed: pass the lists).
    With labels: top-1 accuracy drop (reference minus model; negative when the model is better).
    Without labels: ``1 - top-1 agreement`` for multi-value outputs, or the relative RMS error
    ``rms(ref - out) / rms(ref)`` for single-value outputs (scores, regressions).
    """
    refs = [ref_outputs] if isinstance(ref_outputs, np.ndarray) else list(ref_outputs)
    outs = [outputs] if isinstance(outputs, np.ndarray) else list(outputs)
    if detection is not None:
        return map50_score(refs, detection) - map50_score(outs, detection), "mAP@0.5 drop"
    if labels is not None:
        return top1_accuracy(refs[0], labels) - top1_accuracy(outs[0], labels), "top-1 accuracy drop"
    a, b = _flat(refs[0]), _flat(outs[0])
    if a.shape[1] > 1:
        return 1.0 - float(np.mean(a.argmax(axis=1) == b.argmax(axis=1))), "1 - top-1 agreement"
    rms = float(np.sqrt(np.mean(a * a))) or 1.0
    return float(np.sqrt(np.mean((a - b) ** 2))) / rms, "relative RMS error"


def _task_score(
    metric: Metric | None,
    outputs: list[npt.NDArray[np.float32]],
    data: CalibrationSet,
    detection: DetectionTask | None,
) -> float | None:
    if metric is None:
        return None
    if metric == "top1":
        return None if data.labels is None else top1_accuracy(outputs[0], data.labels)
    if metric == "map50":
        if detection is None:
            raise ConversionError(
                "metric='map50' needs detection=DetectionTask(ground_truth, num_classes, decode)"
            )
        return map50_score(outputs, detection)
    raise ConversionError(f"unknown metric {metric!r}; use 'top1' or 'map50'")


def evaluate(
    model: Path,
    data: CalibrationSet,
    *,
    reference: Path | Sequence[npt.NDArray[np.float32]] | None = None,
    metric: Metric | None = "top1",
    detection: DetectionTask | None = None,
    threads: int = 2,
    latency_runs: int = 0,
) -> EvalResult:
    """Run ``data`` through ``model``; task metric, agreement with ``reference``, size, latency.

    ``reference`` is another model file (run on the same data) or its outputs already computed.
    ``metric="map50"`` needs ``detection`` (ground truth and a decoder) and scores with
    ``converters.detection_metrics.map50``, imported only then.
    ``latency_runs > 0`` also measures p50 latency (alone; use :func:`compare_latency` to
    compare models fairly).
    """
    model = Path(model)
    outputs = run_model(model, data, threads)
    agree = None
    if reference is not None:
        ref = (
            run_model(Path(reference), data, threads)
            if isinstance(reference, (str, Path))
            else list(reference)
        )
        agree = agreement(ref[0], outputs[0])
    score = _task_score(metric, outputs, data, detection)
    latency = None
    if latency_runs > 0:
        latency = measure_latency(model, threads, latency_runs, sample=data.inputs[:1])
    return EvalResult(
        model, outputs, metric if score is not None else None, score, agree, file_size(model), latency
    )


# --------------------------------------------------------------------------- latency


def _stats(path: Path, times: list[float], threads: int, rounds: list[list[float]]) -> LatencyStats:
    ms = sorted(t * 1e3 for t in times)
    p90 = ms[min(len(ms) - 1, math.ceil(0.9 * len(ms)) - 1)]
    per_round = tuple(statistics.median(r) * 1e3 for r in rounds if r)
    return LatencyStats(path, statistics.median(ms), p90, statistics.fmean(ms), len(ms), threads, per_round)


def _sample_for(backend: Any, sample: npt.NDArray[np.float32] | None) -> list[npt.NDArray[Any]]:
    spec = backend.inputs[0]
    if sample is None:
        shape = [d or 1 for d in spec.shape]
        sample = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
    return _feed(backend, np.ascontiguousarray(sample, np.float32))


def measure_latency(
    model: Path, threads: int = 2, runs: int = 50, *, sample: npt.NDArray[np.float32] | None = None
) -> LatencyStats:
    """p50/p90/mean latency of ``model`` alone over ``runs`` timed runs (after warm-up)."""
    return compare_latency([model], threads, runs, sample=sample)[0]


def compare_latency(
    models: Sequence[Path],
    threads: int = 2,
    runs: int = 60,
    *,
    block: int = 5,
    warmup: int = 2,
    settle_s: float = 0.05,
    warmup_s: float = 0.03,
    sample: npt.NDArray[np.float32] | None = None,
) -> list[LatencyStats]:
    """Latency of several models measured in alternating rounds; one :class:`LatencyStats` each.

    Every round runs each model (order rotated per round) untimed for at least ``warmup`` runs
    and ``warmup_s`` seconds, then ``block`` timed times, until each has ``runs`` timed runs;
    ``settle_s`` sleeps before each model's turn (lets other sessions' worker threads park).
    The time-based warm-up matters: after a sleep, XNNPACK's threads and the CPU need more
    than a few runs to come back (measured on MobileNetV2 int8 LiteRT: 0.83 ms steady, 1.6 ms
    for the 5 runs after 2 warm-up runs following a 50 ms sleep, 0.92 ms after 10). ``sample``
    is one float input ``(1, ...)`` (random in [-1, 1] when omitted), quantized per model when
    its input is.
    """
    if runs < 1 or block < 1:
        raise ConversionError("runs and block must be at least 1")
    paths = [Path(m) for m in models]
    backends = [load_backend_for(p, threads, warmup_runs=3) for p in paths]
    try:
        feeds = [_sample_for(b, sample) for b in backends]
        times: list[list[float]] = [[] for _ in paths]
        per_round: list[list[list[float]]] = [[] for _ in paths]
        rounds = math.ceil(runs / block)
        clock = time.perf_counter
        for r in range(rounds):
            n = min(block, runs - r * block)
            for k in range(len(paths)):
                i = (k + r) % len(paths)
                backend, feed = backends[i], feeds[i]
                if settle_s > 0:
                    time.sleep(settle_s)
                warm_until = clock() + warmup_s
                done = 0
                while done < warmup or clock() < warm_until:
                    backend.run(feed)
                    done += 1
                this_round = []
                for _ in range(n):
                    t0 = clock()
                    backend.run(feed)
                    this_round.append(clock() - t0)
                times[i].extend(this_round)
                per_round[i].append(this_round)
        return [_stats(p, t, threads, r) for p, t, r in zip(paths, times, per_round, strict=True)]
    finally:
        for b in backends:
            b.close()
