"""Create bundles from model files a user already has; sign them.

``create_bundle`` copies the models, records each one's io as its runtime reports it, runs the
golden frames through the real preprocessing and runtime to record the self-test outputs and
reference statistics, writes the manifest and (optionally) signs and packs the result. The
bundle appears at ``out`` only when complete (written to a staging folder, then renamed).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_runtime.backends import FORMAT_BACKEND, BackendOptions, load_backend
from edge_runtime.bundle.archive import fsync_dir, pack_bundle
from edge_runtime.bundle.loader import sha256_file
from edge_runtime.bundle.manifest import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    SIGNATURE_NAME,
    FileEntry,
    Manifest,
    ModelEntry,
    SelfTestSpec,
    TensorInfo,
    canonical_bytes,
    parse_manifest,
)
from edge_runtime.bundle.signing import load_private_key, sign_bytes
from edge_runtime.decoders.specs import ClassificationSpec, DecoderSpec, RawSpec
from edge_runtime.drift import frame_means, quantile_histogram, scores_of
from edge_runtime.errors import BundleError
from edge_runtime.preprocess import make_preprocessor
from edge_runtime.preprocess_spec import PreprocessSpec

__all__ = ["create_bundle", "reference_statistics", "sign_bundle", "write_manifest"]

log = logging.getLogger(__name__)

_FORMATS = {".onnx": "onnx", ".tflite": "tflite"}


def _model_format(path: Path) -> str:
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise BundleError(f"{path.name}: model files must end in .onnx or .tflite")
    return fmt


def write_manifest(root: Path, manifest: Manifest) -> bytes:
    """Write manifest.json canonically; drop a stale signature. Returns the bytes written."""
    raw = canonical_bytes(manifest)
    (root / MANIFEST_NAME).write_bytes(raw)
    (root / SIGNATURE_NAME).unlink(missing_ok=True)
    return raw


def sign_bundle(root: Path, key_path: Path) -> str:
    """Sign the bundle directory ``root`` with the private key at ``key_path``; return key id."""
    raw = (root / MANIFEST_NAME).read_bytes()
    parse_manifest(raw)
    key = load_private_key(key_path)
    doc = sign_bytes(raw, key)
    tmp = root / (SIGNATURE_NAME + ".tmp")
    tmp.write_bytes(doc)
    tmp.replace(root / SIGNATURE_NAME)
    return str(json.loads(doc)["key_id"])


def _stats(values: npt.NDArray[Any]) -> dict[str, float]:
    flat = values.astype(np.float64).ravel()
    return {
        "mean": float(flat.mean()),
        "std": float(flat.std()),
        "min": float(flat.min()),
        "max": float(flat.max()),
        "p01": float(np.percentile(flat, 1)),
        "p99": float(np.percentile(flat, 99)),
    }


def reference_statistics(
    inputs: npt.NDArray[Any], outputs: list[npt.NDArray[Any]], decoder: Any
) -> dict[str, Any]:
    """Input/output statistics for drift checks on the device (:mod:`edge_runtime.drift`).

    ``inputs`` are the preprocessed model inputs of N frames (first axis), ``outputs`` the model's
    outputs stacked the same way. Besides summary statistics the result holds binned
    distributions for PSI: ``input_frame_mean`` (per-frame input mean, see
    :func:`~edge_runtime.drift.frame_mean`), ``class_histogram`` (classifiers) and ``score_hist``
    with ``score_mode`` (raw/anomaly decoders; the score is computed as the decoder does).
    """
    ref: dict[str, Any] = {"frames": len(inputs), "input": _stats(inputs)}
    ref["outputs"] = [_stats(o) for o in outputs]
    input_hist = quantile_histogram(frame_means(inputs))
    if input_hist is not None:
        ref["input_frame_mean"] = input_hist
    if isinstance(decoder, ClassificationSpec) and outputs:
        top1 = outputs[0].reshape(len(inputs), -1).argmax(axis=1)
        classes = outputs[0].reshape(len(inputs), -1).shape[1]
        ref["class_histogram"] = (np.bincount(top1, minlength=classes) / len(top1)).tolist()
    if isinstance(decoder, RawSpec) and outputs:
        scores = scores_of(outputs[0], decoder.score)
        ref["score"] = _stats(scores)
        ref["score_mode"] = decoder.score
        score_hist = quantile_histogram(scores)
        if score_hist is not None:
            ref["score_hist"] = score_hist
    return ref


def create_bundle(
    out: Path,
    *,
    models: Sequence[Path],
    name: str,
    version: str,
    task: str,
    preprocess: PreprocessSpec,
    decoder: DecoderSpec,
    labels: Sequence[str] = (),
    golden_frames: npt.NDArray[Any],
    description: str = "",
    precision: dict[str, str] | None = None,
    atol: float = 0.02,
    rtol: float = 0.02,
    latency_budget_ms: float | None = None,
    extra_files: dict[str, Path] | None = None,
    sign_key: Path | None = None,
    pack: Path | None = None,
    threads: int = 2,
    overwrite: bool = False,
    reference: dict[str, Any] | None = None,
) -> Path:
    """Create a bundle directory at ``out`` (and the packed file ``pack`` when given).

    ``golden_frames`` are frames as a source delivers them (uint8 BGR images, or float32
    ``window x channels`` sensor windows); their outputs become the self-test. ``reference``
    replaces the drift statistics computed from the golden frames (the converter passes
    statistics of its whole calibration set).
    """
    if not models:
        raise BundleError("give at least one model file (.onnx or .tflite)")
    if len(golden_frames) == 0:
        raise BundleError("give at least one golden frame for the self-test")
    if latency_budget_ms is not None and latency_budget_ms <= 0:
        raise BundleError(f"latency_budget_ms must be positive, got {latency_budget_ms}")
    if out.exists() and not overwrite:
        raise BundleError(f"{out} already exists; remove it or pass overwrite=True (--force)")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".create-", dir=out.parent))
    try:
        _fill(
            staging,
            models,
            name,
            version,
            task,
            preprocess,
            decoder,
            labels,
            golden_frames,
            description,
            precision or {},
            atol,
            rtol,
            latency_budget_ms,
            extra_files or {},
            threads,
            reference,
        )
        if sign_key is not None:
            sign_bundle(staging, sign_key)
        staging.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        staging.replace(out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if pack is not None:
        pack_bundle(out, pack)
    return out


def _fill(
    root: Path,
    models: Sequence[Path],
    name: str,
    version: str,
    task: str,
    preprocess: PreprocessSpec,
    decoder: DecoderSpec,
    labels: Sequence[str],
    golden_frames: npt.NDArray[Any],
    description: str,
    precision: dict[str, str],
    atol: float,
    rtol: float,
    latency_budget_ms: float | None,
    extra_files: dict[str, Path],
    threads: int,
    given_reference: dict[str, Any] | None,
) -> None:
    files: dict[str, Path] = {}
    entries: list[dict[str, Any]] = []
    arrays: dict[str, npt.NDArray[Any]] = {"frames": np.ascontiguousarray(golden_frames)}
    reference: dict[str, Any] = {}
    latencies: list[float] = []
    for src in models:
        fmt = _model_format(src)
        dest = root / f"model.{fmt}"
        if dest.exists():
            raise BundleError(f"two {fmt} models given; a bundle holds one model per format")
        shutil.copyfile(src, dest)
        files[dest.name] = dest
        backend = load_backend(FORMAT_BACKEND[fmt], dest, BackendOptions(threads=threads))
        try:
            pre = make_preprocessor(preprocess, backend.inputs[0])
            buf = pre.new_buffer()
            per_output: list[list[npt.NDArray[Any]]] = [[] for _ in backend.outputs]
            inputs = []
            for frame in golden_frames:
                pre(frame, buf)
                inputs.append(buf.copy())
                t0 = time.perf_counter()
                outs = backend.run([buf])
                latencies.append((time.perf_counter() - t0) * 1000.0)
                for i, o in enumerate(outs):
                    per_output[i].append(o.copy())
            stacked = [np.stack(o) for o in per_output]
            for i, o in enumerate(stacked):
                arrays[f"{fmt}.out{i}"] = o
            quantized = any(s.quantized for s in backend.inputs + backend.outputs)
            entries.append(
                {
                    "path": dest.name,
                    "format": fmt,
                    "precision": precision.get(fmt, "int8" if quantized else "fp32"),
                    "inputs": [TensorInfo.from_spec(s) for s in backend.inputs],
                    "outputs": [TensorInfo.from_spec(s) for s in backend.outputs],
                }
            )
            if not reference:
                reference = given_reference or reference_statistics(np.stack(inputs), stacked, decoder)
        finally:
            backend.close()
    np.savez_compressed(root / "selftest.npz", **arrays)  # type: ignore[arg-type]
    files["selftest.npz"] = root / "selftest.npz"
    (root / "reference.json").write_text(json.dumps(reference, indent=1, sort_keys=True))
    files["reference.json"] = root / "reference.json"
    labels_name = None
    if labels:
        (root / "labels.txt").write_text("".join(f"{label}\n" for label in labels), encoding="utf-8")
        files["labels.txt"] = root / "labels.txt"
        labels_name = "labels.txt"
    report_name = None
    for fname, src in extra_files.items():
        shutil.copyfile(src, root / fname)
        files[fname] = root / fname
        if fname == "report.json":
            report_name = fname
    budget = latency_budget_ms or max(100.0, 25.0 * statistics.median(latencies))
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        name=name,
        version=version,
        created=dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        task=task,  # type: ignore[arg-type]
        description=description,
        models=[ModelEntry(**e) for e in entries],
        preprocess=preprocess,
        decoder=decoder,
        labels=labels_name,
        selftest=SelfTestSpec(atol=atol, rtol=rtol, latency_budget_ms=latency_budget_ms or round(budget, 1)),
        reference="reference.json",
        report=report_name,
        files={n: FileEntry(sha256=sha256_file(p), size=p.stat().st_size) for n, p in sorted(files.items())},
    )
    write_manifest(root, manifest)
