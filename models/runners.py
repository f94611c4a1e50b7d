"""TensorFlow-free helpers to run exported models with onnxruntime and LiteRT.

Used by the recipes (to verify their exports), by ``build_bundles.py`` and by the tests, which
run in the device venv where TensorFlow is not installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["OnnxRunner", "TfliteRunner", "run_batch"]

F32Array = npt.NDArray[np.float32]


class OnnxRunner:
    """One onnxruntime CPU session for a single-input, single-output model."""

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        inp = self.session.get_inputs()[0]
        self.input_name: str = inp.name
        self.input_shape: tuple[Any, ...] = tuple(inp.shape)

    def __call__(self, x: F32Array) -> F32Array:
        """Run one input tensor (with its batch dimension); returns output 0."""
        out = self.session.run(None, {self.input_name: np.ascontiguousarray(x, np.float32)})
        return np.asarray(out[0], dtype=np.float32)


class TfliteRunner:
    """One LiteRT interpreter for a single-input, single-output float model."""

    def __init__(self, path: Path) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=str(path), num_threads=1)
        self.interpreter.allocate_tensors()
        self._in = self.interpreter.get_input_details()[0]
        self._out = self.interpreter.get_output_details()[0]
        self.input_shape: tuple[int, ...] = tuple(int(d) for d in self._in["shape"])

    def __call__(self, x: F32Array) -> F32Array:
        """Run one input tensor (with its batch dimension); returns output 0."""
        self.interpreter.set_tensor(self._in["index"], np.ascontiguousarray(x, np.float32))
        self.interpreter.invoke()
        return np.array(self.interpreter.get_tensor(self._out["index"]), dtype=np.float32)


def run_batch(runner: OnnxRunner | TfliteRunner, xs: F32Array) -> F32Array:
    """Run a batch-1 model over ``xs`` (N x ...) sample by sample; stacks output 0 (N x ...)."""
    return np.stack([runner(x[None])[0] for x in xs])
