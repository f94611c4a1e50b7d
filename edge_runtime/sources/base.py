"""The :class:`Source` protocol every input kind implements, plus small shared helpers."""

from __future__ import annotations

import re
from typing import Protocol, runtime_checkable

from edge_runtime.types import Frame

__all__ = ["Source", "redact_uri"]


@runtime_checkable
class Source(Protocol):
    """One input of the daemon: a camera, stream, video file, image folder or sensor line feed.

    ``live`` sources (camera, stream, serial, stdin) produce data whether or not anyone reads
    it; the pipeline keeps only the latest frame. File sources (video, images, replay) wait
    for the consumer (back-pressure) and end.

    * :meth:`open` raises :class:`~edge_runtime.errors.SourceError` with a message that says
      what failed, for which uri, and how to fix it.
    * :meth:`read` returns the next :class:`~edge_runtime.types.Frame`, or ``None`` at the
      end of the stream (files, stdin EOF, or after :meth:`close`). A live source that is lost
      raises :class:`~edge_runtime.errors.SourceDisconnectedError`.
    * :meth:`close` is idempotent and may be called from another thread than :meth:`read`.
    """

    @property
    def live(self) -> bool:
        """True for live sources (latest frame wins), False for files (back-pressure)."""
        ...

    def open(self) -> None:
        """Acquire the underlying device, stream or file."""
        ...

    def read(self) -> Frame | None:
        """Return the next frame, or ``None`` at the end of the stream."""
        ...

    def close(self) -> None:
        """Release everything; safe to call more than once."""
        ...


_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")


def redact_uri(uri: str) -> str:
    """Hide ``user:password@`` in URLs so that error messages and logs never show credentials."""
    return _CREDENTIALS.sub(r"\g<scheme>***@", uri)
