"""Reconnecting live sources with exponential back-off and jitter."""

from __future__ import annotations

import logging
import math
import random
import threading
from collections.abc import Callable

from edge_runtime.errors import SourceDisconnectedError, SourceError
from edge_runtime.sources.base import Source
from edge_runtime.sources.specs import SourceSpec
from edge_runtime.types import Frame

__all__ = ["Backoff", "ReconnectingSource", "StateCallback"]

log = logging.getLogger(__name__)

#: ``on_state(state, reason)``: state is "online" or "offline"; reason is "" when online
StateCallback = Callable[[str, str], None]


class Backoff:
    """Exponential back-off delays with jitter, for reconnect attempts.

    Attempt *n* (from 0) has the base delay ``min(max_s, min_s * factor**n)``;
    :meth:`next_delay` returns a value drawn uniformly from ``[base * (1 - jitter), base]``.
    ``jitter=0`` is deterministic, ``jitter=1`` is "full jitter". Jitter spreads the
    reconnects of a fleet of devices after a shared outage (a Wi-Fi access point rebooting).
    """

    def __init__(
        self,
        min_s: float,
        max_s: float,
        *,
        factor: float = 2.0,
        jitter: float = 0.5,
        rng: random.Random | None = None,
    ) -> None:
        if min_s <= 0 or max_s < min_s:
            raise ValueError(f"need 0 < min_s <= max_s, got min_s={min_s}, max_s={max_s}")
        if factor < 1:
            raise ValueError(f"factor must be >= 1, got {factor}")
        if not 0 <= jitter <= 1:
            raise ValueError(f"jitter must be within [0, 1], got {jitter}")
        self.min_s = min_s
        self.max_s = max_s
        self.factor = factor
        self.jitter = jitter
        self.attempt = 0
        self._rng = rng if rng is not None else random.Random()

    def base_delay(self) -> float:
        """The un-jittered delay for the current attempt (capped at ``max_s``)."""
        if self.factor > 1 and self.attempt * math.log(self.factor) >= math.log(self.max_s / self.min_s):
            return self.max_s  # decided in log space: factor**attempt could overflow
        return min(self.max_s, self.min_s * self.factor**self.attempt)

    def next_delay(self) -> float:
        """The delay before the next attempt; each call moves one attempt further."""
        base = self.base_delay()
        self.attempt += 1
        if self.jitter == 0:
            return base
        return base * (1.0 - self.jitter * self._rng.random())

    def reset(self) -> None:
        """Start over at ``min_s`` (after a successful connection)."""
        self.attempt = 0


class ReconnectingSource:
    """Wraps a live source and keeps it connected.

    When opening fails or a read raises :class:`SourceDisconnectedError`, the source reports
    ``on_state("offline", reason)``, waits the back-off delay (interrupted at once by
    ``stop`` or :meth:`close`), reopens, and reports ``on_state("online", "")`` on success.
    ``offline`` is reported again only when the reason changes. :meth:`read` therefore
    blocks through outages and returns ``None`` only once stopped, or when the inner source
    reports a genuine end (stdin EOF). Other errors than disconnects propagate.
    :attr:`reconnects` counts successful reopens after a loss.
    """

    def __init__(
        self,
        inner: Source,
        spec: SourceSpec,
        on_state: StateCallback | None = None,
        *,
        stop: threading.Event | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        self.inner = inner
        self.spec = spec
        self.on_state = on_state
        self._own_stop = stop is None
        self.stop = stop if stop is not None else threading.Event()
        self.backoff = backoff or Backoff(spec.reconnect_min_s, spec.reconnect_max_s)
        self.reconnects = 0
        self.state = "closed"
        self.last_error = ""
        self._is_open = False
        self._ever_online = False

    @property
    def live(self) -> bool:
        """The inner source's ``live``."""
        return self.inner.live

    def open(self) -> None:
        """Try to open once; on failure report offline (read() keeps retrying).

        Source errors never propagate from here (a camera may be plugged in later); a missing
        dependency does.
        """
        if self._own_stop:
            self.stop.clear()
        self.backoff.reset()
        self._try_open()

    def read(self) -> Frame | None:
        """Next frame; blocks through disconnects; None once stopped or at a genuine end."""
        while not self.stop.is_set():
            if not self._is_open:
                delay = self.backoff.next_delay()
                log.debug("%r: reconnecting in %.2f s", self.inner, delay)
                if self.stop.wait(delay):
                    break
                if not self._try_open():
                    continue
            try:
                frame = self.inner.read()
            except SourceDisconnectedError as exc:
                self._lost(str(exc))
                continue
            if frame is None and not self.stop.is_set():
                log.info("%r: end of stream", self.inner)
            return None if self.stop.is_set() else frame
        return None

    def close(self) -> None:
        """Stop (sets ``stop``, ending any back-off wait) and close the inner source."""
        self.stop.set()
        self._is_open = False
        self.inner.close()
        self.state = "closed"

    # -- helpers --------------------------------------------------------------------------
    def _try_open(self) -> bool:
        try:
            self.inner.open()
        except SourceError as exc:
            self._set_offline(str(exc))
            return False
        if self.stop.is_set():  # closed while we were opening
            self.inner.close()
            return False
        self._is_open = True
        self.backoff.reset()
        if self._ever_online:
            self.reconnects += 1
            log.info("%r: back online (reconnect #%d)", self.inner, self.reconnects)
        self._ever_online = True
        self.last_error = ""
        self._report("online", "")
        return True

    def _lost(self, reason: str) -> None:
        log.warning("%r: lost: %s", self.inner, reason)
        self._is_open = False
        self.inner.close()
        self._set_offline(reason)

    def _set_offline(self, reason: str) -> None:
        if self.state == "offline" and reason == self.last_error:
            return
        if self.state != "offline":
            log.warning("%r: offline: %s", self.inner, reason)
        self.last_error = reason
        self._report("offline", reason)

    def _report(self, state: str, reason: str) -> None:
        self.state = state
        if self.on_state is None:
            return
        try:
            self.on_state(state, reason)
        except Exception:  # a broken status callback must not take the source down
            log.exception("source state callback failed")

    def __repr__(self) -> str:
        return f"ReconnectingSource({self.inner!r})"
