"""Where int8 hurts a TFLite model, and the fewest float layers that fix it.

:func:`layer_errors` locates quantization damage op by op. For every activation tensor of the
int8 model it takes the **float** model's values of that tensor (the calibrated float model run
on calibration samples, so the numbers are not polluted by errors upstream) and puts them on the
int8 grid the quantized model uses (its scale/zero point): the per-channel SQNR of that round trip
is the damage this tensor's quantization does by itself. A per-tensor scale stretched by one huge
channel crushes every other channel to a few levels - the tensor's overall SQNR hides that, the
per-channel mean shows it, so the ranking uses the per-channel mean. Weights (int8 constants,
per-channel for conv/dense) get the same per-channel SQNR against the float weights. This is the
"layer statistics" idea of ``tf.lite.experimental.QuantizationDebugger`` (rmse/scale per tensor),
made local and per channel; rmse/scale is reported too.

:func:`fallback_tflite` then keeps the fewest ops float until the int8 model's accuracy drop
against the fp32 TFLite model is within ``max_drop`` on held-out data, with the ONNX path's
metric (:func:`converters.evaluate.accuracy_drop`: top-1 points with labels, else 1 - top-1
agreement with fp32, or relative RMS error for single-value outputs). Keeping a damaged *tensor*
float means keeping its producer float and every op that reads it (an int8 consumer would
re-quantize it on the same bad grid), so candidates are such groups, ranked by damage. The
search tries growing prefixes of the ranking (1, 2, 4, ...), bisects to the shortest that meets
the budget, then tries dropping each group; every trial re-quantizes the one calibration (no
re-calibration), and at most ``max_trials`` are evaluated.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from converters.evaluate import accuracy_drop
from converters.sources import SourceModel, write_atomic
from converters.tflite_quant import (
    CalibratedTFLite,
    OpInfo,
    check_inputs,
    float_compute_ops,
    load_interpreter,
    tflite_ops,
)
from converters.types import Artifact, CalibrationSet, Precision
from edge_runtime.errors import CalibrationError, ConversionError

__all__ = [
    "FallbackResult",
    "LayerError",
    "Trial",
    "fallback_tflite",
    "layer_errors",
    "predict_tflite",
]

log = logging.getLogger(__name__)

F32Array = npt.NDArray[np.float32]

_MAX_DB = 120.0  # SQNR reported for an exact round trip


# --------------------------------------------------------------------------- running models


def predict_tflite(model: bytes | Path, inputs: F32Array, *, threads: int = 2) -> F32Array:
    """First output of a TFLite model for each sample (float32; int8 io quantized/dequantized).

    Runs LiteRT with its default XNNPACK delegate, as the device does.
    """
    from edge_runtime.backends.litert import interpreter_module

    content = model.read_bytes() if isinstance(model, Path) else model
    mod = interpreter_module()
    try:
        interp = mod.Interpreter(model_content=content, num_threads=threads)
        interp.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        raise ConversionError(
            f"LiteRT cannot load the model to evaluate it: {str(exc).strip()[:300]}"
        ) from exc
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    in_scale, in_zp = inp["quantization"]
    out_scale, out_zp = out["quantization"]
    in_dtype = np.dtype(inp["dtype"])
    results: list[F32Array] = []
    for i in range(len(inputs)):
        x = inputs[i : i + 1]
        if in_dtype != np.float32:
            info = np.iinfo(in_dtype)
            x = np.clip(np.round(x / in_scale + in_zp), info.min, info.max).astype(in_dtype)
        interp.set_tensor(inp["index"], x)
        interp.invoke()
        y = interp.get_tensor(out["index"])
        if y.dtype != np.float32:
            y = (y.astype(np.float32) - np.float32(out_zp)) * np.float32(out_scale)
        results.append(np.asarray(y, dtype=np.float32).reshape(-1))
    return np.stack(results)


# --------------------------------------------------------------------------- layer errors


@dataclass(frozen=True)
class LayerError:
    """Quantization damage at one op of the int8 model (higher dB = less damage).

    ``name`` is the op's output tensor (what a denylist names). ``sqnr_db``: mean over channels
    of the SQNR of the float activations on this tensor's int8 grid; ``tensor_sqnr_db``: the same
    over the whole tensor; ``rmse_over_scale``: RMSE of that round trip in quantization steps
    (~0.29 is pure rounding, more means clipping); ``weight_sqnr_db``: per-channel SQNR of the
    op's int8 constants (``None`` without any); ``crushed_channels``: share of channels whose
    values span fewer than 4 int8 steps.
    """

    name: str
    op: str
    position: int
    sqnr_db: float
    tensor_sqnr_db: float
    rmse_over_scale: float
    weight_sqnr_db: float | None
    scale: float
    crushed_channels: float

    @property
    def score(self) -> float:
        """The worst of activation and weight SQNR (NaN - no signal - ranks last)."""
        values = [v for v in (self.sqnr_db, self.weight_sqnr_db) if v is not None and not math.isnan(v)]
        return min(values) if values else math.inf

    @property
    def weight_dominated(self) -> bool:
        """Whether the op's weights, not its output grid, are the worse part."""
        return self.weight_sqnr_db is not None and self.weight_sqnr_db < self.sqnr_db

    def describe(self) -> str:
        """One line for logs and reports."""
        w = "" if self.weight_sqnr_db is None else f", weights {self.weight_sqnr_db:.1f} dB"
        return (
            f"{self.op} {self.name[:70]}: {self.sqnr_db:.1f} dB per channel (tensor "
            f"{self.tensor_sqnr_db:.1f} dB, rmse/scale {self.rmse_over_scale:.2f}, "
            f"{self.crushed_channels:.0%} channels crushed{w})"
        )


def _sqnr(signal: npt.NDArray[np.float64], noise: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    with np.errstate(divide="ignore", invalid="ignore"):
        db = 10.0 * np.log10(signal / noise)
    return np.where(noise <= 0, _MAX_DB, np.minimum(db, _MAX_DB))


def _details(interp: Any) -> dict[int, dict[str, Any]]:
    return {int(d["index"]): d for d in interp.get_tensor_details()}


def _qparams(detail: dict[str, Any]) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64], int] | None:
    qp = detail.get("quantization_parameters") or {}
    scales = np.asarray(qp.get("scales", ()), dtype=np.float64)
    if scales.size == 0 or np.dtype(detail["dtype"]) not in (np.int8, np.uint8):
        return None
    zps = np.asarray(qp.get("zero_points", ()), dtype=np.int64)
    return scales, zps, int(qp.get("quantized_dimension", 0))


def _weight_sqnr(float_w: F32Array, q_w: npt.NDArray[Any], params: Any) -> float | None:
    scales, zps, axis = params
    if float_w.shape != q_w.shape or float_w.size == 0:
        return None
    shape = [1] * q_w.ndim
    if scales.size > 1 and q_w.ndim:
        shape[axis] = scales.size
    deq = (q_w.astype(np.float64) - zps.reshape(shape)) * scales.reshape(shape)
    f = float_w.astype(np.float64)
    axis_ = axis if scales.size > 1 and q_w.ndim else None
    if axis_ is None:
        sig, noise = np.array([np.mean(f**2)]), np.array([np.mean((f - deq) ** 2)])
    else:
        other = tuple(i for i in range(f.ndim) if i != axis_)
        sig, noise = np.mean(f**2, axis=other), np.mean((f - deq) ** 2, axis=other)
    keep = sig > 0
    return float(np.mean(_sqnr(sig[keep], noise[keep]))) if keep.any() else None


def _graph_inputs(ops: Sequence[OpInfo]) -> set[int]:
    produced = {i for op in ops for i in op.output_ids}
    return {i for op in ops for i in op.input_ids if i not in produced}


def _layer_errors(session: CalibratedTFLite, quantized: bytes, x: F32Array) -> list[LayerError]:
    float_interp = load_interpreter(session.calibrated, preserve=True)
    q_interp = load_interpreter(quantized)
    f_details, q_details = _details(float_interp), _details(q_interp)
    q_ops = {op.name: op for op in tflite_ops(quantized)}
    model_input = int(float_interp.get_input_details()[0]["index"])
    constants = _graph_inputs(session.ops) - {model_input}

    tracked: list[tuple[OpInfo, int, float, int]] = []  # float op, float tensor id, scale, zp
    for op in session.ops:
        q_op = q_ops.get(op.name)
        if q_op is None:
            continue
        params = _qparams(q_details[q_op.output_ids[0]])
        if params is None or params[0].size != 1:
            continue  # float op (denylisted / no int8 kernel) or per-channel output
        tracked.append((op, op.output_ids[0], float(params[0][0]), int(params[1][0])))

    sig: dict[int, npt.NDArray[np.float64]] = {}
    noise: dict[int, npt.NDArray[np.float64]] = {}
    err2: dict[int, float] = {}
    count: dict[int, int] = {}
    lo: dict[int, npt.NDArray[np.float64]] = {}
    hi: dict[int, npt.NDArray[np.float64]] = {}
    in_detail = float_interp.get_input_details()[0]
    for i in range(len(x)):
        sample = x[i : i + 1]
        if tuple(in_detail["shape"]) != sample.shape:
            float_interp.resize_tensor_input(in_detail["index"], list(sample.shape))
            float_interp.allocate_tensors()
        float_interp.set_tensor(in_detail["index"], sample)
        float_interp.invoke()
        for _op, tid, scale, zp in tracked:
            f = np.asarray(float_interp.get_tensor(tid), dtype=np.float64)
            ch = f.shape[-1] if f.ndim >= 2 else 1
            f2 = f.reshape(-1, ch)
            q = np.clip(np.round(f2 / scale) + zp, -128, 127)
            d = f2 - (q - zp) * scale
            if tid not in sig:
                sig[tid], noise[tid] = np.zeros(ch), np.zeros(ch)
                err2[tid], count[tid] = 0.0, 0
                lo[tid], hi[tid] = np.full(ch, np.inf), np.full(ch, -np.inf)
            sig[tid] += np.sum(f2**2, axis=0)
            noise[tid] += np.sum(d**2, axis=0)
            err2[tid] += float(np.sum(d**2))
            count[tid] += d.size
            lo[tid] = np.minimum(lo[tid], f2.min(axis=0))
            hi[tid] = np.maximum(hi[tid], f2.max(axis=0))

    rows: list[LayerError] = []
    for op, tid, scale, _zp in tracked:
        if tid not in sig:
            continue
        s, n = sig[tid], noise[tid]
        live = s > 0
        per_channel = float(np.mean(_sqnr(s[live], n[live]))) if live.any() else math.nan
        total = float(_sqnr(np.array([s.sum()]), np.array([n.sum()]))[0]) if s.sum() > 0 else math.nan
        span = (hi[tid] - lo[tid])[live]
        crushed = float(np.mean(span < 4 * scale)) if live.any() else 0.0
        weight = _op_weight_sqnr(op, q_ops[op.name], float_interp, q_interp, f_details, q_details, constants)
        rows.append(
            LayerError(
                name=op.name,
                op=op.type,
                position=op.index,
                sqnr_db=per_channel,
                tensor_sqnr_db=total,
                rmse_over_scale=math.sqrt(err2[tid] / max(1, count[tid])) / scale,
                weight_sqnr_db=weight,
                scale=scale,
                crushed_channels=crushed,
            )
        )
    rows.sort(key=lambda r: (r.score, r.position))
    return rows


def _op_weight_sqnr(
    op: OpInfo,
    q_op: OpInfo,
    float_interp: Any,
    q_interp: Any,
    f_details: dict[int, dict[str, Any]],
    q_details: dict[int, dict[str, Any]],
    constants: set[int],
) -> float | None:
    worst: float | None = None
    for f_id, q_id in zip(op.input_ids, q_op.input_ids, strict=False):
        if f_id not in constants or np.dtype(f_details[f_id]["dtype"]) != np.float32:
            continue
        params = _qparams(q_details.get(q_id, {"dtype": np.float32}))
        if params is None:
            continue
        try:
            value = _weight_sqnr(float_interp.get_tensor(f_id), q_interp.get_tensor(q_id), params)
        except ValueError:  # a constant LiteRT does not expose
            continue
        if value is not None and (worst is None or value < worst):
            worst = value
    return worst


def layer_errors(source: SourceModel, calib: CalibrationSet, *, samples: int = 32) -> list[LayerError]:
    """Per-op int8 damage of ``source``'s full-integer TFLite model, worst first.

    Calibrates on ``calib`` (like :func:`~converters.tflite_quant.quantize_tflite`) and measures
    on its first ``samples`` samples.
    """
    session = CalibratedTFLite(source, calib)
    return _layer_errors(session, session.quantize(()), session.inputs[:samples])


# --------------------------------------------------------------------------- fallback


class Trial(NamedTuple):
    """One quantization tried by the fallback search."""

    float_ops: tuple[str, ...]
    drop: float


class FallbackResult(NamedTuple):
    """What :func:`fallback_tflite` made: unpacks as ``(artifact, kept_float, drop, met)``."""

    artifact: Artifact
    kept_float: list[tuple[str, str]]
    achieved_drop: float
    met: bool


@dataclass
class _Group:
    """Ops to keep float together to take one damaged tensor (or weight) out of int8."""

    layer: LayerError
    ops: frozenset[str]
    reasons: dict[str, str] = field(default_factory=dict)


def _groups(session: CalibratedTFLite, errors: Sequence[LayerError]) -> list[_Group]:
    readers: dict[str, list[OpInfo]] = {}
    for op in session.ops:
        for name in op.inputs:
            readers.setdefault(name, []).append(op)
    groups: list[_Group] = []
    for err in errors:
        if not math.isfinite(err.score):
            continue
        if err.weight_dominated:
            why = f"int8 weights of this {err.op} reach only {err.weight_sqnr_db:.1f} dB SQNR"
            groups.append(_Group(err, frozenset({err.name}), {err.name: why}))
            continue
        reasons = {
            err.name: (
                f"its int8 output grid (scale {err.scale:.3g}) gives {err.sqnr_db:.1f} dB per-channel SQNR, "
                f"{err.crushed_channels:.0%} of channels crushed"
            )
        }
        for reader in readers.get(err.name, []):
            reasons.setdefault(
                reader.name,
                f"reads {err.name[:60]} ({err.sqnr_db:.1f} dB at int8), so it must take it in float",
            )
        groups.append(_Group(err, frozenset(reasons), reasons))
    return groups


def fallback_tflite(
    source: SourceModel,
    calib: CalibrationSet,
    eval_set: CalibrationSet,
    max_drop: float,
    out_path: Path,
    *,
    max_trials: int = 12,
    int8_io: bool = True,
    threads: int = 2,
    samples: int = 32,
) -> FallbackResult:
    """Int8 TFLite with the fewest ops kept float so the accuracy drop is within ``max_drop``.

    ``max_drop`` is a fraction (0.01 = 1 top-1 point, or 1 % disagreement with fp32 when
    ``eval_set`` has no labels), measured on ``eval_set`` (held-out, not the calibration data)
    against the fp32 TFLite model. Ops without an int8 kernel are always kept float. At most
    ``max_trials`` quantizations are evaluated. The best model found is written to ``out_path``
    either way; ``met`` tells whether it is within budget (the caller raises
    :class:`~edge_runtime.errors.AccuracyBudgetError` if it must be).
    """
    if not 0 <= max_drop < 1:
        raise ConversionError(f"max_drop={max_drop} must be a fraction in [0, 1) (0.01 = 1 point)")
    out_path = Path(out_path)
    session = CalibratedTFLite(source, calib)
    x_eval = check_inputs(eval_set, source, "evaluation")
    labels = None if eval_set.labels is None else np.asarray(eval_set.labels, dtype=np.int64)
    if labels is not None and len(labels) != len(x_eval):
        raise CalibrationError(f"the evaluation set has {len(x_eval)} inputs but {len(labels)} labels")
    reference = predict_tflite(source.float_tflite_bytes(), x_eval, threads=threads)

    plain = session.quantize((), int8_io=int8_io)
    # ops without an int8 kernel stay float in every trial without being denylisted
    forced = {op.name: f"{op.type} has no int8 kernel" for op in float_compute_ops(plain)}
    known = {op.name for op in session.ops}
    cache: dict[frozenset[str], tuple[float, bytes]] = {}
    trials: list[Trial] = []
    metric = ""

    def run(nodes: frozenset[str]) -> float:
        nonlocal metric
        nodes = frozenset(n for n in nodes if n in known and n not in forced)
        if nodes not in cache:
            data = plain if not nodes else session.quantize(sorted(nodes), int8_io=int8_io)
            drop, metric = accuracy_drop(reference, predict_tflite(data, x_eval, threads=threads), labels)
            cache[nodes] = (drop, data)
            trials.append(Trial(tuple(sorted(nodes | frozenset(forced))), drop))
            log.info(
                "fallback trial %d: %d float op(s) -> drop %.4f (%s)",
                len(trials), len(nodes) + len(forced), drop, metric,
            )  # fmt: skip
        return cache[nodes][0]

    run(frozenset())
    chosen: list[_Group] = []
    errors: list[LayerError] = []
    if cache[frozenset()][0] > max_drop:
        errors = _layer_errors(session, plain, session.inputs[:samples])
        for err in errors[:5]:
            log.info("int8 damage: %s", err.describe())
        chosen = _search(_groups(session, errors), run, max_drop, max_trials, lambda: len(trials))

    nodes = frozenset(n for g in chosen for n in g.ops if n in known and n not in forced)
    if run(nodes) > max_drop:  # not met: keep the best model seen (fewest float ops on ties)
        nodes = min(cache, key=lambda k: (cache[k][0], len(k)))
    drop, data = cache[nodes]
    met = drop <= max_drop
    write_atomic(out_path, data)

    reasons: dict[str, str] = dict(forced)
    for group in chosen:
        for name, why in group.reasons.items():
            reasons.setdefault(name, why)
    order = {op.name: op.index for op in session.ops}
    kept = [
        (name, reasons.get(name, "kept float by the best trial"))
        for name in sorted(nodes | frozenset(forced), key=lambda n: order.get(n, -1))
    ]
    precision: Precision = "mixed" if kept else "int8"
    notes = [
        f"route: {session.route} + fallback search ({len(trials)} trials)",
        f"accuracy drop vs fp32 TFLite: {drop:.4f} ({metric}), budget {max_drop:.4f}, met={met}",
        *(
            f"trial {i + 1}: {len(t.float_ops)} float op(s) -> drop {t.drop:.4f}"
            for i, t in enumerate(trials)
        ),
        *(f"damage: {e.describe()}" for e in errors[:5]),
    ]
    artifact = Artifact("tflite", precision, out_path, float_nodes=[n for n, _ in kept], notes=notes)
    log.info(
        "fallback: %d op(s) kept float, drop %.4f (budget %.4f, met=%s) after %d trials",
        len(kept), drop, max_drop, met, len(trials),
    )  # fmt: skip
    return FallbackResult(artifact, kept, drop, met)


def _search(
    groups: list[_Group],
    run: Any,
    max_drop: float,
    max_trials: int,
    used: Any,
) -> list[_Group]:
    """Shortest prefix of ``groups`` within budget (doubling, then bisection), then pruning."""

    def ok(selection: Sequence[_Group]) -> bool:
        return bool(run(frozenset().union(*(g.ops for g in selection))) <= max_drop)

    n = len(groups)
    lo, hi, k = 0, None, 1
    while k <= n and used() < max_trials:
        if ok(groups[:k]):
            hi = k
            break
        lo = k
        k = n if k < n < 2 * k else 2 * k
    if hi is None:
        return groups[: max(lo, 0)] if lo else []
    while hi - lo > 1 and used() < max_trials:
        mid = (lo + hi) // 2
        if ok(groups[:mid]):
            hi = mid
        else:
            lo = mid
    chosen = list(groups[:hi])
    for group in reversed(list(chosen)):
        if len(chosen) <= 1 or used() >= max_trials:
            break
        rest = [g for g in chosen if g is not group]
        if ok(rest):
            chosen = rest
    return chosen
