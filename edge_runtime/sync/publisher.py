"""The fleet side: publish bundles and signed desired documents, read device status, roll out.

A publish writes, all retained with QoS 1 and in this order: the bundle's chunks, its chunk
table (``meta``), then the signed desired document. A device that sees the document can
therefore always fetch the bytes, also long after the publisher is gone. The document that
was in force before is kept retained under ``group/{g}/previous`` so ``rollback`` can re-issue
it (with a higher sequence and ``rollback: true``, which allows the lower version).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_runtime.bundle.manifest import parse_manifest
from edge_runtime.bundle.signing import TrustStore
from edge_runtime.errors import BrokerError, DocumentError, EdgeRuntimeError
from edge_runtime.sync.mqtt import LinkSettings, MqttLink
from edge_runtime.sync.protocol import (
    DesiredBundle,
    DesiredDocument,
    Rollout,
    Topics,
    canary_bucket,
    open_envelope,
    seal,
    utc_iso,
)
from edge_runtime.sync.transfer import DEFAULT_CHUNK_SIZE, describe_bundle, iter_chunks

__all__ = ["DeviceStatus", "FleetClient", "RolloutOutcome", "follow_rollout", "read_bundle_manifest"]

log = logging.getLogger(__name__)


def read_bundle_manifest(path: Path) -> tuple[str, str]:
    """``(name, version)`` of a packed bundle, read from its manifest without unpacking."""
    import tarfile

    try:
        with tarfile.open(path, "r:*") as tar:
            member = tar.getmember("manifest.json")
            fh = tar.extractfile(member)
            if fh is None or member.size > 1024 * 1024:
                raise DocumentError(f"{path.name}: manifest.json is not a small regular file")
            manifest = parse_manifest(fh.read())
    except (OSError, KeyError, tarfile.TarError) as exc:
        raise DocumentError(
            f"{path} is not a packed bundle ({exc}); make one with `edgert bundle pack` or "
            "`edgert convert --pack`"
        ) from exc
    return manifest.name, manifest.version


@dataclass
class DeviceStatus:
    """What the fleet knows about one device."""

    device: str
    online: bool = False
    model: str = ""
    phase: str = ""
    reason: str = ""
    health: str = ""
    last_seen: float = 0.0
    updates: list[dict[str, Any]] = field(default_factory=list)


class FleetClient:
    """An operator connection to the broker (mutual TLS with an operator certificate)."""

    def __init__(self, settings: LinkSettings, fleet: str, *, prefix: str = "edgert") -> None:
        self.topics = Topics(fleet, prefix)
        self.fleet = fleet
        self._lock = threading.Lock()
        self._retained: dict[str, bytes] = {}
        self._listeners: list[Callable[[str, bytes], None]] = []
        self._got = threading.Condition(self._lock)
        self.link = MqttLink(settings, on_message=self._on_message, name="fleet")

    def __enter__(self) -> FleetClient:
        self.connect()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def connect(self, timeout: float = 15.0) -> None:
        self.link.start()
        if not self.link.wait_connected(timeout):
            self.link.stop()
            raise BrokerError(
                f"cannot connect to the broker {self.link.settings.host}:{self.link.settings.port}: "
                f"{self.link.last_error or 'no answer'}; check host, port, CA and the operator certificate"
            )

    def close(self) -> None:
        self.link.stop()

    def _on_message(self, topic: str, payload: bytes, _retained: bool) -> None:
        with self._got:
            self._retained[topic] = payload
            self._got.notify_all()
        for listener in list(self._listeners):
            listener(topic, payload)

    # -- reading -----------------------------------------------------------------------------
    def read_retained(self, topic: str, timeout: float = 2.0) -> bytes | None:
        """The retained message of ``topic`` (None when there is none)."""
        with self._got:
            self._retained.pop(topic, None)
        self.link.subscribe([topic])
        end = time.monotonic() + timeout
        with self._got:
            while topic not in self._retained and time.monotonic() < end:
                self._got.wait(0.05)
            value = self._retained.get(topic)
        self.link.unsubscribe([topic])
        return value or None

    def current_document(self, target: str, trust: TrustStore | None = None) -> DesiredDocument | None:
        """The retained desired document of ``group:G`` or ``device:ID`` (verified with ``trust``)."""
        raw = self.read_retained(self._doc_topic(target))
        if raw is None:
            return None
        if trust is None:
            body = json.loads(raw)
            import base64

            return DesiredDocument.model_validate_json(base64.b64decode(body["doc"]))
        doc, _ = open_envelope(raw, trust, DesiredDocument)
        return doc  # type: ignore[no-any-return]

    def _doc_topic(self, target: str) -> str:
        kind, _, name = target.partition(":")
        if kind == "group":
            return self.topics.group_desired(name)
        if kind == "device":
            return self.topics.device(name, "desired")
        raise DocumentError(f"target {target!r} must be group:NAME or device:ID")

    # -- publishing ----------------------------------------------------------------------------
    def _publish_wait(self, topic: str, payload: bytes, retain: bool = True, timeout: float = 60.0) -> None:
        info = self.link.publish(topic, payload, qos=1, retain=retain)
        if info is None:
            raise BrokerError(f"not connected: cannot publish to {topic}")
        info.wait_for_publish(timeout)
        if not info.is_published():
            raise BrokerError(f"the broker did not acknowledge {topic} within {timeout:g} s")

    def upload_bundle(
        self,
        path: Path,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        progress: Callable[[int, int], None] | None = None,
    ) -> tuple[DesiredBundle, float]:
        """Publish a packed bundle's chunks and chunk table (retained); ``(description, seconds)``."""
        name, version = read_bundle_manifest(path)
        meta = describe_bundle(path, chunk_size)
        t0 = time.perf_counter()
        infos: list[Any] = []
        for index, data in iter_chunks(path, meta):
            info = self.link.publish(self.topics.bundle_chunk(meta.sha256, index), data, qos=1, retain=True)
            if info is None:
                raise BrokerError("lost the broker connection while uploading; publish again (it resumes)")
            infos.append(info)
            while len(infos) > 64:
                infos[0].wait_for_publish(60.0)
                infos = [i for i in infos if not i.is_published()]
            if progress is not None:
                progress(index + 1, meta.n_chunks)
        for info in infos:
            info.wait_for_publish(60.0)
            if not info.is_published():
                raise BrokerError("the broker did not acknowledge every chunk; publish again")
        self._publish_wait(self.topics.bundle_meta(meta.sha256), meta.meta_bytes())
        seconds = time.perf_counter() - t0
        bundle = DesiredBundle(
            name=name, version=version, sha256=meta.sha256, size=meta.size, meta_sha256=meta.meta_digest()
        )
        return bundle, seconds

    def publish_document(
        self,
        target: str,
        bundle: DesiredBundle,
        key: Ed25519PrivateKey,
        *,
        rollout: Rollout | None = None,
        rollback: bool = False,
        valid_days: float = 30.0,
        trust: TrustStore | None = None,
    ) -> DesiredDocument:
        """Sign and publish (retained) the desired document of ``target``; keep the old one as previous."""
        topic = self._doc_topic(target)
        old_raw = self.read_retained(topic)
        sequence = int(time.time() * 1000)
        if old_raw is not None:
            try:
                old = self.current_document(target, trust)
            except (EdgeRuntimeError, ValueError, KeyError):
                old = None
            if old is not None:
                sequence = max(sequence, old.sequence + 1)
                if old.bundle.sha256 != bundle.sha256:
                    self._publish_wait(topic.rsplit("/", 1)[0] + "/previous", old_raw)
        now = time.time()
        doc = DesiredDocument(
            fleet=self.fleet,
            target=target,
            sequence=sequence,
            issued_at=utc_iso(now),
            expires_at=utc_iso(now + valid_days * 86400.0),
            bundle=bundle,
            rollout=rollout or Rollout(),
            rollback=rollback,
        )
        self._publish_wait(topic, seal(doc, key))
        return doc

    def publish(
        self,
        path: Path,
        target: str,
        key: Ed25519PrivateKey,
        *,
        rollout: Rollout | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        trust: TrustStore | None = None,
    ) -> DesiredDocument:
        """Upload ``path`` and point ``target`` at it."""
        if not path.is_file():
            raise DocumentError(f"{path} is not a packed bundle file; make one with `edgert bundle pack`")
        bundle, _ = self.upload_bundle(path, chunk_size=chunk_size)
        return self.publish_document(target, bundle, key, rollout=rollout, trust=trust)

    def promote(
        self, target: str, key: Ed25519PrivateKey, trust: TrustStore | None = None
    ) -> DesiredDocument:
        """Re-issue the current document to every device (canary 100 %, no shadow)."""
        doc = self.current_document(target, trust)
        if doc is None:
            raise DocumentError(f"{target} has no desired document to promote; publish one first")
        rollout = doc.rollout.model_copy(update={"canary_percent": 100.0, "shadow": None})
        return self.publish_document(target, doc.bundle, key, rollout=rollout, trust=trust)

    def rollback(
        self, target: str, key: Ed25519PrivateKey, trust: TrustStore | None = None
    ) -> DesiredDocument:
        """Re-issue the previous document (signed, ``rollback: true``, a higher sequence)."""
        topic = self._doc_topic(target).rsplit("/", 1)[0] + "/previous"
        raw = self.read_retained(topic)
        if raw is None:
            raise DocumentError(f"{target} has no previous document to roll back to")
        if trust is not None:
            prev, _ = open_envelope(raw, trust, DesiredDocument)
        else:
            import base64

            prev = DesiredDocument.model_validate_json(base64.b64decode(json.loads(raw)["doc"]))
        rollout = prev.rollout.model_copy(update={"canary_percent": 100.0, "shadow": None})
        return self.publish_document(target, prev.bundle, key, rollout=rollout, rollback=True, trust=trust)

    # -- status -----------------------------------------------------------------------------------
    def status(self, wait_s: float = 1.5) -> list[DeviceStatus]:
        """Every device's retained state, collected for ``wait_s`` seconds."""
        topic = self.topics.all_devices("state")
        self.link.subscribe([topic])
        time.sleep(wait_s)
        self.link.unsubscribe([topic])
        out: dict[str, DeviceStatus] = {}
        with self._lock:
            items = [(t, p) for t, p in self._retained.items() if t.endswith("/state")]
        for t, p in items:
            device = t.split("/")[-2]
            try:
                body = json.loads(p) if p else {}
            except ValueError:
                continue
            model = body.get("model") or {}
            out[device] = DeviceStatus(
                device=device,
                online=bool(body.get("online")),
                model=f"{model.get('name', '')} {model.get('version', '')}".strip(),
                phase=str(body.get("phase", "")),
                reason=str(body.get("reason", "")),
                health="ok" if body.get("phase") not in ("rolled_back", "rejected") else "attention",
                last_seen=float(body.get("ts", 0.0) or 0.0),
            )
        return sorted(out.values(), key=lambda d: d.device)

    def watch(
        self, leaves: Iterable[str], callback: Callable[[str, bytes], None], shared: str | None = None
    ) -> None:
        """Call ``callback(topic, payload)`` for every message on the devices' ``leaves`` topics.

        With ``shared``, subscribe as the MQTT 5 shared subscription ``$share/{shared}/...`` so
        several consumer processes split the fleet's messages.
        """
        self._listeners.append(callback)
        topics = [self.topics.all_devices(leaf) for leaf in leaves]
        if shared:
            topics = [f"$share/{shared}/{t}" for t in topics]
        self.link.subscribe(topics)

    def canaries(self, devices: Iterable[str], doc: DesiredDocument) -> list[str]:
        """Which of ``devices`` take part in ``doc``'s canary."""
        return [d for d in devices if canary_bucket(d, doc.bundle.sha256) < doc.rollout.canary_percent]


@dataclass
class RolloutOutcome:
    """How a canary rollout ended: ``promoted``, ``aborted`` or ``timeout``."""

    result: str
    canaries: list[str]
    committed: list[str]
    failed: dict[str, str]
    document: DesiredDocument | None = None


def follow_rollout(
    client: FleetClient,
    doc: DesiredDocument,
    devices: Iterable[str],
    key: Ed25519PrivateKey,
    *,
    abort_share: float = 0.5,
    timeout_s: float = 600.0,
    auto_promote: bool = True,
    trust: TrustStore | None = None,
) -> RolloutOutcome:
    """Watch the canaries of ``doc``; promote when all committed, roll back when too many failed.

    ``abort_share``: the rollout is aborted (the previous document re-issued with
    ``rollback: true``) as soon as more than this share of the canaries rolled back or rejected
    the update. Decisions come from the devices' ``update`` events. A rollout none of
    ``devices`` is a canary of is ``held`` at once (nothing was tested, so nothing is promoted).
    """
    canaries = client.canaries(devices, doc)
    if not canaries:  # nothing would be tested: "all canaries committed" must not promote it
        log.warning(
            "no device is in the %g%% canary of %s: nothing was promoted; raise the canary share "
            "or promote by hand", doc.rollout.canary_percent, doc.bundle.version,
        )  # fmt: skip
        return RolloutOutcome("held", [], [], {})
    committed: set[str] = set()
    failed: dict[str, str] = {}
    lock = threading.Lock()
    prefix = client.topics.root + "/device/"

    def on_update(topic: str, payload: bytes) -> None:
        if not topic.startswith(prefix) or not topic.endswith("/update"):
            return
        device = topic[len(prefix) :].split("/", maxsplit=1)[0]
        try:
            body = json.loads(payload)
        except ValueError:
            return
        if body.get("version") != doc.bundle.version or device not in canaries:
            return
        with lock:
            if body.get("phase") == "committed":
                committed.add(device)
            elif body.get("phase") in ("rolled_back", "rejected"):
                failed[device] = str(body.get("reason", ""))

    client.watch(["update"], on_update)
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        with lock:
            n_failed, n_ok = len(failed), len(committed)
        if canaries and n_failed / len(canaries) > abort_share:
            new = client.rollback(doc.target, key, trust)
            return RolloutOutcome("aborted", canaries, sorted(committed), dict(failed), new)
        if n_ok + n_failed >= len(canaries):
            if n_failed:
                return RolloutOutcome("held", canaries, sorted(committed), dict(failed))
            promoted = client.promote(doc.target, key, trust) if auto_promote else None
            return RolloutOutcome("promoted", canaries, sorted(committed), {}, promoted)
        time.sleep(0.1)
    return RolloutOutcome("timeout", canaries, sorted(committed), dict(failed))
