"""The converter's acceptance figures, side by side, from ONE run of the real ``edgert convert``.

Run from the repository root with a Python that has the conversion toolchain
(tensorflow-cpu, keras, tf2onnx, onnx, onnxruntime, ai-edge-litert)::

    .venv/bin/python bench/convert.py [--json out.json] [--threads 2] [--runs 200] [--calls 5]

Every figure comes from :func:`converters.convert.convert` (``target="auto"``) on real model
files, measured at the same thread count for both runtimes (ONNX Runtime and LiteRT, 2 threads
by default):

1. **shapes96**, a real trained classifier (:mod:`models.shapes96.recipe`: 96x96, ~1.18 M
   params, ~120 M MACs; built once by the recipe when ``models/shapes96/build/model.keras`` is
   missing): per format, int8 speedup over fp32 (goal >= 2.0x), size ratio (>= 3.5x) and top-1
   loss on the 1000 held-out images (<= 1.0 point). The LiteRT model is also quantized with the
   7 per-image standardization ops kept float (``quantize_tflite(..., denylist=...)``, which
   ``ConvertOptions`` does not expose): XNNPACK has no fast int8 kernels for them.
2. **MobileNetV2** (``keras.applications.MobileNetV2(weights=None)``, 224x224, 1000 classes)
   calibrated and evaluated on structured random images (synthesized shapes scenes): its
   accuracy is meaningless (random weights, no labels), so top-1 agreement with fp32 is
   reported instead; speedup and size ratio as above.
3. **A quantization-hostile model**: shapes96 with one channel multiplied by 1e4 before a max
   pool and divided back after it (two 1x1 depthwise convs; the float model is unchanged),
   which crushes every other channel of that tensor onto a few int8 levels. Plain int8 must
   lose > 5 points; ``--max-accuracy-drop 0.01`` (the converter's accuracy-aware fallback)
   must bring both formats within 1 point, listing what stayed float.
4. Hooks, run when the modules exist: **structured channel pruning** 30 %
   (``converters.prune_onnx.channel_prune_onnx``; ``converters.prune_keras`` +
   ``finetune`` through ``convert(prune="channels:0.3")``), goal >= 1.25x faster, accuracy
   change reported; the **YOLOv8-style detector** (``models/detector/build``): int8 ONNX faster
   than fp32 with mAP@0.5 within 1 point. Without those modules: "not available yet".

Latency: the converter's own figure (``ConvertOptions.latency_runs``) is shown, but the goals
are judged on a steadier one: ``--calls`` separate :func:`converters.evaluate.compare_latency`
calls of ``--runs`` timed runs per model on the produced files (interleaved rounds, order
rotated every round), each started after waiting for a quiet machine (``--max-load``,
``--quiet-budget``, as ``bench/pipeline.py``) with the other processes' CPU use measured, and
more calls (up to ``--max-calls``) while fewer than 3 were free of outside load; the speedup
is the median over all rounds of the clean calls (all calls when fewer than 3 are clean) of
the per-round fp32/int8 ratio. Outside load matters: with another process on one of the 2
cores, fp32 at 2 threads loses its second core while int8 (which gains little from it) does
not, so loaded calls overstate int8's speedup. shapes96 is also measured at 1 thread, for
information. No absolute time is a goal.

Builds are cached in ``bench/build/`` (git-ignored): the Keras MobileNetV2, the image folders,
the hostile model; the conversions themselves run every time (into ``bench/build/convert/``).
A full run takes about 12 minutes on 2 shared cores (at most ~15 when other processes keep the
machine busy; plus ~2.5 minutes once to train shapes96).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

if __package__ in (None, ""):  # run as a script: make ``bench``, ``converters``, ``models`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.models import BUILD_DIR, bench_preprocess
from bench.pipeline import LoadMeter, QuietWait

__all__ = [
    "NOT_AVAILABLE",
    "SECTIONS",
    "BenchConfig",
    "ClassifierData",
    "classifier_figures",
    "detector_figures",
    "format_report",
    "hostile_figures",
    "main",
    "make_hostile_keras",
    "paired_latency",
    "pruning_figures",
    "run_bench",
    "summary_rows",
]

REPO = Path(__file__).resolve().parent.parent
SHAPES96_DIR = REPO / "models" / "shapes96" / "build"
DETECTOR_DIR = REPO / "models" / "detector" / "build"

GOAL_SPEEDUP = 2.0
GOAL_SIZE = 3.5
GOAL_DROP_POINTS = 1.0
GOAL_HOSTILE_LOSS = 5.0
GOAL_PRUNE_SPEEDUP = 1.25
GOAL_DETECTOR_SPEEDUP = 1.0
GOAL_DETECTOR_MAP_POINTS = 1.0
SECTIONS: tuple[str, ...] = ("shapes96", "mobilenet_v2", "hostile", "pruning", "detector")
NOT_AVAILABLE = "not available yet"
_FORMAT_NAMES = {"onnx": "ORT", "tflite": "LiteRT"}


@dataclass
class BenchConfig:
    """What to run; the defaults are the documented configuration."""

    threads: int = 2
    runs: int = 200
    """Timed runs per model in each latency call."""
    calls: int = 5
    """Latency calls per comparison (each after a quiet-machine wait), pooled."""
    max_calls: int = 10
    """More calls (up to this many) are made while fewer than 3 were free of outside load."""
    info_threads: tuple[int, ...] = (1,)
    """Other thread counts measured for shapes96, for information (no goal)."""
    converter_runs: int = 100
    """``ConvertOptions.latency_runs`` (the converter's own interleaved figure)."""
    sections: tuple[str, ...] = SECTIONS
    shapes96_dir: Path = SHAPES96_DIR
    detector_dir: Path = DETECTOR_DIR
    build_dir: Path = BUILD_DIR
    s96_calib: int = 300
    s96_eval: int = 1000
    mnv2_calib: int = 100
    mnv2_eval: int = 200
    hostile_eval: int = 500
    hostile_scale: float = 1e4
    max_drop: float = 0.01
    prune_ratio: float = 0.3
    prune_round_to: int = 8
    """``round_to`` of the direct ``channel_prune_onnx`` call (kept channels a multiple of it)."""
    finetune_samples: int = 3000
    finetune_epochs: int = 3
    max_load: float = 0.25
    quiet_budget_s: float = 120.0
    recipe_args: tuple[str, ...] = ()
    """Extra arguments for the shapes96 recipe when it must be built."""


@dataclass
class ClassifierData:
    """A Keras classifier with labelled (or unlabelled) calibration and evaluation folders."""

    name: str
    model: Path
    calibration: Path
    eval_data: Path
    preprocess: Any
    labels: Sequence[str] = ()
    calib_count: int = 300
    eval_count: int = 1000
    labelled: bool = True
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# -- helpers ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """TensorFlow/Keras/tf2onnx chatter silenced (``converters.sources.quiet_tf``)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from converters.sources import quiet_tf

    with quiet_tf():
        yield


def _median(values: Sequence[float]) -> float:
    clean = [float(v) for v in values if v is not None and not math.isnan(v)]
    return float(statistics.median(clean)) if clean else math.nan


def _sample(data: ClassifierData | Path, preprocess: Any, shape: Sequence[int]) -> npt.NDArray[np.float32]:
    """One model input from an image folder, through the device preprocessing."""
    from converters.calibration import load_calibration

    folder = data.eval_data if isinstance(data, ClassifierData) else data
    return load_calibration(folder, preprocess, tuple(shape), count=1).inputs[:1]


def paired_latency(
    base: Path,
    other: Path,
    cfg: BenchConfig,
    quiet: QuietWait,
    sample: npt.NDArray[np.float32] | None = None,
    *,
    threads: int | None = None,
) -> dict[str, Any]:
    """``base`` vs ``other`` latency: at least ``cfg.calls`` interleaved :func:`compare_latency` calls.

    Each call waits for a quiet machine first and measures the other processes' CPU use; while
    fewer than 3 calls were free of outside load (``cfg.max_load``), more are made, up to
    ``cfg.max_calls``. Returns the speedup (median over the rounds of the clean calls - all
    calls when fewer than 3 are clean - of the per-round base/other medians; > 1: ``other`` is
    faster), both p50s (median of the used calls'), and what was used. ``threads`` overrides
    ``cfg.threads``.
    """
    from converters.evaluate import compare_latency, paired_speedup

    n_threads = threads or cfg.threads
    calls: list[tuple[Any, Any, float]] = []
    want_clean = min(3, cfg.calls)
    while len(calls) < cfg.calls or (
        sum(not c[2] >= cfg.max_load for c in calls) < want_clean and len(calls) < cfg.max_calls
    ):
        quiet.wait()
        meter = LoadMeter()
        a, b = compare_latency([base, other], n_threads, cfg.runs, sample=sample)
        calls.append((a, b, meter.stop()))
    clean = [c for c in calls if not c[2] >= cfg.max_load]
    used = clean if len(clean) >= want_clean else calls
    ratios = [x / y for a, b, _ in used for x, y in zip(a.round_medians_ms, b.round_medians_ms, strict=False)]
    return {
        "speedup": _median(ratios),
        "base_p50_ms": _median([a.p50_ms for a, _, _ in used]),
        "other_p50_ms": _median([b.p50_ms for _, b, _ in used]),
        "speedup_per_call": [round(paired_speedup(a, b), 3) for a, b, _ in calls],
        "external_load_per_call": [round(load, 3) for _, _, load in calls],
        "calls": len(calls),
        "clean_calls": len(clean),
        "used_calls": len(used),
        "rounds": len(ratios),
        "runs_per_call": cfg.runs,
        "threads": n_threads,
    }


def _rows_by_format(report: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{format: {"fp32": row, "int8": row}}`` from a converter report (int8 or mixed)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for row in report.get("artifacts", []):
        key = "fp32" if row["precision"] == "fp32" else "int8"
        out.setdefault(row["format"], {})[key] = row
    return out


def _convert(data: ClassifierData, out: Path, cfg: BenchConfig, **extra: Any) -> tuple[dict[str, Any], bool]:
    """Run the real converter; returns (report, budget met). A missed budget still has a report."""
    from converters.convert import ConvertOptions, convert
    from edge_runtime.errors import AccuracyBudgetError

    opts = ConvertOptions(
        model=data.model,
        out=out,
        calibration=data.calibration,
        eval_data=data.eval_data,
        preprocess=data.preprocess,
        labels=list(data.labels),
        name=data.name,
        calibration_count=data.calib_count,
        eval_count=data.eval_count,
        target="auto",
        threads=cfg.threads,
        latency_runs=cfg.converter_runs,
        overwrite=True,
        **extra,
    )
    with _quiet():
        try:
            result = convert(opts)
        except AccuracyBudgetError:
            return json.loads((out / "report.json").read_text(encoding="utf-8")), False
    return result.report, True


def _format_figures(
    fmt: str,
    rows: dict[str, dict[str, Any]],
    out: Path,
    cfg: BenchConfig,
    quiet: QuietWait,
    sample: npt.NDArray[np.float32],
) -> dict[str, Any]:
    fp32, q = rows["fp32"], rows["int8"]
    lat = paired_latency(out / fp32["file"], out / q["file"], cfg, quiet, sample)
    fig: dict[str, Any] = {
        "format": fmt,
        "fp32_file": fp32["file"],
        "int8_file": q["file"],
        "precision": q["precision"],
        "speedup": lat["speedup"],
        "latency": lat,
        "converter_speedup": q.get("speedup_vs_fp32"),
        "converter_p50_ms": {"fp32": fp32["latency_ms_p50"], "int8": q["latency_ms_p50"]},
        "size_bytes": {"fp32": fp32["size_bytes"], "int8": q["size_bytes"]},
        "size_ratio": q.get("size_ratio_vs_fp32"),
        "float_nodes": q.get("float_nodes", []),
    }
    if fp32.get("metric") and q.get("metric"):
        fig["top1_fp32"] = fp32["metric"].get("top1")
        fig["top1_int8"] = q["metric"].get("top1")
        fig["loss_points"] = q.get("metric_drop_points")
    if q.get("agreement"):
        fig["agreement"] = q["agreement"]
    return fig


def _standardization_ops(source: Any) -> list[str]:
    """Output names of the TFLite ops before the first convolution (the per-image standardization)."""
    from converters.tflite_quant import tflite_ops

    names: list[str] = []
    for op in tflite_ops(source.float_tflite_bytes()):
        if op.type in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
            break
        names.append(op.name)
    return names


def _keep_float_variant(
    data: ClassifierData,
    out: Path,
    fp32_tflite: Path,
    cfg: BenchConfig,
    quiet: QuietWait,
    sample: npt.NDArray[np.float32],
) -> dict[str, Any]:
    """LiteRT int8 with the standardization ops kept float, via ``quantize_tflite(denylist=...)``."""
    from converters.calibration import load_calibration
    from converters.evaluate import evaluate
    from converters.sources import load_source
    from converters.tflite_quant import quantize_tflite

    path = out.parent / f"{out.name}_std_float.tflite"
    with _quiet(), load_source(data.model) as source:
        shape = tuple(source.input_shape)
        labels = list(data.labels) or None
        # the same samples the converter picked (same folder, count and seed)
        calib = load_calibration(
            data.calibration, data.preprocess, shape, count=data.calib_count, labels=labels
        )
        evals = load_calibration(data.eval_data, data.preprocess, shape, count=data.eval_count, labels=labels)
        ops = _standardization_ops(source)
        if not ops:
            return {"skipped": "the model has no ops before its first convolution"}
        art = quantize_tflite(source, path, calib, denylist=tuple(ops))
    ref = evaluate(fp32_tflite, evals, threads=cfg.threads)
    ev = evaluate(path, evals, reference=ref.outputs, threads=cfg.threads)
    lat = paired_latency(fp32_tflite, path, cfg, quiet, sample)
    fig: dict[str, Any] = {
        "format": "tflite",
        "file": path.name,
        "precision": art.precision,
        "kept_float": ops,
        "speedup": lat["speedup"],
        "latency": lat,
        "size_bytes": {"fp32": ref.size_bytes, "int8": ev.size_bytes},
        "size_ratio": ref.size_bytes / max(1, ev.size_bytes),
        "how": "converters.tflite_quant.quantize_tflite(source, out, calib, denylist=<the ops above>)",
    }
    if ref.score is not None and ev.score is not None:
        fig["top1_fp32"], fig["top1_int8"] = ref.score, ev.score
        fig["loss_points"] = round(100 * (ref.score - ev.score), 2)
    return fig


def classifier_figures(
    data: ClassifierData,
    cfg: BenchConfig,
    quiet: QuietWait,
    *,
    keep_float_standardization: bool = False,
    info_threads: Sequence[int] = (),
    log_fn: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Convert ``data.model`` with the real converter and measure every format's int8 figures.

    ``keep_float_standardization`` also measures LiteRT int8 with the ops before the first
    convolution kept float; ``info_threads`` also measures the speedups at those thread counts.
    """
    out = cfg.build_dir / "convert" / data.name
    t0 = time.perf_counter()
    report, _ = _convert(data, out, cfg)
    t_convert = time.perf_counter() - t0
    by_fmt = _rows_by_format(report)
    shape = report["model"]["input"]
    sample = _sample(data, data.preprocess, shape)
    res: dict[str, Any] = {
        "model": data.name,
        "file": str(data.model),
        "input": shape,
        "labelled": data.labelled,
        "note": data.note,
        "calibration": report.get("calibration", {}),
        "target": report.get("target", {}).get("name"),
        "preflight": report.get("target", {}).get("preflight", []),
        "convert_s": round(t_convert, 1),
        "out": str(out),
        "formats": {},
        **data.extra,
    }
    for fmt in ("onnx", "tflite"):
        if fmt in by_fmt and {"fp32", "int8"} <= set(by_fmt[fmt]):
            log_fn(f"  {data.name}: {_FORMAT_NAMES[fmt]} latency, {cfg.calls} x {cfg.runs} runs")
            fig = res["formats"][fmt] = _format_figures(fmt, by_fmt[fmt], out, cfg, quiet, sample)
            for n in info_threads:
                if n != cfg.threads:
                    log_fn(f"  {data.name}: {_FORMAT_NAMES[fmt]} latency at {n} thread(s), for information")
                    lat = paired_latency(
                        out / fig["fp32_file"], out / fig["int8_file"], cfg, quiet, sample, threads=n
                    )
                    fig.setdefault("other_threads", {})[str(n)] = lat
    res["skipped"] = report.get("skipped", [])
    if not data.labelled and res["formats"]:
        from converters.calibration import load_calibration
        from converters.evaluate import run_model

        fig = next(iter(res["formats"].values()))
        evals = load_calibration(data.eval_data, data.preprocess, tuple(shape), count=data.eval_count)
        probs = run_model(out / fig["fp32_file"], evals, cfg.threads)[0]
        res["fp32_median_max_output"] = float(np.median(probs.reshape(len(probs), -1).max(axis=1)))
    if keep_float_standardization and "tflite" in res["formats"]:
        log_fn(f"  {data.name}: LiteRT int8 with the standardization ops kept float")
        fp32_tflite = out / res["formats"]["tflite"]["fp32_file"]
        res["tflite_std_float"] = _keep_float_variant(data, out, fp32_tflite, cfg, quiet, sample)
    return res


# -- models and data ---------------------------------------------------------------------------------
def _shapes96_data(cfg: BenchConfig, log_fn: Callable[[str], None]) -> ClassifierData:
    """The trained shapes96 classifier; trains it with the recipe when it is missing."""
    from models.shapes96 import recipe

    if not recipe.is_built(cfg.shapes96_dir):
        log_fn(f"  building shapes96 with its recipe into {cfg.shapes96_dir} (once; ~3 min)")
        with _quiet():
            recipe.main(["--out", str(cfg.shapes96_dir), "--quiet", *cfg.recipe_args])
    metrics = json.loads((cfg.shapes96_dir / "metrics.json").read_text(encoding="utf-8"))
    return ClassifierData(
        name="shapes96",
        model=cfg.shapes96_dir / "model.keras",
        calibration=cfg.shapes96_dir / "calib",
        eval_data=cfg.shapes96_dir / "eval",
        preprocess=recipe.preprocess_spec(),
        labels=recipe.CLASSES,
        calib_count=cfg.s96_calib,
        eval_count=cfg.s96_eval,
        note=(
            f"trained: {metrics.get('params', 0):,} params, {metrics.get('macs', 0) / 1e6:.0f} M MACs, "
            f"Keras held-out top-1 {metrics.get('eval_accuracy_keras', math.nan):.4f}"
        ),
        extra={"params": metrics.get("params"), "macs": metrics.get("macs")},
    )


def _write_scenes(folder: Path, n: int, seed: int, size: int) -> Path:
    """``n`` structured random images (shapes scenes on camera-like canvases) as JPEG, cached."""
    import cv2

    from models.shapes import data as shapes_data

    if folder.is_dir() and len(list(folder.glob("*.jpg"))) >= n:
        return folder
    tmp = folder.with_name(f".{folder.name}.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        frame = shapes_data.render_sample(i % len(shapes_data.CLASSES), rng, canvas=(320, 240))
        image = cv2.resize(frame, (size, size), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(tmp / f"scene_{i:04d}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 92])
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    tmp.replace(folder)
    return folder


def _set_bn_statistics(keras: Any, model: Any, x: npt.NDArray[np.float32]) -> None:
    """Batch-norm moving statistics = the statistics of ``x`` (one training-mode step, lr 0).

    With Keras' initial statistics (mean 0, variance 1) a randomly initialised MobileNetV2's
    activations vanish and every output is exactly 1/1000, which makes "agreement with fp32"
    trivially 1.0; re-estimated statistics keep the activations alive, like a trained network's.
    The weights do not change (learning rate 0), nor does the cost of an inference.
    """
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    saved = [bn.momentum for bn in bns]
    for bn in bns:
        bn.momentum = 0.0
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.0), loss="categorical_crossentropy")
    y = np.zeros((len(x), int(model.output.shape[-1])), np.float32)
    y[:, 0] = 1.0
    model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0)
    for bn, momentum in zip(bns, saved, strict=True):
        bn.momentum = momentum


def _mobilenet_v2_data(cfg: BenchConfig) -> ClassifierData:
    """Keras' MobileNetV2 (random weights, 224, 1000 classes) and structured random image folders."""
    from converters.calibration import load_calibration

    images = cfg.build_dir / "scenes_224"
    calib_dir = _write_scenes(images / "calib", cfg.mnv2_calib, 501, 224)
    eval_dir = _write_scenes(images / "eval", cfg.mnv2_eval, 502, 224)
    path = cfg.build_dir / "keras_mobilenet_v2_224_c1000_s0_bn.keras"
    if not path.is_file():
        stats = _write_scenes(images / "bn_stats", 32, 503, 224)
        x = load_calibration(stats, bench_preprocess(), (1, 224, 224, 3)).inputs
        with _quiet():
            from converters.sources import keras_module

            keras = keras_module("building MobileNetV2")
            keras.utils.set_random_seed(0)
            model = keras.applications.MobileNetV2(weights=None, input_shape=(224, 224, 3), classes=1000)
            _set_bn_statistics(keras, model, x)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.stem}.tmp.keras")
            model.save(tmp)
            tmp.replace(path)
    return ClassifierData(
        name="mobilenet_v2",
        model=path,
        calibration=calib_dir,
        eval_data=eval_dir,
        preprocess=bench_preprocess(),
        calib_count=cfg.mnv2_calib,
        eval_count=cfg.mnv2_eval,
        labelled=False,
        note=(
            "random weights (batch-norm statistics set from 32 scenes) on unlabelled structured random "
            "images: accuracy is meaningless, agreement with fp32 is reported"
        ),
    )


def make_hostile_keras(
    src: Path,
    dst: Path,
    sample_inputs: npt.NDArray[np.float32],
    *,
    scale: float = 1e4,
    pool: str | None = None,
) -> dict[str, Any]:
    """Write a copy of ``src`` whose input to one MaxPooling2D has one channel scaled by ``scale``.

    A 1x1 depthwise conv multiplies the most active channel (on ``sample_inputs``) by ``scale``
    before the pool and another divides it back after, so the float function is unchanged
    (max pooling commutes with a positive per-channel scale) but a per-tensor int8 grid over
    that tensor crushes every other channel. ``pool`` names the MaxPooling2D (default: the
    second one, or the only one). Returns what was done, with the float max |difference|.
    """
    with _quiet():
        from converters.sources import keras_module

        keras = keras_module("building the quantization-hostile model")
        model = keras.models.load_model(src)
        pools = [layer for layer in model.layers if isinstance(layer, keras.layers.MaxPooling2D)]
        if not pools:
            raise ValueError(f"{src.name} has no MaxPooling2D layer to make hostile")
        target = next((p for p in pools if p.name == pool), None) if pool else pools[min(1, len(pools) - 1)]
        if target is None:
            raise ValueError(f"{src.name} has no MaxPooling2D named {pool!r}")
        probe = keras.Model(model.inputs, target.input)
        acts = np.asarray(probe.predict(sample_inputs, verbose=0))
        channels = acts.shape[-1]
        channel = int(np.argmax(acts.reshape(-1, channels).max(axis=0)))
        factors = np.ones(channels, np.float32)
        factors[channel] = scale

        def call(layer: Any, *args: Any, **kwargs: Any) -> Any:
            if layer is not target:
                return layer(*args, **kwargs)
            up = keras.layers.DepthwiseConv2D(1, use_bias=False, name="hostile_scale_up")
            down = keras.layers.DepthwiseConv2D(1, use_bias=False, name="hostile_scale_down")
            y = up(args[0])
            up.set_weights([factors.reshape(1, 1, channels, 1)])
            y = down(layer(y, **kwargs))
            down.set_weights([(1.0 / factors).reshape(1, 1, channels, 1)])
            return y

        hostile = keras.models.clone_model(model, clone_function=lambda layer: layer, call_function=call)
        diff = float(
            np.max(
                np.abs(
                    np.asarray(model.predict(sample_inputs, verbose=0))
                    - np.asarray(hostile.predict(sample_inputs, verbose=0))
                )
            )
        )
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.stem}.tmp.keras")
        hostile.save(tmp)
        tmp.replace(dst)
    return {
        "pool": target.name,
        "channel": channel,
        "channels": channels,
        "scale": scale,
        "channel_max_activation": float(acts[..., channel].max()),
        "float_max_abs_diff": diff,
        "file": str(dst),
    }


def hostile_figures(
    base: ClassifierData,
    cfg: BenchConfig,
    *,
    log_fn: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Plain int8 vs the accuracy-aware fallback (``max_accuracy_drop``) on a hostile copy of ``base``."""
    from converters.calibration import load_calibration

    dst = cfg.build_dir / f"{base.name}_hostile.keras"
    meta_path = dst.with_suffix(".json")
    stale = not dst.is_file() or not meta_path.is_file() or dst.stat().st_mtime < base.model.stat().st_mtime
    if not stale:
        stale = json.loads(meta_path.read_text(encoding="utf-8")).get("scale") != cfg.hostile_scale
    if stale:
        calib = load_calibration(base.calibration, base.preprocess, _input_shape(base.model), count=32)
        meta = make_hostile_keras(base.model, dst, calib.inputs, scale=cfg.hostile_scale)
        meta_path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    data = ClassifierData(
        name=f"{base.name}_hostile",
        model=dst,
        calibration=base.calibration,
        eval_data=base.eval_data,
        preprocess=base.preprocess,
        labels=base.labels,
        calib_count=base.calib_count,
        eval_count=min(base.eval_count, cfg.hostile_eval),
    )
    log_fn("  hostile: plain int8")
    plain, _ = _convert(data, cfg.build_dir / "convert" / f"{data.name}_plain", cfg)
    log_fn(f"  hostile: --max-accuracy-drop {cfg.max_drop}")
    t0 = time.perf_counter()
    fb, met = _convert(
        data, cfg.build_dir / "convert" / f"{data.name}_fallback", cfg, max_accuracy_drop=cfg.max_drop
    )
    t_fb = time.perf_counter() - t0
    res: dict[str, Any] = {
        "model": meta,
        "max_drop": cfg.max_drop,
        "budget_met": met,
        "fallback_s": round(t_fb, 1),
    }
    plain_rows, fb_rows = _rows_by_format(plain), _rows_by_format(fb)
    kept = fb.get("fallback", {}).get("kept_float", {})
    for fmt in ("onnx", "tflite"):
        p, f = plain_rows.get(fmt, {}), fb_rows.get(fmt, {})
        if "int8" not in p or "int8" not in f:
            continue
        res[fmt] = {
            "top1_fp32": (p["fp32"].get("metric") or {}).get("top1"),
            "top1_plain_int8": (p["int8"].get("metric") or {}).get("top1"),
            "plain_loss_points": p["int8"].get("metric_drop_points"),
            "top1_fallback": (f["int8"].get("metric") or {}).get("top1"),
            "fallback_loss_points": f["int8"].get("metric_drop_points"),
            "fallback_precision": f["int8"]["precision"],
            "kept_float": kept.get(fmt, []),
            "fallback_speedup_converter": f["int8"].get("speedup_vs_fp32"),
            "fallback_size_ratio": f["int8"].get("size_ratio_vs_fp32"),
        }
    return res


def _input_shape(model: Path) -> tuple[int, ...]:
    from converters.sources import load_source

    with _quiet():
        source = load_source(model)
        shape = tuple(source.input_shape)
        source.close()
    return shape


# -- hooks: pruning and detector ------------------------------------------------------------------------
def _module_ready(name: str, attrs: Sequence[str]) -> bool:
    import importlib

    try:
        module = importlib.import_module(name)
    except ImportError:
        return False
    return all(hasattr(module, a) for a in attrs)


def pruning_figures(
    base: ClassifierData,
    converted: dict[str, Any] | None,
    cfg: BenchConfig,
    quiet: QuietWait,
    *,
    log_fn: Callable[[str], None] = print,
) -> dict[str, Any]:
    """HOOK: structured channel pruning (``cfg.prune_ratio``) of ``base`` - speedup and accuracy change.

    Two routes, each run only when its module is present:

    * ONNX: ``converters.prune_onnx.channel_prune_onnx`` on the fp32 ONNX the converter made
      (calibration inputs for importance and least-squares compensation, no fine-tuning):
      pruned fp32 vs fp32 latency (ORT) and top-1 change on the held-out set;
    * Keras: ``convert(prune="channels:R", finetune_data=...)`` (``converters.prune_keras``
      ``channel_prune_keras`` + ``finetune``): the pruned int8 models vs the unpruned int8
      models of ``converted`` (same formats), and the pruned top-1 vs the unpruned fp32 top-1.
    """
    res: dict[str, Any] = {"ratio": cfg.prune_ratio}
    if converted is None or not converted.get("formats"):
        return {"available": False, "reason": "needs the shapes96 section's conversion"}
    out = Path(converted["out"])
    sample = _sample(base, base.preprocess, converted["input"])
    if _module_ready("converters.prune_onnx", ["channel_prune_onnx"]) and "onnx" in converted["formats"]:
        log_fn(f"  pruning: channel_prune_onnx {cfg.prune_ratio:g} on the fp32 ONNX")
        res["onnx"] = _prune_onnx(base, out / converted["formats"]["onnx"]["fp32_file"], cfg, quiet, sample)
    else:
        res["onnx"] = {"available": False, "reason": NOT_AVAILABLE}
    if _module_ready("converters.prune_keras", ["channel_prune_keras", "finetune"]):
        log_fn(f"  pruning: convert --prune channels:{cfg.prune_ratio:g} with fine-tuning (Keras)")
        res["keras"] = _prune_keras(base, converted, cfg, quiet, sample)
    else:
        res["keras"] = {"available": False, "reason": NOT_AVAILABLE}
    res["available"] = any(r.get("available", True) for r in (res["onnx"], res["keras"]))
    return res


def _prune_onnx(
    base: ClassifierData, fp32: Path, cfg: BenchConfig, quiet: QuietWait, sample: npt.NDArray[np.float32]
) -> dict[str, Any]:
    from converters.calibration import load_calibration
    from converters.evaluate import evaluate
    from converters.prune_onnx import channel_prune_onnx

    shape = _input_shape(base.model)
    labels = list(base.labels) or None
    calib = load_calibration(
        base.calibration, base.preprocess, shape, count=min(128, base.calib_count), labels=labels
    )
    evals = load_calibration(base.eval_data, base.preprocess, shape, count=base.eval_count, labels=labels)
    dst = cfg.build_dir / "convert" / f"{base.name}_pruned_{cfg.prune_ratio:g}_r{cfg.prune_round_to}.onnx"
    t0 = time.perf_counter()
    with _quiet():
        report = channel_prune_onnx(fp32, dst, cfg.prune_ratio, calib.inputs, round_to=cfg.prune_round_to)
    t_prune = time.perf_counter() - t0
    ref = evaluate(fp32, evals, threads=cfg.threads)
    ev = evaluate(dst, evals, reference=ref.outputs, threads=cfg.threads)
    lat = paired_latency(fp32, dst, cfg, quiet, sample)
    return {
        "route": f"converters.prune_onnx.channel_prune_onnx(fp32.onnx, {cfg.prune_ratio:g}, calibration "
        f"inputs, round_to={cfg.prune_round_to}), no fine-tuning",
        "speedup": lat["speedup"],
        "latency": lat,
        "params": [report.params_before, report.params_after],
        "macs": [report.macs_before, report.macs_after],
        "top1_before": ref.score,
        "top1_after": ev.score,
        "change_points": None
        if ref.score is None or ev.score is None
        else round(100 * (ev.score - ref.score), 2),
        "skipped_layers": len(report.skipped),
        "round_to": cfg.prune_round_to,
        "prune_s": round(t_prune, 1),
    }


def _finetune_npz(base: ClassifierData, cfg: BenchConfig) -> Path:
    """Fine-tuning data (``x`` model inputs, ``y`` labels): fresh shapes96 training-style samples."""
    from models.shapes96 import recipe

    path = cfg.build_dir / f"{base.name}_finetune_{cfg.finetune_samples}.npz"
    if not path.is_file():
        metrics = json.loads((base.model.parent / "metrics.json").read_text(encoding="utf-8"))
        seed = int(metrics.get("split_seeds", {}).get("train", 1235))
        images, labels = recipe.make_images(cfg.finetune_samples, seed)
        tmp = path.with_name(f".{path.stem}.tmp.npz")
        np.savez(tmp, x=recipe.to_input(images), y=labels)
        tmp.replace(path)
    return path


def _prune_keras(
    base: ClassifierData,
    converted: dict[str, Any],
    cfg: BenchConfig,
    quiet: QuietWait,
    sample: npt.NDArray[np.float32],
) -> dict[str, Any]:
    data = ClassifierData(**{**vars(base), "name": f"{base.name}_pruned_channels"})
    t0 = time.perf_counter()
    report, _ = _convert(
        data,
        cfg.build_dir / "convert" / data.name,
        cfg,
        prune=f"channels:{cfg.prune_ratio:g}",
        finetune_data=_finetune_npz(base, cfg),
        finetune_epochs=cfg.finetune_epochs,
    )
    t_convert = time.perf_counter() - t0
    rows = _rows_by_format(report)
    out = cfg.build_dir / "convert" / data.name
    base_out = Path(converted["out"])
    res: dict[str, Any] = {
        "route": f"convert(prune='channels:{cfg.prune_ratio:g}', finetune_data=..., "
        f"finetune_epochs={cfg.finetune_epochs}) - channel_prune_keras + finetune",
        "pruning": {
            k: report.get("pruning", {}).get(k)
            for k in ("params_before", "params_after", "macs_before", "macs_after")
        },
        "convert_s": round(t_convert, 1),
        "finetune_final_train_accuracy": _final_train_accuracy(report),
        "bn_check": _bn_check(out / "pruned.keras", base, cfg),
        "formats": {},
    }
    for fmt, fig in converted["formats"].items():
        if fmt not in rows or "int8" not in rows[fmt]:
            continue
        lat = paired_latency(base_out / fig["int8_file"], out / rows[fmt]["int8"]["file"], cfg, quiet, sample)
        lat32 = paired_latency(
            base_out / fig["fp32_file"], out / rows[fmt]["fp32"]["file"], cfg, quiet, sample
        )
        top1 = (rows[fmt]["int8"].get("metric") or {}).get("top1")
        top1_fp32 = (rows[fmt]["fp32"].get("metric") or {}).get("top1")
        res["formats"][fmt] = {
            "speedup_int8": lat["speedup"],
            "latency": lat,
            "speedup_fp32": lat32["speedup"],
            "latency_fp32": lat32,
            "top1_unpruned_fp32": fig.get("top1_fp32"),
            "top1_pruned_fp32": top1_fp32,
            "top1_pruned_int8": top1,
            "change_points": None
            if top1 is None or fig.get("top1_fp32") is None
            else round(100 * (top1 - fig["top1_fp32"]), 2),
        }
    return res


def _bn_check(pruned: Path, base: ClassifierData, cfg: BenchConfig) -> dict[str, Any]:
    """Held-out top-1 (Keras) of the converter's fine-tuned ``pruned.keras``, before and after
    re-estimating its batch-norm statistics on 512 fine-tuning samples."""
    if not pruned.is_file():
        return {}
    from converters.calibration import load_calibration

    evals = load_calibration(
        base.eval_data,
        base.preprocess,
        _input_shape(base.model),
        count=base.eval_count,
        labels=list(base.labels),
    )
    with np.load(_finetune_npz(base, cfg)) as ft:
        x = np.asarray(ft["x"][:512], np.float32)
    with _quiet():
        from converters.sources import keras_module

        keras = keras_module("checking batch-norm statistics")
        model = keras.models.load_model(pruned)

        def top1() -> float:
            probs = np.asarray(model.predict(evals.inputs, batch_size=128, verbose=0))
            return float(np.mean(probs.argmax(axis=1) == evals.labels))

        before = top1()
        _set_bn_statistics(keras, model, x)
        after = top1()
    return {"top1_finetuned": before, "top1_reestimated": after, "samples": len(x)}


def _final_train_accuracy(report: dict[str, Any]) -> float | None:
    """The last training accuracy of the converter's fine-tuning, from its report notes."""
    import ast

    for note in report.get("notes", []):
        if isinstance(note, str) and note.startswith("fine-tuned after pruning: "):
            try:
                history = ast.literal_eval(note.split(": ", 1)[1])
                return float(history["accuracy"][-1])
            except (ValueError, SyntaxError, KeyError, IndexError, TypeError):
                return None
    return None


def _decode_tail(model_path: Path) -> list[str]:
    """Node names downstream of the last Conv nodes of an ONNX graph (a detector's decode tail)."""
    import onnx

    graph = onnx.load(str(model_path)).graph
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def downstream(start: str) -> list[Any]:
        seen: dict[str, Any] = {}
        todo = [start]
        while todo:
            for n in consumers.get(todo.pop(), []):
                if n.name not in seen:
                    seen[n.name] = n
                    todo.extend(n.output)
        return list(seen.values())

    tail: dict[str, None] = {}
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        after = [n for o in node.output for n in downstream(o)]
        if not any(n.op_type == "Conv" for n in after):
            tail.update(dict.fromkeys(n.name for n in after))
    return list(tail)


def detector_figures(
    cfg: BenchConfig, quiet: QuietWait, *, log_fn: Callable[[str], None] = print
) -> dict[str, Any]:
    """HOOK: the YOLOv8-style detector (``models/detector/build``) through the converter (ONNX).

    Needs ``model.onnx``, ``labels.txt`` and ``eval.npz`` (``images`` uint8 BGR, ``boxes`` rows
    ``image, class, x1, y1, x2, y2``) from ``models/detector/recipe.py`` and
    ``models.detector.data`` (for calibration images from a seed the recipe does not use).
    mAP@0.5 is measured with :func:`converters.evaluate.evaluate` (``metric="map50"``) through
    the runtime's ``YoloDecoder``. When full int8 loses more than the goal, the int8 model with
    the decode tail kept float (``quantize_onnx(options.exclude=...)``) is measured too.
    """
    d = cfg.detector_dir
    needed = [d / "model.onnx", d / "labels.txt", d / "eval.npz"]
    if not all(p.is_file() for p in needed) or not _module_ready(
        "models.detector.data", ["make_dataset", "to_input"]
    ):
        return {"available": False, "reason": NOT_AVAILABLE}
    import cv2

    from converters.evaluate import DetectionTask, evaluate
    from converters.types import CalibrationSet
    from edge_runtime.decoders import YoloDecoder, YoloSpec
    from edge_runtime.preprocess_spec import ImagePreprocess
    from models.detector import data as det_data

    labels = [x.strip() for x in (d / "labels.txt").read_text(encoding="utf-8").splitlines() if x.strip()]
    folders = {}
    for name, n, seed in (("calib", 200, 31_337), ("eval", 100, 31_338)):
        folder = folders[name] = cfg.build_dir / f"detector_{name}"
        if not folder.is_dir() or len(list(folder.glob("*.png"))) < n:
            images, _ = det_data.make_dataset(n, seed)  # seeds the detector recipe does not use
            folder.mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(images):
                cv2.imwrite(str(folder / f"{name}_{i:04d}.png"), image)
    spec = YoloSpec(layout="v8", normalized=False, conf_threshold=0.01, max_detections=100)
    out = cfg.build_dir / "convert" / "detector"
    ev = np.load(d / "eval.npz", allow_pickle=False)
    x_eval = det_data.to_input(ev["images"])
    boxes = ev["boxes"]
    # the converter scores mAP@0.5 itself from an .npz with raw frames and 'boxes' ground truth
    eval_npz = cfg.build_dir / "detector_eval.npz"
    np.savez(eval_npz, frames=ev["images"], boxes=boxes)
    data = ClassifierData(
        name="detector",
        model=d / "model.onnx",
        calibration=folders["calib"],
        eval_data=eval_npz,
        preprocess=ImagePreprocess(resize="stretch", color="rgb", layout="nhwc", scale=1.0 / 255.0),
        labels=labels,
        calib_count=200,
        eval_count=len(x_eval),
        labelled=False,
    )
    log_fn(f"  detector: convert (ONNX, detection, mAP@0.5 fallback budget {cfg.max_drop})")
    report, met = _convert(
        data,
        out,
        cfg,
        formats=("onnx",),
        task="detection",
        decoder=spec,
        max_accuracy_drop=cfg.max_drop,
    )
    rows = _rows_by_format(report).get("onnx", {})
    if "int8" not in rows:
        return {"available": True, "error": f"no int8 ONNX: {report.get('skipped')}"}
    truth = [boxes[boxes[:, 0] == i][:, 1:] for i in range(len(x_eval))]
    decoder = YoloDecoder(spec, labels)
    task = DetectionTask(truth, len(labels), lambda outs: decoder.decode(outs, None))
    evals = CalibrationSet(x_eval, description=f"{len(x_eval)} held-out detector images (eval.npz)")
    fallback = report.get("fallback", {}).get("onnx", {})
    kept = report.get("fallback", {}).get("kept_float", {}).get("onnx", [])
    fp32, q = out / rows["fp32"]["file"], out / rows["int8"]["file"]
    ref = evaluate(fp32, evals, metric="map50", detection=task, threads=cfg.threads)
    res: dict[str, Any] = {
        "available": True,
        "eval_images": len(x_eval),
        "map50_fp32": ref.score,
        "budget_met": met,
        "kept_float": [k["name"] for k in kept],
        "converter_drop": fallback.get("achieved_drop"),
    }
    variants = {"int8": q}
    full = evaluate(q, evals, metric="map50", detection=task, threads=cfg.threads)
    assert ref.score is not None and full.score is not None
    if 100 * (ref.score - full.score) > GOAL_DETECTOR_MAP_POINTS:
        variants["int8_float_tail"] = _detector_float_tail(out, data, cfg)
    sample = x_eval[:1]
    for key, path in variants.items():
        scored = (
            full
            if key == "int8"
            else evaluate(path, evals, metric="map50", detection=task, threads=cfg.threads)
        )
        assert scored.score is not None
        lat = paired_latency(fp32, path, cfg, quiet, sample)
        res[key] = {
            "file": path.name,
            "map50": scored.score,
            "loss_points": round(100 * (ref.score - scored.score), 2),
            "speedup": lat["speedup"],
            "latency": lat,
            "size_ratio": ref.size_bytes / max(1, scored.size_bytes),
        }
    return res


def _detector_float_tail(out: Path, data: ClassifierData, cfg: BenchConfig) -> Path:
    """int8 ONNX of the detector with its decode tail (after the last convs) kept float."""
    import dataclasses

    from converters.calibration import load_calibration
    from converters.onnx_quant import prepare_onnx, quantize_onnx
    from converters.targets import resolve_target

    profile = resolve_target("auto")
    prepared, _ = prepare_onnx(out / "model_fp32.onnx", out / "bench_prepared.onnx")
    tail = _decode_tail(prepared)
    shape = _onnx_input_shape(prepared)
    calib = load_calibration(data.calibration, data.preprocess, shape, count=data.calib_count)
    dst = out / "model_int8_float_tail.onnx"
    options = dataclasses.replace(profile.options, exclude=tuple(tail))
    with _quiet():
        quantize_onnx(prepared, dst, calib, options, target=profile, preprocess=False)
    return dst


def _onnx_input_shape(path: Path) -> tuple[int, ...]:
    import onnx

    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    return tuple(max(1, d.dim_value) for d in dims)


# -- the bench -----------------------------------------------------------------------------------------
def run_bench(cfg: BenchConfig, log_fn: Callable[[str], None] = print) -> dict[str, Any]:
    """Build what is missing, run every section in ``cfg.sections``, return the figures."""
    import onnxruntime as ort

    t_start = time.perf_counter()
    quiet = QuietWait(cfg.max_load, cfg.quiet_budget_s)
    cfg.build_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "config": {
            "threads": cfg.threads,
            "runs": cfg.runs,
            "calls": cfg.calls,
            "max_calls": cfg.max_calls,
            "converter_runs": cfg.converter_runs,
            "max_load": cfg.max_load,
            "quiet_budget_s": cfg.quiet_budget_s,
            "cpus": os.cpu_count(),
            "onnxruntime": ort.__version__,
            "sections": list(cfg.sections),
        },
        "needed_changes": [],
    }
    total = len(cfg.sections)
    step = 0
    s96: ClassifierData | None = None
    if {"shapes96", "hostile", "pruning"} & set(cfg.sections):
        s96 = _shapes96_data(cfg, log_fn)

    def announce(what: str) -> None:
        nonlocal step
        step += 1
        log_fn(f"[{step}/{total}] {what}")

    if "shapes96" in cfg.sections and s96 is not None:
        announce("shapes96 (trained classifier): convert + latency")
        report["shapes96"] = classifier_figures(
            s96, cfg, quiet, keep_float_standardization=True, info_threads=cfg.info_threads, log_fn=log_fn
        )
    if "mobilenet_v2" in cfg.sections:
        announce("MobileNetV2 (random weights): convert + latency")
        report["mobilenet_v2"] = classifier_figures(_mobilenet_v2_data(cfg), cfg, quiet, log_fn=log_fn)
    if "hostile" in cfg.sections and s96 is not None:
        announce(f"quantization-hostile shapes96: plain int8 vs --max-accuracy-drop {cfg.max_drop}")
        report["hostile"] = hostile_figures(s96, cfg, log_fn=log_fn)
    if "pruning" in cfg.sections and s96 is not None:
        announce(f"structured channel pruning {cfg.prune_ratio:.0%} (hook)")
        report["pruning"] = pruning_figures(s96, report.get("shapes96"), cfg, quiet, log_fn=log_fn)
    if "detector" in cfg.sections:
        announce("YOLOv8-style detector (hook)")
        report["detector"] = detector_figures(cfg, quiet, log_fn=log_fn)
    report["needed_changes"] = _needed_changes(report)
    report["quiet"] = {"waited_s": round(quiet.waited_s, 1), "rounds_started_busy": quiet.busy_starts}
    report["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    return report


def _needed_changes(report: dict[str, Any]) -> list[str]:
    out: list[str] = []
    std = report.get("shapes96", {}).get("tflite_std_float")
    plain = report.get("shapes96", {}).get("formats", {}).get("tflite")
    if (
        std
        and plain
        and "speedup" in std
        and (plain["speedup"] < GOAL_SPEEDUP or std["speedup"] > 1.25 * plain["speedup"])
    ):
        out.append(
            "ConvertOptions (and `edgert convert`) has no keep-float/denylist option: LiteRT int8 of "
            f"shapes96 is {plain['speedup']:.2f}x with every op int8 and {std['speedup']:.2f}x with the "
            f"{len(std['kept_float'])} standardization ops float (quantize_tflite(denylist=...)); expose "
            "it (e.g. ConvertOptions.keep_float / --keep-float NAME, passed to quantize_tflite's denylist "
            "and QuantOptions.exclude), or keep float by default the ops XNNPACK runs slower in int8 "
            "(MEAN, SQUARED_DIFFERENCE, RSQRT at the model input)"
        )
    mn = report.get("mobilenet_v2", {})
    lite, ort_fig = mn.get("formats", {}).get("tflite", {}), mn.get("formats", {}).get("onnx", {})
    if lite.get("agreement") and ort_fig.get("agreement"):
        a_lite, a_ort = lite["agreement"], ort_fig["agreement"]
        if a_lite.get("sqnr_db", 0) < a_ort.get("sqnr_db", 0) - 6:
            out.append(
                "LiteRT int8 quantizes the final softmax into the int8 output tensor (steps of 1/256), "
                "ONNX keeps Softmax float: on the random MobileNetV2 (median top probability "
                f"{mn.get('fp32_median_max_output', math.nan):.4f}) LiteRT agreement is "
                f"{a_lite.get('top1', math.nan):.2f} top-1 / {a_lite.get('sqnr_db', math.nan):.1f} dB vs ORT "
                f"{a_ort.get('top1', math.nan):.2f} / {a_ort.get('sqnr_db', math.nan):.1f} dB; for "
                "many-class models keep the final SOFTMAX float (or a float output) in quantize_tflite"
            )
    pr = report.get("pruning", {})
    keras_fmts = pr.get("keras", {}).get("formats", {})
    bn = pr.get("keras", {}).get("bn_check", {})
    if keras_fmts and bn.get("top1_reestimated") is not None and bn.get("top1_finetuned") is not None:
        gain = 100 * (bn["top1_reestimated"] - bn["top1_finetuned"])
        if gain > GOAL_DROP_POINTS:
            acc = pr["keras"].get("finetune_final_train_accuracy")
            seen = f" (final fine-tuning training accuracy {acc:.3f})" if acc else ""
            out.append(
                "converters.prune_keras.finetune leaves batch-norm moving statistics behind the fine-tuned "
                f"weights: the converter's pruned.keras scores {bn['top1_finetuned']:.3f} top-1 on the "
                f"held-out set{seen}, and {bn['top1_reestimated']:.3f} once its BN statistics are "
                "re-estimated (one training-mode pass, momentum 0, learning rate 0, on "
                f"{bn['samples']} fine-tuning samples); do that at the end of finetune (or lower the "
                "BN momentum while fine-tuning)"
            )
    det = report.get("detector", {})
    if det.get("available") and "int8_float_tail" in det:
        out.append(
            "ConvertOptions cannot evaluate detectors (no DetectionTask / mAP@0.5), so the accuracy "
            "fallback cannot protect mAP and full int8 of the detector loses "
            f"{det['int8']['loss_points']:.1f} points; pass ground truth + decoder to convert (evaluate "
            "already supports metric='map50') and/or a keep-float option for the decode tail"
        )
    return out


# -- report --------------------------------------------------------------------------------------------
def _mark(ok: bool | None) -> str:
    return "-" if ok is None else ("PASS" if ok else "FAIL")


def _x(v: float | None) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}x"


def _pt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f} pt"


def _ge(v: float | None, goal: float) -> bool | None:
    return None if v is None or math.isnan(v) else v >= goal


def _le(v: float | None, goal: float) -> bool | None:
    return None if v is None or math.isnan(v) else v <= goal


Row = tuple[str, str, str, str]


def _classifier_rows(key: str, res: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for fmt, f in res["formats"].items():
        rt = _FORMAT_NAMES[fmt]
        rows.append((f"{key}: {rt} int8 speedup vs fp32", _x(f["speedup"]), f">= {GOAL_SPEEDUP}x",
                     _mark(_ge(f["speedup"], GOAL_SPEEDUP))))  # fmt: skip
        for n, lat in f.get("other_threads", {}).items():
            rows.append((f"  ... at {n} thread(s), for information", _x(lat["speedup"]), "report", "-"))
        rows += [
            (f"{key}: {rt} size ratio fp32/int8", _x(f["size_ratio"]), f">= {GOAL_SIZE}x",
             _mark(_ge(f["size_ratio"], GOAL_SIZE))),
        ]  # fmt: skip
        if res["labelled"] and "loss_points" in f:
            rows.append(
                (f"{key}: {rt} top-1 loss ({f['top1_fp32']:.4f} -> {f['top1_int8']:.4f})",
                 _pt(f["loss_points"]), f"<= {GOAL_DROP_POINTS} pt",
                 _mark(_le(f["loss_points"], GOAL_DROP_POINTS)))
            )  # fmt: skip
        elif "agreement" in f:
            a = f["agreement"]
            rows.append(
                (f"{key}: {rt} top-1 agreement with fp32 (SQNR {a.get('sqnr_db', math.nan):.1f} dB)",
                 f"{a.get('top1', math.nan):.3f}", "report", "-")
            )  # fmt: skip
    std = res.get("tflite_std_float")
    if std and "speedup" in std:
        rows += [
            (f"{key}: LiteRT int8, standardization float: speedup", _x(std["speedup"]),
             f">= {GOAL_SPEEDUP}x", _mark(_ge(std["speedup"], GOAL_SPEEDUP))),
            ("  ... size ratio", _x(std["size_ratio"]), f">= {GOAL_SIZE}x",
             _mark(_ge(std["size_ratio"], GOAL_SIZE))),
        ]  # fmt: skip
        if "loss_points" in std:
            rows.append(("  ... top-1 loss", _pt(std["loss_points"]), f"<= {GOAL_DROP_POINTS} pt",
                         _mark(_le(std["loss_points"], GOAL_DROP_POINTS))))  # fmt: skip
    return rows


def _hostile_rows(res: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for fmt in ("onnx", "tflite"):
        if fmt not in res:
            continue
        f, rt = res[fmt], _FORMAT_NAMES[fmt]
        rows += [
            (f"hostile: {rt} plain int8 top-1 loss", _pt(f["plain_loss_points"]), f"> {GOAL_HOSTILE_LOSS} pt",
             _mark(None if f["plain_loss_points"] is None else f["plain_loss_points"] > GOAL_HOSTILE_LOSS)),
            (f"hostile: {rt} fallback top-1 loss ({len(f['kept_float'])} kept float)",
             _pt(f["fallback_loss_points"]), f"<= {100 * res['max_drop']:.1f} pt",
             _mark(_le(f["fallback_loss_points"], 100 * res["max_drop"]))),
        ]  # fmt: skip
    return rows


def _pruning_rows(res: dict[str, Any]) -> list[Row]:
    pct = f"{res.get('ratio', 0.3):.0%}"
    if not res.get("available", False) and "onnx" not in res:
        return [
            (
                f"channel pruning {pct}: speedup",
                res.get("reason", NOT_AVAILABLE),
                f">= {GOAL_PRUNE_SPEEDUP}x",
                "-",
            )
        ]
    rows: list[Row] = []
    o = res.get("onnx", {})
    if "speedup" in o:
        rows += [
            (f"channel pruning {pct} (ONNX, no fine-tune): fp32 speedup (ORT)", _x(o["speedup"]),
             f">= {GOAL_PRUNE_SPEEDUP}x", _mark(_ge(o["speedup"], GOAL_PRUNE_SPEEDUP))),
            ("  ... top-1 change", _pt(o["change_points"]), "report", "-"),
        ]  # fmt: skip
    else:
        rows.append(
            (
                f"channel pruning {pct} (ONNX)",
                o.get("reason", NOT_AVAILABLE),
                f">= {GOAL_PRUNE_SPEEDUP}x",
                "-",
            )
        )
    k = res.get("keras", {})
    if "formats" in k:
        for fmt, f in k["formats"].items():
            rt = _FORMAT_NAMES[fmt]
            rows += [
                (f"channel pruning {pct} + fine-tune (convert): {rt} int8 speedup", _x(f["speedup_int8"]),
                 f">= {GOAL_PRUNE_SPEEDUP}x", _mark(_ge(f["speedup_int8"], GOAL_PRUNE_SPEEDUP))),
                (f"  ... {rt} fp32 speedup", _x(f["speedup_fp32"]),
                 f">= {GOAL_PRUNE_SPEEDUP}x", _mark(_ge(f["speedup_fp32"], GOAL_PRUNE_SPEEDUP))),
                ("  ... top-1 change vs unpruned fp32", _pt(f["change_points"]), "report", "-"),
            ]  # fmt: skip
        bn = k.get("bn_check", {})
        if bn.get("top1_reestimated") is not None:
            was = bn["top1_finetuned"]
            rows.append((f"  ... pruned.keras top-1, BN statistics re-estimated (was {was:.3f})",
                         f"{bn['top1_reestimated']:.3f}", "report", "-"))  # fmt: skip
    else:
        rows.append(
            (
                f"channel pruning {pct} (Keras)",
                k.get("reason", NOT_AVAILABLE),
                f">= {GOAL_PRUNE_SPEEDUP}x",
                "-",
            )
        )
    return rows


def _detector_rows(res: dict[str, Any]) -> list[Row]:
    if not res.get("available"):
        return [("detector: int8 ONNX speedup / mAP@0.5 loss", res.get("reason", NOT_AVAILABLE), "", "-")]
    if "error" in res:
        return [("detector: int8 ONNX", res["error"][:60], "", "FAIL")]
    rows: list[Row] = []
    for key, label in (("int8", "int8 (convert)"), ("int8_float_tail", "int8, decode tail float")):
        if key not in res:
            continue
        f = res[key]
        rows += [
            (f"detector: ORT {label} speedup vs fp32", _x(f["speedup"]), f"> {GOAL_DETECTOR_SPEEDUP}x",
             _mark(None if math.isnan(f["speedup"]) else f["speedup"] > GOAL_DETECTOR_SPEEDUP)),
            (f"  ... mAP@0.5 loss ({res['map50_fp32']:.4f} -> {f['map50']:.4f})", _pt(f["loss_points"]),
             f"<= {GOAL_DETECTOR_MAP_POINTS} pt", _mark(_le(f["loss_points"], GOAL_DETECTOR_MAP_POINTS))),
        ]  # fmt: skip
    return rows


def summary_rows(report: dict[str, Any]) -> list[Row]:
    """(figure, measured, goal, PASS/FAIL/-) rows of every section present in ``report``."""
    rows: list[Row] = []
    for key in ("shapes96", "mobilenet_v2"):
        if key in report:
            rows += _classifier_rows(key, report[key])
    if "hostile" in report:
        rows += _hostile_rows(report["hostile"])
    if "pruning" in report:
        rows += _pruning_rows(report["pruning"])
    if "detector" in report:
        rows += _detector_rows(report["detector"])
    return rows


def _lat_line(lat: dict[str, Any]) -> str:
    return (
        f"p50 {lat['base_p50_ms']:.3f} -> {lat['other_p50_ms']:.3f} ms; {lat['rounds']} paired rounds from "
        f"{lat['used_calls']}/{lat['calls']} calls ({lat['clean_calls']} free of outside load); per call "
        f"{lat['speedup_per_call']}; outside load {lat['external_load_per_call']}"
    )


def _details(report: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for key in ("shapes96", "mobilenet_v2"):
        if key not in report:
            continue
        r = report[key]
        lines.append(
            f"  {key}: {Path(r['file']).name}, input {r['input']}, target {r['target']}; {r['note']}; "
            f"convert {r['convert_s']} s"
        )
        cal = r.get("calibration", {})
        lines.append(f"    calibration {cal.get('samples')} / evaluation {cal.get('eval_samples')} samples")
        if "fp32_median_max_output" in r:
            lines.append(f"    fp32 median top output (probability): {r['fp32_median_max_output']:.4f}")
        for w in r.get("preflight", []):
            lines.append(f"    preflight: {w}")
        for fmt, f in r["formats"].items():
            sz = f["size_bytes"]
            lines.append(
                f"    {_FORMAT_NAMES[fmt]} {f['precision']}: {sz['fp32'] / 1e6:.2f} -> "
                f"{sz['int8'] / 1e6:.2f} MB; "
                f"{_lat_line(f['latency'])}; the converter's own figure {f['converter_speedup']}x "
                f"({f['converter_p50_ms']['fp32']} -> {f['converter_p50_ms']['int8']} ms)"
            )
            for n, lat in f.get("other_threads", {}).items():
                lines.append(f"      at {n} thread(s): {_lat_line(lat)}")
        std = r.get("tflite_std_float")
        if std and "speedup" in std:
            lines.append(f"    LiteRT standardization float ({std['how']}): kept float {std['kept_float']}")
            lines.append(f"      {_lat_line(std['latency'])}")
    h = report.get("hostile")
    if h:
        m = h["model"]
        lines.append(
            f"  hostile: channel {m['channel']}/{m['channels']} before {m['pool']} x{m['scale']:g} and back "
            f"after (float max |diff| vs shapes96 {m['float_max_abs_diff']:.2e}); "
            f"budget met: {h['budget_met']}; "
            f"fallback convert {h['fallback_s']} s"
        )
        for fmt in ("onnx", "tflite"):
            if fmt in h:
                f = h[fmt]
                kept = ", ".join(k["name"][:70] for k in f["kept_float"]) or "nothing"
                lines.append(
                    f"    {_FORMAT_NAMES[fmt]}: fp32 {f['top1_fp32']}, plain int8 {f['top1_plain_int8']}, "
                    f"fallback {f['top1_fallback']} ({f['fallback_precision']}, converter speedup "
                    f"{f['fallback_speedup_converter']}x, size ratio {f['fallback_size_ratio']}x)"
                )
                lines.append(f"      kept float: {kept}")
    p = report.get("pruning")
    if p and p.get("available"):
        o = p.get("onnx", {})
        if "speedup" in o:
            lines.append(
                f"  pruning (ONNX): {o['route']}; params {o['params'][0]:,} -> {o['params'][1]:,}, MACs "
                f"{o['macs'][0] / 1e6:.1f} -> {o['macs'][1] / 1e6:.1f} M; top-1 {o['top1_before']} -> "
                f"{o['top1_after']}; {o['skipped_layers']} layers skipped; {o['prune_s']} s"
            )
            lines.append(f"    {_lat_line(o['latency'])}")
        k = p.get("keras", {})
        if "formats" in k:
            lines.append(f"  pruning (Keras): {k['route']}; {k['pruning']}; convert {k['convert_s']} s")
            for fmt, f in k["formats"].items():
                lines.append(
                    f"    {_FORMAT_NAMES[fmt]}: top-1 unpruned fp32 {f['top1_unpruned_fp32']}, pruned fp32 "
                    f"{f['top1_pruned_fp32']}, pruned int8 {f['top1_pruned_int8']}; unpruned int8 -> pruned "
                    f"int8 {_lat_line(f['latency'])}"
                )
                lines.append(f"      unpruned fp32 -> pruned fp32 {_lat_line(f['latency_fp32'])}")
    d = report.get("detector")
    if d and d.get("available") and "int8" in d:
        lines.append(f"  detector: {d['eval_images']} held-out images, fp32 mAP@0.5 {d['map50_fp32']:.4f}")
        if "kept_float" in d:
            lines.append(
                f"    convert --max-accuracy-drop: budget met {d.get('budget_met')}, kept float "
                f"{d['kept_float']}, converter's own mAP drop {d.get('converter_drop')}"
            )
        for key in ("int8", "int8_float_tail"):
            if key in d:
                lines.append(
                    f"    {key}: size ratio {d[key]['size_ratio']:.2f}x; {_lat_line(d[key]['latency'])}"
                )
    return lines


def format_report(report: dict[str, Any], command: str) -> str:
    """The human-readable table (figures, goals, PASS/FAIL), the details and the command."""
    c = report["config"]
    rows = summary_rows(report)
    w0 = max([len(r[0]) for r in rows] + [6])
    w1 = max([len(r[1]) for r in rows] + [8])
    lines = [
        f"edgert convert acceptance bench: {c['cpus']} CPUs, {c['threads']} threads for every runtime, "
        f"onnxruntime {c['onnxruntime']}",
        f"speedups: median per-round fp32/int8 ratio over {c['calls']}-{c.get('max_calls', c['calls'])} "
        f"compare_latency calls x {c['runs']} runs (interleaved, after waiting for a quiet machine; calls "
        f"with other load >= {c['max_load']:.0%} dropped when 3 are clean)",
        "",
        f"{'figure':<{w0}}  {'measured':>{w1}}  {'goal':>10}  result",
        f"{'-' * w0}  {'-' * w1}  {'-' * 10}  ------",
    ]
    lines += [f"{a:<{w0}}  {b:>{w1}}  {g:>10}  {r}" for a, b, g, r in rows]
    lines += ["", "details:", *_details(report)]
    if report.get("needed_changes"):
        lines += ["", "changes needed elsewhere:"]
        lines += [f"  - {x}" for x in report["needed_changes"]]
    q = report.get("quiet", {})
    lines += [
        "",
        f"waited {q.get('waited_s', 0)} s for a quiet machine (other load < {c['max_load']:.0%}); "
        f"{q.get('rounds_started_busy', 0)} calls started busy; elapsed {report.get('elapsed_s', 0)} s",
        f"command: {command}",
    ]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="threads for every runtime (default 2)")
    p.add_argument(
        "--runs", type=int, default=200, help="timed runs per model per latency call (default 200)"
    )
    p.add_argument("--calls", type=int, default=5, help="latency calls per comparison (default 5)")
    p.add_argument("--max-calls", type=int, default=10,
                   help="more calls, up to this many, while < 3 were quiet (default 10)")  # fmt: skip
    p.add_argument(
        "--converter-runs", type=int, default=100, help="ConvertOptions.latency_runs (default 100)"
    )
    p.add_argument("--only", help=f"comma-separated sections to run (default all: {','.join(SECTIONS)})")
    p.add_argument("--skip", default="", help="comma-separated sections to skip")
    p.add_argument("--max-load", type=float, default=0.25,
                   help="before each latency call wait until other processes use less than this share of "
                   "the CPUs (default 0.25) ...")  # fmt: skip
    p.add_argument("--quiet-budget", type=float, default=120.0,
                   help="... but wait at most this long in all (default 120 s; 0: no wait)")  # fmt: skip
    p.add_argument("--json", type=Path, help="also write the figures as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the bench, print the table, optionally write JSON."""
    args = _parser().parse_args(argv)
    sections = tuple(s.strip() for s in (args.only or ",".join(SECTIONS)).split(",") if s.strip())
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = (set(sections) | skip) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown section(s) {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    cfg = BenchConfig(
        threads=args.threads,
        runs=args.runs,
        calls=args.calls,
        max_calls=max(args.calls, args.max_calls),
        converter_runs=args.converter_runs,
        sections=tuple(s for s in sections if s not in skip),
        max_load=args.max_load,
        quiet_budget_s=args.quiet_budget,
    )
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    argv_list = list(sys.argv[1:] if argv is None else argv)
    command = " ".join(["PYTHONPATH=. python bench/convert.py", *(shlex.quote(a) for a in argv_list)])
    report = run_bench(cfg, log_fn=lambda msg: print(msg, file=sys.stderr, flush=True))
    report["command"] = command
    print(format_report(report, command))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
