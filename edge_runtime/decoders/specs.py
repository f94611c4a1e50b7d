"""Decoder settings as stored in a bundle manifest (``manifest.decoder``).

One pydantic model per decoder kind, joined in :data:`DecoderSpec`, a union discriminated by
``kind``. Unknown fields are rejected so a typo in a threshold never passes silently.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ClassificationSpec",
    "DecoderSpec",
    "RawSpec",
    "SSDSpec",
    "YoloSpec",
]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ClassificationSpec(_Spec):
    """Top-k classification; ``softmax='auto'`` applies softmax when outputs are not probabilities."""

    kind: Literal["classification"] = "classification"
    top_k: int = Field(default=3, ge=1, le=1000)
    softmax: Literal["auto", "always", "never"] = "auto"
    min_score: float = Field(default=0.0, ge=0.0, le=1.0)


class YoloSpec(_Spec):
    """YOLO detection heads.

    ``layout='v8'``: one output (1, 4 + C, N) or (1, N, 4 + C), boxes cx, cy, w, h, class scores.
    ``layout='v5'``: one output (1, N, 5 + C): cx, cy, w, h, objectness, class scores.
    ``normalized`` says whether box coordinates are 0..1 of the model input (else pixels).
    """

    kind: Literal["yolo"] = "yolo"
    layout: Literal["v5", "v8"] = "v8"
    conf_threshold: float = Field(default=0.25, ge=0.0, le=1.0)
    iou_threshold: float = Field(default=0.45, ge=0.0, le=1.0)
    max_detections: int = Field(default=100, ge=1, le=10000)
    class_agnostic: bool = False
    normalized: bool = False


class SSDSpec(_Spec):
    """SSD-style post-processed outputs: boxes (1, N, 4), classes (1, N), scores (1, N), count (1,).

    ``boxes_index``/``classes_index``/``scores_index``/``count_index`` pick the outputs by
    position (``count_index=None`` when the model has no count output). ``box_order`` is the
    coordinate order; coordinates are normalized 0..1 of the model input unless
    ``normalized=False``. NMS is applied again (class-aware) unless ``apply_nms=False``.
    """

    kind: Literal["ssd"] = "ssd"
    boxes_index: int = Field(default=0, ge=0)
    classes_index: int = Field(default=1, ge=0)
    scores_index: int = Field(default=2, ge=0)
    count_index: int | None = Field(default=3, ge=0)
    box_order: Literal["yxyx", "xyxy"] = "yxyx"
    normalized: bool = True
    label_offset: int = 0
    conf_threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    iou_threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    max_detections: int = Field(default=100, ge=1, le=10000)
    apply_nms: bool = True


class RawSpec(_Spec):
    """Raw / regression outputs, with an optional anomaly threshold on a score.

    ``score`` chooses the anomaly score: ``first`` (output 0, element 0), ``max`` (max of output
    0) or ``l2`` (L2 norm of output 0). With ``anomaly_threshold`` set, results carry
    ``anomaly: score > threshold``.
    """

    kind: Literal["raw"] = "raw"
    score: Literal["first", "max", "l2"] = "first"
    anomaly_threshold: float | None = None
    max_values: int = Field(default=64, ge=0, le=100000)


DecoderSpec = Annotated[ClassificationSpec | YoloSpec | SSDSpec | RawSpec, Field(discriminator="kind")]
