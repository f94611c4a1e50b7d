"""The backend interface: load a model, describe its io, run it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from edge_runtime.types import TensorSpec

__all__ = ["Backend", "BackendOptions", "DelegateSpec", "Dequantizer"]


@dataclass(frozen=True)
class DelegateSpec:
    """An external LiteRT delegate (e.g. Edge TPU ``libedgetpu.so.1``) and its options."""

    library: str
    options: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BackendOptions:
    """How to run a model.

    ``providers`` (ONNX Runtime): ``auto`` or names among ``cpu``, ``cuda``, ``tensorrt``,
    ``openvino``, ``coreml``, in order of preference; ``auto`` takes the best one present.
    ``delegates`` (LiteRT): external delegates; XNNPACK is always used by LiteRT on CPU.
    """

    threads: int = 2
    providers: tuple[str, ...] = ("auto",)
    delegates: tuple[DelegateSpec, ...] = ()
    warmup_runs: int = 2


class Backend(Protocol):
    """A loaded model. ``inputs``/``outputs`` describe the model's own tensors."""

    name: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def run(self, inputs: Sequence[npt.NDArray[Any]]) -> list[npt.NDArray[np.float32]]:
        """One inference. Inputs in the model's dtype; outputs dequantized to float32."""
        ...

    def close(self) -> None:
        """Release the runtime's resources."""
        ...


class Dequantizer:
    """Turns one raw output into float32 using the tensor's scale/zero point, reusing a buffer."""

    def __init__(self, spec: TensorSpec) -> None:
        self.spec = spec
        self.scale = np.float32(spec.scale or 1.0)
        self.zero_point = np.float32(spec.zero_point or 0)

    def __call__(self, raw: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        if raw.dtype == np.float32:
            return raw
        if not self.spec.quantized:
            return raw.astype(np.float32)
        out = raw.astype(np.float32)
        out -= self.zero_point
        out *= self.scale
        return out
