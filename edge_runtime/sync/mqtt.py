"""One MQTT connection on paho-mqtt with its own network thread.

TLS or mutual TLS, username/password, a retained last will, TCP_NODELAY, and reconnects with
exponential back-off and jitter (paho's own reconnect has no jitter: a fleet that lost its
broker would reconnect in lock-step). Callbacks run on the network thread; keep them short.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from edge_runtime.errors import BrokerError, MissingDependencyError
from edge_runtime.sources.reconnect import Backoff

__all__ = ["LinkSettings", "MqttLink", "import_paho"]

log = logging.getLogger(__name__)


def import_paho() -> Any:
    """The ``paho.mqtt.client`` module, or an error naming the extra to install."""
    try:
        import paho.mqtt.client as mqtt
    except ImportError as exc:
        raise MissingDependencyError("paho-mqtt", "mqtt", "fleet sync over MQTT") from exc
    return mqtt


class _ClosingSSLSocket(ssl.SSLSocket):
    """An SSL socket that closes itself when its handshake fails.

    paho wraps and handshakes the socket inside ``connect()`` and, when the handshake fails
    (a plain listener, a foreign CA, a reset), drops it without closing it: every retry then
    left an open socket to the garbage collector (a ResourceWarning each time).
    """

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except BaseException:
            self.close()
            raise


@dataclass(frozen=True)
class LinkSettings:
    """Where and how to connect."""

    host: str
    port: int
    client_id: str
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    tls: bool = True
    username: str | None = None
    password: str | None = None
    keepalive_s: int = 30
    protocol: Literal["5", "3.1.1"] = "5"
    will_topic: str | None = None
    will_payload: bytes = b""
    backoff_min_s: float = 0.5
    backoff_max_s: float = 30.0
    max_inflight: int = 64


class MqttLink:
    """A resilient MQTT client: ``start()``, ``publish()``, ``subscribe()``, ``stop()``."""

    def __init__(
        self,
        settings: LinkSettings,
        *,
        on_message: Callable[[str, bytes, bool], None],
        on_connect: Callable[[], None] | None = None,
        on_disconnect: Callable[[str], None] | None = None,
        on_publish: Callable[[int, int], None] | None = None,
        name: str = "mqtt",
    ) -> None:
        mqtt = import_paho()
        self._mqtt = mqtt
        self.settings = settings
        self.name = name
        self._on_message_cb = on_message
        self._on_connect_cb = on_connect
        self._on_disconnect_cb = on_disconnect
        self._on_publish_cb = on_publish
        v5 = settings.protocol == "5"
        self._client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=settings.client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else True,
        )
        self._client.max_inflight_messages_set(settings.max_inflight)
        self._client.max_queued_messages_set(0)
        if settings.tls:
            self._configure_tls()
        if settings.username is not None:
            self._client.username_pw_set(settings.username, settings.password)
        if settings.will_topic:
            self._client.will_set(settings.will_topic, settings.will_payload, qos=1, retain=True)
        self._client.on_connect = self._handle_connect
        self._client.on_disconnect = self._handle_disconnect
        self._client.on_message = self._handle_message
        self._client.on_publish = self._handle_publish
        self._client.on_socket_open = self._handle_socket_open
        # Packets queued by other threads must be written by the network thread only: paho
        # writes to the socket from the caller's thread unless it runs its own loop thread or
        # an external loop registered for writes (concurrent TLS writes corrupt the stream).
        self._client.on_socket_register_write = self._handle_register_write
        self._connected = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error = ""
        self.connects = 0

    # -- setup -----------------------------------------------------------------------------
    def _configure_tls(self) -> None:
        s = self.settings
        for what, path in (("ca_file", s.ca_file), ("cert_file", s.cert_file), ("key_file", s.key_file)):
            if path is not None and not Path(path).is_file():
                raise BrokerError(f"[sync] {what} {path} does not exist; point it at the PEM file")
        if (s.cert_file is None) != (s.key_file is None):
            raise BrokerError("[sync] give both cert_file and key_file for mutual TLS, or neither")
        try:
            ctx = ssl.create_default_context(
                ssl.Purpose.SERVER_AUTH, cafile=str(s.ca_file) if s.ca_file else None
            )
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.sslsocket_class = _ClosingSSLSocket
            if s.cert_file is not None and s.key_file is not None:
                ctx.load_cert_chain(str(s.cert_file), str(s.key_file))
        except (ssl.SSLError, OSError) as exc:
            raise BrokerError(
                f"cannot load the TLS files of [sync]: {exc}; check the PEM files and key"
            ) from exc
        self._client.tls_set_context(ctx)

    # -- callbacks (network thread) ----------------------------------------------------------
    def _handle_socket_open(self, _client: Any, _userdata: Any, sock: Any) -> None:
        with contextlib.suppress(OSError, AttributeError):  # not a TCP socket
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _handle_register_write(self, _client: Any, _userdata: Any, _sock: Any) -> None:
        """Nothing to do: the network thread's ``loop()`` selects for writes when data is queued."""

    def _handle_connect(self, _c: Any, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if getattr(reason, "is_failure", False):
            self.last_error = f"broker refused the connection: {reason}"
            log.error("%s: %s", self.name, self.last_error)
            return
        self.connects += 1
        self._connected.set()
        log.info("%s: connected to %s:%d", self.name, self.settings.host, self.settings.port)
        if self._on_connect_cb is not None:
            try:
                self._on_connect_cb()
            except Exception:
                log.exception("%s: on_connect handler failed", self.name)

    def _handle_disconnect(self, _c: Any, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if was:
            log.warning("%s: disconnected (%s)", self.name, reason)
            if self._on_disconnect_cb is not None:
                self._on_disconnect_cb(str(reason))

    def _handle_message(self, _c: Any, _u: Any, msg: Any) -> None:
        try:
            self._on_message_cb(msg.topic, bytes(msg.payload), bool(msg.retain))
        except Exception:
            log.exception("%s: message handler failed for %s", self.name, msg.topic)

    def _handle_publish(self, _c: Any, _u: Any, mid: int, reason: Any, _props: Any) -> None:
        if self._on_publish_cb is not None:
            self._on_publish_cb(mid, int(getattr(reason, "value", 0) or 0))

    # -- network thread ---------------------------------------------------------------------
    def _run(self) -> None:
        mqtt = self._mqtt
        backoff = Backoff(self.settings.backoff_min_s, self.settings.backoff_max_s, jitter=0.5)
        s = self.settings
        while not self._stop.is_set():
            try:
                if s.protocol == "5":
                    self._client.connect(s.host, s.port, s.keepalive_s, clean_start=True)
                else:
                    self._client.connect(s.host, s.port, s.keepalive_s)
            except (OSError, ssl.SSLError, ValueError) as exc:
                self.last_error = f"cannot connect to {s.host}:{s.port}: {exc}"
                delay = backoff.next_delay()
                log.warning("%s: %s; retrying in %.1f s", self.name, self.last_error, delay)
                self._stop.wait(delay)
                continue
            while not self._stop.is_set():
                rc = self._client.loop(timeout=0.2)
                if rc != mqtt.MQTT_ERR_SUCCESS:
                    break
                if self._connected.is_set():
                    backoff.reset()
            self._connected.clear()
            if self._stop.is_set():
                break
            delay = backoff.next_delay()
            self._stop.wait(delay)
        try:
            self._client.disconnect()
            self._client.loop(timeout=0.2)
        except (OSError, ValueError):  # pragma: no cover - socket already gone
            pass

    # -- public API ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start the network thread (connects, and reconnects until :meth:`stop`)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"{self.name}-net", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly (the broker then does NOT send the last will) and stop the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def abort(self) -> None:
        """Drop the connection without DISCONNECT (the broker sends the will), for tests."""
        sock = self._client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> Any:
        """Queue a publish; returns paho's ``MQTTMessageInfo`` (``is_published()`` turns true on
        PUBACK for QoS 1), or None when not connected."""
        if not self._connected.is_set():
            return None
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != self._mqtt.MQTT_ERR_SUCCESS:
            return None
        return info

    def subscribe(self, topics: Sequence[str], qos: int = 1) -> bool:
        if not topics or not self._connected.is_set():
            return False
        rc, _mid = self._client.subscribe([(t, qos) for t in topics])
        return bool(rc == self._mqtt.MQTT_ERR_SUCCESS)

    def unsubscribe(self, topics: Sequence[str]) -> None:
        if topics and self._connected.is_set():
            self._client.unsubscribe(list(topics))
