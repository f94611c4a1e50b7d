"""Inference backends behind one small interface, and their name-to-class registry."""

from __future__ import annotations

import platform
from pathlib import Path

from edge_runtime.backends.base import Backend, BackendOptions, DelegateSpec, Dequantizer
from edge_runtime.backends.litert import LiteRTBackend
from edge_runtime.backends.onnxruntime import OnnxRuntimeBackend
from edge_runtime.errors import BackendError

__all__ = [
    "BACKENDS",
    "FORMAT_BACKEND",
    "Backend",
    "BackendOptions",
    "DelegateSpec",
    "Dequantizer",
    "LiteRTBackend",
    "OnnxRuntimeBackend",
    "format_preference",
    "load_backend",
]

BACKENDS: dict[str, type[OnnxRuntimeBackend] | type[LiteRTBackend]] = {
    "onnxruntime": OnnxRuntimeBackend,
    "litert": LiteRTBackend,
}
FORMAT_BACKEND = {"onnx": "onnxruntime", "tflite": "litert"}


def format_preference() -> list[str]:
    """Model formats in order of preference on this CPU (LiteRT/XNNPACK leads on Arm)."""
    arm = platform.machine().lower() in ("aarch64", "arm64", "armv7l", "armv8l")
    return ["tflite", "onnx"] if arm else ["onnx", "tflite"]


def load_backend(name: str, path: Path, options: BackendOptions | None = None) -> Backend:
    """Load ``path`` with the backend registered as ``name``."""
    cls = BACKENDS.get(name)
    if cls is None:
        raise BackendError(f"unknown backend {name!r}; choose from {sorted(BACKENDS)}")
    return cls(path, options)
