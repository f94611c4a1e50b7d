"""The daemon: config -> verified bundle -> self-tested model -> pipeline, under signals.

SIGTERM/SIGINT stop gracefully (the queue is drained into the sinks, the summary printed).
SIGHUP re-reads the config: an invalid new config is reported and ignored; a new model is
loaded and self-tested in the background and swapped in between two inferences; other
changes restart the source and sinks. Under systemd it sends READY, STATUS and WATCHDOG
(the watchdog ping stops if the inference thread stops making progress, so systemd restarts
a hung daemon).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from edge_runtime.backends import BackendOptions, DelegateSpec
from edge_runtime.bundle import Bundle, TrustStore, open_bundle
from edge_runtime.config import Config, load_config
from edge_runtime.errors import ConfigError, EdgeRuntimeError
from edge_runtime.model import LoadedModel, load_model
from edge_runtime.pipeline import Pipeline, PipelineOptions
from edge_runtime.preprocess_spec import TensorPreprocess
from edge_runtime.sdnotify import Notifier, watchdog_interval
from edge_runtime.selftest import run_selftest
from edge_runtime.sinks import make_sinks
from edge_runtime.sources import ReconnectingSource, Source, Windower, make_source
from edge_runtime.sources.specs import WindowSpec
from edge_runtime.stats import PipelineStats

__all__ = ["Daemon", "load_verified_model"]

log = logging.getLogger(__name__)

_UNLOCKED_STALE_S = 60.0
"""An unpack folder without a ``.lock`` this old was left by a daemon that died (or an older version)."""


def _remove_stale_unpack_dirs(parent: Path) -> None:
    """Remove the ``edgert-*`` unpack folders of daemons that died (kill -9, power loss).

    Each may hold a whole unpacked bundle, so a crash loop would fill the disk. A folder is in
    use while its daemon holds the ``flock`` on its ``.lock`` (released when the process dies).
    """
    for path in sorted(parent.glob("edgert-*")):
        if path.is_symlink() or not path.is_dir():
            continue
        try:
            fd = os.open(path / ".lock", os.O_RDWR)
        except FileNotFoundError:
            with contextlib.suppress(OSError):
                if time.time() - path.stat().st_mtime > _UNLOCKED_STALE_S:
                    log.info("removing %s, left by a daemon that did not exit cleanly", path)
                    shutil.rmtree(path, ignore_errors=True)
            continue
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pass  # a running daemon's folder
        else:
            log.info("removing %s, left by a daemon that did not exit cleanly", path)
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)


def load_verified_model(config: Config, unpack_dir: Path, bundle_path: Path | None = None) -> LoadedModel:
    """Open and verify the configured bundle (or ``bundle_path``), load its model and self-test it."""
    trust = TrustStore.from_files(config.trust.keys) if config.trust.keys else None
    if not config.trust.require_signature:
        log.warning("bundle signatures are not required ([trust] require_signature = false)")
    bundle: Bundle = open_bundle(
        bundle_path or config.model.bundle,
        trust=trust,
        require_signature=config.trust.require_signature,
        unpack_dir=unpack_dir,
    )
    options = BackendOptions(
        threads=config.model.threads,
        providers=tuple(config.model.providers),
        delegates=tuple(DelegateSpec(d.library, dict(d.options)) for d in config.model.delegates),
    )
    model = load_model(bundle, config.model.format, options)
    if config.model.selftest:
        try:
            report = run_selftest(model)
        except EdgeRuntimeError:
            model.close()
            raise
        log.info("self-test passed: %s", report.to_dict())
    return model


class Daemon:
    """Runs the pipeline described by a config until stopped."""

    def __init__(self, config: Config, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.stop_event = threading.Event()
        self.stats = PipelineStats()
        self.notifier = Notifier()
        self._reload = threading.Event()
        self._source_state = "starting"
        self._tmp: Path | None = None
        self._tmp_lock = -1
        self.summary: dict[str, Any] = {}
        self.agent: Any = None
        self.pipeline: Pipeline | None = None
        self.extra_sinks: list[Any] = []
        self._boot_note: str | None = None

    # -- building blocks ----------------------------------------------------------------------
    def _unpack_dir(self) -> Path:
        """A private folder for packed bundles unpacked by this process (removed at exit).

        It is locked (``.lock``) while this process lives; the folders of daemons that died
        without removing theirs are removed first.
        """
        if self._tmp is None:
            parent = self.config.state.dir / "tmp"
            try:
                parent.mkdir(parents=True, exist_ok=True)
                _remove_stale_unpack_dirs(parent)
                tmp = Path(tempfile.mkdtemp(prefix="edgert-", dir=parent))
                self._tmp_lock = os.open(tmp / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
                fcntl.flock(self._tmp_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._tmp = tmp
            except OSError:
                self._tmp = Path(tempfile.mkdtemp(prefix="edgert-"))
        return self._tmp

    def _on_source_state(self, state: str, reason: str) -> None:
        self._source_state = state
        if state == "offline":
            log.warning("source offline: %s", reason)
        else:
            log.info("source %s", state)
        self.notifier.status(f"source {state}" + (f": {reason}" if reason else ""))

    def _source(self, config: Config) -> Source:
        inner = make_source(config.source)
        if config.source.live:
            return ReconnectingSource(inner, config.source, self._on_source_state, stop=self.stop_event)
        return inner

    @staticmethod
    def _windower(config: Config, model: LoadedModel) -> Windower | None:
        pre = model.bundle.manifest.preprocess
        if not isinstance(pre, TensorPreprocess):
            return None
        spec = config.window or WindowSpec(size=pre.window, hop=pre.hop)
        return Windower(spec)

    def _pipeline(self, config: Config, model: LoadedModel) -> Pipeline:
        sinks = make_sinks(config.sinks) + list(self.extra_sinks)
        snapshots = any(s.kind == "snapshots" for s in config.sinks)
        options = PipelineOptions(
            max_fps=config.pipeline.max_fps,
            queue_size=config.pipeline.queue_size,
            max_frames=config.pipeline.max_frames,
            keep_frames=snapshots or config.pipeline.snapshot_frames,
            batch=config.pipeline.batch,
            batch_timeout_s=config.pipeline.batch_timeout_ms / 1000.0,
        )
        return Pipeline(
            model,
            self._source(config),
            sinks,
            options,
            windower=self._windower(config, model),
            stats=self.stats,
            stop_event=self.stop_event,
        )

    # -- signals ------------------------------------------------------------------------------
    def _install_signals(self) -> None:
        def stop(signum: int, _frame: FrameType | None) -> None:
            log.info("received %s, stopping", signal.Signals(signum).name)
            self.stop_event.set()

        def hup(_signum: int, _frame: FrameType | None) -> None:
            self._reload.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, hup)

    def request_reload(self) -> None:
        """Same as SIGHUP."""
        self._reload.set()

    def _do_reload(self, pipeline: Pipeline) -> Pipeline:
        self._reload.clear()
        if self.config_path is None:
            log.warning("SIGHUP ignored: the daemon was started without --config")
            return pipeline
        self.notifier.reloading()
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error("reload rejected, keeping the running config: %s", exc)
            self.notifier.ready("reload rejected")
            return pipeline
        old = self.config
        if (new.model, new.trust) != (old.model, old.trust):
            try:
                model = load_verified_model(new, self._unpack_dir())
            except EdgeRuntimeError as exc:
                log.error("reload: new model rejected, still serving the old one: %s", exc)
                self.notifier.ready("reload rejected")
                return pipeline
            done, retired = pipeline.swap_model(model)
            done.wait(30.0)
            for m in retired:
                m.close()
        self.config = new
        if (new.source, new.sinks, new.window, new.pipeline) != (
            old.source,
            old.sinks,
            old.window,
            old.pipeline,
        ):
            log.info("reload: restarting source and sinks")
            current = pipeline.model
            observers = list(pipeline.observers)
            pipeline.stop()
            self.stop_event.clear()
            pipeline = self._pipeline(new, current)
            pipeline.observers.extend(observers)  # fleet sync's probation/drift watchers carry over
            self.pipeline = pipeline
            pipeline.start()
        self.notifier.ready("reloaded")
        log.info("config reloaded")
        return pipeline

    # -- main loop ----------------------------------------------------------------------------
    def run(self, install_signals: bool = True) -> int:
        """Run until the source ends, max frames, or a stop signal; return the exit code."""
        if install_signals:
            self._install_signals()
        self.notifier.status("loading model")
        agent = None
        try:
            model = self._boot_model()
            pipeline = self._pipeline(self.config, model)
            if self.config.sync.enabled:
                from edge_runtime.sync.host import build_agent

                config = self.config
                self.pipeline = pipeline
                agent = build_agent(
                    config,
                    self._current_pipeline,
                    lambda p: load_verified_model(config, self._unpack_dir(), p),
                    self.extra_sinks,
                )
                agent.boot_note = self._boot_note
        except EdgeRuntimeError:
            self.notifier.close()
            self._cleanup()
            raise
        pipeline.start()
        if agent is not None:
            agent.start()
            self.agent = agent
        self.notifier.ready(f"serving {model.name} {model.version}")
        watchdog = watchdog_interval()
        stats_every = self.config.log.stats_interval_s
        next_stats = time.monotonic() + stats_every if stats_every else float("inf")
        try:
            while not pipeline.wait(0.2):
                if self.stop_event.is_set():
                    break
                if self._reload.is_set():
                    pipeline = self._do_reload(pipeline)
                now = time.monotonic()
                if watchdog and now - self.stats.last_progress < max(2 * watchdog, 5.0):
                    self.notifier.watchdog()
                if now >= next_stats:
                    next_stats = now + stats_every
                    s = pipeline.summary()
                    log.info(
                        "stats: frames=%d dropped=%d fps=%.1f errors=%s source=%s",
                        s["frames"],
                        s["dropped"],
                        s["fps"],
                        s["errors"],
                        self._source_state,
                    )
        finally:
            self.notifier.stopping()
            if agent is not None:
                agent.stop()
            pipeline.stop()
            if agent is not None:
                agent.close()
            self.summary = pipeline.summary()
            pipeline.model.close()
            self.notifier.close()
            self._cleanup()
        return 0

    def _current_pipeline(self) -> Pipeline:
        assert self.pipeline is not None
        return self.pipeline

    def _boot_model(self) -> LoadedModel:
        """The committed fleet model when sync is on (else, or when it fails, the configured bundle)."""
        if not self.config.sync.enabled:
            return load_verified_model(self.config, self._unpack_dir())
        from edge_runtime.sync.host import boot_bundle

        path, self._boot_note = boot_bundle(self.config)
        if path == self.config.model.bundle:
            return load_verified_model(self.config, self._unpack_dir())
        try:
            return load_verified_model(self.config, self._unpack_dir(), path)
        except EdgeRuntimeError as exc:
            log.error("boot: the committed model in %s failed (%s); serving the factory bundle", path, exc)
            self._boot_note = f"the committed model failed at boot ({exc}); serving the factory bundle"
            return load_verified_model(self.config, self._unpack_dir())

    def _cleanup(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        if self._tmp_lock >= 0:
            os.close(self._tmp_lock)
            self._tmp_lock = -1


def print_summary(summary: dict[str, Any]) -> None:
    """The final summary, one JSON line on stderr (stdout may carry the JSONL results)."""
    sys.stderr.write(json.dumps({"summary": summary}) + "\n")
    sys.stderr.flush()
