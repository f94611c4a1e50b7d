"""Image sources backed by ``cv2.VideoCapture``: cameras, network streams and video files.

All three share :class:`_CaptureSource`, which translates OpenCV's silent failures
(``isOpened() == False``, ``read() -> (False, None)``, ``cv2.error``) into
:class:`~edge_runtime.errors.SourceError` / :class:`~edge_runtime.errors.SourceDisconnectedError`.
Access to the capture is serialised by a lock so that :meth:`close` may be called from
another thread while :meth:`read` is in progress (OpenCV captures are not thread-safe).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from edge_runtime.errors import SourceDisconnectedError, SourceError
from edge_runtime.sources.base import redact_uri
from edge_runtime.sources.specs import SourceSpec
from edge_runtime.types import Frame

__all__ = ["CameraSource", "StreamSource", "VideoFileSource"]

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mjpeg", ".mjpg", ".ts")


class _CaptureSource:
    """Shared open/read/close logic around one ``cv2.VideoCapture``.

    Subclasses define :meth:`_create` (build the capture), :meth:`_open_error` (the message
    when it cannot be opened) and :meth:`_on_read_failure` (what a failed read means).
    """

    live: bool = False
    what: str = "capture"

    def __init__(self, spec: SourceSpec) -> None:
        self.spec = spec
        self._cap: Any = None
        self._lock = threading.Lock()
        self._closed = False
        self._index = 0

    # -- subclass hooks ---------------------------------------------------------------
    def _create(self) -> Any:
        raise NotImplementedError

    def _open_error(self, detail: str) -> str:
        raise NotImplementedError

    def _on_read_failure(self, detail: str) -> npt.NDArray[np.uint8] | None:
        """Called (lock held) when ``cap.read()`` fails: return a frame, None (end) or raise."""
        raise NotImplementedError

    def _source_ts(self) -> float | None:
        return None

    # -- Source protocol ----------------------------------------------------------------
    def open(self) -> None:
        """Open the capture; raise :class:`SourceError` naming the uri and the fix if it fails."""
        with self._lock:
            self._release_locked()
            self._closed = False
            try:
                cap = self._create()
            except cv2.error as exc:
                raise SourceError(self._open_error(f"OpenCV error: {exc}")) from exc
            if cap is None or not cap.isOpened():
                if cap is not None:
                    cap.release()
                raise SourceError(self._open_error("OpenCV could not open it"))
            self._cap = cap
        log.info("%s %s opened", self.what, redact_uri(self.spec.uri))

    def read(self) -> Frame | None:
        """Return the next image frame (BGR uint8); ``None`` at the end of a file or after close."""
        with self._lock:
            if self._closed:
                return None
            if self._cap is None:
                raise SourceError(f"{self.what} {redact_uri(self.spec.uri)} is not open; call open()")
            image = self._read_locked()
            if image is None:
                return None
            frame = Frame(
                data=image,
                index=self._index,
                t_capture=time.monotonic(),
                kind="image",
                source_ts=self._source_ts(),
            )
            self._index += 1
            return frame

    def close(self) -> None:
        """Release the capture; idempotent and safe from another thread."""
        self._closed = True
        with self._lock:
            self._release_locked()

    # -- helpers --------------------------------------------------------------------------
    def _read_locked(self) -> npt.NDArray[np.uint8] | None:
        try:
            ok, image = self._cap.read()
        except cv2.error as exc:
            return self._on_read_failure(f"OpenCV error: {exc}")
        if not ok or image is None:
            return self._on_read_failure("no frame returned")
        result: npt.NDArray[np.uint8] = image
        return result

    def _release_locked(self) -> None:
        cap, self._cap = self._cap, None
        if cap is not None:
            try:
                cap.release()
            except cv2.error as exc:  # pragma: no cover - release failing is exotic
                log.debug("releasing %s failed: %s", self.what, exc)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({redact_uri(self.spec.uri)!r})"


def _camera_target(uri: str) -> tuple[int | str, int]:
    """Map a camera uri ("0" or "/dev/video0") to a VideoCapture argument and backend."""
    text = uri.strip()
    if text.isdigit():
        return int(text), cv2.CAP_ANY
    if sys.platform.startswith("linux") and text.startswith("/dev/video"):
        return text, cv2.CAP_V4L2
    return text, cv2.CAP_ANY


class CameraSource(_CaptureSource):
    """A local camera by index (``"0"``) or device path (``/dev/video0``); live.

    ``width``/``height``/``fps`` from the spec are requested from the driver (which may pick
    the nearest mode it supports) and the internal buffer is set to one frame so that reads
    return the newest image. A failed read means the camera went away:
    :class:`SourceDisconnectedError`.
    """

    live = True
    what = "camera"

    def _create(self) -> Any:
        target, api = _camera_target(self.spec.uri)
        if isinstance(target, str) and target.startswith("/dev/") and not Path(target).exists():
            raise SourceError(self._open_error("the device does not exist (is the camera plugged in?)"))
        cap = cv2.VideoCapture(target, api)
        if cap.isOpened():
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
            if self.spec.width is not None:
                cap.set(cv2.CAP_PROP_FRAME_WIDTH, float(self.spec.width))
            if self.spec.height is not None:
                cap.set(cv2.CAP_PROP_FRAME_HEIGHT, float(self.spec.height))
            if self.spec.fps is not None:
                cap.set(cv2.CAP_PROP_FPS, float(self.spec.fps))
            log.debug(
                "camera %s mode: %dx%d @ %.1f fps",
                self.spec.uri,
                int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
                int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
                cap.get(cv2.CAP_PROP_FPS),
            )
        return cap

    def _open_error(self, detail: str) -> str:
        return (
            f"cannot open camera {self.spec.uri!r}: {detail}. Check that the camera is connected "
            "(ls /dev/video*), that no other program is using it, that this user may access it "
            "(member of the 'video' group), and that the index or /dev/videoN path is right"
        )

    def _on_read_failure(self, detail: str) -> npt.NDArray[np.uint8] | None:
        raise SourceDisconnectedError(
            f"camera {self.spec.uri!r} stopped delivering frames ({detail}); it was unplugged "
            "or the driver failed"
        )


class StreamSource(_CaptureSource):
    """A network stream (``rtsp://``, ``http(s)://`` MJPEG/HLS, ...) through FFmpeg; live.

    ``open_timeout_s`` bounds both connecting and each read, so a dead server is noticed.
    Credentials in the URL are never logged. For RTSP over lossy links, set the environment
    variable ``OPENCV_FFMPEG_CAPTURE_OPTIONS="rtsp_transport;tcp"`` before starting.
    """

    live = True
    what = "stream"

    def _create(self) -> Any:
        timeout_ms = int(self.spec.open_timeout_s * 1000)
        if cv2.videoio_registry.hasBackend(cv2.CAP_FFMPEG):
            params = [
                cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
                timeout_ms,
                cv2.CAP_PROP_READ_TIMEOUT_MSEC,
                timeout_ms,
            ]
            return cv2.VideoCapture(self.spec.uri, cv2.CAP_FFMPEG, params)
        return cv2.VideoCapture(self.spec.uri, cv2.CAP_ANY)

    def _open_error(self, detail: str) -> str:
        return (
            f"cannot open stream {redact_uri(self.spec.uri)}: {detail} within "
            f"{self.spec.open_timeout_s:g} s. Check the URL (scheme, host, port, path), that the "
            "server is reachable from this device and that the credentials are right; for RTSP "
            "try OPENCV_FFMPEG_CAPTURE_OPTIONS='rtsp_transport;tcp'"
        )

    def _on_read_failure(self, detail: str) -> npt.NDArray[np.uint8] | None:
        raise SourceDisconnectedError(
            f"stream {redact_uri(self.spec.uri)} stopped delivering frames ({detail}); the "
            "server closed the connection or the network is down"
        )


class VideoFileSource(_CaptureSource):
    """A video file; every frame is returned in order (not live).

    ``source_ts`` is the frame's position in the file in milliseconds. With ``loop=True`` the
    file restarts at its end (``index`` keeps counting, ``source_ts`` restarts at 0). A frame
    that cannot be decoded mid-file ends the stream, like the end of the file.
    """

    live = False
    what = "video file"

    def __init__(self, spec: SourceSpec) -> None:
        super().__init__(spec)
        self._pending: npt.NDArray[np.uint8] | None = None
        self._pending_ts: float | None = None
        self._ts: float | None = None
        self.loops = 0

    def _create(self) -> Any:
        path = Path(self.spec.uri)
        if not path.exists():
            raise SourceError(
                f"video file {self.spec.uri!r} does not exist; check the path (relative paths "
                f"are resolved against {Path.cwd()})"
            )
        if not path.is_file():
            raise SourceError(
                f"video file {self.spec.uri!r} is not a file; for a folder of images use "
                f"kind 'images' (--source images:{self.spec.uri})"
            )
        return cv2.VideoCapture(str(path), cv2.CAP_ANY)

    def _open_error(self, detail: str) -> str:
        return (
            f"cannot decode video file {self.spec.uri!r}: {detail}. The file is corrupt, "
            "truncated or uses a codec this OpenCV build lacks; re-encode it, e.g. "
            f"ffmpeg -i {self.spec.uri} -c:v libx264 -pix_fmt yuv420p out.mp4"
        )

    def open(self) -> None:
        """Open the file and decode its first frame, so an undecodable file fails here."""
        super().open()
        with self._lock:
            first = self._grab_locked()
            if first is None:
                self._release_locked()
                raise SourceError(self._open_error("it has no decodable frame"))
            self._pending, self._pending_ts = first, self._ts

    def _grab_locked(self) -> npt.NDArray[np.uint8] | None:
        try:
            ok, image = self._cap.read()
        except cv2.error as exc:
            log.warning("video file %s: decode error: %s", self.spec.uri, exc)
            return None
        if not ok or image is None:
            return None
        self._ts = float(self._cap.get(cv2.CAP_PROP_POS_MSEC))
        result: npt.NDArray[np.uint8] = image
        return result

    def _read_locked(self) -> npt.NDArray[np.uint8] | None:
        if self._pending is not None:
            first, self._pending = self._pending, None
            self._ts = self._pending_ts
            return first
        image = self._grab_locked()
        if image is not None:
            return image
        if not self.spec.loop:
            log.info("video file %s: end after %d frames", self.spec.uri, self._index)
            return None
        # Reopen rather than seek: seeking is unreliable for some containers and codecs.
        self._release_locked()
        try:
            self._cap = self._create()
        except (SourceError, cv2.error) as exc:
            log.warning("video file %s: could not restart for looping: %s", self.spec.uri, exc)
            return None
        image = self._grab_locked() if self._cap.isOpened() else None
        if image is None:
            log.warning("video file %s: could not restart for looping; ending", self.spec.uri)
            return None
        self.loops += 1
        return image

    def _on_read_failure(self, detail: str) -> npt.NDArray[np.uint8] | None:  # pragma: no cover
        return None

    def _source_ts(self) -> float | None:
        return self._ts

    def close(self) -> None:
        """Release the file; idempotent."""
        super().close()
        self._pending = None
