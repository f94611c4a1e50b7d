"""Load a candidate bundle's model and run its self-test in a child process first.

A model that crashes the runtime while loading or running (a segfault in a kernel, an abort,
the OOM killer) would take the daemon down with it, and a restart would try again: a crash
loop. The probe runs ``python -m edge_runtime.sync.probe BUNDLE_DIR`` and refuses the bundle
with the signal named when the child dies; only a bundle that passed in the child is loaded
into the daemon. Run as a command it exits 0 (self-test passed), 1 (refused, reason on stderr).
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from edge_runtime.errors import EdgeRuntimeError, UpdateError

__all__ = ["main", "probe_bundle"]


def probe_bundle(bundle_dir: Path, fmt: str = "auto", threads: int = 1, timeout_s: float = 180.0) -> None:
    """Raise :class:`UpdateError` naming the reason unless the model loads and self-tests in a child."""
    cmd = [
        sys.executable,
        "-m",
        "edge_runtime.sync.probe",
        str(bundle_dir),
        "--format",
        fmt,
        "--threads",
        str(threads),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise UpdateError(
            f"loading and self-testing the model took over {timeout_s:g} s in the probe"
        ) from exc
    if proc.returncode == 0:
        return
    if proc.returncode < 0:
        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:
            name = f"signal {-proc.returncode}"
        raise UpdateError(f"the runtime crashed ({name}) loading or running the model; the bundle is refused")
    last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
    raise UpdateError(f"the model failed in the probe: {last[:500]}")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m edge_runtime.sync.probe BUNDLE_DIR [--format F] [--threads N]``."""
    parser = argparse.ArgumentParser(prog="edge_runtime.sync.probe")
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--format", default="auto", choices=["auto", "onnx", "tflite"])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    from edge_runtime.backends import BackendOptions
    from edge_runtime.bundle import open_bundle
    from edge_runtime.model import load_model
    from edge_runtime.selftest import run_selftest

    try:
        # the signature was verified when the bundle was staged; here only the model runs
        bundle = open_bundle(args.bundle, require_signature=False)
        model = load_model(bundle, args.format, BackendOptions(threads=args.threads))
        try:
            run_selftest(model)
        finally:
            model.close()
    except EdgeRuntimeError as exc:
        sys.stderr.write(f"{exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
