"""The ``edgert`` command line: run, bundle, keys, convert, fleet, doctor.

Exit codes: 0 success, 1 a runtime failure (bad bundle, model, source), 2 a usage or config
error. Expected errors print one ``edgert: error: ...`` line, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from edge_runtime import __version__
from edge_runtime.bundle.manifest import format_validation_error
from edge_runtime.errors import ConfigError, EdgeRuntimeError, MissingDependencyError

__all__ = ["main"]

log = logging.getLogger("edge_runtime.cli")


_TASKS = {"classification": "classification", "yolo": "detection", "ssd": "detection", "raw": "regression"}


class UsageError(ConfigError):
    """Bad command-line arguments (exit code 2)."""


# -- run ----------------------------------------------------------------------------------------
def _sink_config(text: str) -> dict[str, Any]:
    kind, _, rest = text.partition(":")
    if kind == "jsonl":
        return {"kind": "jsonl", "path": rest or "-"}
    if kind == "sqlite" and rest:
        return {"kind": "sqlite", "path": rest}
    if kind == "snapshots" and rest:
        return {"kind": "snapshots", "dir": rest}
    raise UsageError(f"--sink {text!r}: use jsonl[:PATH], sqlite:PATH or snapshots:DIR")


def _adhoc_config(args: argparse.Namespace) -> Any:
    from edge_runtime.config import parse_config
    from edge_runtime.sources import parse_source_uri

    if not args.bundle or not args.source:
        raise UsageError("give --config FILE, or both --bundle and --source")
    source = parse_source_uri(args.source)
    data: dict[str, Any] = {
        "model": {
            "bundle": str(args.bundle),
            "format": args.format,
            "threads": args.threads,
            "selftest": not args.no_selftest,
        },
        "source": source.model_dump(exclude_defaults=True) | {"kind": source.kind},
        "sinks": [_sink_config(s) for s in (args.sink or ["jsonl:-"])],
        "trust": {
            "keys": [str(k) for k in args.trust_key],
            "require_signature": bool(args.trust_key),
        },
        "state": {"dir": str(Path(tempfile.gettempdir()) / "edgert")},
        "log": {"stats_interval_s": 0},
    }
    if args.loop:
        data["source"]["loop"] = True
    pipeline: dict[str, Any] = {}
    if args.max_frames:
        pipeline["max_frames"] = args.max_frames
    if args.max_fps:
        pipeline["max_fps"] = args.max_fps
    if pipeline:
        data["pipeline"] = pipeline
    return parse_config(data, Path.cwd(), "command line")


def cmd_run(args: argparse.Namespace) -> int:
    from edge_runtime.config import load_config
    from edge_runtime.daemon import Daemon, print_summary

    if args.config:
        config = load_config(args.config)
        overrides: dict[str, Any] = {}
        if args.max_frames:
            overrides["pipeline"] = config.pipeline.model_copy(update={"max_frames": args.max_frames})
        if args.threads_set:
            overrides["model"] = config.model.model_copy(update={"threads": args.threads})
        config = config.model_copy(update=overrides)
        daemon = Daemon(config, args.config)
    else:
        daemon = Daemon(_adhoc_config(args))
    code = daemon.run()
    print_summary(daemon.summary)
    return code


# -- keys / bundle ------------------------------------------------------------------------------
def cmd_keys_generate(args: argparse.Namespace) -> int:
    from edge_runtime.bundle import generate_keypair, key_id, load_public_key

    priv, pub = generate_keypair(args.out, args.name)
    print(f"private key: {priv} (keep it secret, mode 0600)")
    print(f"public key:  {pub} (key id {key_id(load_public_key(pub))}); put it in [trust] keys")
    return 0


def _parse_opts(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--decoder-opt {item!r}: use KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _preprocess_from_args(args: argparse.Namespace) -> Any:
    from edge_runtime.preprocess_spec import PreprocessSpec

    if args.preprocess_json:
        data = json.loads(args.preprocess_json)
    elif args.window:
        data = {
            "kind": "tensor",
            "window": args.window,
            "channels": args.channels or 1,
            "layout": args.sensor_layout,
        }
        if args.hop:
            data["hop"] = args.hop
    else:
        data = {
            "kind": "image",
            "resize": args.resize,
            "color": args.color,
            "layout": args.layout,
            "scale": args.scale,
        }
    if args.mean:
        data["mean"] = [float(v) for v in args.mean.split(",")]
    if args.std:
        data["std"] = [float(v) for v in args.std.split(",")]
    try:
        return TypeAdapter(PreprocessSpec).validate_python(data)
    except ValidationError as exc:
        raise UsageError(f"preprocessing: {format_validation_error(exc)}") from exc


def cmd_bundle_create(args: argparse.Namespace) -> int:
    from edge_runtime.bundle import create_bundle
    from edge_runtime.bundle.golden import golden_frames
    from edge_runtime.decoders.specs import DecoderSpec

    preprocess = _preprocess_from_args(args)
    try:
        decoder = TypeAdapter(DecoderSpec).validate_python(
            {"kind": args.decoder, **_parse_opts(args.decoder_opt)}
        )
    except ValidationError as exc:
        raise UsageError(f"decoder: {format_validation_error(exc)}") from exc
    labels: list[str] = []
    if args.labels:
        labels = [x.strip() for x in args.labels.read_text(encoding="utf-8").splitlines() if x.strip()]
    task = args.task or _TASKS[args.decoder]
    frames = golden_frames(args.golden, preprocess, args.golden_count)
    out = create_bundle(
        args.out,
        models=args.model,
        name=args.name,
        version=args.version,
        task=task,
        preprocess=preprocess,
        decoder=decoder,
        labels=labels,
        golden_frames=frames,
        description=args.description,
        latency_budget_ms=args.latency_budget_ms,
        sign_key=args.sign_key,
        pack=args.pack,
        overwrite=args.force,
    )
    print(f"bundle written to {out}" + (f" and packed to {args.pack}" if args.pack else ""))
    return 0


def cmd_bundle_sign(args: argparse.Namespace) -> int:
    from edge_runtime.bundle import pack_bundle, sign_bundle

    kid = sign_bundle(args.bundle, args.key)
    print(f"signed {args.bundle} with key {kid}")
    if args.pack:
        pack_bundle(args.bundle, args.pack)
        print(f"packed to {args.pack}")
    return 0


def cmd_bundle_pack(args: argparse.Namespace) -> int:
    from edge_runtime.bundle import pack_bundle

    pack_bundle(args.bundle, args.out)
    print(f"packed {args.bundle} to {args.out}")
    return 0


def cmd_bundle_verify(args: argparse.Namespace) -> int:
    from edge_runtime.bundle import TrustStore, open_bundle

    trust = TrustStore.from_files(args.key)
    with tempfile.TemporaryDirectory(prefix="edgert-verify-") as tmp:
        bundle = open_bundle(args.bundle, trust=trust, require_signature=True, unpack_dir=Path(tmp))
        print(
            f"OK: {bundle.name} {bundle.version} signed by key {bundle.signed_by}; "
            f"{len(bundle.manifest.files)} files match their sha256"
        )
        if args.selftest:
            from edge_runtime.model import load_model
            from edge_runtime.selftest import run_selftest

            for entry in bundle.manifest.models:
                model = load_model(bundle, entry.format)
                try:
                    report = run_selftest(model)
                finally:
                    model.close()
                print(
                    f"self-test {entry.format}: passed {report.matched}/{report.frames} frames, "
                    f"p50 {report.latency_ms_p50:.2f} ms (budget {report.latency_budget_ms} ms)"
                )
    return 0


def cmd_bundle_inspect(args: argparse.Namespace) -> int:
    from edge_runtime.bundle import open_bundle

    with tempfile.TemporaryDirectory(prefix="edgert-inspect-") as tmp:
        bundle = open_bundle(args.bundle, require_signature=False, unpack_dir=Path(tmp))
        man = bundle.manifest
        if args.json:
            print(json.dumps(man.model_dump(mode="json", exclude_none=True), indent=2))
            return 0
        signed = (bundle.root / "manifest.sig").is_file()
        print(f"{man.name} {man.version}  task={man.task}  created={man.created}")
        print(f"  signed: {'yes (not verified here; use bundle verify)' if signed else 'NO'}")
        if man.description:
            print(f"  {man.description}")
        for m in man.models:
            ins = ", ".join(f"{t.name}{t.shape}:{t.dtype}" for t in m.inputs)
            outs = ", ".join(f"{t.name}{t.shape}:{t.dtype}" for t in m.outputs)
            size = man.files[m.path].size
            print(f"  model {m.path} [{m.format} {m.precision}] {size / 1024:.1f} KiB")
            print(f"    in:  {ins}\n    out: {outs}")
        print(f"  preprocess: {man.preprocess.model_dump(exclude_defaults=False)}")
        print(f"  decoder: {man.decoder.model_dump()}")
        labels = bundle.labels()
        if labels:
            more = "..." if len(labels) > 10 else ""
            print(f"  labels ({len(labels)}): {', '.join(labels[:10])}{more}")
        if man.selftest:
            print(
                f"  self-test: atol={man.selftest.atol} rtol={man.selftest.rtol} "
                f"budget={man.selftest.latency_budget_ms} ms"
            )
        for name, entry in man.files.items():
            print(f"  file {name:<16} {entry.size:>10} B  sha256 {entry.sha256[:16]}...")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    try:
        from converters.convert import ConvertOptions, convert
    except ImportError as exc:  # converters ship with the host-side package only
        raise MissingDependencyError("edge-runtime converters", "convert", "edgert convert") from exc
    from edge_runtime.decoders.specs import DecoderSpec

    preprocess = _preprocess_from_args(args)
    try:
        decoder = TypeAdapter(DecoderSpec).validate_python(
            {"kind": args.decoder, **_parse_opts(args.decoder_opt)}
        )
    except ValidationError as exc:
        raise UsageError(f"decoder: {format_validation_error(exc)}") from exc
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if not formats or any(f not in ("onnx", "tflite") for f in formats):
        raise UsageError(f"--formats {args.formats!r}: use onnx, tflite or onnx,tflite")
    labels = (
        [x.strip() for x in args.labels.read_text(encoding="utf-8").splitlines() if x.strip()]
        if args.labels
        else []
    )
    result = convert(
        ConvertOptions(
            model=args.model,
            out=args.out,
            calibration=args.calibration,
            preprocess=preprocess,
            decoder=decoder,
            name=args.name,
            version=args.version,
            task=args.task or _TASKS[args.decoder],  # type: ignore[arg-type]
            labels=labels,
            eval_data=args.eval_data,
            calibration_count=args.calibration_count,
            eval_count=args.eval_count,
            method=args.method,
            target=args.target,
            formats=formats,
            max_accuracy_drop=args.max_accuracy_drop,
            keep_float=tuple(args.keep_float),
            float_input_ops=args.float_input_ops,
            prune=args.prune,
            finetune_data=args.finetune_data,
            threads=args.threads,
            latency_runs=args.latency_runs,
            sign_key=args.sign_key,
            pack=args.pack,
            overwrite=args.force,
        )
    )
    for row in result.report.get("artifacts", []):
        extra = ""
        if "speedup_vs_fp32" in row:
            extra = f"  {row['speedup_vs_fp32']}x faster, {row['size_ratio_vs_fp32']}x smaller than fp32"
        print(
            f"{row['format']:<6} {row['precision']:<5} {row['size_bytes'] / 1024:>9.1f} KiB "
            f"{row['latency_ms_p50']:>8.3f} ms  {row['metric'] or ''}{extra}"
        )
    for skipped in result.skipped:
        print(f"not produced: {skipped.format} {skipped.precision}: {skipped.reason}")
    print(f"report: {result.out / 'report.html'}; bundle: {result.bundle}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from edge_runtime.doctor import doctor_report, format_report

    report = doctor_report(probe_cameras=not args.no_cameras)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


# -- parser -------------------------------------------------------------------------------------
def _add_model_args(parser: argparse.ArgumentParser) -> None:
    """Bundle metadata, preprocessing and decoder flags shared by bundle create and convert."""
    parser.add_argument("--name", required=True)
    parser.add_argument("--version", default="1.0.0")
    parser.add_argument("--task", choices=["classification", "detection", "regression", "anomaly"])
    parser.add_argument("--description", default="")
    parser.add_argument("--labels", type=Path)
    parser.add_argument(
        "--decoder", default="classification", choices=["classification", "yolo", "ssd", "raw"]
    )
    parser.add_argument(
        "--decoder-opt", action="append", default=[], help="KEY=VALUE, e.g. conf_threshold=0.3"
    )
    parser.add_argument("--resize", default="stretch", choices=["stretch", "letterbox", "crop"])
    parser.add_argument("--color", default="rgb", choices=["rgb", "bgr", "gray"])
    parser.add_argument("--layout", default="nhwc", choices=["nhwc", "nchw"])
    parser.add_argument("--scale", type=float, default=1.0 / 255.0)
    parser.add_argument("--mean", help="comma-separated, e.g. 0.485,0.456,0.406")
    parser.add_argument("--std", help="comma-separated")
    parser.add_argument("--window", type=int, help="sensor models: samples per window")
    parser.add_argument("--hop", type=int)
    parser.add_argument("--channels", type=int)
    parser.add_argument("--sensor-layout", default="nwc", choices=["nwc", "ncw", "flat"])
    parser.add_argument("--preprocess-json", help="the whole preprocess section as JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgert", description="edge-runtime: offline edge inference")
    parser.add_argument("--version", action="version", version=f"edgert {__version__}")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("--config", type=Path, help="TOML config (see docs/configuration.md)")
    run.add_argument("--bundle", type=Path, help="bundle directory or .edgebundle file")
    run.add_argument("--source", help="video file, camera index, /dev/video*, URL, serial:..., ...")
    run.add_argument(
        "--sink",
        action="append",
        help="jsonl[:PATH] (default stdout), sqlite:PATH, snapshots:DIR; repeatable",
    )
    run.add_argument("--max-frames", type=int, help="stop after N results")
    run.add_argument("--max-fps", type=float)
    run.add_argument("--threads", type=int, default=2)
    run.add_argument("--format", default="auto", choices=["auto", "onnx", "tflite"])
    run.add_argument("--loop", action="store_true", help="loop a video/replay file")
    run.add_argument(
        "--trust-key",
        type=Path,
        action="append",
        default=[],
        help="public key whose signature is required (repeatable)",
    )
    run.add_argument("--no-selftest", action="store_true")
    run.set_defaults(func=cmd_run)

    keys = sub.add_parser("keys", help="signing keys").add_subparsers(dest="keys_cmd", required=True)
    gen = keys.add_parser("generate", help="create an Ed25519 key pair")
    gen.add_argument("--out", type=Path, required=True)
    gen.add_argument("--name", default="edgert")
    gen.set_defaults(func=cmd_keys_generate)

    bundle = sub.add_parser("bundle", help="create, sign, verify, inspect bundles")
    bsub = bundle.add_subparsers(dest="bundle_cmd", required=True)
    create = bsub.add_parser("create", help="wrap an ONNX and/or TFLite model into a bundle")
    create.add_argument("--model", type=Path, action="append", required=True)
    create.add_argument("--out", type=Path, required=True)
    _add_model_args(create)
    create.add_argument("--golden", type=Path, help=".npz/.npy frames, an image folder, a video or a CSV")
    create.add_argument("--golden-count", type=int, default=8)
    create.add_argument("--latency-budget-ms", type=float)
    create.add_argument("--sign-key", type=Path)
    create.add_argument("--pack", type=Path, help="also write the packed .edgebundle file")
    create.add_argument("--force", action="store_true", help="replace an existing --out")
    create.set_defaults(func=cmd_bundle_create)

    sign = bsub.add_parser("sign", help="sign a bundle directory")
    sign.add_argument("bundle", type=Path)
    sign.add_argument("--key", type=Path, required=True)
    sign.add_argument("--pack", type=Path)
    sign.set_defaults(func=cmd_bundle_sign)

    pack = bsub.add_parser("pack", help="pack a bundle directory into one .edgebundle file")
    pack.add_argument("bundle", type=Path)
    pack.add_argument("out", type=Path)
    pack.set_defaults(func=cmd_bundle_pack)

    verify = bsub.add_parser("verify", help="check signature and hashes (and run the self-test)")
    verify.add_argument("bundle", type=Path)
    verify.add_argument("--key", type=Path, action="append", required=True)
    verify.add_argument("--selftest", action="store_true")
    verify.set_defaults(func=cmd_bundle_verify)

    inspect = bsub.add_parser("inspect", help="print a bundle's manifest")
    inspect.add_argument("bundle", type=Path)
    inspect.add_argument("--json", action="store_true")
    inspect.set_defaults(func=cmd_bundle_inspect)

    conv = sub.add_parser(
        "convert",
        help="int8 ONNX + TFLite from one calibration, accuracy report, signed bundle",
        description="Needs the convert extra: pip install 'edge-runtime[convert]'.",
    )
    conv.add_argument("model", type=Path, help=".onnx, .keras, a SavedModel folder or a float .tflite")
    conv.add_argument("--out", type=Path, required=True, help="output folder (report, models, bundle/)")
    conv.add_argument(
        "--calibration",
        type=Path,
        required=True,
        help="image folder (labelled subfolders allowed), .npy/.npz, or .csv/.jsonl",
    )
    conv.add_argument("--calibration-count", type=int, default=200)
    conv.add_argument(
        "--eval",
        dest="eval_data",
        type=Path,
        help="labelled evaluation data (default: a held-out split of --calibration); for detectors an "
        ".npz with 'boxes' rows sample, class, x1, y1, x2, y2 scores mAP@0.5",
    )
    conv.add_argument("--eval-count", type=int, default=500)
    conv.add_argument("--method", choices=["minmax", "entropy", "percentile"])
    conv.add_argument(
        "--target", default="auto", choices=["auto", "x86", "x86-vnni", "rpi4", "rpi5", "jetson"]
    )
    conv.add_argument("--formats", default="onnx,tflite", help="comma-separated: onnx,tflite")
    conv.add_argument("--max-accuracy-drop", type=float, help="e.g. 0.01 = 1 point of top-1")
    conv.add_argument(
        "--keep-float",
        action="append",
        default=[],
        metavar="NAME",
        help="keep this op float (repeatable; onnx:NODE or tflite:OP aims at one format)",
    )
    conv.add_argument(
        "--float-input-ops",
        choices=["auto", "float", "int8"],
        default="auto",
        help="the ops before the first convolution (input standardization): auto keeps them float "
        "when that measures >= 10%% faster on this host",
    )
    conv.add_argument("--prune", help="magnitude:S or channels:R")
    conv.add_argument("--finetune-data", type=Path, help=".npz with x, y to fine-tune after pruning (Keras)")
    conv.add_argument("--threads", type=int, default=2)
    conv.add_argument("--latency-runs", type=int, default=40, help="timed runs per model for the report")
    conv.add_argument("--sign-key", type=Path)
    conv.add_argument("--pack", type=Path, help="also write the packed .edgebundle file")
    conv.add_argument("--force", action="store_true", help="replace an existing --out")
    _add_model_args(conv)
    conv.set_defaults(func=cmd_convert)

    from edge_runtime.sync.fleet_cli import add_fleet_parser

    add_fleet_parser(sub)

    doctor = sub.add_parser("doctor", help="report runtimes, providers, delegates, CPU, cameras")
    doctor.add_argument("--json", action="store_true")
    doctor.add_argument("--no-cameras", action="store_true")
    doctor.set_defaults(func=cmd_doctor)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``edgert`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.threads_set = "--threads" in (argv if argv is not None else sys.argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args))
    except ConfigError as exc:
        sys.stderr.write(f"edgert: error: {exc}\n")
        return 2
    except EdgeRuntimeError as exc:
        sys.stderr.write(f"edgert: error: {exc}\n")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
