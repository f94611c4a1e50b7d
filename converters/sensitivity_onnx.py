"""Which layers does int8 hurt, and which must stay float to meet an accuracy budget (ONNX).

:func:`per_layer_sqnr` locates damage: it runs the fp32 model and the QDQ model on a few
calibration samples with every node's output exposed, and reports, in graph order, the SQNR of
each node's output in the quantized model (its quantized value, i.e. what the next layer reads)
against the fp32 value. Errors accumulate along the graph, so the place to look is where the
SQNR *drops*.

:func:`rank_sensitivity` ranks the quantizable nodes by the damage each does **on its own**: a
"switchable" copy of the fully quantized QDQ graph gets a boolean mask input and a
``float + mask[i] * (dequantized - float)`` after every DequantizeLinear, so one ONNX Runtime session
evaluates "only node X quantized" (its weights, its input and its output QDQ pairs on, all
others off) for every node X; the score is the final-output SQNR against fp32 (lower = more
damaging). Why this measure:

* it is exact about what the node's quantization does to the output (not a local proxy);
* it ranks *both* ends of a damaged tensor high. "Keep only X in float" would miss such pairs:
  when a tensor has a huge outlier range, excluding its producer alone changes nothing because
  its consumer still quantizes it as an input;
* it is affordable: one session plus ``samples`` runs of the emulated graph per node (the 18
  ranked nodes of the shapes CNN: 0.3 s; the 101 of MobileNetV2 224 with 8 samples: ~60 s on
  2 busy shared cores), and :func:`fallback_onnx` only ranks when all-int8 misses the budget.

:func:`fallback_onnx` keeps the fewest nodes float until the accuracy drop versus fp32 is within
budget: real quantizations (ranges calibrated once, reused from a calibration cache) of the
ranked prefix, searched by doubling then bisection, then pruned node by node while trials
remain; every trial is measured on the evaluation set with the device's backend.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from converters import deps
from converters.evaluate import DetectionTask, accuracy_drop, run_model, sqnr_db
from converters.onnx_quant import (
    _commit,
    _input_info,
    _session,
    _staging,
    default_op_types,
    prepare_onnx,
    quantize_onnx,
)
from converters.targets import TargetProfile
from converters.types import Artifact, CalibrationSet, QuantOptions
from edge_runtime.errors import CalibrationError, ConversionError

__all__ = [
    "FallbackResult",
    "LayerSQNR",
    "NodeSensitivity",
    "Trial",
    "fallback_onnx",
    "per_layer_sqnr",
    "rank_sensitivity",
]

log = logging.getLogger(__name__)

_MASK = "__edgert_qmask"
_ANALYSIS = {"QDQKeepRemovableActivations": True}
"""The analysis QDQ model keeps Relu/Clip nodes (the deployed one folds them into the
quantization range), so that switching a QDQ pair off gives exactly the float value."""
_QD = ("QuantizeLinear", "DequantizeLinear")
_FOLDED = ("Relu", "Clip")


@dataclass(frozen=True)
class LayerSQNR:
    """One node's output in the quantized model compared with fp32."""

    node: str
    op_type: str
    output: str
    sqnr_db: float | None
    """None when the tensor is not float or no longer exists in the quantized graph (fused)."""
    quantized: bool
    """The output is quantized (followed by a QDQ pair) in the quantized model."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready row for the report (``sqnr_db`` left out when there is none)."""
        row: dict[str, Any] = {"name": self.node, "op_type": self.op_type, "output": self.output}
        row["quantized"] = self.quantized
        if self.sqnr_db is not None:
            row["sqnr_db"] = round(self.sqnr_db, 2)
        return row


@dataclass(frozen=True)
class NodeSensitivity:
    """The damage one node's int8 quantization does to the model output on its own."""

    node: str
    op_type: str
    sqnr_db: float
    """Final-output SQNR vs fp32 with only this node quantized (lower = more damaging)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready row for the report."""
        return {"name": self.node, "op_type": self.op_type, "sqnr_db": round(self.sqnr_db, 2)}


@dataclass(frozen=True)
class Trial:
    """One quantization tried by :func:`fallback_onnx`."""

    float_nodes: tuple[str, ...]
    drop: float
    met: bool


@dataclass
class FallbackResult:
    """What :func:`fallback_onnx` produced.

    ``artifact`` is the best model (written to ``out_path``): the one meeting the budget with the
    fewest float nodes, or, when no trial met it (``met_budget`` False: the caller should raise
    :class:`~edge_runtime.errors.AccuracyBudgetError` / exit non-zero), the one with the
    smallest drop.
    """

    artifact: Artifact
    kept_float: list[tuple[str, str]]
    """(node, reason) for every node kept in float."""
    achieved_drop: float
    met_budget: bool
    max_drop: float
    metric: str
    """What ``drop`` measures: top-1 accuracy drop (labelled) or 1 - top-1 agreement."""
    int8_drop: float
    """The drop with every node quantized (before any fallback)."""
    trials: list[Trial] = field(default_factory=list)
    ranking: list[NodeSensitivity] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary for the report."""
        return {
            "max_drop": self.max_drop,
            "metric": self.metric,
            "met_budget": self.met_budget,
            "result": (
                f"{self.metric} {self.achieved_drop:.4f} with {len(self.kept_float)} float node(s) "
                f"(all int8: {self.int8_drop:.4f}); budget {'met' if self.met_budget else 'NOT met'}"
            ),
            "achieved_drop": self.achieved_drop,
            "int8_drop": self.int8_drop,
            "file": str(self.artifact.path),
            "kept_float": [{"name": n, "reason": r} for n, r in self.kept_float],
            "trials": [
                {"float_nodes": list(t.float_nodes), "drop": t.drop, "met": t.met} for t in self.trials
            ],
            "ranking": [r.to_dict() for r in self.ranking],
        }


# --------------------------------------------------------------------------- graph helpers


def _float_tensors(model: Any) -> set[str]:
    """Names of float32 tensors (values, inputs, outputs) after ONNX shape/type inference."""
    onnx = deps.onnx()
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - best effort; fall back to the declared types
        inferred = model
    out = set()
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        if vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            out.add(vi.name)
    return out


def _with_outputs(model: Any, names: Sequence[str]) -> bytes:
    """Serialized copy of ``model`` with the float tensors ``names`` added as graph outputs."""
    onnx = deps.onnx()
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {o.name for o in copy.graph.output}
    for name in names:
        if name not in present:
            copy.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
            present.add(name)
    data: bytes = copy.SerializeToString()
    return data


def _run_named(
    session: Any,
    input_name: str,
    samples: npt.NDArray[np.float32],
    names: Sequence[str],
    extra: dict[str, Any] | None = None,
) -> dict[str, list[npt.NDArray[np.float32]]]:
    out: dict[str, list[npt.NDArray[np.float32]]] = {n: [] for n in names}
    for i in range(len(samples)):
        feed = {input_name: np.ascontiguousarray(samples[i : i + 1], np.float32), **(extra or {})}
        values = session.run(list(names), feed)
        for n, v in zip(names, values, strict=True):
            out[n].append(np.asarray(v, np.float32))
    return out


def _sqnr_lists(ref: list[npt.NDArray[np.float32]], q: list[npt.NDArray[np.float32]]) -> float:
    return sqnr_db(np.concatenate([r.ravel() for r in ref]), np.concatenate([x.ravel() for x in q]))


def _samples(calib: CalibrationSet, n: int) -> npt.NDArray[np.float32]:
    if len(calib) == 0:
        raise CalibrationError("the calibration set is empty; give at least one sample")
    return calib.inputs[: max(1, n)]


# --------------------------------------------------------------------------- per-layer SQNR


def _quantized_view(qdq: Any) -> dict[str, str]:
    """float tensor -> the tensor the quantized graph's consumers read (its DQ output)."""
    consumers: dict[str, list[Any]] = {}
    for node in qdq.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    view = {}
    for node in qdq.graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        for dq in consumers.get(node.output[0], []):
            if dq.op_type == "DequantizeLinear":
                view[node.input[0]] = dq.output[0]
                break
    return view


def per_layer_sqnr(
    fp32_path: Path, qdq_path: Path, calib: CalibrationSet, *, samples: int = 8
) -> list[LayerSQNR]:
    """SQNR (dB) of every node's output in the quantized model vs fp32, in fp32 graph order.

    Pass the pre-processed fp32 model (:func:`~converters.onnx_quant.prepare_onnx`) the QDQ
    model was made from for an exact match of node names; nodes whose outputs no longer exist in
    the quantized graph (fused, e.g. a Relu folded into the preceding Conv's QDQ pair) get
    ``sqnr_db=None``.
    """
    fp32_path, qdq_path = Path(fp32_path), Path(qdq_path)
    onnx = deps.onnx()
    fp32 = onnx.load(str(fp32_path))
    qdq = onnx.load(str(qdq_path))
    floats = _float_tensors(fp32)
    qdq_tensors = {o for n in qdq.graph.node for o in n.output} | {i.name for i in qdq.graph.input}
    view = _quantized_view(qdq)
    rows: list[tuple[Any, str, str | None]] = []
    for node in fp32.graph.node:
        out = node.output[0] if node.output else ""
        target = None
        if out in floats and out in qdq_tensors:
            target = view.get(out, out)
        rows.append((node, out, target))
    ref_names = sorted({out for _, out, t in rows if t is not None})
    q_names = sorted({t for _, _, t in rows if t is not None})
    x = _samples(calib, samples)
    input_name = _input_info(fp32_path)[0]
    try:
        ref = _run_named(_session(_with_outputs(fp32, ref_names)), input_name, x, ref_names)
        got = _run_named(_session(_with_outputs(qdq, q_names)), input_name, x, q_names)
    except Exception as exc:
        raise ConversionError(
            f"per-layer SQNR: running the models with intermediate outputs failed: {exc}"
        ) from exc
    result = []
    for node, out, target in rows:
        value = None if target is None else _sqnr_lists(ref[out], got[target])
        result.append(LayerSQNR(node.name, node.op_type, out, value, target is not None and target != out))
    return result


# --------------------------------------------------------------------------- switchable QDQ model


class _Switchable:
    """A QDQ model whose quantization can be switched on per DequantizeLinear with a mask input.

    Every DequantizeLinear output ``t`` becomes ``float + mask[i] * (DQ(...) - float)``: the
    float source is the QuantizeLinear's input for activations, or the fp32 initializer for
    weights and biases. ``node_sites`` maps each quantized node to the mask indices of its
    weights, its activation inputs and its output QDQ pairs.
    """

    def __init__(self, fp32: Any, qdq: Any, input_name: str) -> None:
        onnx = deps.onnx()
        helper, numpy_helper = onnx.helper, onnx.numpy_helper
        model = onnx.ModelProto()
        model.CopyFrom(qdq)
        graph = model.graph
        fp32_inits = {i.name: i for i in fp32.graph.initializer}
        inits = {i.name for i in graph.initializer}
        producer = {o: n for n in graph.node for o in n.output}
        new_nodes: list[Any] = []
        site_of: dict[str, int] = {}  # DQ output name -> mask index
        extra_inits: list[Any] = []
        for node in graph.node:
            new_nodes.append(node)
            if node.op_type != "DequantizeLinear":
                continue
            src = node.input[0]
            q = producer.get(src)
            if q is not None and q.op_type == "QuantizeLinear":
                float_src = q.input[0]
            elif src in inits and src.endswith("_quantized") and src[: -len("_quantized")] in fp32_inits:
                orig = fp32_inits[src[: -len("_quantized")]]
                float_src = f"{orig.name}__edgert_f32"
                arr = numpy_helper.to_array(orig)
                extra_inits.append(numpy_helper.from_array(arr, float_src))
            else:
                continue  # cannot be bypassed; stays quantized
            idx = len(site_of)
            out = node.output[0]
            site_of[out] = idx
            dq_out = f"{out}__edgert_dq"
            node.output[0] = dq_out
            on = f"{out}__edgert_on"
            extra_inits.append(numpy_helper.from_array(np.array(idx, np.int64), f"{on}_idx"))
            # out = float + on * (dq - float): exact float when off; ORT's Where with a scalar
            # condition is ~20x slower than these three vectorized ops on a CNN.
            new_nodes += [
                helper.make_node("Gather", [_MASK, f"{on}_idx"], [on], axis=0, name=f"{on}_g"),
                helper.make_node("Sub", [dq_out, float_src], [f"{out}__edgert_d"], name=f"{out}__edgert_s"),
                helper.make_node(
                    "Mul", [f"{out}__edgert_d", on], [f"{out}__edgert_m"], name=f"{out}__edgert_x"
                ),
                helper.make_node("Add", [float_src, f"{out}__edgert_m"], [out], name=f"{out}__edgert_a"),
            ]
        del graph.node[:]
        graph.node.extend(new_nodes)
        graph.initializer.extend(extra_inits)
        graph.input.append(helper.make_tensor_value_info(_MASK, onnx.TensorProto.FLOAT, [len(site_of)]))
        self.sites = len(site_of)
        consumers: dict[str, list[Any]] = {}  # on the original graph (DQ outputs not renamed)
        for n in qdq.graph.node:
            for name in n.input:
                consumers.setdefault(name, []).append(n)
        self.node_sites: dict[str, list[int]] = {}
        self.op_types: dict[str, str] = {}
        for node in qdq.graph.node:  # original wiring (before renaming)
            if node.op_type in _QD or not node.name:
                continue
            idxs = [site_of[i] for i in node.input if i in site_of]
            outs = list(node.output)
            # A Relu/Clip right after the node is folded into the node's output quantization in
            # the deployed model, so the activation's output QDQ pair belongs to the node too.
            outs += [a.output[0] for o in node.output for a in consumers.get(o, []) if a.op_type in _FOLDED]
            for o in outs:
                for q in consumers.get(o, []):
                    if q.op_type == "QuantizeLinear":
                        idxs.extend(
                            site_of[d.output[0]]
                            for d in consumers.get(q.output[0], [])
                            if d.op_type == "DequantizeLinear" and d.output[0] in site_of
                        )
            if idxs:
                self.node_sites[node.name] = sorted(set(idxs))
                self.op_types[node.name] = node.op_type
        self.input_name = input_name
        self.output_name = model.graph.output[0].name
        self.session = _session(model.SerializeToString(), threads=2)

    def run(self, mask: npt.NDArray[np.bool_], x: npt.NDArray[np.float32]) -> list[npt.NDArray[np.float32]]:
        on = mask.astype(np.float32)
        return _run_named(self.session, self.input_name, x, [self.output_name], {_MASK: on})[self.output_name]


def _rank(
    fp32: Path,
    qdq: Path,
    calib: CalibrationSet,
    samples: int,
    skip: Sequence[str] = (),
    target: TargetProfile | None = None,
) -> list[NodeSensitivity]:
    onnx = deps.onnx()
    fp32_model = onnx.load(str(fp32))
    input_name = _input_info(fp32)[0]
    x = _samples(calib, samples)
    ref_sess = _session(fp32)
    out_name = ref_sess.get_outputs()[0].name
    ref = _run_named(ref_sess, input_name, x, [out_name])[out_name]
    try:
        sw = _Switchable(fp32_model, onnx.load(str(qdq)), input_name)
    except Exception as exc:
        raise ConversionError(
            f"sensitivity analysis could not build its switchable QDQ model: {exc}"
        ) from exc
    exact = _sqnr_lists(ref, sw.run(np.zeros(sw.sites, np.bool_), x))
    if exact < 60.0:
        log.warning(
            "sensitivity: with every QDQ pair switched off the model differs from fp32 (SQNR %.1f dB); "
            "the ranking is approximate",
            exact,
        )
    fp32_names = {n.name for n in fp32_model.graph.node}
    quantizable = set(default_op_types(target.float_op_types if target else ("Softmax",)))
    ranking = []
    for name, idxs in sw.node_sites.items():
        if name in skip or name not in fp32_names or sw.op_types[name] not in quantizable:
            continue  # only nodes the quantizer quantizes can be kept float
        mask = np.zeros(sw.sites, np.bool_)
        mask[idxs] = True
        ranking.append(NodeSensitivity(name, sw.op_types[name], _sqnr_lists(ref, sw.run(mask, x))))
    order = {n.name: i for i, n in enumerate(fp32_model.graph.node)}
    ranking.sort(key=lambda r: (r.sqnr_db, order.get(r.node, 0)))
    return ranking


def rank_sensitivity(
    fp32_path: Path,
    calib: CalibrationSet,
    options: QuantOptions,
    *,
    target: TargetProfile | None = None,
    samples: int = 8,
    preprocess: bool = True,
) -> list[NodeSensitivity]:
    """Quantizable nodes, most damaging first (see the module docstring for the measure).

    Node names are those of the pre-processed graph (``preprocess=True`` runs
    :func:`~converters.onnx_quant.prepare_onnx` first, like :func:`quantize_onnx` does), i.e.
    the names ``QuantOptions.exclude`` takes. Nodes already in ``options.exclude`` are left out.
    """
    fp32_path = Path(fp32_path)
    with tempfile.TemporaryDirectory(prefix="edgert-rank-") as tmp_name:
        tmp = Path(tmp_name)
        model = prepare_onnx(fp32_path, tmp / "prepared.onnx")[0] if preprocess else fp32_path
        qdq = tmp / "analysis.onnx"
        quantize_onnx(
            model,
            qdq,
            calib,
            options,
            target=target,
            preprocess=False,
            extra_options=_ANALYSIS,
            compact_names=False,
        )
        return _rank(model, qdq, calib, samples, skip=options.exclude, target=target)


# --------------------------------------------------------------------------- accuracy fallback


def fallback_onnx(
    fp32_path: Path,
    calib: CalibrationSet,
    eval_set: CalibrationSet,
    options: QuantOptions,
    max_drop: float,
    *,
    out_path: Path,
    target: TargetProfile | None = None,
    max_trials: int = 12,
    samples: int = 8,
    threads: int = 2,
    detection: DetectionTask | None = None,
    preprocess: bool = True,
) -> FallbackResult:
    """Quantize with the fewest nodes kept float such that the accuracy drop is ``<= max_drop``.

    ``max_drop`` is a fraction (0.01 = 1 point): the mAP@0.5 drop with ``detection``, else the
    top-1 accuracy drop versus fp32 on ``eval_set`` when it is labelled, else ``1 - top-1
    agreement`` with fp32 (relative RMS error for single-value outputs); see
    :func:`converters.evaluate.accuracy_drop`. Search: all int8 first; then the prefix of
    :func:`rank_sensitivity`'s order (1, 2, 4, ... nodes, then bisection), then, with trials
    left, each kept node is tried back in int8 (least damaging first) and stays int8 if the
    budget still holds. At most ``max_trials`` quantizations. The best model is written to
    ``out_path``; ``met_budget`` says whether it meets the budget. ``preprocess=False`` when
    ``fp32_path`` already is the output of :func:`~converters.onnx_quant.prepare_onnx`.
    """
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    if len(eval_set) == 0:
        raise CalibrationError(
            "the evaluation set is empty; give labelled or unlabelled samples to measure the drop"
        )
    if max_drop < 0:
        raise ConversionError(f"max_drop must be >= 0 (a fraction, 0.01 = 1 point), got {max_drop}")
    with _staging(out_path) as tmp:
        if preprocess:
            prepared, notes = prepare_onnx(fp32_path, tmp / "prepared.onnx")
        else:
            prepared, notes = fp32_path, []
        ref = run_model(fp32_path, eval_set, threads)
        cache = tmp / "calibration.json"
        order = {n: i for i, n in enumerate(_node_names(prepared))}
        user = tuple(options.exclude)
        trials: list[Trial] = []
        files: dict[tuple[str, ...], Path] = {}
        metric = ""

        def trial(extra: Sequence[str]) -> Trial:
            nonlocal metric
            names = tuple(sorted(set(user) | set(extra), key=lambda n: order.get(n, 0)))
            for t in trials:
                if t.float_nodes == names:
                    return t
            path = tmp / f"trial{len(trials)}.onnx"
            opts = dataclasses.replace(options, exclude=names)
            quantize_onnx(
                prepared, path, calib, opts, target=target, preprocess=False, calibration_cache=cache
            )
            outs = run_model(path, eval_set, threads)
            drop, metric = accuracy_drop(ref, outs, eval_set.labels, detection=detection)
            t = Trial(names, drop, drop <= max_drop + 1e-12)
            trials.append(t)
            files[names] = path
            log.info(
                "fallback trial %d: %d float nodes, drop %.4f (%s)",
                len(trials),
                len(names),
                drop,
                "ok" if t.met else "over budget",
            )
            return t

        base = trial(())
        ranking: list[NodeSensitivity] = []
        chosen: list[str] = []
        if not base.met:
            analysis = tmp / "analysis.onnx"
            quantize_onnx(
                prepared,
                analysis,
                calib,
                dataclasses.replace(options, exclude=user),
                target=target,
                preprocess=False,
                calibration_cache=cache,
                extra_options=_ANALYSIS,
                compact_names=False,
            )
            ranking = _rank(prepared, analysis, calib, samples, skip=user, target=target)
            cands = [r.node for r in ranking]
            chosen = _search(cands, trial, trials, max_trials)
        best = _best(trials)
        _commit(files[best.float_nodes], out_path)
    rank_of = {r.node: (i, r) for i, r in enumerate(ranking)}
    kept: list[tuple[str, str]] = []
    for name in best.float_nodes:
        if name in user:
            kept.append((name, "kept float by the user (QuantOptions.exclude)"))
        elif name in rank_of:
            i, r = rank_of[name]
            kept.append(
                (
                    name,
                    (
                        f"{r.op_type}: quantizing only this node gives output SQNR {r.sqnr_db:.1f} dB "
                        f"(rank {i + 1} of {len(ranking)} by damage); kept float to bring the {metric} "
                        f"within {max_drop:.4g}"
                    ),
                )
            )
        else:
            kept.append((name, "kept float by the accuracy fallback"))
    status = "met" if best.met else "NOT met"
    notes.append(
        f"accuracy fallback: {metric} {base.drop:.4f} with all nodes int8, {best.drop:.4f} with "
        f"{len(best.float_nodes)} float node(s) after {len(trials)} trial(s); budget {max_drop:.4g} {status}"
    )
    if chosen and not best.met:
        notes.append("the budget could not be met; the result with the smallest drop was kept")
    artifact = Artifact(
        "onnx",
        "mixed" if best.float_nodes else "int8",
        out_path,
        float_nodes=list(best.float_nodes),
        notes=notes,
    )
    return FallbackResult(
        artifact, kept, best.drop, best.met, max_drop, metric, base.drop, trials, ranking, notes
    )


def _node_names(path: Path) -> list[str]:
    return [n.name for n in deps.onnx().load(str(path)).graph.node]


def _best(trials: list[Trial]) -> Trial:
    met = [t for t in trials if t.met]
    if met:
        return min(met, key=lambda t: (len(t.float_nodes), t.drop))
    return min(trials, key=lambda t: (t.drop, len(t.float_nodes)))


def _search(cands: list[str], trial: Any, trials: list[Trial], max_trials: int) -> list[str]:
    """Smallest ranked prefix meeting the budget (doubling, then bisection), then pruning."""
    if not cands:
        return []
    lo, hi = 0, None  # prefix lengths: lo fails (0 = all int8, known to fail), hi meets
    k = 1
    while len(trials) < max_trials:
        k = min(k, len(cands))
        if trial(cands[:k]).met:
            hi = k
            break
        lo = k
        if k == len(cands):
            return cands  # even everything float does not meet the budget
        k *= 2
    if hi is None:
        return cands[:lo]
    while hi - lo > 1 and len(trials) < max_trials:
        mid = (lo + hi) // 2
        if trial(cands[:mid]).met:
            hi = mid
        else:
            lo = mid
    keep = list(cands[:hi])
    for name in reversed(cands[:hi]):  # least damaging of the kept first
        if len(keep) == 1 or len(trials) >= max_trials:
            break  # one node left: all-int8 is known to fail
        candidate = [n for n in keep if n != name]
        if trial(candidate).met:
            keep = candidate
    return keep
