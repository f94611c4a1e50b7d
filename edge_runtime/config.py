"""The daemon's TOML configuration, validated by pydantic models with ``extra="forbid"``.

Relative paths are taken relative to the config file's folder. A secret is never written in
the config: fields ending in ``_file`` name a file, and a bare file name is looked up in
``$CREDENTIALS_DIRECTORY`` (systemd's ``LoadCredential=``) first. Errors name the field path
and the fix; the CLI exits with code 2 on them.

Example ``edgert.toml``::

    [model]
    bundle = "models/demo/shapes"

    [source]
    kind = "video"
    uri = "models/demo/shapes.avi"

    [[sinks]]
    kind = "jsonl"
    path = "-"
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edge_runtime.bundle.manifest import format_validation_error
from edge_runtime.errors import ConfigError
from edge_runtime.sources.specs import SourceSpec, WindowSpec

#: a config file larger than this is refused unread (a real one is a few KiB)
MAX_CONFIG_BYTES = 1 << 20

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "MAX_CONFIG_BYTES",
    "Config",
    "DelegateConfig",
    "JsonlSinkConfig",
    "LogConfig",
    "ModelConfig",
    "PipelineConfig",
    "SinkConfig",
    "SnapshotSinkConfig",
    "OutboxConfig",
    "SqliteSinkConfig",
    "StateConfig",
    "SyncConfig",
    "TrustConfig",
    "load_config",
    "parse_config",
    "read_secret",
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DelegateConfig(_Section):
    """An external LiteRT delegate, e.g. ``{ library = "libedgetpu.so.1" }``."""

    library: str
    options: dict[str, str] = Field(default_factory=dict)


class ModelConfig(_Section):
    """Which bundle to run and how."""

    bundle: Path
    format: Literal["auto", "onnx", "tflite"] = "auto"
    threads: int = Field(default=2, ge=1, le=256)
    providers: list[str] = Field(default_factory=lambda: ["auto"])
    delegates: list[DelegateConfig] = Field(default_factory=list)
    selftest: bool = True


class PipelineConfig(_Section):
    """Queueing and pacing between capture and inference."""

    max_fps: float | None = Field(default=None, gt=0)
    queue_size: int = Field(default=4, ge=1, le=1024, description="file sources only")
    max_frames: int | None = Field(default=None, ge=1)
    batch: int = Field(default=1, ge=1, le=1024, description="frames/windows per inference")
    batch_timeout_ms: float = Field(default=20.0, ge=0, description="wait this long to fill a batch")
    snapshot_frames: bool = False


class JsonlSinkConfig(_Section):
    """One JSON result line per processed frame/window; ``path = "-"`` is stdout."""

    kind: Literal["jsonl"] = "jsonl"
    path: str = "-"
    flush_every: int = Field(
        default=64, ge=1, description="flush after this many lines (and after every burst)"
    )


class SqliteSinkConfig(_Section):
    """Results in an SQLite event log (WAL), bounded to ``max_rows`` (oldest deleted)."""

    kind: Literal["sqlite"] = "sqlite"
    path: Path
    max_rows: int = Field(default=100_000, ge=1)
    only_events: bool = Field(default=False, description="store detections/anomalies only")


class SnapshotSinkConfig(_Section):
    """JPEG snapshots of frames with detections (boxes drawn), rate limited."""

    kind: Literal["snapshots"] = "snapshots"
    dir: Path
    min_score: float = Field(default=0.5, ge=0, le=1)
    min_interval_s: float = Field(default=5.0, ge=0)
    max_files: int = Field(default=500, ge=1)
    quality: int = Field(default=85, ge=10, le=100)


SinkConfig = Annotated[JsonlSinkConfig | SqliteSinkConfig | SnapshotSinkConfig, Field(discriminator="kind")]


def _default_sinks() -> list[SinkConfig]:
    return [JsonlSinkConfig()]


class TrustConfig(_Section):
    """Public keys whose bundle signatures are accepted."""

    keys: list[Path] = Field(default_factory=list)
    require_signature: bool = True

    @model_validator(mode="after")
    def _check(self) -> TrustConfig:
        if self.require_signature and not self.keys:
            raise ValueError(
                "require_signature is true but no keys are listed; add keys = ['path/to/key.pub'] "
                "or set require_signature = false (development only)"
            )
        return self


class StateConfig(_Section):
    """Where the daemon keeps its state (bundles unpacked, databases)."""

    dir: Path = Path("state")


class OutboxConfig(_Section):
    """The disk-backed outbox that keeps telemetry and events while the broker is away."""

    max_mb: float = Field(default=64.0, gt=0, le=65536)
    ttl_days: float | None = Field(default=7.0, gt=0)
    synchronous: Literal["NORMAL", "FULL"] = "NORMAL"


class SyncConfig(_Section):
    """Fleet sync over MQTT (``[sync]``); off unless ``enabled = true``.

    Example::

        [sync]
        enabled = true
        host = "broker.plant1.example"
        port = 8883
        fleet = "plant1"
        device_id = "cam-07"
        groups = ["cameras"]
        ca_file = "/etc/edgert/ca.pem"
        cert_file = "cam-07.crt"      # bare names: $CREDENTIALS_DIRECTORY first
        key_file = "cam-07.key"
    """

    enabled: bool = False
    host: str = "localhost"
    port: int = Field(default=8883, ge=1, le=65535)
    fleet: str = Field(default="default", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    device_id: str = Field(default="", pattern=r"^[A-Za-z0-9_.-]{0,64}$")
    groups: list[str] = Field(default_factory=list)
    prefix: str = Field(default="edgert", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    tls: bool = Field(default=True, description="false only for a broker on a trusted local link")
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = None
    password_file: Path | None = None
    password: str | None = Field(default=None, exclude=True, description="read from password_file at load")
    protocol: Literal["5", "3.1.1"] = "5"
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    telemetry_interval_s: float = Field(default=10.0, gt=0)
    chunk_window: int = Field(default=32, ge=1, le=1024)
    events: bool = True
    probe: bool = Field(default=True, description="load and self-test a candidate in a child process first")
    max_attempts: int = Field(default=3, ge=1, le=100, description="installs of one document, then give up")
    outbox: OutboxConfig = Field(default_factory=OutboxConfig)

    @model_validator(mode="after")
    def _check(self) -> SyncConfig:
        if not self.enabled:
            return self
        if not self.device_id:
            raise ValueError('device_id is required when enabled = true (e.g. device_id = "cam-07")')
        for group in self.groups:
            if not re.match(r"^[A-Za-z0-9_.-]{1,64}$", group):
                raise ValueError(f"group {group!r}: use letters, digits, '.', '_' or '-' (no '/', '+', '#')")
        if self.tls and self.ca_file is None:
            raise ValueError(
                'tls is on but ca_file is missing; give the broker\'s CA certificate (ca_file = "ca.pem") '
                "or set tls = false for a trusted local link"
            )
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("give both cert_file and key_file (mutual TLS), or neither")
        return self


class LogConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    stats_interval_s: float = Field(default=30.0, ge=0, description="0 = no periodic stats")


class Config(_Section):
    """The whole daemon configuration."""

    model: ModelConfig
    source: SourceSpec
    window: WindowSpec | None = None
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    sinks: list[SinkConfig] = Field(default_factory=_default_sinks)
    trust: TrustConfig = Field(default_factory=lambda: TrustConfig(require_signature=False))
    state: StateConfig = Field(default_factory=StateConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    sync: SyncConfig = Field(default_factory=SyncConfig)


def _resolve(base: Path, value: Path) -> Path:
    try:
        value = value.expanduser()
    except RuntimeError as exc:  # '~name/...' of a user this system does not know
        raise ConfigError(
            f"path {str(value)!r}: {exc}; use an absolute path or one relative to the config"
        ) from exc
    return value if value.is_absolute() else base / value


def _resolve_paths(config: Config, base: Path) -> Config:
    model = config.model.model_copy(update={"bundle": _resolve(base, config.model.bundle)})
    source = config.source
    if source.kind in ("video", "images", "replay") and source.uri and "://" not in source.uri:
        source = source.model_copy(update={"uri": str(_resolve(base, Path(source.uri)))})
    sinks: list[Any] = []
    for sink in config.sinks:
        if isinstance(sink, JsonlSinkConfig) and sink.path != "-":
            sinks.append(sink.model_copy(update={"path": str(_resolve(base, Path(sink.path)))}))
        elif isinstance(sink, SqliteSinkConfig):
            sinks.append(sink.model_copy(update={"path": _resolve(base, sink.path)}))
        elif isinstance(sink, SnapshotSinkConfig):
            sinks.append(sink.model_copy(update={"dir": _resolve(base, sink.dir)}))
        else:
            sinks.append(sink)
    trust = config.trust.model_copy(update={"keys": [_resolve(base, k) for k in config.trust.keys]})
    state = StateConfig(dir=_resolve(base, config.state.dir))
    sync = config.sync
    if sync.enabled:
        files = {
            name: _secret_path(base, value)
            for name in ("ca_file", "cert_file", "key_file", "password_file")
            if (value := getattr(sync, name)) is not None
        }
        sync = sync.model_copy(update=files)
    return config.model_copy(
        update={
            "model": model,
            "source": source,
            "sinks": sinks,
            "trust": trust,
            "state": state,
            "sync": sync,
        }
    )


def _secret_path(base: Path, value: Path) -> Path:
    """A bare file name is looked up in $CREDENTIALS_DIRECTORY first (systemd LoadCredential=)."""
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds and not value.is_absolute() and len(value.parts) == 1 and (Path(creds) / value).is_file():
        return Path(creds) / value
    return _resolve(base, value)


def parse_config(data: dict[str, Any], base: Path | None = None, origin: str = "config") -> Config:
    """Validate a config mapping; raise :class:`ConfigError` naming each bad field."""
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{origin}: {format_validation_error(exc)}") from exc
    config = _resolve_paths(config, base or Path.cwd())
    for key in config.trust.keys:
        if not key.is_file():
            raise ConfigError(f"{origin}: trust.keys: public key {key} does not exist")
    sync = config.sync
    if sync.enabled:
        for name in ("ca_file", "cert_file", "key_file"):
            path = getattr(sync, name)
            if path is not None and not path.is_file():
                raise ConfigError(f"{origin}: sync.{name}: {path} does not exist; point it at the PEM file")
        if sync.password_file is not None:
            password = read_secret(sync.password_file)
            config = config.model_copy(update={"sync": sync.model_copy(update={"password": password})})
        if not config.trust.keys:
            raise ConfigError(
                f"{origin}: sync.enabled needs trust.keys: desired documents and bundles from the fleet are "
                "only accepted when signed by a listed key"
            )
    return config


def load_config(path: Path) -> Config:
    """Read and validate a TOML config file."""
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from exc
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config {path} is larger than {MAX_CONFIG_BYTES} bytes; is it the right file?")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config {path} is not UTF-8 text") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    except RecursionError as exc:  # tomllib recurses once per nested array or inline table
        raise ConfigError(f"{path} is not valid TOML: arrays or inline tables nested too deeply") from exc
    return parse_config(data, path.resolve().parent, str(path))


def read_secret(value: Path) -> str:
    """Read a secret from a file; bare names are looked up in $CREDENTIALS_DIRECTORY first."""
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    candidates = [value]
    if creds and not value.is_absolute() and len(value.parts) == 1:
        candidates.insert(0, Path(creds) / value)
    for candidate in candidates:
        if candidate.is_file():
            try:
                return candidate.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(
                    f"cannot read secret file {candidate}: {exc}; make it UTF-8 text the daemon can read"
                ) from exc
    raise ConfigError(
        f"secret file {value} not found (looked in {[str(c) for c in candidates]}); create it or "
        "pass it with systemd LoadCredential="
    )
