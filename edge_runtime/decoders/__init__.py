"""Decoders: turn a model's (dequantized, float32) outputs into a JSON-ready result.

One decoder class per ``manifest.decoder.kind``, all with the :class:`Decoder` shape::

    decoder = make_decoder(manifest.decoder, manifest.labels)
    payload = decoder.decode(outputs, transform)   # dict of plain str/int/float/bool/list

Outputs that do not fit the configured decoder raise
:class:`~edge_runtime.errors.DecoderError` naming the manifest field to fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy.typing as npt

from edge_runtime.decoders.classification import ClassificationDecoder
from edge_runtime.decoders.nms import batched_nms, box_iou, nms
from edge_runtime.decoders.raw import RawDecoder
from edge_runtime.decoders.specs import (
    ClassificationSpec,
    DecoderSpec,
    RawSpec,
    SSDSpec,
    YoloSpec,
)
from edge_runtime.decoders.ssd import SSDDecoder
from edge_runtime.decoders.yolo import YoloDecoder
from edge_runtime.errors import DecoderError
from edge_runtime.types import ImageTransform

__all__ = [
    "DECODERS",
    "ClassificationDecoder",
    "ClassificationSpec",
    "Decoder",
    "DecoderSpec",
    "RawDecoder",
    "RawSpec",
    "SSDDecoder",
    "SSDSpec",
    "YoloDecoder",
    "YoloSpec",
    "batched_nms",
    "box_iou",
    "make_decoder",
    "nms",
]


@runtime_checkable
class Decoder(Protocol):
    """Turns one inference's outputs into a JSON-serialisable payload.

    ``outputs`` are the model outputs in model order, dequantized to float32, batch axis
    included. ``transform`` maps model-input pixels to source-frame pixels (``None`` for
    sensor models). The result holds only plain Python str/int/float/bool/list/dict values.
    """

    def decode(self, outputs: Sequence[npt.NDArray[Any]], transform: ImageTransform | None) -> dict[str, Any]:
        """Decode one frame's outputs."""
        ...


DECODERS: dict[str, type] = {
    "classification": ClassificationDecoder,
    "yolo": YoloDecoder,
    "ssd": SSDDecoder,
    "raw": RawDecoder,
}
"""Decoder class per ``manifest.decoder.kind``; each takes ``(spec, labels)``."""


def make_decoder(spec: DecoderSpec, labels: Sequence[str]) -> Decoder:
    """Build the decoder for ``spec`` (a parsed ``manifest.decoder``) and the model's labels."""
    cls = DECODERS.get(spec.kind)
    if cls is None:  # only reachable with a spec type this module does not know
        raise DecoderError(
            f"unknown decoder kind {spec.kind!r}; manifest.decoder.kind must be one of {sorted(DECODERS)}"
        )
    decoder: Decoder = cls(spec, labels)
    return decoder
