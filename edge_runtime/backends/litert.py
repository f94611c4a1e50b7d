"""LiteRT backend (``ai_edge_litert``, falling back to ``tflite_runtime``), XNNPACK on CPU."""

from __future__ import annotations

import ctypes
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

__all__ = ["LiteRTBackend", "interpreter_module"]

log = logging.getLogger(__name__)


def interpreter_module() -> Any:
    """The LiteRT interpreter module: ai_edge_litert, else tflite_runtime."""
    try:
        from ai_edge_litert import interpreter

        return interpreter
    except ImportError:
        pass
    try:
        from tflite_runtime import interpreter as tflite_interpreter
    except ImportError as exc:
        raise MissingDependencyError(
            "ai-edge-litert", "litert", "The LiteRT backend (or install tflite-runtime)"
        ) from exc
    return tflite_interpreter


def _spec(detail: dict[str, Any]) -> TensorSpec:
    scale, zero_point = detail.get("quantization", (0.0, 0))
    dtype = np.dtype(detail["dtype"]).name
    quantized = bool(scale) and dtype in ("int8", "uint8", "int16")
    shape = tuple(int(d) if d > 0 else None for d in detail.get("shape_signature", detail["shape"]))
    return TensorSpec(
        detail["name"],
        shape,
        dtype,
        float(scale) if quantized else None,
        int(zero_point) if quantized else None,
    )


class LiteRTBackend:
    """A .tflite model in a LiteRT interpreter."""

    name = "litert"

    def __init__(self, path: Path, options: BackendOptions | None = None) -> None:
        mod = interpreter_module()
        opts = options or BackendOptions()
        delegates = []
        for spec in opts.delegates:
            try:
                # Load the library first: LiteRT leaves a half-built Delegate behind otherwise.
                ctypes.CDLL(spec.library)
                delegates.append(mod.load_delegate(spec.library, dict(spec.options)))
            except (ValueError, OSError, RuntimeError) as exc:
                raise ProviderUnavailableError(
                    f"LiteRT delegate {spec.library!r} could not be loaded ({exc}); install the "
                    "delegate library (e.g. libedgetpu1-std for a Coral Edge TPU) or remove it "
                    "from [model] delegates"
                ) from exc
        try:
            content = path.read_bytes()
        except OSError as exc:
            raise ModelLoadError(f"cannot read TFLite model {path}: {exc}") from exc
        try:
            self._interp = mod.Interpreter(
                model_content=content,
                num_threads=opts.threads,
                experimental_delegates=delegates or None,
            )
            self._interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ModelLoadError(
                f"LiteRT cannot load {path.name}: {str(exc).strip()[:300]}; the file is corrupt, "
                "truncated or uses ops this runtime lacks - re-export or re-download the model"
            ) from exc
        in_details = self._interp.get_input_details()
        out_details = self._interp.get_output_details()
        self.inputs = [_spec(d) for d in in_details]
        self.outputs = [_spec(d) for d in out_details]
        self._in_idx = [int(d["index"]) for d in in_details]
        self._in_shapes = [tuple(int(x) for x in d["shape"]) for d in in_details]
        self._out_idx = [int(d["index"]) for d in out_details]
        self._dequant = [Dequantizer(s) for s in self.outputs]
        self.delegates = [d.library for d in opts.delegates]
        log.debug("litert loaded %s, %d threads, delegates %s", path.name, opts.threads, self.delegates)
        if opts.warmup_runs:
            warm = [np.zeros([d or 1 for d in s.shape], s.dtype) for s in self.inputs]
            for _ in range(opts.warmup_runs):
                self.run(warm)

    def run(self, inputs: Sequence[npt.NDArray[Any]]) -> list[npt.NDArray[np.float32]]:
        interp = self._interp
        try:
            if any(v.shape != s for v, s in zip(inputs, self._in_shapes, strict=True)):
                self._resize([v.shape for v in inputs])
            for idx, value in zip(self._in_idx, inputs, strict=True):
                interp.set_tensor(idx, value)
            interp.invoke()
            return [dq(interp.get_tensor(i)) for dq, i in zip(self._dequant, self._out_idx, strict=True)]
        except (ValueError, RuntimeError) as exc:
            got = [list(getattr(v, "shape", ())) for v in inputs]
            want = [list(s.shape) for s in self.inputs]
            raise InferenceError(
                f"LiteRT invoke failed: {str(exc).strip()[:300]} (inputs {got}, model expects {want})"
            ) from exc

    def _resize(self, shapes: list[tuple[int, ...]]) -> None:
        """Resize inputs along their dynamic dimensions (e.g. a batch), then re-allocate."""
        for i, (idx, shape) in enumerate(zip(self._in_idx, shapes, strict=True)):
            self._interp.resize_tensor_input(idx, list(shape), strict=True)
            self._in_shapes[i] = tuple(shape)
        self._interp.allocate_tensors()

    def close(self) -> None:
        self._interp = None
