"""The MQTT v1 protocol of fleet sync: topics, signed documents and commands, status payloads.

Topics (prefix ``edgert``, fleet name from the config)::

    edgert/{fleet}/device/{id}/state        retained JSON; {"online": false} is the last will
    edgert/{fleet}/device/{id}/telemetry    QoS 1 from the outbox; metrics, drift, drop reports
    edgert/{fleet}/device/{id}/events       QoS 1 from the outbox; inference results
    edgert/{fleet}/device/{id}/update       QoS 1 from the outbox; update state transitions
    edgert/{fleet}/device/{id}/cmd          signed commands to one device
    edgert/{fleet}/device/{id}/desired      retained signed desired document for one device
    edgert/{fleet}/group/{group}/desired    retained signed desired document for a group
    edgert/{fleet}/bundle/{sha256}/meta     retained chunk table (sync.transfer.BundleMeta)
    edgert/{fleet}/bundle/{sha256}/chunk/{i}  retained raw bytes of chunk ``i``

Signed messages (desired documents and commands) travel as an *envelope*: the exact document
bytes in base64 plus an Ed25519 signature over those bytes by a key in the device's trust
store. The device verifies the signature before it parses the document, so an attacker
controls no byte that the device interprets. A document carries a ``sequence`` that only
grows per target (replays of older documents are refused) and an ``expires_at`` (a stale
retained document cannot freeze a device on an old model forever without notice).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import time
from datetime import datetime, timezone
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edge_runtime.bundle.manifest import format_validation_error
from edge_runtime.bundle.signing import TrustStore, sign_bytes
from edge_runtime.errors import DocumentError, SignatureError

__all__ = [
    "Command",
    "DesiredDocument",
    "DesiredBundle",
    "Rollout",
    "ShadowOptions",
    "Topics",
    "canary_bucket",
    "open_envelope",
    "seal",
    "semver_key",
    "utc_iso",
]

MAX_ENVELOPE_BYTES = 64 * 1024
_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_SHA = re.compile(r"^[0-9a-f]{64}$")
_SEMVER = re.compile(r"^(\d+)\.(\d+)\.(\d+)(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?$")


def utc_iso(ts: float | None = None) -> str:
    """``ts`` (default now) as an ISO 8601 UTC time with a ``Z``."""
    moment = datetime.fromtimestamp(time.time() if ts is None else ts, tz=timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_time(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def semver_key(version: str) -> tuple[int, int, int, int, str]:
    """Sort key of a semantic version (a pre-release sorts before its release)."""
    m = _SEMVER.match(version)
    if m is None:
        raise DocumentError(f"{version!r} is not a semantic version like 1.2.3")
    pre = m.group(4)
    return int(m.group(1)), int(m.group(2)), int(m.group(3)), 0 if pre else 1, pre or ""


def check_id(value: str, what: str) -> str:
    """A device, group or fleet id usable as one MQTT topic level."""
    if not _ID.match(value):
        raise DocumentError(
            f"{what} {value!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-' (no '/', '+', '#')"
        )
    return value


class Topics:
    """Topic names of one fleet."""

    def __init__(self, fleet: str, prefix: str = "edgert") -> None:
        self.fleet = check_id(fleet, "fleet")
        self.prefix = prefix
        self.root = f"{prefix}/{fleet}"

    def device(self, device_id: str, leaf: str) -> str:
        """``{root}/device/{id}/{leaf}`` (state, telemetry, events, update, cmd, desired)."""
        return f"{self.root}/device/{check_id(device_id, 'device id')}/{leaf}"

    def group_desired(self, group: str) -> str:
        return f"{self.root}/group/{check_id(group, 'group')}/desired"

    def bundle_meta(self, sha256: str) -> str:
        return f"{self.root}/bundle/{sha256}/meta"

    def bundle_chunk(self, sha256: str, index: int) -> str:
        return f"{self.root}/bundle/{sha256}/chunk/{index}"

    def parse_chunk(self, topic: str) -> tuple[str, int] | None:
        """``(sha256, index)`` of a chunk topic of this fleet, else None."""
        parts = topic.split("/")
        base = self.root.split("/")
        if len(parts) != len(base) + 4 or parts[: len(base)] != base:
            return None
        if parts[len(base)] != "bundle" or parts[len(base) + 2] != "chunk":
            return None
        sha, idx = parts[len(base) + 1], parts[len(base) + 3]
        if not _SHA.match(sha) or not idx.isdigit():
            return None
        return sha, int(idx)

    def all_devices(self, leaf: str) -> str:
        """Wildcard over every device's ``leaf`` topic."""
        return f"{self.root}/device/+/{leaf}"


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DesiredBundle(_Doc):
    """Which bundle to run, and how to fetch it."""

    name: str = Field(pattern=_ID.pattern)
    version: str
    sha256: str = Field(pattern=_SHA.pattern)
    size: int = Field(gt=0, le=2 * 1024**3)
    meta_sha256: str = Field(pattern=_SHA.pattern, description="sha256 of the chunk table document")

    @field_validator("version")
    @classmethod
    def _semver(cls, value: str) -> str:
        if not _SEMVER.match(value):
            raise ValueError(f"{value!r} is not a semantic version like 1.2.3")
        return value


class ShadowOptions(_Doc):
    """Run the candidate beside the live model on a sample of inputs; report agreement only."""

    sample_rate: float = Field(default=0.2, gt=0, le=1)
    min_frames: int = Field(default=100, ge=1)
    report_every_s: float = Field(default=10.0, gt=0)


class Rollout(_Doc):
    """How a device installs the bundle and decides to keep it."""

    canary_percent: float = Field(default=100.0, ge=0, le=100)
    shadow: ShadowOptions | None = None
    probation_s: float = Field(default=30.0, ge=0, le=86400)
    probation_min_frames: int = Field(default=50, ge=0)
    max_latency_ratio: float = Field(default=2.0, gt=1, description="new p50 / old p50 that fails probation")
    max_error_rate: float = Field(default=0.05, ge=0, le=1)
    min_fps_ratio: float = Field(default=0.5, ge=0, le=1)
    max_output_psi: float = Field(default=0.5, gt=0, description="PSI of output classes vs the reference")
    max_top1_share: float = Field(
        default=0.97, gt=0, le=1, description="collapse: one class takes this share"
    )


class DesiredDocument(_Doc):
    """The signed, retained document that says which model a group or device should run."""

    schema_version: Literal[1] = 1
    kind: Literal["desired"] = "desired"
    fleet: str = Field(pattern=_ID.pattern)
    target: str = Field(description="'group:NAME' or 'device:ID'")
    sequence: int = Field(ge=1, description="grows with every document for this target")
    issued_at: str
    expires_at: str
    bundle: DesiredBundle
    rollout: Rollout = Field(default_factory=Rollout)
    rollback: bool = Field(default=False, description="an explicit, signed rollback: allows a lower version")

    @field_validator("target")
    @classmethod
    def _target(cls, value: str) -> str:
        kind, _, name = value.partition(":")
        if kind not in ("group", "device") or not _ID.match(name):
            raise ValueError(f"{value!r} must be 'group:NAME' or 'device:ID'")
        return value

    @field_validator("issued_at", "expires_at")
    @classmethod
    def _time(cls, value: str) -> str:
        try:
            _parse_time(value)
        except ValueError as exc:
            raise ValueError(f"{value!r} is not an ISO 8601 time like 2026-01-31T12:00:00Z") from exc
        return value

    @model_validator(mode="after")
    def _order(self) -> DesiredDocument:
        if _parse_time(self.expires_at) <= _parse_time(self.issued_at):
            raise ValueError("expires_at must be after issued_at")
        return self

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= _parse_time(self.expires_at)

    @property
    def issued_ts(self) -> float:
        return _parse_time(self.issued_at)


class Command(_Doc):
    """A signed command to one device (``device/{id}/cmd``)."""

    schema_version: Literal[1] = 1
    kind: Literal["command"] = "command"
    fleet: str = Field(pattern=_ID.pattern)
    device: str = Field(pattern=_ID.pattern)
    action: Literal["rollback", "shadow_off", "report"]
    sequence: int = Field(ge=1)
    issued_at: str
    expires_at: str
    reason: str = Field(default="", max_length=500)

    @field_validator("issued_at", "expires_at")
    @classmethod
    def _time(cls, value: str) -> str:
        try:
            _parse_time(value)
        except ValueError as exc:
            raise ValueError(f"{value!r} is not an ISO 8601 time like 2026-01-31T12:00:00Z") from exc
        return value

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= _parse_time(self.expires_at)


def seal(document: DesiredDocument | Command, key: Ed25519PrivateKey) -> bytes:
    """The MQTT payload of a signed document: ``{"doc": b64(bytes), "alg", "key_id", "sig"}``."""
    body = json.dumps(document.model_dump(mode="json"), sort_keys=True, separators=(",", ":")).encode()
    sig = json.loads(sign_bytes(body, key))
    envelope = {"doc": base64.b64encode(body).decode(), **sig}
    return json.dumps(envelope, sort_keys=True, separators=(",", ":")).encode()


def open_envelope(payload: bytes, trust: TrustStore, kind: type[Any]) -> tuple[Any, str]:
    """Verify and parse a signed payload into ``kind``; return ``(document, signing key id)``.

    Raises :class:`DocumentError` (malformed, unsigned, wrong kind) - the signature is checked
    before the document bytes are parsed.
    """
    if len(payload) > MAX_ENVELOPE_BYTES:
        raise DocumentError(f"signed message of {len(payload)} bytes is over the {MAX_ENVELOPE_BYTES} limit")
    try:
        env = json.loads(payload)
        body = base64.b64decode(env["doc"], validate=True)
        sig_doc = json.dumps({k: env[k] for k in ("alg", "key_id", "sig")}).encode()
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise DocumentError(
            f"not a signed edgert message ({type(exc).__name__}: {exc}); publish with `edgert fleet`"
        ) from exc
    try:
        key_id = trust.verify(body, sig_doc)
    except SignatureError as exc:
        raise DocumentError(f"signature refused: {exc}") from exc
    try:
        doc = kind.model_validate_json(body)
    except ValidationError as exc:
        raise DocumentError(f"signed {kind.__name__} is invalid: {format_validation_error(exc)}") from exc
    return doc, key_id


def canary_bucket(device_id: str, salt: str) -> float:
    """A stable number in [0, 100) for ``device_id``: canaries are devices below the percentage.

    ``salt`` (the bundle sha256) changes the subset from one rollout to the next, so the same
    devices are not always the ones to take the risk.
    """
    digest = hashlib.sha256(f"{salt}:{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100.0


def status_payload(**fields: Any) -> bytes:
    """Compact JSON for a status message."""
    return json.dumps(fields, separators=(",", ":"), default=str).encode()
