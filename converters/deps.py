"""Lazy importers for the converter's heavy, optional dependencies.

Nothing in :mod:`converters` imports TensorFlow, ONNX, ONNX Runtime's quantization tools or
tf2onnx at module import time; each step calls one of these functions when it needs the
package. A missing package raises :class:`~edge_runtime.errors.MissingDependencyError`, which
names the package and the extra to install (``pip install 'edge-runtime[convert]'``)::

    >>> from converters import deps
    >>> deps.onnx().__name__
    'onnx'
"""

from __future__ import annotations

import importlib
from typing import Any

from edge_runtime.errors import MissingDependencyError

__all__ = ["onnx", "onnxruntime", "ort_quantization", "tensorflow", "tf2onnx"]

_EXTRA = "convert"


def _load(module: str, package: str, purpose: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(package, _EXTRA, purpose) from exc


def tensorflow(purpose: str = "Converting to TFLite") -> Any:
    """The ``tensorflow`` module (tensorflow-cpu is enough)."""
    return _load("tensorflow", "tensorflow-cpu", purpose)


def onnx(purpose: str = "Reading and editing ONNX models") -> Any:
    """The ``onnx`` module."""
    return _load("onnx", "onnx", purpose)


def onnxruntime(purpose: str = "Running ONNX models") -> Any:
    """The ``onnxruntime`` module."""
    return _load("onnxruntime", "onnxruntime", purpose)


def ort_quantization(purpose: str = "int8 quantization of ONNX models") -> Any:
    """``onnxruntime.quantization`` (needs both onnxruntime and onnx)."""
    onnx(purpose)
    return _load("onnxruntime.quantization", "onnxruntime", purpose)


def tf2onnx(purpose: str = "Exporting TensorFlow/Keras models to ONNX") -> Any:
    """The ``tf2onnx`` module."""
    return _load("tf2onnx", "tf2onnx", purpose)
