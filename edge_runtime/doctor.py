"""``edgert doctor``: what this device can run (runtimes, providers, delegates, CPU, cameras)."""

from __future__ import annotations

import ctypes.util
import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any

__all__ = ["cpu_features", "doctor_report", "format_report"]

_KNOWN_DELEGATES = {
    "edgetpu": ["libedgetpu.so.1", "edgetpu"],
    "hexagon": ["libhexagon_interface.so", "hexagon_interface"],
    "vx (NPU, i.MX 8M Plus)": ["libvx_delegate.so", "vx_delegate"],
    "armnn": ["libarmnnDelegate.so", "armnnDelegate"],
}
_X86_FLAGS = ("sse4_2", "avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
_ARM_FLAGS = ("asimd", "asimddp", "i8mm", "sve", "fphp", "asimdhp")


def cpu_features(cpuinfo: str | None = None) -> dict[str, Any]:
    """CPU model and the features that decide int8 speed (VNNI on x86, dot-product on Arm)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            cpuinfo = ""
    flags: set[str] = set()
    model = platform.processor() or ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features"):
            flags.update(value.split())
        elif key in ("model name", "hardware") and not model:
            model = value.strip()
    wanted = _ARM_FLAGS if platform.machine().lower() in ("aarch64", "arm64", "armv7l") else _X86_FLAGS
    found = {f: f in flags for f in wanted}
    int8 = (
        "fast (VNNI / dot-product)"
        if found.get("avx512_vnni") or found.get("avx_vnni") or found.get("asimddp")
        else "no int8 dot-product instructions: int8 may not beat fp32"
    )
    return {
        "machine": platform.machine(),
        "model": model,
        "cores": os.cpu_count(),
        "features": found,
        "int8": int8,
    }


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _backends() -> dict[str, Any]:
    out: dict[str, Any] = {}
    ort_version = _version("onnxruntime") or _version("onnxruntime-gpu")
    if ort_version:
        from edge_runtime.backends.onnxruntime import available_providers

        out["onnxruntime"] = {"version": ort_version, "providers": available_providers()}
    else:
        out["onnxruntime"] = {"missing": "pip install 'edge-runtime[onnx]'"}
    litert = _version("ai-edge-litert")
    tflite = _version("tflite-runtime")
    if litert or tflite:
        out["litert"] = {
            "module": "ai_edge_litert" if litert else "tflite_runtime",
            "version": litert or tflite,
            "xnnpack": True,
        }
    else:
        out["litert"] = {"missing": "pip install ai-edge-litert (or tflite-runtime)"}
    return out


def _delegates() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name, (soname, short) in _KNOWN_DELEGATES.items():
        path = ctypes.util.find_library(short)
        if path is None:
            for folder in ("/usr/lib", "/usr/lib/aarch64-linux-gnu", "/usr/local/lib"):
                if Path(folder, soname).exists():
                    path = str(Path(folder, soname))
                    break
        found[name] = path
    return found


def _cameras(probe: bool) -> list[dict[str, Any]]:
    cams: list[dict[str, Any]] = []
    for dev in sorted(str(p) for p in Path("/dev").glob("video*")):
        entry: dict[str, Any] = {"device": dev, "readable": os.access(dev, os.R_OK | os.W_OK)}
        name = Path("/sys/class/video4linux", Path(dev).name, "name")
        if name.exists():
            entry["name"] = name.read_text(encoding="utf-8", errors="replace").strip()
        if probe and entry["readable"]:
            import cv2

            cap = cv2.VideoCapture(dev)
            try:
                entry["opens"] = bool(cap.isOpened())
                if entry["opens"]:
                    entry["size"] = [
                        int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
                        int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
                    ]
            finally:
                cap.release()
        cams.append(entry)
    return cams


def _jetson() -> str | None:
    release = Path("/etc/nv_tegra_release")
    if release.exists():
        return release.read_text(encoding="utf-8", errors="replace").splitlines()[0]
    return None


def doctor_report(probe_cameras: bool = True) -> dict[str, Any]:
    """Everything ``edgert doctor`` prints, as a dict."""
    from edge_runtime import __version__

    gpu_hint = None
    backends = _backends()
    providers = backends.get("onnxruntime", {}).get("providers", [])
    jetson = _jetson()
    if jetson and "cuda" not in providers:
        gpu_hint = (
            "Jetson found but onnxruntime has no CUDA/TensorRT provider: install JetPack's onnxruntime-gpu"
        )
    return {
        "edgert": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "jetson": jetson,
        "cpu": cpu_features(),
        "backends": backends,
        "gpu": gpu_hint or ("CUDA/TensorRT available" if "cuda" in providers else "no GPU provider"),
        "delegates": _delegates(),
        "cameras": _cameras(probe_cameras),
    }


def format_report(report: dict[str, Any]) -> str:
    """Human-readable form of :func:`doctor_report`."""
    lines = [f"edgert {report['edgert']} on {report['platform']} (Python {report['python']})"]
    if report["jetson"]:
        lines.append(f"Jetson: {report['jetson']}")
    cpu = report["cpu"]
    feats = ", ".join(f for f, ok in cpu["features"].items() if ok) or "none"
    lines.append(f"CPU: {cpu['model']} ({cpu['machine']}, {cpu['cores']} cores); features: {feats}")
    lines.append(f"  int8: {cpu['int8']}")
    for name, info in report["backends"].items():
        lines.append(f"backend {name}: {info}")
    lines.append(f"GPU: {report['gpu']}")
    for name, path in report["delegates"].items():
        lines.append(f"delegate {name}: {path or 'not found'}")
    if report["cameras"]:
        lines.extend(f"camera {c}" for c in report["cameras"])
    else:
        lines.append("cameras: none found (/dev/video*)")
    return "\n".join(lines)
