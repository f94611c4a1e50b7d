"""The daemon side of fleet sync: the model host the agent drives, and building the agent.

:func:`boot_bundle` decides which bundle the daemon serves at start (the committed slot, the
previous one when that fails, or the factory bundle from ``[model] bundle``);
:class:`PipelineHost` lets the agent load, swap and watch models in the running pipeline.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_runtime.config import Config
from edge_runtime.model import LoadedModel
from edge_runtime.pipeline import Pipeline, TensorObserver
from edge_runtime.sync.agent import AgentOptions, SyncAgent
from edge_runtime.sync.mqtt import LinkSettings
from edge_runtime.sync.outbox import Outbox
from edge_runtime.sync.slots import StateStore, transition
from edge_runtime.types import Result

__all__ = ["EventSink", "PipelineHost", "boot_bundle", "build_agent", "event_filter"]

log = logging.getLogger(__name__)

_IN_FLIGHT = frozenset({"downloading", "verifying", "staged", "selftest", "probation"})


def state_store(config: Config) -> StateStore:
    from edge_runtime.bundle import TrustStore

    trust = TrustStore.from_files(config.trust.keys) if config.trust.keys else None
    return StateStore(
        config.state.dir / "sync", trust=trust, require_signature=config.trust.require_signature
    )


def boot_bundle(config: Config) -> tuple[Path, str | None]:
    """The bundle to serve at start, and why it is not the committed one (None when it is)."""
    store = state_store(config)
    state = store.load()
    # A damaged state file: the state recovered from state.json.prev or the slots is saved (which
    # repairs the file) and the loss is reported with the boot note. An update in flight is left
    # to boot_choice; otherwise the phase becomes idle, so the agent does not take the recovered
    # phase for a rollback made at this boot.
    recovered = store.recovered
    if recovered and state.phase not in _IN_FLIGHT and state.reason != recovered:
        state = transition(state, "idle", recovered)
    path, new_state, reason = store.boot_choice(state, factory=config.model.bundle)
    if new_state != state or recovered:
        store.save(new_state)
    reason = "; ".join(r for r in (recovered, reason) if r) or None
    if reason:
        log.warning("boot: %s", reason)
    return path, reason


class PipelineHost:
    """:class:`~edge_runtime.sync.agent.ModelHost` over the daemon's running pipeline.

    ``current`` returns the pipeline serving now (a SIGHUP reload may replace it).
    """

    def __init__(self, current: Callable[[], Pipeline], loader: Callable[[Path], LoadedModel]) -> None:
        self._current = current
        self._loader = loader
        self._lock = threading.Lock()

    @property
    def pipeline(self) -> Pipeline:
        return self._current()

    def serving(self) -> LoadedModel:
        return self.pipeline.model

    def load(self, bundle_dir: Path) -> LoadedModel:
        return self._loader(bundle_dir)

    def swap(self, model: LoadedModel) -> LoadedModel:
        with self._lock:
            done, old = self.pipeline.swap_model(model)
            done.wait(30.0)
            return old[0] if old else model

    def add_observer(self, observer: TensorObserver) -> None:
        self.pipeline.observers.append(observer)

    def remove_observer(self, observer: TensorObserver) -> None:
        if observer in self.pipeline.observers:
            self.pipeline.observers.remove(observer)

    def errors(self) -> int:
        with self.pipeline.stats.lock:
            return sum(self.pipeline.stats.errors.values())

    def summary(self) -> dict[str, Any]:
        return self.pipeline.summary()


class EventSink:
    """A pipeline sink (runs on the sink thread) that queues fleet events in the outbox, one
    transaction per burst of results."""

    def __init__(self, agent: SyncAgent, pick: Callable[[Result], dict[str, Any] | None]) -> None:
        self._agent = agent
        self._pick = pick
        self._pending: list[dict[str, Any]] = []

    def write(self, result: Result) -> None:
        body = self._pick(result)
        if body is not None:
            self._pending.append(body)

    def flush(self) -> None:
        if self._pending:
            batch, self._pending = self._pending, []
            self._agent.events(batch)

    def close(self) -> None:
        """The outbox belongs to the agent; only what is pending is handed over."""
        self.flush()


def event_filter() -> Callable[[Result], dict[str, Any] | None]:
    """Which results become fleet events: detections, anomalies, and changes of the top class."""
    last: list[Any] = [None]

    def pick(result: Result) -> dict[str, Any] | None:
        p = result.payload
        if p.get("detections"):
            return {"frame": result.frame_index, **p}
        if p.get("anomaly"):
            return {"frame": result.frame_index, **p}
        top = p.get("top")
        if top:
            label = top[0].get("label")
            if label != last[0]:
                last[0] = label
                return {"frame": result.frame_index, "change": True, **p}
        return None

    return pick


def build_agent(
    config: Config,
    current: Callable[[], Pipeline],
    loader: Callable[[Path], LoadedModel],
    extra_sinks: list[Any],
) -> SyncAgent:
    """The agent for ``[sync]`` (enabled), attached to the pipeline ``current()`` returns.

    Inference events reach the outbox through an :class:`EventSink` appended to the current
    pipeline's sinks and to ``extra_sinks`` (the daemon adds those to every pipeline it builds).
    """
    from edge_runtime.bundle import TrustStore

    s = config.sync
    trust = TrustStore.from_files(config.trust.keys) if config.trust.keys else None
    state_dir = config.state.dir / "sync"
    link = LinkSettings(
        host=s.host,
        port=s.port,
        client_id=f"edgert-{s.fleet}-{s.device_id}",
        ca_file=s.ca_file,
        cert_file=s.cert_file,
        key_file=s.key_file,
        tls=s.tls,
        username=s.username,
        password=s.password,
        keepalive_s=s.keepalive_s,
        protocol=s.protocol,
    )
    options = AgentOptions(
        device_id=s.device_id,
        fleet=s.fleet,
        groups=tuple(s.groups),
        state_dir=state_dir,
        factory_bundle=config.model.bundle,
        link=link,
        prefix=s.prefix,
        telemetry_interval_s=s.telemetry_interval_s,
        chunk_window=s.chunk_window,
        require_signature=config.trust.require_signature,
        events=s.events,
        max_attempts=s.max_attempts,
    )
    outbox = Outbox(
        state_dir / "outbox.db",
        max_bytes=int(s.outbox.max_mb * 1024 * 1024),
        default_ttl_s=None if s.outbox.ttl_days is None else s.outbox.ttl_days * 86400.0,
        synchronous=s.outbox.synchronous,
    )

    def probed(path: Path) -> LoadedModel:
        if s.probe:
            from edge_runtime.sync.probe import probe_bundle

            probe_bundle(path, config.model.format, config.model.threads)
        return loader(path)

    agent = SyncAgent(options, PipelineHost(current, probed), trust, state_store(config), outbox)
    if s.events:
        sink = EventSink(agent, event_filter())
        extra_sinks.append(sink)
        current().sinks.append(sink)
    return agent
