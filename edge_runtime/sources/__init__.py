"""Input sources: cameras, streams, video files, image folders and sensor line feeds.

:func:`make_source` builds the source for a :class:`SourceSpec`; :func:`parse_source_uri`
turns the CLI's ``--source`` text into one. Wrapping live sources in
:class:`ReconnectingSource` is the pipeline's job.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from pydantic import ValidationError

from edge_runtime.errors import SourceError
from edge_runtime.sources.base import Source, redact_uri
from edge_runtime.sources.images import IMAGE_EXTENSIONS, ImageFolderSource
from edge_runtime.sources.opencv import CameraSource, StreamSource, VideoFileSource
from edge_runtime.sources.reconnect import Backoff, ReconnectingSource, StateCallback
from edge_runtime.sources.sensors import (
    LineParser,
    ReplaySource,
    SerialSource,
    StdinSource,
    parse_line,
)
from edge_runtime.sources.specs import SourceKind, SourceSpec, WindowSpec
from edge_runtime.sources.window import Windower

__all__ = [
    "SOURCES",
    "SOURCE_URI_FORMS",
    "Backoff",
    "CameraSource",
    "IMAGE_EXTENSIONS",
    "ImageFolderSource",
    "LineParser",
    "ReconnectingSource",
    "ReplaySource",
    "SerialSource",
    "Source",
    "SourceKind",
    "SourceSpec",
    "StateCallback",
    "StdinSource",
    "StreamSource",
    "VideoFileSource",
    "WindowSpec",
    "Windower",
    "make_source",
    "parse_line",
    "parse_source_uri",
    "redact_uri",
]

SOURCES: dict[str, type] = {
    "camera": CameraSource,
    "stream": StreamSource,
    "video": VideoFileSource,
    "images": ImageFolderSource,
    "serial": SerialSource,
    "replay": ReplaySource,
    "stdin": StdinSource,
}


def make_source(spec: SourceSpec) -> Source:
    """Construct (not open) the source for ``spec``."""
    try:
        cls = SOURCES[spec.kind]
    except KeyError:  # pragma: no cover - SourceSpec only allows known kinds
        raise SourceError(f"unknown source kind {spec.kind!r}; known: {sorted(SOURCES)}") from None
    source: Source = cls(spec)
    return source


SOURCE_URI_FORMS = """\
accepted --source forms:
  camera:0 | 0 | /dev/video0                 local camera (index or device path)
  camera:0?width=640&height=480&fps=30       ... with a requested mode
  rtsp://host/path | http(s)://host/path     network stream
  video:PATH | PATH.mp4/.avi/.mkv/.mov/.webm video file (add ?loop=1 to repeat)
  images:DIR | DIR                           folder of images (?loop=1)
  serial:/dev/ttyUSB0?baud=9600&format=json  serial port (also bare /dev/tty*, COM3)
  replay:PATH?rate=100&loop=1 | PATH.csv/.jsonl   recorded sensor lines
  stdin:csv | stdin:json | -                 sensor lines on standard input
options (after '?', joined by '&'): loop, width, height, fps, baud, format, columns (a,b,c),
rate"""

_VIDEO_EXT = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v")
_REPLAY_EXT = {".csv": "csv", ".jsonl": "json", ".ndjson": "json"}
_STREAM_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://")
_KINDS: dict[str, SourceKind] = {
    "camera": "camera",
    "stream": "stream",
    "video": "video",
    "images": "images",
    "serial": "serial",
    "replay": "replay",
    "stdin": "stdin",
}
_OPTION_NAMES = {
    "loop": "loop",
    "width": "width",
    "height": "height",
    "fps": "fps",
    "baud": "baudrate",
    "baudrate": "baudrate",
    "format": "format",
    "fmt": "format",
    "columns": "columns",
    "rate": "rate_hz",
    "rate_hz": "rate_hz",
}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _fail(text: str, why: str) -> SourceError:
    return SourceError(f"cannot understand --source {redact_uri(text)!r}: {why}\n{SOURCE_URI_FORMS}")


def _options(text: str, query: str) -> dict[str, Any]:
    """Parse ``a=1&b=2`` into SourceSpec fields."""
    out: dict[str, Any] = {}
    for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=False):
        field = _OPTION_NAMES.get(key.lower())
        if field is None:
            raise _fail(text, f"unknown option {key!r}")
        if field == "loop":
            flag = value.lower()
            if flag not in _TRUE | _FALSE and flag != "":
                raise _fail(text, f"loop must be 1 or 0, got {value!r}")
            out[field] = flag in _TRUE or flag == ""
        elif field == "columns":
            out[field] = [c.strip() for c in value.split(",") if c.strip()]
        else:
            out[field] = value
    return out


def _guess_bare(text: str) -> tuple[SourceKind, str, dict[str, Any]]:
    """Kind of a string without ``kind:`` prefix: digits, device paths, URLs, file paths."""
    if text.isdigit():
        return "camera", text, {}
    if text == "-" or text.lower() == "stdin":
        return "stdin", "", {}
    low = text.lower()
    if low.startswith(_STREAM_SCHEMES):
        return "stream", text, {}
    path_part, _, query = text.partition("?")
    opts = _options(text, query) if query else {}
    lower_path = path_part.lower()
    if path_part.startswith("/dev/video"):
        return "camera", path_part, opts
    if path_part.startswith(("/dev/tty", "/dev/serial/", "/dev/rfcomm")) or re.fullmatch(
        r"COM\d+", path_part, re.IGNORECASE
    ):
        return "serial", path_part, opts
    if lower_path.endswith(_VIDEO_EXT):
        return "video", path_part, opts
    suffix = Path(lower_path).suffix
    if suffix in _REPLAY_EXT:
        opts.setdefault("format", _REPLAY_EXT[suffix])
        return "replay", path_part, opts
    if Path(path_part).is_dir():
        return "images", path_part, opts
    if not Path(path_part).exists():
        raise _fail(text, "no such file or folder, and no 'kind:' prefix to say what it is")
    raise _fail(text, "cannot tell the source kind from the file name; add a 'kind:' prefix")


def parse_source_uri(text: str) -> SourceSpec:
    """Turn the CLI's ``--source`` text into a :class:`SourceSpec`.

    See :data:`SOURCE_URI_FORMS` for the accepted forms. Raises :class:`SourceError` listing
    them when the text fits none.
    """
    text = text.strip()
    if not text:
        raise _fail(text, "it is empty")
    kind: SourceKind
    prefix, sep, rest = text.partition(":")
    if sep and prefix.lower() in _KINDS and not rest.startswith("//"):
        kind = _KINDS[prefix.lower()]
        if kind == "stream":
            uri, opts = rest, {}
        else:
            uri, _, query = rest.partition("?")
            opts = _options(text, query) if query else {}
        if kind == "stdin":
            if uri and uri.lower() not in ("csv", "json"):
                raise _fail(text, f"stdin takes csv or json, not {uri!r}")
            if uri:
                opts.setdefault("format", uri.lower())
            uri = ""
        elif kind == "replay":
            suffix = Path(uri.lower()).suffix
            if suffix in _REPLAY_EXT:
                opts.setdefault("format", _REPLAY_EXT[suffix])
        if kind != "stdin" and not uri:
            raise _fail(text, f"{kind}: needs a {'path' if kind != 'camera' else 'camera index'}")
    else:
        kind, uri, opts = _guess_bare(text)
    try:
        return SourceSpec(kind=kind, uri=uri, **opts)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'source'}: {err['msg']}" for err in exc.errors()
        )
        raise _fail(text, problems) from None
