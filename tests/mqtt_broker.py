"""A real mosquitto broker for tests: fleet CA and certificates, generated config and ACL, mutual TLS.

``Broker(directory, fleet=..., devices={"dev1": ["cams"]}, operators=["fleet-admin"])`` writes into
``directory``::

    pki/                 ca.crt/ca.key, server.crt/server.key, <name>.crt/<name>.key per client
    acl, mosquitto.conf  rendered by edge_runtime.sync.broker_config
    db/                  mosquitto's persistence database (kept across stop()/start())
    mosquitto.log        everything mosquitto logs (log_type all), for debugging a failing test

``start()`` runs ``mosquitto -c mosquitto.conf`` on a free 127.0.0.1 port and returns once it
completes a TLS handshake with an operator certificate. ``client(name)`` returns a connected
:class:`BrokerClient` (a paho ``mqtt.Client``, MQTT v5, mutual TLS, loop started) that records
PUBACK/SUBACK reason codes and received messages. ``close()`` (also ``with Broker(...)``, and the
``broker`` fixture in conftest.py, on failure too) disconnects every client and terminates
mosquitto; a finalizer kills it if the Broker object is dropped without ``close()``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_runtime.errors import BrokerError
from edge_runtime.sync import broker_config, pki

__all__ = [
    "Broker",
    "BrokerClient",
    "connect_client",
    "find_mosquitto",
    "free_port",
    "spawn_mosquitto",
    "wait_tls_ready",
]

HOST = "127.0.0.1"
_START_TIMEOUT = 10.0


def find_mosquitto() -> str:
    """The mosquitto executable: on PATH or in the usual sbin directories (Debian: /usr/sbin)."""
    found = shutil.which("mosquitto")
    for candidate in (found, "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise BrokerError("mosquitto is not installed: run scripts/ensure-mosquitto.sh (make test does)")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (the caller retries if it is taken meanwhile)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    """Stop mosquitto: SIGTERM (it saves its database), SIGKILL if it does not exit."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def spawn_mosquitto(conf: Path, log_path: Path, mosquitto: str | None = None) -> subprocess.Popen[bytes]:
    """Start ``mosquitto -c conf`` with stdout and stderr appended to ``log_path``."""
    with log_path.open("ab") as log_file:
        return subprocess.Popen(
            [mosquitto or find_mosquitto(), "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )


def wait_tls_ready(
    proc: subprocess.Popen[bytes],
    port: int,
    ca: Path,
    cert: tuple[Path, Path],
    log_path: Path,
    timeout: float = _START_TIMEOUT,
) -> None:
    """Return once mosquitto completes a mutual-TLS handshake on ``port``; raise if it exits or times out."""
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(str(cert[0]), str(cert[1]))
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            log = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""
            raise BrokerError(f"mosquitto exited (code {proc.returncode}); its log:\n{log}")
        try:
            with (
                socket.create_connection((HOST, port), timeout=2) as raw,
                context.wrap_socket(raw, server_hostname="localhost") as tls,
            ):
                tls.do_handshake()
        except OSError as exc:
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"mosquitto did not accept TLS on port {port} within {timeout} s: {exc}"
                ) from exc
            time.sleep(0.02)
        else:
            return


class BrokerClient(mqtt.Client):
    """A paho MQTT v5 client that records acks and messages so tests can wait for them."""

    def __init__(self, client_id: str) -> None:
        super().__init__(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        self._cond = threading.Condition()
        self.received: list[mqtt.MQTTMessage] = []
        self.connacks: list[ReasonCode] = []
        self.disconnects: list[ReasonCode] = []
        self._pubacks: dict[int, ReasonCode] = {}
        self._subacks: dict[int, list[ReasonCode]] = {}
        self.on_connect = self._record_connect
        self.on_disconnect = self._record_disconnect
        self.on_publish = self._record_publish
        self.on_subscribe = self._record_subscribe
        self.on_message = self._record_message

    def _notify(self, update: Callable[[], None]) -> None:
        with self._cond:
            update()
            self._cond.notify_all()

    def _record_connect(self, _c: Any, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        self._notify(lambda: self.connacks.append(rc))

    def _record_disconnect(self, _c: Any, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        self._notify(lambda: self.disconnects.append(rc))

    def _record_publish(self, _c: Any, _u: Any, mid: int, rc: ReasonCode, _p: Any) -> None:
        self._notify(lambda: self._pubacks.__setitem__(mid, rc))

    def _record_subscribe(self, _c: Any, _u: Any, mid: int, rcs: list[ReasonCode], _p: Any) -> None:
        self._notify(lambda: self._subacks.__setitem__(mid, list(rcs)))

    def _record_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        self._notify(lambda: self.received.append(msg))

    def _wait(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        with self._cond:
            if not self._cond.wait_for(ready, timeout=timeout):
                raise AssertionError(f"{self._client_id!r}: timed out after {timeout} s waiting for {what}")

    def wait_connack(self, timeout: float = 10.0) -> ReasonCode:
        """The reason code of the first CONNACK, or of the disconnect if the connection failed first."""
        self._wait(lambda: bool(self.connacks or self.disconnects), timeout, "CONNACK or disconnect")
        with self._cond:
            return self.connacks[0] if self.connacks else self.disconnects[0]

    def publish_wait(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, timeout: float = 10.0
    ) -> ReasonCode:
        """Publish with QoS 1 or 2 and return the broker's PUBACK/PUBREC reason code."""
        if qos not in (1, 2):
            raise ValueError("publish_wait needs QoS 1 or 2: QoS 0 has no acknowledgement")
        info = self.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise AssertionError(f"publish to {topic!r} could not be sent: {mqtt.error_string(info.rc)}")
        self._wait(lambda: info.mid in self._pubacks, timeout, f"the PUBACK for {topic!r}")
        with self._cond:
            return self._pubacks[info.mid]

    def subscribe_wait(self, topic: str, *, qos: int = 1, timeout: float = 10.0) -> ReasonCode:
        """Subscribe to one filter and return the SUBACK reason code (granted QoS or an error)."""
        rc, mid = self.subscribe(topic, qos=qos)
        if rc != mqtt.MQTT_ERR_SUCCESS or mid is None:
            raise AssertionError(f"subscribe to {topic!r} could not be sent: {mqtt.error_string(rc)}")
        self._wait(lambda: mid in self._subacks, timeout, f"the SUBACK for {topic!r}")
        with self._cond:
            return self._subacks[mid][0]

    def messages(self, topic_filter: str = "#") -> list[mqtt.MQTTMessage]:
        """The messages received so far whose topic matches ``topic_filter``."""
        with self._cond:
            return [m for m in self.received if mqtt.topic_matches_sub(topic_filter, m.topic)]

    def wait_message(self, topic: str, payload: bytes, timeout: float = 10.0) -> mqtt.MQTTMessage:
        """Wait for a message with exactly this topic and payload (use it as an ordering barrier)."""

        def found() -> bool:
            return any(m.topic == topic and m.payload == payload for m in self.received)

        self._wait(found, timeout, f"{payload!r} on {topic!r} (got {self.topics()})")
        return next(m for m in self.messages(topic) if m.payload == payload)

    def wait_count(self, topic_filter: str, count: int, timeout: float = 10.0) -> list[mqtt.MQTTMessage]:
        """Wait until at least ``count`` messages matching ``topic_filter`` arrived; return them."""
        self._wait(lambda: len(self.messages(topic_filter)) >= count, timeout, f"{count} on {topic_filter!r}")
        return self.messages(topic_filter)

    def topics(self) -> list[str]:
        """Topics of every message received so far, in arrival order."""
        with self._cond:
            return [m.topic for m in self.received]

    def close(self) -> None:
        """Disconnect (if connected) and stop the network loop."""
        if self.is_connected():
            self.disconnect()
        self.loop_stop()


def connect_client(
    client: BrokerClient,
    port: int,
    ca: Path,
    cert: tuple[Path, Path] | None,
    *,
    will: tuple[str, bytes] | None = None,
    clean_start: bool = True,
    properties: Properties | None = None,
    wait: bool = True,
) -> BrokerClient:
    """Connect ``client`` over TLS (client certificate ``cert``, or none) to 127.0.0.1:``port``.

    Starts the network loop. With ``wait``, returns once the CONNACK is a success and raises
    :class:`BrokerError` otherwise.
    """
    if cert is None:
        client.tls_set(ca_certs=str(ca))
    else:
        client.tls_set(ca_certs=str(ca), certfile=str(cert[0]), keyfile=str(cert[1]))
    if will is not None:
        client.will_set(will[0], will[1], qos=1, retain=True)
    client.connect(HOST, port, keepalive=30, clean_start=clean_start, properties=properties)
    client.loop_start()
    if wait:
        rc = client.wait_connack()
        if rc.is_failure or not client.connacks:
            client.close()
            raise BrokerError(f"{client._client_id!r} could not connect to port {port}: {rc}")
    return client


class Broker:
    """One real mosquitto process with a generated fleet PKI, config and ACL (see the module doc)."""

    def __init__(
        self,
        directory: Path,
        *,
        fleet: str = "test",
        devices: Mapping[str, Sequence[str]] | None = None,
        operators: Sequence[str] = ("fleet-admin",),
    ) -> None:
        self.directory = Path(directory)
        self.fleet = fleet
        self.devices: dict[str, list[str]] = {d: list(g) for d, g in (devices or {}).items()}
        self.operators = list(operators)
        self.pki_dir = self.directory / "pki"
        self.acl_path = self.directory / "acl"
        self.conf_path = self.directory / "mosquitto.conf"
        self.db_dir = self.directory / "db"
        self.log_path = self.directory / "mosquitto.log"
        self.mosquitto = find_mosquitto()
        self.ca_path, self._ca_key = pki.create_ca(self.pki_dir, f"edgert {fleet} test CA", days=2)
        self.server_cert, self.server_key = pki.issue_server_cert(
            self.ca_path, self._ca_key, self.pki_dir, days=2
        )
        for name in [*self.operators, *self.devices]:
            self.client_cert(name)
        self.db_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self._port_fixed = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._clients: list[BrokerClient] = []
        self._counter = 0
        self._write_acl()

    # -- files -------------------------------------------------------------------------------
    def client_cert(self, name: str) -> tuple[Path, Path]:
        """``(cert, key)`` for client ``name`` (CN = name), issued by the fleet CA on first use."""
        cert, key = self.pki_dir / f"{name}.crt", self.pki_dir / f"{name}.key"
        if not (cert.exists() and key.exists()):
            cert, key = pki.issue_client_cert(self.ca_path, self._ca_key, self.pki_dir, name, days=2)
        return cert, key

    def topic(self, *levels: str) -> str:
        """``edgert/<fleet>/<levels...>``."""
        return "/".join([broker_config.TOPIC_PREFIX, self.fleet, *levels])

    def _write_acl(self) -> None:
        text = broker_config.render_acl(self.fleet, self.devices, self.operators)
        tmp = self.acl_path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.acl_path)

    def _write_conf(self) -> None:
        conf = broker_config.render_mosquitto_conf(
            cafile=self.ca_path,
            certfile=self.server_cert,
            keyfile=self.server_key,
            acl_file=self.acl_path,
            port=self.port,
            bind_address=HOST,
            persistence_location=self.db_dir,
            # as root, mosquitto switches to the 'mosquitto' user, which cannot read our 0600 keys
            user="root" if os.geteuid() == 0 else None,
            log_types=("all",),
        )
        self.conf_path.write_text(conf)

    # -- process -----------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """Whether the mosquitto process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The mosquitto process id while one was started (None before the first start)."""
        return None if self._proc is None else self._proc.pid

    def log(self) -> str:
        """Everything mosquitto logged so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, needle: str, *, after: int = 0, timeout: float = _START_TIMEOUT) -> None:
        """Wait until mosquitto's log contains ``needle`` more than ``after`` times."""
        deadline = time.monotonic() + timeout
        while self.log().count(needle) <= after:
            if time.monotonic() > deadline:
                raise BrokerError(f"mosquitto did not log {needle!r} within {timeout} s: {self.log_path}")
            time.sleep(0.02)

    def start(self) -> None:
        """Start mosquitto (same port and database as before) and wait until it accepts mutual TLS."""
        if self.running:
            raise BrokerError("mosquitto is already running: stop() it first")
        for _attempt in range(5):
            if self._finalizer is not None:
                self._finalizer.detach()
            self._write_conf()
            self._proc = spawn_mosquitto(self.conf_path, self.log_path, self.mosquitto)
            self._finalizer = weakref.finalize(self, _terminate, self._proc)
            try:
                self._wait_ready(_START_TIMEOUT)
            except BrokerError:
                _terminate(self._proc)
                if not self._port_fixed and "Address already in use" in self.log():
                    self.port = free_port()  # lost a race for the port: try another one
                    continue
                raise
            self._port_fixed = True
            return
        raise BrokerError(f"mosquitto could not find a free port; log: {self.log_path}")

    def _wait_ready(self, timeout: float) -> None:
        if self._proc is None:
            raise BrokerError("mosquitto was never started: call start()")
        cert = self.client_cert(self.operators[0])
        wait_tls_ready(self._proc, self.port, self.ca_path, cert, self.log_path, timeout)

    def stop(self) -> None:
        """SIGTERM mosquitto and wait: it saves retained messages and sessions to ``db/``."""
        if self._proc is not None:
            _terminate(self._proc)
            if self._finalizer is not None:
                self._finalizer.detach()

    def kill(self) -> None:
        """SIGKILL mosquitto (a crash: nothing is saved since the last autosave)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=10)

    def restart(self) -> None:
        """``stop()`` then ``start()`` on the same port with the same database."""
        self.stop()
        self.start()

    def add_device(self, device_id: str, groups: Sequence[str] = ()) -> tuple[Path, Path]:
        """Add a device (certificate + ACL user block) and make the running broker reload its ACL.

        Returns the device's ``(cert, key)``. The reload is a SIGHUP; it has taken effect when this
        returns (mosquitto logs the reload, then answers a new TLS handshake only after it).
        """
        devices = {**self.devices, pki.validate_device_id(device_id): list(groups)}
        broker_config.render_acl(self.fleet, devices, self.operators)  # validate before changing anything
        self.devices = devices
        self._write_acl()
        paths = self.client_cert(device_id)
        if self.running and self._proc is not None:
            before = self.log().count("Reloading config")
            self._proc.send_signal(signal.SIGHUP)
            self.wait_for_log("Reloading config", after=before)
            self._wait_ready(_START_TIMEOUT)
        return paths

    # -- clients -----------------------------------------------------------------------------
    def client(
        self,
        name: str,
        *,
        client_id: str | None = None,
        will: tuple[str, bytes] | None = None,
        clean_start: bool = True,
        properties: Properties | None = None,
        wait: bool = True,
    ) -> BrokerClient:
        """A paho MQTT v5 client authenticated with ``name``'s certificate, connected, loop started.

        ``will`` is ``(topic, payload)``, sent retained with QoS 1. With ``wait`` (default) this
        returns once the CONNACK is a success and raises :class:`BrokerError` otherwise; with
        ``wait=False`` the caller inspects ``wait_connack()`` itself.
        """
        self._counter += 1
        client = BrokerClient(client_id or f"{name}-{self._counter}")
        self._clients.append(client)
        return connect_client(
            client,
            self.port,
            self.ca_path,
            self.client_cert(name),
            will=will,
            clean_start=clean_start,
            properties=properties,
            wait=wait,
        )

    def close(self) -> None:
        """Disconnect every client made by :meth:`client` and terminate mosquitto. Idempotent."""
        clients, self._clients = self._clients, []
        for client in clients:
            client.close()
        self.stop()

    def __enter__(self) -> Broker:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
