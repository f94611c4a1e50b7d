"""ONNX Runtime backend (CPU; CUDA / TensorRT / OpenVINO providers when installed)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_runtime.backends.base import BackendOptions, Dequantizer
from edge_runtime.errors import (
    InferenceError,
    MissingDependencyError,
    ModelLoadError,
    ProviderUnavailableError,
)
from edge_runtime.types import TensorSpec

__all__ = ["PROVIDERS", "OnnxRuntimeBackend", "available_providers"]

log = logging.getLogger(__name__)

PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
_AUTO_ORDER = ("tensorrt", "cuda", "openvino", "cpu")
_HINTS = {
    "tensorrt": "install NVIDIA's onnxruntime-gpu build with TensorRT (JetPack on Jetson)",
    "cuda": "install onnxruntime-gpu matching the CUDA version (JetPack's wheel on Jetson)",
    "openvino": "install onnxruntime-openvino",
    "coreml": "CoreML is only available on macOS",
}
_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
}


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise MissingDependencyError("onnxruntime", "onnx", "The ONNX Runtime backend") from exc
    return onnxruntime


def available_providers() -> list[str]:
    """Short names of the execution providers this onnxruntime build offers."""
    names = set(_ort().get_available_providers())
    return [short for short, full in PROVIDERS.items() if full in names]


def _resolve_providers(requested: Sequence[str]) -> list[str]:
    have = available_providers()
    if not requested or list(requested) == ["auto"]:
        chosen = [p for p in _AUTO_ORDER if p in have]
        return [PROVIDERS[p] for p in chosen] or [PROVIDERS["cpu"]]
    out = []
    for name in requested:
        if name not in PROVIDERS:
            raise ProviderUnavailableError(
                f"unknown execution provider {name!r}; choose from {sorted(PROVIDERS)} or 'auto'"
            )
        if name not in have:
            raise ProviderUnavailableError(
                f"execution provider {name!r} was requested but this onnxruntime build has only "
                f"{have}; {_HINTS.get(name, 'install an onnxruntime build with it')}, or use "
                "providers = ['auto']"
            )
        out.append(PROVIDERS[name])
    if PROVIDERS["cpu"] not in out:
        out.append(PROVIDERS["cpu"])
    return out


def _spec(arg: Any) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) and d > 0 else None for d in arg.shape)
    return TensorSpec(arg.name, shape, _DTYPES.get(arg.type, arg.type))


class OnnxRuntimeBackend:
    """A model loaded in an ONNX Runtime InferenceSession."""

    name = "onnxruntime"

    def __init__(self, path: Path, options: BackendOptions | None = None) -> None:
        ort = _ort()
        opts = options or BackendOptions()
        so = ort.SessionOptions()
        so.intra_op_num_threads = opts.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        providers = _resolve_providers(opts.providers)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ModelLoadError(f"cannot read ONNX model {path}: {exc}") from exc
        try:
            self._session = ort.InferenceSession(data, sess_options=so, providers=providers)
        except Exception as exc:
            raise ModelLoadError(
                f"ONNX Runtime cannot load {path.name}: {str(exc).strip()[:300]}; the file is "
                "corrupt, truncated or uses operators this runtime lacks - re-export or "
                "re-download the model"
            ) from exc
        self.providers = list(self._session.get_providers())
        self.inputs = [_spec(a) for a in self._session.get_inputs()]
        self.outputs = [_spec(a) for a in self._session.get_outputs()]
        self._input_names = [s.name for s in self.inputs]
        self._output_names = [s.name for s in self.outputs]
        self._feed: dict[str, npt.NDArray[Any]] = {}
        self._dequant = [Dequantizer(s) for s in self.outputs]
        log.debug("onnxruntime loaded %s with %s, %d threads", path.name, self.providers, opts.threads)
        if opts.warmup_runs:
            warm = [np.zeros([d or 1 for d in s.shape], s.dtype) for s in self.inputs]
            for _ in range(opts.warmup_runs):
                self.run(warm)

    def run(self, inputs: Sequence[npt.NDArray[Any]]) -> list[npt.NDArray[np.float32]]:
        feed = self._feed
        if len(inputs) != len(self._input_names):
            raise InferenceError(
                f"ONNX Runtime run got {len(inputs)} inputs; the model takes {len(self._input_names)}"
            )
        for name, value in zip(self._input_names, inputs, strict=True):
            feed[name] = value
        try:
            raw = self._session.run(self._output_names, feed)
        except Exception as exc:
            got = [list(getattr(v, "shape", ())) for v in inputs]
            want = [list(s.shape) for s in self.inputs]
            raise InferenceError(
                f"ONNX Runtime run failed: {str(exc).strip()[:300]} (inputs {got}, model expects {want})"
            ) from exc
        return [dq(r) for dq, r in zip(self._dequant, raw, strict=True)]

    def close(self) -> None:
        self._feed.clear()
        self._session = None
