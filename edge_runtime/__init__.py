"""edge-runtime: offline edge ML inference with signed model bundles.

Public names are re-exported here and imported lazily, so ``import edge_runtime`` stays
cheap (no runtime or OpenCV import until a name is used)::

    >>> import edge_runtime
    >>> edge_runtime.__version__
    '0.1.0'
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Bundle": "edge_runtime.bundle",
    "TrustStore": "edge_runtime.bundle",
    "create_bundle": "edge_runtime.bundle",
    "open_bundle": "edge_runtime.bundle",
    "sign_bundle": "edge_runtime.bundle",
    "generate_keypair": "edge_runtime.bundle",
    "Config": "edge_runtime.config",
    "load_config": "edge_runtime.config",
    "Daemon": "edge_runtime.daemon",
    "LoadedModel": "edge_runtime.model",
    "load_model": "edge_runtime.model",
    "Pipeline": "edge_runtime.pipeline",
    "PipelineOptions": "edge_runtime.pipeline",
    "run_selftest": "edge_runtime.selftest",
    "make_preprocessor": "edge_runtime.preprocess",
    "load_backend": "edge_runtime.backends",
    "BackendOptions": "edge_runtime.backends",
    "make_decoder": "edge_runtime.decoders",
    "make_source": "edge_runtime.sources",
    "parse_source_uri": "edge_runtime.sources",
    "Frame": "edge_runtime.types",
    "TensorSpec": "edge_runtime.types",
    "EdgeRuntimeError": "edge_runtime.errors",
}

__all__ = [
    "__version__",
    "BackendOptions",
    "Bundle",
    "Config",
    "Daemon",
    "EdgeRuntimeError",
    "Frame",
    "LoadedModel",
    "Pipeline",
    "PipelineOptions",
    "TensorSpec",
    "TrustStore",
    "create_bundle",
    "generate_keypair",
    "load_backend",
    "load_config",
    "load_model",
    "make_decoder",
    "make_preprocessor",
    "make_source",
    "open_bundle",
    "parse_source_uri",
    "run_selftest",
    "sign_bundle",
]

if TYPE_CHECKING:
    from edge_runtime.backends import BackendOptions, load_backend
    from edge_runtime.bundle import (
        Bundle,
        TrustStore,
        create_bundle,
        generate_keypair,
        open_bundle,
        sign_bundle,
    )
    from edge_runtime.config import Config, load_config
    from edge_runtime.daemon import Daemon
    from edge_runtime.decoders import make_decoder
    from edge_runtime.errors import EdgeRuntimeError
    from edge_runtime.model import LoadedModel, load_model
    from edge_runtime.pipeline import Pipeline, PipelineOptions
    from edge_runtime.preprocess import make_preprocessor
    from edge_runtime.selftest import run_selftest
    from edge_runtime.sources import make_source, parse_source_uri
    from edge_runtime.types import Frame, TensorSpec


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'edge_runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
