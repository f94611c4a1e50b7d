"""Source settings (``[source]`` in the daemon config, or ``--source URI`` on the CLI)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["SourceKind", "SourceSpec", "WindowSpec"]

SourceKind = Literal["camera", "stream", "video", "images", "serial", "replay", "stdin"]


class SourceSpec(BaseModel):
    """Where frames or sensor samples come from.

    ``uri`` means, per kind: camera - an index ("0") or a ``/dev/video*`` path; stream - an
    rtsp/http(s) URL; video - a file; images - a folder; serial - a device path such as
    ``/dev/ttyUSB0``; replay - a ``.csv``/``.jsonl`` file; stdin - ignored.
    """

    model_config = ConfigDict(extra="forbid")

    kind: SourceKind
    uri: str = ""
    loop: bool = False
    # camera / stream
    width: int | None = Field(default=None, ge=1)
    height: int | None = Field(default=None, ge=1)
    fps: float | None = Field(default=None, gt=0)
    # serial / replay / stdin sensor lines
    format: Literal["csv", "json"] = "csv"
    columns: list[str] | None = None
    baudrate: int = Field(default=115200, ge=50)
    rate_hz: float | None = Field(default=None, gt=0, description="replay rate; None = as fast as consumed")
    # reconnect of live sources
    reconnect_min_s: float = Field(default=0.5, gt=0)
    reconnect_max_s: float = Field(default=30.0, gt=0)
    open_timeout_s: float = Field(default=10.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> SourceSpec:
        if self.kind != "stdin" and not self.uri:
            raise ValueError(f"source kind {self.kind!r} needs 'uri' (see docs/sources)")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        return self

    @property
    def live(self) -> bool:
        """Live sources keep only the latest frame; file sources apply back-pressure."""
        return self.kind in ("camera", "stream", "serial", "stdin")


class WindowSpec(BaseModel):
    """Turns a stream of sensor samples into model-sized windows of ``size`` samples every ``hop``."""

    model_config = ConfigDict(extra="forbid")

    size: int = Field(ge=1)
    hop: int | None = Field(default=None, ge=1, description="default: size (no overlap)")
