"""A bundle's model made ready to run: backend + preprocessor + decoder, chosen from the manifest."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_runtime.backends import (
    FORMAT_BACKEND,
    Backend,
    BackendOptions,
    format_preference,
    load_backend,
)
from edge_runtime.bundle.loader import Bundle
from edge_runtime.decoders import Decoder, make_decoder
from edge_runtime.errors import (
    BackendError,
    BundleError,
    MissingDependencyError,
    ModelLoadError,
    PreprocessError,
)
from edge_runtime.preprocess import ImagePreprocessor, TensorPreprocessor, make_preprocessor
from edge_runtime.types import ImageTransform

__all__ = ["LoadedModel", "load_model"]

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """Everything needed to turn a frame into a decoded result with one bundle's model."""

    bundle: Bundle
    format: str
    backend: Backend
    preprocessor: ImagePreprocessor | TensorPreprocessor
    decoder: Decoder
    load_ms: float

    @property
    def version(self) -> str:
        return self.bundle.version

    @property
    def name(self) -> str:
        return self.bundle.name

    def infer(
        self, data: npt.NDArray[Any], buffer: npt.NDArray[Any] | None = None
    ) -> tuple[list[npt.NDArray[np.float32]], ImageTransform | None]:
        """Preprocess one frame and run the model (not the hot path: allocates if no buffer)."""
        buf = self.preprocessor.new_buffer() if buffer is None else buffer
        transform = self.preprocessor(data, buf)
        return self.backend.run([buf]), transform

    def close(self) -> None:
        self.backend.close()


def _choose_format(bundle: Bundle, requested: str) -> list[str]:
    have = [m.format for m in bundle.manifest.models]
    if requested != "auto":
        if requested not in have:
            raise BundleError(
                f"bundle {bundle.name} has no {requested} model (it has {have}); set "
                "[model] format = 'auto' or one of those"
            )
        return [requested]
    return [f for f in format_preference() if f in have]


def load_model(bundle: Bundle, fmt: str = "auto", options: BackendOptions | None = None) -> LoadedModel:
    """Load the bundle's model in ``fmt`` (``auto``: the best format whose runtime is installed)."""
    candidates = _choose_format(bundle, fmt)
    errors: list[str] = []
    for candidate in candidates:
        entry = bundle.model_entry(candidate)
        t0 = time.monotonic()
        try:
            backend = load_backend(FORMAT_BACKEND[candidate], bundle.path(entry.path), options)
        except (MissingDependencyError, ModelLoadError) as exc:
            if fmt != "auto" or (candidate == candidates[-1] and not errors):
                raise
            log.warning("cannot use the %s model: %s", candidate, exc)
            errors.append(str(exc))
            continue
        load_ms = (time.monotonic() - t0) * 1000.0
        if len(backend.inputs) != 1:
            backend.close()
            raise BackendError(
                f"model {entry.path} has {len(backend.inputs)} inputs; the daemon feeds "
                "single-input models - export the model with one input"
            )
        try:
            pre = make_preprocessor(bundle.manifest.preprocess, backend.inputs[0])
        except PreprocessError:
            backend.close()
            raise
        decoder = make_decoder(bundle.manifest.decoder, bundle.labels())
        log.info("loaded %s %s (%s) in %.0f ms", bundle.name, bundle.version, candidate, load_ms)
        return LoadedModel(bundle, candidate, backend, pre, decoder, load_ms)
    raise BackendError("no runtime available for this bundle: " + "; ".join(errors))
