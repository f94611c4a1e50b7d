"""``edgert convert``: one command from a trained model to a signed int8 bundle.

Steps, each reported on stderr as it runs::

    load source -> calibration (+ evaluation) data through the device's preprocessing
    -> [prune] -> fp32 references (ONNX, TFLite) -> target profile + preflight
    -> int8 ONNX (QDQ) and int8 TFLite from the SAME calibration set
       (or the accuracy-aware fallback that keeps the fewest layers float)
    -> per-layer error -> accuracy, agreement, latency and size of every artifact
    -> report.json + report.html -> signed bundle (both int8 models, golden self-test)

Everything is written into a staging folder beside ``out`` and renamed into place at the end,
so a failed conversion leaves nothing that looks like a result. When the accuracy budget cannot
be met the best result is still written, the report says why, and
:class:`~edge_runtime.errors.AccuracyBudgetError` is raised (the CLI exits non-zero).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from converters.types import Artifact, CalibrationSet, Skipped
from edge_runtime.decoders.specs import ClassificationSpec, DecoderSpec
from edge_runtime.errors import AccuracyBudgetError, ConversionError
from edge_runtime.preprocess_spec import PreprocessSpec

__all__ = ["ConvertOptions", "ConvertResult", "convert", "parse_prune"]

log = logging.getLogger(__name__)


@dataclass
class ConvertOptions:
    """Everything ``edgert convert`` takes (the Python API has the CLI's reach)."""

    model: Path
    out: Path
    calibration: Path
    preprocess: PreprocessSpec
    decoder: DecoderSpec = field(default_factory=ClassificationSpec)
    name: str = "model"
    version: str = "1.0.0"
    task: Literal["classification", "detection", "regression", "anomaly"] = "classification"
    labels: Sequence[str] = ()
    eval_data: Path | None = None
    calibration_count: int = 200
    eval_count: int = 500
    method: Literal["minmax", "entropy", "percentile"] | None = None
    target: str = "auto"
    formats: Sequence[Literal["onnx", "tflite"]] = ("onnx", "tflite")
    max_accuracy_drop: float | None = None
    keep_float: Sequence[str] = ()
    float_input_ops: Literal["auto", "float", "int8"] = "auto"
    prune: str | None = None
    finetune_data: Path | None = None
    finetune_epochs: int = 3
    threads: int = 2
    latency_runs: int = 40
    sign_key: Path | None = None
    pack: Path | None = None
    overwrite: bool = False
    progress: bool = True


@dataclass
class ConvertResult:
    """What was written, and the report's content."""

    out: Path
    bundle: Path | None
    report: dict[str, Any]
    artifacts: list[Artifact]
    skipped: list[Skipped]


def parse_prune(text: str | None) -> tuple[str, float] | None:
    """``magnitude:S`` or ``channels:R`` (0 < value < 1)."""
    if not text:
        return None
    kind, _, value = text.partition(":")
    try:
        amount = float(value)
    except ValueError:
        amount = -1.0
    if kind not in ("magnitude", "channels") or not 0.0 < amount < 1.0:
        raise ConversionError(
            f"--prune {text!r}: use magnitude:S (zero the smallest S of weights) or channels:R "
            "(remove the least important R of channels), with 0 < S, R < 1"
        )
    return kind, amount


class _Steps:
    """Progress lines on stderr: ``[3/9] quantizing ONNX ... 2.1 s``."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.n, self.enabled = total, 0, enabled
        self.t0 = time.monotonic()
        self.current = ""

    def __call__(self, what: str) -> None:
        self._end()
        self.n += 1
        self.current, self.t0 = what, time.monotonic()
        if self.enabled:
            sys.stderr.write(f"[{self.n}/{self.total}] {what} ...")
            sys.stderr.flush()

    def _end(self) -> None:
        if self.enabled and self.current:
            sys.stderr.write(f" {time.monotonic() - self.t0:.1f} s\n")
            sys.stderr.flush()
        self.current = ""

    def done(self) -> None:
        self._end()


def _load_data(opts: ConvertOptions, source: Any) -> tuple[CalibrationSet, CalibrationSet]:
    from converters.calibration import load_calibration, split_calibration

    shape = tuple(source.input_shape)
    labels = list(opts.labels) or None
    if opts.eval_data is not None:
        calib = load_calibration(
            opts.calibration, opts.preprocess, shape, count=opts.calibration_count, labels=labels
        )
        evals = load_calibration(opts.eval_data, opts.preprocess, shape, count=opts.eval_count, labels=labels)
        return calib, evals
    both = load_calibration(
        opts.calibration,
        opts.preprocess,
        shape,
        count=opts.calibration_count + opts.eval_count,
        labels=labels,
    )
    if len(both) >= 20:
        return split_calibration(both, eval_fraction=min(0.5, opts.eval_count / len(both)))
    log.warning("only %d samples: evaluating on the calibration data itself", len(both))
    return both, both


def _prune(
    opts: ConvertOptions, source: Any, stage: Path, calib: CalibrationSet, report: dict[str, Any]
) -> Any:
    """Apply ``--prune``; return the (possibly new) source model."""
    from converters.sources import load_source

    parsed = parse_prune(opts.prune)
    if parsed is None:
        return source
    kind, amount = parsed
    if source.kind in ("keras",):
        from converters import prune_keras

        model = source._keras()  # the loaded keras.Model
        if kind == "channels":
            from converters.targets import resolve_target

            round_to = 16 if resolve_target(opts.target).name == "x86-vnni" else 8
            new_model, pr = prune_keras.channel_prune_keras(model, amount, round_to=round_to)
            if opts.finetune_data is not None:
                x, y = prune_keras.load_finetune_data(opts.finetune_data)
                history = prune_keras.finetune(new_model, x, y, epochs=opts.finetune_epochs)
                report.setdefault("notes", []).append(f"fine-tuned after pruning: {history}")
        else:
            new_model = model
            sparsity = prune_keras.magnitude_prune_keras(model, amount)
            pr = None
            report["pruning"] = {
                "kind": "magnitude",
                "amount": amount,
                "per_layer_sparsity": sparsity,
                "note": "unstructured zeros compress; they do not run faster",
            }
        path = stage / "pruned.keras"
        new_model.save(path)
        if pr is not None:
            report["pruning"] = {"kind": kind, "amount": amount, **pr.to_dict()}
        return load_source(path)
    if source.kind != "onnx":
        raise ConversionError(
            f"--prune works on ONNX and Keras sources; {source.path.name} is {source.kind}: convert "
            "it from the Keras/ONNX model instead"
        )
    from converters import prune_onnx

    dst = stage / "pruned.onnx"
    if kind == "channels":
        # Channel counts rounded to the CPU kernels' blocks: 16 on AVX-512, 8 elsewhere (an
        # exact 30% leaves odd counts that run on slower kernels; measured in docs/performance.md).
        from converters.targets import resolve_target

        round_to = 16 if resolve_target(opts.target).name == "x86-vnni" else 8
        pr = prune_onnx.channel_prune_onnx(source.path, dst, amount, calib.inputs[:256], round_to=round_to)
    else:
        pr = prune_onnx.magnitude_prune_onnx(source.path, dst, amount)
    report["pruning"] = {"kind": kind, "amount": amount, **pr.to_dict()}
    return load_source(dst)


def _as_artifact(made: Artifact | Skipped, skipped: list[Skipped]) -> Artifact | None:
    if isinstance(made, Skipped):
        skipped.append(made)
        log.warning("%s %s not produced: %s", made.format, made.precision, made.reason)
        return None
    return made


def _detection_task(opts: ConvertOptions, evals: CalibrationSet) -> Any:
    """mAP@0.5 scoring when the evaluation data holds detector ground truth (``boxes``)."""
    if evals.boxes is None:
        return None
    from converters.evaluate import DetectionTask
    from edge_runtime.decoders import make_decoder
    from edge_runtime.decoders.specs import SSDSpec, YoloSpec

    if not isinstance(opts.decoder, (YoloSpec, SSDSpec)):
        raise ConversionError(
            f"the evaluation data holds detector ground truth ('boxes') but the decoder is "
            f"{opts.decoder.kind!r}; pass --task detection with --decoder yolo or ssd"
        )
    decoder = make_decoder(opts.decoder, list(opts.labels))
    seen = [int(b[:, 0].max()) + 1 for b in evals.boxes if len(b)]
    classes = max([len(opts.labels), *seen])
    return DetectionTask(evals.boxes, classes, lambda outs: decoder.decode(outs, None))


def _keep_float_names(
    opts: ConvertOptions, fmt: Literal["onnx", "tflite"], names: Sequence[str], report: dict[str, Any]
) -> list[str]:
    from converters.keep_float import keep_float_names

    kept = keep_float_names(opts.keep_float, fmt, names, opts.formats)
    report.setdefault("keep_float", {})[fmt] = list(kept)
    return kept


def _check_keep_float(opts: ConvertOptions, report: dict[str, Any]) -> None:
    """A bare ``--keep-float`` name must have matched an op in at least one format."""
    matched = {n for names in report.get("keep_float", {}).values() for n in names}
    for entry in opts.keep_float:
        prefix, sep, _ = entry.partition(":")
        if not (sep and prefix in ("onnx", "tflite")) and entry not in matched:
            raise ConversionError(
                f"--keep-float {entry!r} names no op of the ONNX or TFLite model; see report.json "
                "'per_layer' for the names"
            )


def _faster_of(
    opts: ConvertOptions,
    plain: Artifact,
    make_alternative: Callable[[Path], Artifact],
    input_ops: Sequence[str],
    evals: CalibrationSet,
    report: dict[str, Any],
) -> Artifact:
    """``--float-input-ops auto``: keep the input ops float when that is >= 10 % faster on this host."""
    from converters.evaluate import compare_latency, paired_speedup

    path = plain.path.with_name(f"{plain.path.stem}_float_input{plain.path.suffix}")
    alt = make_alternative(path)
    lat = compare_latency(
        [plain.path, alt.path], opts.threads, max(30, opts.latency_runs), sample=evals.inputs[:1]
    )
    gain = paired_speedup(lat[0], lat[1])
    chosen = gain >= 1.1
    entry = {
        "ops": list(input_ops),
        "speedup_float_vs_int8": round(gain, 3),
        "kept_float": chosen,
        "threads": opts.threads,
        "note": "measured on the conversion host; --float-input-ops float|int8 decides for another CPU",
    }
    report.setdefault("float_input_ops", {})[plain.format] = entry
    log.info(
        "%s: %d input op(s) float is %.2fx the speed of int8: %s",
        plain.format, len(input_ops), gain, "kept float" if chosen else "left int8",
    )  # fmt: skip
    if not chosen:
        path.unlink(missing_ok=True)
        return plain
    path.replace(plain.path)
    alt.path = plain.path
    alt.notes.append(f"input ops kept float ({gain:.2f}x faster than int8 on the conversion host)")
    return alt


def _onnx_int8(
    opts: ConvertOptions,
    fp32: Path,
    stage: Path,
    calib: CalibrationSet,
    evals: CalibrationSet,
    profile: Any,
    report: dict[str, Any],
    detection: Any = None,
) -> tuple[Artifact, bool]:
    from converters.keep_float import onnx_input_ops, onnx_node_names
    from converters.onnx_quant import prepare_onnx, quantize_onnx
    from converters.sensitivity_onnx import fallback_onnx, per_layer_sqnr

    prepared, notes = prepare_onnx(fp32, stage / "prepared.onnx")
    report.setdefault("notes", []).extend(f"onnx pre-processing: {n}" for n in notes)
    out = stage / "model_int8.onnx"
    met = True
    names = onnx_node_names(prepared)
    kept = _keep_float_names(opts, "onnx", names, report)
    input_ops = [n for n in onnx_input_ops(prepared) if n not in kept]
    if opts.float_input_ops == "float":
        kept += input_ops
    options = dataclasses.replace(
        profile.options, exclude=tuple(dict.fromkeys([*profile.options.exclude, *kept]))
    )
    if opts.max_accuracy_drop is not None:
        fb = fallback_onnx(
            prepared,
            calib,
            evals,
            options,
            opts.max_accuracy_drop,
            out_path=out,
            target=profile,
            threads=opts.threads,
            detection=detection,
            preprocess=False,
        )
        report.setdefault("fallback", {"max_drop": opts.max_accuracy_drop, "kept_float": {}})
        report["fallback"]["kept_float"]["onnx"] = [{"name": n, "reason": r} for n, r in fb.kept_float]
        report["fallback"]["onnx"] = fb.to_dict()
        artifact, met = fb.artifact, fb.met_budget
    else:
        artifact = quantize_onnx(prepared, out, calib, options, target=profile, preprocess=False)
        if opts.float_input_ops == "auto" and input_ops:

            def alternative(path: Path) -> Artifact:
                alt = dataclasses.replace(options, exclude=(*options.exclude, *input_ops))
                return quantize_onnx(prepared, path, calib, alt, target=profile, preprocess=False)

            artifact = _faster_of(opts, artifact, alternative, input_ops, evals, report)
    layers = per_layer_sqnr(prepared, artifact.path, calib)
    report.setdefault("per_layer", {})["onnx"] = [x.to_dict() for x in layers]
    return artifact, met


def _tflite_int8(
    opts: ConvertOptions,
    source: Any,
    stage: Path,
    calib: CalibrationSet,
    evals: CalibrationSet,
    report: dict[str, Any],
) -> tuple[Artifact, bool]:
    from converters.keep_float import tflite_input_ops
    from converters.sensitivity_tflite import fallback_tflite, layer_errors
    from converters.tflite_quant import quantize_tflite, tflite_ops

    out = stage / "model_int8.tflite"
    met = True
    names = [op.name for op in tflite_ops(source.float_tflite_bytes())]
    kept = _keep_float_names(opts, "tflite", names, report)
    input_ops = [n for n in tflite_input_ops(source) if n not in kept]
    if opts.float_input_ops == "float":
        kept += input_ops
    if opts.max_accuracy_drop is not None:
        if kept:
            report.setdefault("notes", []).append(
                "tflite: --keep-float is not combined with --max-accuracy-drop; the fallback search chose "
                "the float ops"
            )
        fb = fallback_tflite(source, calib, evals, opts.max_accuracy_drop, out, threads=opts.threads)
        report.setdefault("fallback", {"max_drop": opts.max_accuracy_drop, "kept_float": {}})
        report["fallback"]["kept_float"]["tflite"] = [{"name": n, "reason": r} for n, r in fb.kept_float]
        report["fallback"]["tflite"] = {"achieved_drop": fb.achieved_drop, "met_budget": fb.met}
        artifact, met = fb.artifact, fb.met
    else:
        artifact = quantize_tflite(source, out, calib, denylist=tuple(kept))
        if opts.float_input_ops == "auto" and input_ops:

            def alternative(path: Path) -> Artifact:
                return quantize_tflite(source, path, calib, denylist=(*kept, *input_ops))

            artifact = _faster_of(opts, artifact, alternative, input_ops, evals, report)
    errors = sorted(layer_errors(source, calib), key=lambda e: e.position)
    report.setdefault("per_layer", {})["tflite"] = [
        {"name": e.name, "op_type": e.op, "sqnr_db": round(e.sqnr_db, 2), "detail": e.describe()}
        for e in errors
    ]
    return artifact, met


def _measure(
    opts: ConvertOptions,
    pairs: list[tuple[Artifact, Artifact]],
    evals: CalibrationSet,
    report: dict[str, Any],
    detection: Any = None,
) -> None:
    """Metric, agreement, size and interleaved latency of every fp32/int8 pair."""
    from converters.evaluate import compare_latency, evaluate, paired_speedup

    rows = report.setdefault("artifacts", [])
    metric: Literal["top1", "map50"] = "map50" if detection is not None else "top1"
    for ref, art in pairs:
        ref_eval = evaluate(ref.path, evals, threads=opts.threads, metric=metric, detection=detection)
        q_eval = evaluate(
            art.path,
            evals,
            reference=ref_eval.outputs,
            threads=opts.threads,
            metric=metric,
            detection=detection,
        )
        lat = compare_latency([ref.path, art.path], opts.threads, opts.latency_runs, sample=evals.inputs[:1])
        speedup = paired_speedup(lat[0], lat[1])
        for a, ev, stats, is_ref in ((ref, ref_eval, lat[0], True), (art, q_eval, lat[1], False)):
            row: dict[str, Any] = {
                "format": a.format,
                "precision": a.precision,
                "file": a.path.name,
                "size_bytes": ev.size_bytes,
                "latency_ms_p50": round(stats.p50_ms, 4),
                "threads": opts.threads,
                "metric": None if ev.score is None else {ev.metric: round(ev.score, 4)},
                "float_nodes": a.float_nodes,
                "notes": a.notes,
            }
            if not is_ref:
                row["speedup_vs_fp32"] = round(speedup, 3) if speedup else None
                row["size_ratio_vs_fp32"] = round(ref_eval.size_bytes / max(1, ev.size_bytes), 3)
                if ev.agreement is not None:
                    row["agreement"] = {k: round(float(v), 4) for k, v in vars(ev.agreement).items()}
                if ref_eval.score is not None and ev.score is not None:
                    row["metric_drop_points"] = round(100 * (ref_eval.score - ev.score), 2)
            rows.append(row)


def convert(opts: ConvertOptions) -> ConvertResult:
    """Run the whole conversion (see the module docstring)."""
    from converters.sources import load_source
    from converters.targets import preflight, resolve_target

    out = opts.out
    if opts.max_accuracy_drop is not None and not 0.0 <= opts.max_accuracy_drop < 1.0:
        raise ConversionError(
            f"--max-accuracy-drop {opts.max_accuracy_drop}: give a fraction between 0 and 1 "
            "(0.01 = 1 point of top-1)"
        )
    parse_prune(opts.prune)
    if out.exists() and not opts.overwrite:
        raise ConversionError(f"{out} already exists; remove it or pass --force")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    steps = _Steps(9, opts.progress)
    report: dict[str, Any] = {"notes": []}
    artifacts: list[Artifact] = []
    skipped: list[Skipped] = []
    try:
        steps(f"loading {opts.model.name}")
        source = load_source(opts.model)
        report["model"] = {
            "name": opts.name,
            "source": opts.model.name,
            "task": opts.task,
            "input": list(source.input_shape),
            "kind": source.kind,
        }
        steps("calibration and evaluation data (device preprocessing)")
        calib, evals = _load_data(opts, source)
        detection = _detection_task(opts, evals)
        report["calibration"] = {
            "samples": len(calib),
            "eval_samples": len(evals),
            "labelled_eval": evals.labels is not None,
            "detection_ground_truth": detection is not None,
            "description": calib.description,
        }
        steps("pruning" if opts.prune else "no pruning requested")
        source = _prune(opts, source, stage, calib, report)
        steps("fp32 references")
        fp32: dict[str, Artifact] = {}
        if "onnx" in opts.formats:
            made = _as_artifact(source.fp32_onnx(stage / "model_fp32.onnx"), skipped)
            if made:
                fp32["onnx"] = made
        if "tflite" in opts.formats:
            made = _as_artifact(source.fp32_tflite(stage / "model_fp32.tflite"), skipped)
            if made:
                fp32["tflite"] = made
        if not fp32:
            raise ConversionError(  # noqa: TRY301 - cleanup below must run
                "no fp32 model could be produced: " + "; ".join(s.reason for s in skipped)
            )
        steps(f"target {opts.target}")
        profile = resolve_target(opts.target)
        if opts.method:
            profile = profile.with_options(method=opts.method)
        warnings = preflight(profile, fp32["onnx"].path) if "onnx" in fp32 else []
        report["target"] = {
            "name": profile.name,
            "description": profile.description,
            "options": vars(profile.options) | {"exclude": list(profile.options.exclude)},
            "preflight": warnings,
            "detected": profile.detected,
        }
        for w in warnings:
            log.warning("preflight: %s", w)
        met_all = True
        pairs: list[tuple[Artifact, Artifact]] = []
        steps("int8 ONNX (QDQ)" + (" with accuracy-aware fallback" if opts.max_accuracy_drop else ""))
        if "onnx" in fp32:
            art, met = _onnx_int8(opts, fp32["onnx"].path, stage, calib, evals, profile, report, detection)
            pairs.append((fp32["onnx"], art))
            met_all &= met
        steps("int8 TFLite" + (" with accuracy-aware fallback" if opts.max_accuracy_drop else ""))
        if "tflite" in fp32:
            art, met = _tflite_int8(opts, source, stage, calib, evals, report)
            pairs.append((fp32["tflite"], art))
            met_all &= met
        elif "tflite" in opts.formats:
            skipped.append(Skipped("tflite", "int8", "no fp32 TFLite reference (see above)"))
        _check_keep_float(opts, report)
        steps("accuracy, agreement, latency and size")
        _measure(opts, pairs, evals, report, detection)
        for ref, art in pairs:
            artifacts += [ref, art]
        report["skipped"] = [vars(s) for s in skipped]
        status = "ok" if met_all else "accuracy budget NOT met; the best result found is kept"
        report["status"] = {"ok": met_all, "message": status}
        steps("report and bundle")
        from converters.report import write_report

        write_report(report, stage)
        bundle_dir = _bundle(opts, stage, pairs, calib, evals)
        steps.done()
        if out.exists():
            shutil.rmtree(out)
        stage.replace(out)
    except BaseException:
        steps.done()
        shutil.rmtree(stage, ignore_errors=True)
        raise
    for a in artifacts:
        a.path = out / a.path.name
    result = ConvertResult(out, out / bundle_dir.name if bundle_dir else None, report, artifacts, skipped)
    if opts.pack is not None and result.bundle is not None:
        from edge_runtime.bundle import pack_bundle

        pack_bundle(result.bundle, opts.pack)
    if not met_all:
        raise AccuracyBudgetError(
            f"--max-accuracy-drop {opts.max_accuracy_drop} could not be met; the best result is in "
            f"{out} and {out / 'report.html'} says which layers were tried in float"
        )
    return result


def _bundle(
    opts: ConvertOptions,
    stage: Path,
    pairs: list[tuple[Artifact, Artifact]],
    calib: CalibrationSet,
    evals: CalibrationSet,
) -> Path | None:
    from converters.evaluate import run_model
    from edge_runtime.bundle import create_bundle
    from edge_runtime.bundle.create import reference_statistics
    from edge_runtime.bundle.golden import golden_frames

    if not pairs:
        return None
    frames = golden_frames(opts.calibration, opts.preprocess, 8)
    ref_outputs = run_model(pairs[0][0].path, calib, opts.threads)
    reference = reference_statistics(calib.inputs, [np.asarray(o) for o in ref_outputs], opts.decoder)
    models = [art.path for _, art in pairs]
    precision: dict[str, str] = {str(art.format): str(art.precision) for _, art in pairs}
    return create_bundle(
        stage / "bundle",
        models=models,
        name=opts.name,
        version=opts.version,
        task=opts.task,
        preprocess=opts.preprocess,
        decoder=opts.decoder,
        labels=list(opts.labels),
        golden_frames=frames,
        description=f"converted by edgert convert from {opts.model.name} (target {opts.target})",
        precision=precision,
        extra_files={"report.json": stage / "report.json"},
        sign_key=opts.sign_key,
        threads=opts.threads,
        reference=reference,
    )
