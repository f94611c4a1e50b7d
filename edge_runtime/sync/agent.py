"""The device agent: follows the signed desired document, installs updates, sends telemetry.

Threads (named roles)::

    sync-mqtt-net    paho network loop (MqttLink): reconnects with jittered back-off
    sync-agent       the update state machine: documents, chunks, install, probation
    sync-outbox      drains the disk-backed outbox with QoS 1, acks on PUBACK
    sync-telemetry   puts metrics and drift statistics into the outbox every interval
    sync-shadow      (shadow mode only) runs the candidate on sampled frames

Update states (``edgert/{fleet}/device/{id}/update`` and ``state.json``)::

    idle -> downloading -> verifying -> staged -> selftest -> [shadow] -> probation
         -> committed | rejected (reason) | rolled_back (reason)

The running model is never touched until a candidate passed verification and its self-test;
a candidate in probation is swapped back the moment a rule fails, and a restart during
probation rolls back too (:meth:`~edge_runtime.sync.slots.StateStore.boot_choice`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from edge_runtime.bundle.signing import TrustStore
from edge_runtime.errors import DocumentError, EdgeRuntimeError, OutboxError, TransferError, UpdateError
from edge_runtime.model import LoadedModel
from edge_runtime.pipeline import TensorObserver
from edge_runtime.sync.metrics import SystemMetrics
from edge_runtime.sync.mqtt import LinkSettings, MqttLink
from edge_runtime.sync.outbox import Outbox
from edge_runtime.sync.protocol import (
    Command,
    DesiredDocument,
    Topics,
    canary_bucket,
    open_envelope,
    semver_key,
    status_payload,
)
from edge_runtime.sync.shadow import ShadowRunner
from edge_runtime.sync.slots import DeviceState, SlotInfo, StateStore, commit, reject, rollback, transition
from edge_runtime.sync.transfer import BundleMeta, ChunkAssembler, cleanup_workdir, parse_meta
from edge_runtime.sync.watch import DriftWatch, ModelWatch, probation_verdict, reference_histogram

__all__ = ["AgentOptions", "ModelHost", "SyncAgent"]

log = logging.getLogger(__name__)

PRIORITY_UPDATE = 10
PRIORITY_TELEMETRY = 5
PRIORITY_EVENT = 0


class ModelHost(Protocol):
    """What the agent needs from the daemon."""

    def serving(self) -> LoadedModel:
        """The model the pipeline runs now."""

    def load(self, bundle_dir: Path) -> LoadedModel:
        """Verify, load and self-test a bundle directory (raises EdgeRuntimeError)."""

    def swap(self, model: LoadedModel) -> LoadedModel:
        """Serve ``model`` from the next inference on; return the previous one (not closed)."""

    def add_observer(self, observer: TensorObserver) -> None: ...

    def remove_observer(self, observer: TensorObserver) -> None: ...

    def errors(self) -> int:
        """Inference and decode errors so far."""

    def summary(self) -> dict[str, Any]:
        """Pipeline statistics (fps, latency percentiles, drops)."""


@dataclass(frozen=True)
class AgentOptions:
    """The agent's settings (from ``[sync]`` in the config)."""

    device_id: str
    fleet: str
    groups: tuple[str, ...]
    state_dir: Path
    factory_bundle: Path
    link: LinkSettings
    prefix: str = "edgert"
    telemetry_interval_s: float = 10.0
    chunk_window: int = 32
    stall_timeout_s: float = 15.0
    require_signature: bool = True
    outbox_max_bytes: int = 64 * 1024 * 1024
    events: bool = True
    max_attempts: int = 3


@dataclass
class _Download:
    doc: DesiredDocument
    meta: BundleMeta | None = None
    asm: ChunkAssembler | None = None
    subscribed: set[int] = field(default_factory=set)
    last_progress: float = field(default_factory=time.monotonic)
    reported: float = -1.0
    started: float = field(default_factory=time.monotonic)
    refused: dict[int, tuple[int, float]] = field(default_factory=dict)
    """chunk index -> (times refused, clock time before which it is not asked for again)"""


@dataclass
class _Probation:
    doc: DesiredDocument
    info: SlotInfo
    model: LoadedModel
    old: LoadedModel
    started: float
    errors0: int
    baseline: Any
    beside: ShadowRunner | None = None


class SyncAgent:
    """Fleet sync for one device; ``start()`` after the pipeline runs, ``stop()`` before it stops."""

    def __init__(
        self,
        options: AgentOptions,
        host: ModelHost,
        trust: TrustStore | None,
        store: StateStore,
        outbox: Outbox,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.opts = options
        self.host = host
        self.trust = trust
        self.store = store
        self.outbox = outbox
        self.topics = Topics(options.fleet, options.prefix)
        self._clock = clock
        self.state: DeviceState = store.load()
        self._events: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._stop = threading.Event()
        self._docs: dict[str, DesiredDocument] = {}
        self._download: _Download | None = None
        self._probation: _Probation | None = None
        self._shadow: tuple[DesiredDocument, SlotInfo, LoadedModel, ShadowRunner] | None = None
        self._said: dict[str, str] = {}
        self._inflight: list[tuple[Any, int]] = []
        self._wake_sender = threading.Event()
        self.watch = ModelWatch()
        self.drift = DriftWatch()
        self.metrics = SystemMetrics(options.state_dir)
        self._threads: list[threading.Thread] = []
        self._t0 = time.monotonic()
        self.boot_note: str | None = None
        self.downloads = options.state_dir / "downloads"
        self.downloads.mkdir(parents=True, exist_ok=True)
        will = status_payload(online=False, device=options.device_id)
        link = LinkSettings(**{**vars(options.link), "will_topic": self._t("state"), "will_payload": will})
        self.link = MqttLink(
            link,
            on_message=self._on_message,
            on_connect=lambda: self._events.put(("connected",)),
            on_publish=self._on_puback,
            name="sync-mqtt",
        )

    # -- helpers ------------------------------------------------------------------------------
    def _t(self, leaf: str) -> str:
        return self.topics.device(self.opts.device_id, leaf)

    def _subscriptions(self) -> list[str]:
        subs = [self._t("cmd"), self._t("desired")]
        subs += [self.topics.group_desired(g) for g in self.opts.groups]
        return subs

    def _outcome(self, state: DeviceState) -> DeviceState:
        """Record how the accepted document ended, so the same document is not retried after a
        rollback or rejection (a candidate that crashes the daemon must not crash-loop it); a new
        document (a higher sequence) is tried again."""
        record = dict(state.last_document or {})
        if not record:
            return state
        record["outcome"] = state.phase
        return transition(state, state.phase, state.reason, last_document=record)

    def _save(self, state: DeviceState) -> None:
        self.state = state
        self.store.save(state)

    def _update_event(self, phase: str, reason: str = "", **extra: Any) -> None:
        body = {"phase": phase, "reason": reason, "device": self.opts.device_id, **extra}
        try:
            self.outbox.put("update", body, priority=PRIORITY_UPDATE, ttl_s=None)
        except OutboxError as exc:
            log.error("cannot queue the update event %s: %s", phase, exc)
        self._wake_sender.set()
        self._publish_state()
        log.info("update: %s %s", phase, reason)

    def _say_once(self, key: str, phase: str, reason: str, **extra: Any) -> None:
        """An update event that is not repeated for every redelivery of the same document."""
        if self._said.get(key) != reason:
            self._said[key] = reason
            self._update_event(phase, reason, **extra)

    def _publish_state(self) -> None:
        model = self._serving_info()
        body = status_payload(
            online=True,
            device=self.opts.device_id,
            model=model,
            phase=self.state.phase,
            reason=self.state.reason,
            groups=list(self.opts.groups),
            ts=time.time(),
        )
        self.link.publish(self._t("state"), body, qos=1, retain=True)

    def _serving_info(self) -> dict[str, Any]:
        try:
            m = self.host.serving()
        except EdgeRuntimeError:  # pragma: no cover - host not ready
            return {}
        info = self.state.active
        return {
            "name": m.name,
            "version": m.version,
            "format": m.format,
            "sha256": info.sha256 if info is not None and info.version == m.version else None,
        }

    # -- MQTT callbacks (network thread) ---------------------------------------------------------
    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        chunk = self.topics.parse_chunk(topic)
        if chunk is not None:
            self._events.put(("chunk", chunk[0], chunk[1], payload))
        elif topic.endswith("/meta"):
            self._events.put(("meta", topic, payload))
        elif topic == self._t("cmd"):
            self._events.put(("cmd", payload))
        elif topic.endswith("/desired"):
            self._events.put(("desired", topic, payload))
        else:
            log.debug("ignoring message on %s", topic)
        del retained

    def _on_puback(self, mid: int, reason: int) -> None:
        if reason >= 0x80:
            log.error("broker refused message %d (reason code 0x%02x): check the broker ACL", mid, reason)
        self._wake_sender.set()

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the threads; the pipeline must already serve the boot model."""
        self.host.add_observer(self.watch)
        self.host.add_observer(self.drift)
        # partial downloads stay: the next document for the same bundle resumes from them
        if self.boot_note:
            if self.state.phase == "rolled_back":
                self._save(self._outcome(self.state))
            self._update_event(self.state.phase, self.boot_note, version=self.host.serving().version)
        self.link.start()
        for name, target in (
            ("sync-agent", self._agent_loop),
            ("sync-outbox", self._sender_loop),
            ("sync-telemetry", self._telemetry_loop),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop the threads (a running probation is left for the next boot to roll back)."""
        self._stop.set()
        self._wake_sender.set()
        self._events.put(("stop",))
        for thread in self._threads:
            thread.join(5.0)
        if self._shadow is not None:
            self._shadow[3].stop()
            self.host.remove_observer(self._shadow[3])
        self.host.remove_observer(self.watch)
        self.host.remove_observer(self.drift)
        if self.link.connected:
            self.link.publish(
                self._t("state"), status_payload(online=False, device=self.opts.device_id), retain=True
            )
            time.sleep(0.1)
        self.link.stop()
        if self._download is not None and self._download.asm is not None:
            self._download.asm.close()

    def close(self) -> None:
        """Close the outbox (after the pipeline stopped: its last events are kept for next time)."""
        self.outbox.close()

    # -- the agent thread ------------------------------------------------------------------------
    def _agent_loop(self) -> None:
        while not self._stop.is_set():
            try:
                event = self._events.get(timeout=0.25)
            except queue.Empty:
                event = ("tick",)
            try:
                self._handle(event)
                if event[0] != "tick":
                    self._handle(("tick",))
            except Exception:  # the agent must outlive any bug in one event
                log.exception("sync agent failed on %s", event[0])

    def _handle(self, event: tuple[Any, ...]) -> None:
        kind = event[0]
        if kind == "connected":
            self.link.subscribe(self._subscriptions())
            self._publish_state()
            if self._download is not None:
                self._download.subscribed.clear()
                self._request()
        elif kind == "desired":
            self._on_desired(event[1], event[2])
        elif kind == "cmd":
            self._on_command(event[1])
        elif kind == "meta":
            self._on_meta(event[1], event[2])
        elif kind == "chunk":
            self._on_chunk(event[1], event[2], event[3])
        elif kind == "tick":
            self._tick()

    # -- documents -----------------------------------------------------------------------------
    def _on_desired(self, topic: str, payload: bytes) -> None:
        if not payload:
            self._docs.pop(topic, None)
            return
        if self.trust is None:
            self._say_once(topic, "rejected", "no trusted keys in [trust] keys: documents cannot be verified")
            return
        try:
            doc, _key = open_envelope(payload, self.trust, DesiredDocument)
        except DocumentError as exc:
            self._say_once(topic, "rejected", f"desired document on {topic} refused: {exc}")
            return
        expected = self._target_of(topic)
        if doc.fleet != self.opts.fleet or doc.target != expected:
            self._say_once(
                topic,
                "rejected",
                f"document for {doc.fleet}/{doc.target} published on {topic} (wants {expected})",
            )
            return
        self._docs[topic] = doc
        self._reconcile()

    def _target_of(self, topic: str) -> str:
        if topic == self._t("desired"):
            return f"device:{self.opts.device_id}"
        return f"group:{topic.split('/')[-2]}"

    def _effective(self) -> DesiredDocument | None:
        own = self._docs.get(self._t("desired"))
        if own is not None:
            return own
        for group in self.opts.groups:
            doc = self._docs.get(self.topics.group_desired(group))
            if doc is not None:
                return doc
        return None

    def _serving_version(self) -> str:
        return self.host.serving().version

    def _reconcile(self) -> None:
        doc = self._effective()
        if doc is None:
            return
        key = f"doc:{doc.target}"
        last = self.state.last_document or {}
        if doc.expired():
            self._say_once(
                key, "rejected", f"desired document {doc.target}#{doc.sequence} expired at {doc.expires_at}"
            )
            return
        if last.get("target") == doc.target and int(str(last.get("sequence", 0))) > doc.sequence:
            self._say_once(
                key,
                "rejected",
                f"replayed document {doc.target}#{doc.sequence} is older than the accepted "
                f"#{last.get('sequence')}",
            )
            return
        if (
            last.get("target") == doc.target
            and last.get("sequence") == doc.sequence
            and last.get("outcome") in ("rolled_back", "rejected")
        ):
            why = f"not retrying {doc.bundle.version}: {self.state.reason or last['outcome']}"
            self._say_once(key, str(last["outcome"]), why, version=doc.bundle.version)
            return
        busy = self._probation or self._shadow
        if self._probation is not None and self._probation.doc.bundle.sha256 == doc.bundle.sha256:
            return
        if self._shadow is not None:
            shadow_doc, info, model, _runner = self._shadow
            if shadow_doc.bundle.sha256 == doc.bundle.sha256:
                if doc.rollout.shadow is None:  # promoted: swap the shadowed candidate in
                    self._end_shadow(keep_model=True)
                    self._accept(doc)
                    self._swap_in(doc, info, model)
                return
            self._end_shadow(keep_model=False)
        elif busy:
            return
        if self._download is not None:
            if self._download.doc.bundle.sha256 == doc.bundle.sha256:
                return
            self._abort_download("superseded by a newer document")
        if doc.rollout.canary_percent < 100.0:
            bucket = canary_bucket(self.opts.device_id, doc.bundle.sha256)
            if bucket >= doc.rollout.canary_percent:
                pct = doc.rollout.canary_percent
                why = f"not in the {pct:g}% canary of {doc.bundle.version}"
                self._say_once(key, "skipped", why, version=doc.bundle.version)
                return
        serving_sha = self.state.active.sha256 if self.state.active is not None else None
        if doc.bundle.sha256 == serving_sha:
            if last.get("sequence") != doc.sequence:
                self._accept(doc)
                self._say_once(
                    key, "committed", "already serving the desired bundle", version=doc.bundle.version
                )
            return
        try:
            older = semver_key(doc.bundle.version) < semver_key(self._serving_version())
        except DocumentError:
            older = False
        if older and not doc.rollback:
            self._say_once(
                key,
                "rejected",
                f"downgrade from {self._serving_version()} to {doc.bundle.version} refused; publish a signed "
                "rollback (edgert fleet rollback) to go back",
                version=doc.bundle.version,
            )
            return
        attempts = int(str(last.get("attempts", 0))) if last.get("sequence") == doc.sequence else 0
        if attempts >= self.opts.max_attempts and last.get("outcome") != "committed":
            why = f"gave up on {doc.bundle.version} after {attempts} interrupted attempts; publish it again"
            self._say_once(key, "rejected", why, version=doc.bundle.version)
            return
        self._accept(doc)
        prev = self.state.previous
        if prev is not None and prev.sha256 == doc.bundle.sha256 and self.store.check_slot(prev) is None:
            self._save(
                transition(self.state, "staged", "the previous slot holds this bundle", candidate=prev)
            )
            self._install(doc, prev)
            return
        self._start_download(doc)

    def _accept(self, doc: DesiredDocument) -> None:
        """Record the document as accepted; every acceptance of the same one counts as an attempt
        (a daemon killed mid-update tries again at boot, at most ``max_attempts`` times)."""
        last = self.state.last_document or {}
        same = last.get("target") == doc.target and last.get("sequence") == doc.sequence
        record = {
            "target": doc.target,
            "sequence": doc.sequence,
            "version": doc.bundle.version,
            "sha256": doc.bundle.sha256,
            "issued_at": doc.issued_at,
            "attempts": (int(str(last.get("attempts", 0))) if same else 0) + 1,
        }
        if "command_sequence" in last:  # a new document must not reopen the door to old commands
            record["command_sequence"] = last["command_sequence"]
        self._save(transition(self.state, self.state.phase, self.state.reason, last_document=record))

    # -- commands ---------------------------------------------------------------------------------
    def _on_command(self, payload: bytes) -> None:
        if not payload:
            return
        if self.trust is None:
            self._say_once("cmd", "rejected", "no trusted keys: commands cannot be verified")
            return
        try:
            cmd, _key = open_envelope(payload, self.trust, Command)
        except DocumentError as exc:
            self._say_once("cmd", "rejected", f"command refused: {exc}")
            return
        last = int(str((self.state.last_document or {}).get("command_sequence", 0)))
        if cmd.device != self.opts.device_id or cmd.fleet != self.opts.fleet:
            self._say_once("cmd", "rejected", f"command for {cmd.fleet}/{cmd.device} refused")
            return
        if cmd.expired() or cmd.sequence <= last:
            self._say_once("cmd", "rejected", f"command #{cmd.sequence} expired or replayed")
            return
        record = dict(self.state.last_document or {})
        record["command_sequence"] = cmd.sequence
        self._save(transition(self.state, self.state.phase, self.state.reason, last_document=record))
        if cmd.action == "rollback":
            if self._probation is not None:
                self._end_probation(f"rollback command: {cmd.reason}")
            else:
                self._update_event("rejected", "rollback command: nothing in probation to roll back")
        elif cmd.action == "shadow_off" and self._shadow is not None:
            self._end_shadow(keep_model=False)
            self._update_event("idle", "shadow mode stopped by command")
        elif cmd.action == "report":
            self._publish_state()
            self._telemetry_once()

    # -- download ---------------------------------------------------------------------------------
    def _start_download(self, doc: DesiredDocument) -> None:
        cleanup_workdir(self.downloads, keep={doc.bundle.sha256})
        self._download = _Download(doc)
        self._save(transition(self.state, "downloading", f"{doc.bundle.name} {doc.bundle.version}"))
        self._update_event(
            "downloading", "", version=doc.bundle.version, sha256=doc.bundle.sha256, progress=0.0
        )
        self.link.subscribe([self.topics.bundle_meta(doc.bundle.sha256)])

    def _abort_download(self, reason: str) -> None:
        dl = self._download
        if dl is None:
            return
        self._download = None
        if dl.asm is not None:
            dl.asm.close()
        self.link.unsubscribe(
            [self.topics.bundle_meta(dl.doc.bundle.sha256)]
            + [self.topics.bundle_chunk(dl.doc.bundle.sha256, i) for i in dl.subscribed]
        )
        log.info("download of %s stopped: %s", dl.doc.bundle.version, reason)

    def _on_meta(self, topic: str, payload: bytes) -> None:
        dl = self._download
        if dl is None or topic != self.topics.bundle_meta(dl.doc.bundle.sha256) or not payload:
            return
        if dl.meta is not None:
            return
        want = dl.doc.bundle
        try:
            meta = parse_meta(payload, want.meta_sha256)
            if meta.sha256 != want.sha256 or meta.size != want.size:
                raise TransferError(  # noqa: TRY301
                    f"chunk table describes {meta.sha256[:12]} ({meta.size} bytes), the document "
                    f"{want.sha256[:12]} ({want.size} bytes)"
                )
            asm = ChunkAssembler(self.downloads, meta)
        except TransferError as exc:
            self._fail_download(f"bundle chunk table refused: {exc}")
            return
        dl.meta, dl.asm = meta, asm
        dl.last_progress = self._clock()
        if asm.received_bytes:
            self._update_event(
                "downloading", "resumed from disk", version=want.version, progress=round(asm.progress, 3),
                received_bytes=asm.received_bytes,
            )  # fmt: skip
        self.link.unsubscribe([topic])
        if asm.complete:
            self._finish_download()
        else:
            self._request()

    def _request(self) -> None:
        dl = self._download
        if dl is None:
            return
        if dl.asm is None:
            self.link.subscribe([self.topics.bundle_meta(dl.doc.bundle.sha256)])
            return
        room = self.opts.chunk_window - len(dl.subscribed)
        if room <= 0:
            return
        now = self._clock()
        want = [
            i for i in dl.asm.missing() if i not in dl.subscribed and dl.refused.get(i, (0, now))[1] <= now
        ][:room]
        if want and self.link.subscribe([self.topics.bundle_chunk(dl.doc.bundle.sha256, i) for i in want]):
            dl.subscribed.update(want)

    def _on_chunk(self, sha: str, index: int, payload: bytes) -> None:
        dl = self._download
        if dl is None or dl.asm is None or sha != dl.doc.bundle.sha256:
            return
        if index in dl.subscribed:
            dl.subscribed.discard(index)
            self.link.unsubscribe([self.topics.bundle_chunk(sha, index)])
        try:
            dl.asm.add(index, payload)
        except TransferError as exc:
            # A bad chunk that stays retained on the broker would come straight back on the
            # re-subscription: back off (0.5 s doubling up to the stall timeout) instead of
            # re-fetching it in a tight loop, and tell the fleet once per chunk and reason.
            times = dl.refused.get(index, (0, 0.0))[0] + 1
            delay = min(self.opts.stall_timeout_s, 0.5 * 2.0 ** min(times - 1, 16))
            dl.refused[index] = (times, self._clock() + delay)
            log.warning("bundle chunk %d refused: %s (fetching it again in %.1f s)", index, exc, delay)
            self._say_once(
                f"chunk:{sha}:{index}", "downloading", f"bundle chunk {index} refused: {exc}",
                version=dl.doc.bundle.version,
            )  # fmt: skip
            return
        dl.refused.pop(index, None)
        dl.last_progress = self._clock()
        progress = dl.asm.progress
        if progress - dl.reported >= 0.1 or dl.asm.complete:
            dl.reported = progress
            self._update_event(
                "downloading", "", version=dl.doc.bundle.version, progress=round(progress, 3),
                received_bytes=dl.asm.received_bytes,
            )  # fmt: skip
        if dl.asm.complete:
            self._finish_download()
        else:
            self._request()

    def _fail_download(self, reason: str) -> None:
        dl = self._download
        self._abort_download(reason)
        if dl is not None and dl.asm is not None:
            dl.asm.discard()
        self._save(self._outcome(reject(self.state, reason)))
        self._update_event("rejected", reason)

    def _finish_download(self) -> None:
        dl = self._download
        assert dl is not None and dl.asm is not None
        dest = self.downloads / f"{dl.doc.bundle.sha256}.edgebundle"
        try:
            path = dl.asm.finish(dest)
        except TransferError as exc:
            self._download = None
            self._save(self._outcome(reject(self.state, f"download failed its checks: {exc}")))
            self._update_event("rejected", f"download failed its checks: {exc}")
            return
        self._download = None
        seconds = time.monotonic() - dl.started
        self._save(transition(self.state, "verifying", ""))
        self._update_event("verifying", "", version=dl.doc.bundle.version, download_s=round(seconds, 3))
        try:
            info = self.store.stage(path, self.trust, self.opts.require_signature)
        except UpdateError as exc:
            self._save(self._outcome(reject(self.state, str(exc))))
            self._update_event("rejected", str(exc), version=dl.doc.bundle.version)
            return
        finally:
            path.unlink(missing_ok=True)
        if info.sha256 != dl.doc.bundle.sha256:  # pragma: no cover - finish() checked the digest
            self._save(self._outcome(reject(self.state, "staged bundle digest differs from the document")))
            return
        self._save(transition(self.state, "staged", "", candidate=info))
        self._update_event("staged", "", version=info.version, slot=info.slot)
        self._install(dl.doc, info)

    # -- install -----------------------------------------------------------------------------------
    def _install(self, doc: DesiredDocument, info: SlotInfo) -> None:
        bundle_dir = self.store.bundle_dir(info)
        self._save(transition(self.state, "selftest", "", candidate=info))
        self._update_event("selftest", "", version=info.version)
        try:
            if bundle_dir is None:
                raise UpdateError(f"slot {info.slot} is empty")
            model = self.host.load(bundle_dir)
        except EdgeRuntimeError as exc:
            reason = f"self-test failed: {exc}"
            self._save(self._outcome(reject(self.state, reason)))
            self._update_event("rejected", reason, version=info.version)
            return
        if doc.rollout.shadow is not None:
            runner = ShadowRunner(model, doc.rollout.shadow.sample_rate)
            runner.start()
            self.host.add_observer(runner)
            self._shadow = (doc, info, model, runner)
            self._save(
                transition(self.state, "selftest", "shadow mode: candidate runs beside the live model")
            )
            self._update_event("shadow", "candidate runs beside the live model", version=info.version)
            return
        self._swap_in(doc, info, model)

    def _end_shadow(self, keep_model: bool) -> None:
        assert self._shadow is not None
        _doc, _info, model, runner = self._shadow
        self._shadow = None
        self.host.remove_observer(runner)
        runner.stop()
        if not keep_model:
            model.close()
            self._save(transition(self.state, "idle", "shadow ended", candidate=None))

    def _swap_in(self, doc: DesiredDocument, info: SlotInfo, model: LoadedModel) -> None:
        old = self.host.serving()
        since = self._clock() - 60.0
        baseline = self.watch.stats(old, since=since)
        self._save(transition(self.state, "probation", "", candidate=info))
        self.host.swap(model)
        # the previous model keeps running on a sample of the same frames, for a fair comparison
        beside = ShadowRunner(old, sample_rate=0.25)
        beside.start()
        self.host.add_observer(beside)
        self._probation = _Probation(
            doc, info, model, old, self._clock(), self.host.errors(), baseline, beside
        )
        self._update_event(
            "probation", "", version=info.version, probation_s=doc.rollout.probation_s,
            previous=baseline.to_dict(),
        )  # fmt: skip

    def _check_probation(self) -> None:
        p = self._probation
        if p is None:
            return
        elapsed = self._clock() - p.started
        cand = self.watch.stats(p.model, since=p.started)
        errors = self.host.errors() - p.errors0
        ro = p.doc.rollout
        enough = cand.frames >= ro.probation_min_frames
        if not enough and errors == 0 and elapsed < 10 * max(ro.probation_s, 1.0):
            return
        same = p.beside.histograms() if p.beside is not None else None
        if same is not None and same[0].sum() < min(20, max(ro.probation_min_frames, 1)):
            same = None
        classifier = p.model.bundle.manifest.task == "classification"
        if same is None and classifier and errors == 0 and elapsed < 10 * max(ro.probation_s, 1.0):
            return  # wait for enough frames seen by both models (class distributions compared)
        reason, figures = probation_verdict(
            ro, cand, p.baseline, errors=errors, same_frames=None if same is None else (same[0], same[1]),
            candidate_reference=reference_histogram(p.model), baseline_reference=reference_histogram(p.old),
        )  # fmt: skip
        if reason is not None:
            self._end_probation(reason, figures)
        elif elapsed >= ro.probation_s and enough:
            self._commit(figures)
        elif elapsed >= 10 * max(ro.probation_s, 1.0):
            self._commit({**figures, "note": f"only {cand.frames} frames in {elapsed:.0f} s"})

    def _stop_beside(self, p: _Probation) -> None:
        if p.beside is not None:
            self.host.remove_observer(p.beside)
            p.beside.stop()

    def _commit(self, figures: dict[str, Any]) -> None:
        p = self._probation
        assert p is not None
        self._probation = None
        self._stop_beside(p)
        self._save(self._outcome(commit(self.state, "probation passed")))
        self.watch.forget(p.old)
        p.old.close()
        self._update_event("committed", "probation passed", version=p.info.version, figures=figures)
        self._reconcile_set_aside(p.doc)

    def _end_probation(self, reason: str, figures: dict[str, Any] | None = None) -> None:
        p = self._probation
        assert p is not None
        self._probation = None
        self._stop_beside(p)
        self.host.swap(p.old)
        self.watch.forget(p.model)
        p.model.close()
        self._save(self._outcome(rollback(self.state, reason)))
        self._update_event(
            "rolled_back", reason, version=p.info.version, serving=p.old.version, figures=figures or {}
        )
        self._reconcile_set_aside(p.doc)

    def _reconcile_set_aside(self, finished: DesiredDocument) -> None:
        """Act on a document that arrived while a probation ran (``_reconcile`` sets it aside while
        busy): without this, a canary still in probation when the fleet aborts the rollout ignores
        the re-issued previous document until its next reconnect, and keeps the candidate if its own
        probation passes."""
        doc = self._effective()
        if doc is not None and (doc.target, doc.sequence) != (finished.target, finished.sequence):
            self._reconcile()

    # -- periodic -----------------------------------------------------------------------------------
    def _tick(self) -> None:
        dl = self._download
        if dl is not None and self.link.connected:
            if self._clock() - dl.last_progress > self.opts.stall_timeout_s:
                log.info("download of %s stalled; asking for the missing chunks again", dl.doc.bundle.version)
                topics = [self.topics.bundle_chunk(dl.doc.bundle.sha256, i) for i in dl.subscribed]
                self.link.unsubscribe(topics)
                dl.subscribed.clear()
                dl.last_progress = self._clock()
            self._request()
        self._check_probation()
        if self._shadow is not None:
            doc, info, _model, runner = self._shadow
            rep = runner.report()
            assert doc.rollout.shadow is not None
            key = f"shadow:{info.sha256}"
            stamp = self._said.get(key + ":t", "0")
            if self._clock() - float(stamp) >= doc.rollout.shadow.report_every_s:
                self._said[key + ":t"] = str(self._clock())
                ready = rep["frames"] >= doc.rollout.shadow.min_frames
                self._update_event(
                    "shadow", "ready for promotion" if ready else "", version=info.version, shadow=rep
                )

    # -- telemetry -------------------------------------------------------------------------------------
    def _telemetry_once(self) -> None:
        summary = self.host.summary()
        body = {
            "kind": "metrics",
            "device": self.opts.device_id,
            "model": self._serving_info(),
            "phase": self.state.phase,
            "uptime_s": round(time.monotonic() - self._t0, 1),
            "pipeline": summary,
            "system": self.metrics.collect(),
            "outbox": self.outbox.stats(),
            "drift": self.drift.snapshot(),
        }
        try:
            self.outbox.put("telemetry", body, priority=PRIORITY_TELEMETRY)
            alert = self.drift.new_alert()
            if alert is not None:
                log.warning("drift alert: %s", alert.get("alerts"))
                self.outbox.put("events", {"kind": "drift_alert", **alert}, priority=PRIORITY_UPDATE)
            # the drop report goes into the outbox in the same transaction that marks it reported
            self.outbox.take_drop_report(enqueue="telemetry", priority=PRIORITY_UPDATE)
        except OutboxError as exc:
            log.error("cannot queue telemetry: %s", exc)
        self._wake_sender.set()

    def _telemetry_loop(self) -> None:
        while not self._stop.wait(self.opts.telemetry_interval_s):
            try:
                self._telemetry_once()
            except Exception:
                log.exception("telemetry failed")

    def events(self, payloads: list[dict[str, Any]]) -> None:
        """Queue inference events (``events`` stream) for the fleet, in one transaction."""
        if not self.opts.events or not payloads:
            return
        try:
            self.outbox.put_many("events", payloads, priority=PRIORITY_EVENT)
        except OutboxError as exc:
            log.warning("cannot queue %d events: %s", len(payloads), exc)
        self._wake_sender.set()

    # -- outbox sender ---------------------------------------------------------------------------------
    def _sender_loop(self) -> None:
        """Publish outbox records with QoS 1; ack each one in the outbox once its PUBACK came.

        At least once: a record whose PUBACK was lost to a disconnect or a crash is sent again
        (consumers drop duplicates by ``seq``).
        """
        while not self._stop.is_set():
            self._wake_sender.wait(0.5)
            self._wake_sender.clear()
            done = [seq for info, seq in self._inflight if info.is_published()]
            self._inflight = [(info, seq) for info, seq in self._inflight if not info.is_published()]
            if done:
                try:
                    self.outbox.ack(done)
                except OutboxError as exc:
                    log.error("cannot ack sent records: %s", exc)
            if not self.link.connected:
                self._inflight.clear()  # unacked records stay in the outbox and are sent again
                continue
            room = 256 - len(self._inflight)
            if room <= 0:
                continue
            try:
                records = self.outbox.peek(min(room, 128), exclude={seq for _, seq in self._inflight})
            except OutboxError as exc:
                log.error("cannot read the outbox: %s", exc)
                continue
            for rec in records:
                info = self.link.publish(self._t(rec.stream), rec.payload, qos=1)
                if info is None:
                    break
                self._inflight.append((info, rec.seq))
            if records:
                self._wake_sender.set()

    def flush(self, timeout: float) -> bool:
        """Wait until the outbox is empty (every record acknowledged by the broker)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.outbox.stats()["pending"] == 0:
                return True
            self._wake_sender.set()
            time.sleep(0.05)
        return False
