"""A folder of still images, read in natural sort order (``img2.png`` before ``img10.png``)."""

from __future__ import annotations

import logging
import re
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from edge_runtime.errors import SourceError
from edge_runtime.sources.specs import SourceSpec
from edge_runtime.types import Frame

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderSource", "read_image"]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm", ".pnm"}
)

_DIGITS = re.compile(r"(\d+)")


def _natural_key(path: Path) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders embedded numbers numerically: ``frame2`` < ``frame10``."""
    parts = _DIGITS.split(path.name)
    return tuple((0, int(p)) if p.isdigit() else (1, p.lower()) for p in parts)


def read_image(path: Path) -> npt.NDArray[np.uint8] | None:
    """Decode one image as 3-channel BGR uint8; None if unreadable (works with any path text)."""
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError:
        return None
    if raw.size == 0:
        return None
    try:
        image = cv2.imdecode(raw, cv2.IMREAD_COLOR)
    except cv2.error:
        return None
    if image is None:
        return None
    return np.asarray(image, dtype=np.uint8)


class ImageFolderSource:
    """Every image file in a folder (not recursive), in natural sort order; not live.

    Files whose extension is not an image extension are ignored. A file that cannot be
    decoded is skipped with a warning and counted in :attr:`skipped`. ``loop=True`` starts
    over after the last file. :attr:`current_path` is the file of the frame last returned.
    """

    live = False

    def __init__(self, spec: SourceSpec) -> None:
        self.spec = spec
        self.files: list[Path] = []
        self.skipped = 0
        self.current_path: Path | None = None
        self._pos = 0
        self._index = 0
        self._good_in_pass = 0
        self._lock = threading.Lock()
        self._closed = True

    def open(self) -> None:
        """List the folder; raise :class:`SourceError` if it is missing or holds no images."""
        folder = Path(self.spec.uri)
        if not folder.is_dir():
            what = "is not a folder" if folder.exists() else "does not exist"
            raise SourceError(
                f"image folder {self.spec.uri!r} {what}; give a directory holding "
                f"{', '.join(sorted(IMAGE_EXTENSIONS))} files (for a video use kind 'video')"
            )
        try:
            files = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
        except OSError as exc:
            raise SourceError(
                f"cannot list image folder {self.spec.uri!r}: {exc}; check its permissions"
            ) from exc
        if not files:
            raise SourceError(
                f"image folder {self.spec.uri!r} holds no image files; expected files ending "
                f"in {', '.join(sorted(IMAGE_EXTENSIONS))}"
            )
        with self._lock:
            self.files = sorted(files, key=_natural_key)
            self._pos = 0
            self._good_in_pass = 0
            self._closed = False
        log.info("image folder %s: %d images", self.spec.uri, len(self.files))

    def read(self) -> Frame | None:
        """Return the next decodable image; ``None`` after the last one (unless looping)."""
        with self._lock:
            while not self._closed:
                if self._pos >= len(self.files):
                    if self._good_in_pass == 0:
                        raise SourceError(
                            f"image folder {self.spec.uri!r}: none of its {len(self.files)} "
                            "image files could be decoded; check that they are valid images"
                        )
                    if not self.spec.loop:
                        return None
                    self._pos = 0
                    self._good_in_pass = 0
                path = self.files[self._pos]
                self._pos += 1
                image = read_image(path)
                if image is None:
                    self.skipped += 1
                    log.warning(
                        "image folder %s: skipping unreadable image %s (%d skipped so far)",
                        self.spec.uri,
                        path.name,
                        self.skipped,
                    )
                    continue
                self._good_in_pass += 1
                self.current_path = path
                frame = Frame(data=image, index=self._index, t_capture=time.monotonic())
                self._index += 1
                return frame
            return None

    def close(self) -> None:
        """Stop reading; idempotent."""
        self._closed = True

    def __repr__(self) -> str:
        return f"ImageFolderSource({self.spec.uri!r})"
