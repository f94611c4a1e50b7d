"""``edgert fleet``: publish, status, watch, promote, rollback, provision.

The operator's connection comes from ``--config fleet.toml`` (a ``[fleet]`` table) and/or
flags; flags win. Example ``fleet.toml``::

    [fleet]
    host = "broker.plant1.example"
    port = 8883
    fleet = "plant1"
    ca_file = "pki/ca.crt"
    cert_file = "pki/fleet-admin.crt"
    key_file = "pki/fleet-admin.key"
    sign_key = "keys/release.key"
    trust_keys = ["keys/release.pub"]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_runtime.bundle.manifest import format_validation_error
from edge_runtime.errors import ConfigError

__all__ = ["FleetSettings", "add_fleet_parser"]


class FleetSettings(BaseModel):
    """The operator side's settings (``[fleet]`` in fleet.toml)."""

    model_config = ConfigDict(extra="forbid")

    host: str = "localhost"
    port: int = Field(default=8883, ge=1, le=65535)
    fleet: str = Field(default="default", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    prefix: str = "edgert"
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    tls: bool = True
    sign_key: Path | None = None
    trust_keys: list[Path] = Field(default_factory=list)
    client_id: str = "edgert-fleet"


def _settings(args: argparse.Namespace) -> FleetSettings:
    data: dict[str, Any] = {}
    base = Path.cwd()
    if args.config is not None:
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - Python 3.10
            import tomli as tomllib

        try:
            data = dict(tomllib.loads(args.config.read_text(encoding="utf-8")).get("fleet", {}))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {args.config}: {exc}") from exc
        base = args.config.resolve().parent
    for name in ("host", "port", "fleet", "ca_file", "cert_file", "key_file", "sign_key"):
        value = getattr(args, name, None)
        if value is not None:
            data[name] = value
    if getattr(args, "trust_key", None):
        data["trust_keys"] = args.trust_key
    try:
        settings = FleetSettings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"fleet settings: {format_validation_error(exc)}") from exc

    def rel(p: Path | None) -> Path | None:
        return None if p is None else (p if p.is_absolute() else base / p)

    return settings.model_copy(
        update={
            "ca_file": rel(settings.ca_file),
            "cert_file": rel(settings.cert_file),
            "key_file": rel(settings.key_file),
            "sign_key": rel(settings.sign_key),
            "trust_keys": [rel(k) for k in settings.trust_keys],
        }
    )


def _client(s: FleetSettings) -> Any:
    from edge_runtime.sync.mqtt import LinkSettings
    from edge_runtime.sync.publisher import FleetClient

    if s.tls and s.ca_file is None:
        raise ConfigError("fleet: give ca_file (the broker's CA) and the operator's cert_file/key_file")
    link = LinkSettings(
        host=s.host,
        port=s.port,
        client_id=f"{s.client_id}-{int(time.time() * 1000) % 100000}",
        ca_file=s.ca_file,
        cert_file=s.cert_file,
        key_file=s.key_file,
        tls=s.tls,
    )
    client = FleetClient(link, s.fleet, prefix=s.prefix)
    client.connect()
    return client


def _key(s: FleetSettings) -> Any:
    from edge_runtime.bundle.signing import load_private_key

    if s.sign_key is None:
        raise ConfigError("fleet: documents must be signed; give --sign-key (or sign_key in fleet.toml)")
    return load_private_key(s.sign_key)


def _trust(s: FleetSettings) -> Any:
    from edge_runtime.bundle.signing import TrustStore

    return TrustStore.from_files(list(s.trust_keys)) if s.trust_keys else None


def _target(args: argparse.Namespace) -> str:
    if bool(args.group) == bool(args.device):
        raise ConfigError("give exactly one of --group G or --device ID")
    return f"group:{args.group}" if args.group else f"device:{args.device}"


def cmd_publish(args: argparse.Namespace) -> int:
    from edge_runtime.sync.protocol import Rollout, ShadowOptions
    from edge_runtime.sync.publisher import follow_rollout

    s = _settings(args)
    key = _key(s)
    rollout = Rollout(
        canary_percent=args.canary,
        shadow=ShadowOptions(sample_rate=args.shadow_rate) if args.shadow else None,
        probation_s=args.probation,
    )
    client = _client(s)
    try:
        t0 = time.monotonic()
        bundle, seconds = client.upload_bundle(args.bundle)
        doc = client.publish_document(_target(args), bundle, key, rollout=rollout, trust=_trust(s))
        print(
            f"published {bundle.name} {bundle.version} ({bundle.size} bytes, sha256 {bundle.sha256[:12]}) to "
            f"{doc.target} as #{doc.sequence}; upload {seconds:.2f} s, total {time.monotonic() - t0:.2f} s"
        )
        if args.canary < 100 and args.follow:
            devices = [d.device for d in client.status()]
            outcome = follow_rollout(
                client,
                doc,
                devices,
                key,
                abort_share=args.abort_share,
                timeout_s=args.timeout,
                trust=_trust(s),
            )
            print(json.dumps({**vars(outcome), "document": None}, default=str))
            return 0 if outcome.result == "promoted" else 1
    finally:
        client.close()
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    client = _client(_settings(args))
    try:
        rows = client.status(args.wait)
    finally:
        client.close()
    if args.json:
        print(json.dumps([vars(r) for r in rows], default=str))
        return 0
    header = f"{'device':<20} {'online':<7} {'model':<24} {'update':<12} {'health':<10} last seen"
    print(header)
    now = time.time()
    for r in rows:
        seen = f"{now - r.last_seen:.0f} s ago" if r.last_seen else "-"
        print(
            f"{r.device:<20} {'yes' if r.online else 'no':<7} {r.model:<24} {r.phase:<12} "
            f"{r.health:<10} {seen}"
        )
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    client = _client(_settings(args))
    count = 0

    def show(topic: str, payload: bytes) -> None:
        nonlocal count
        count += 1
        sys.stdout.write(json.dumps({"topic": topic, "payload": payload.decode("utf-8", "replace")}) + "\n")
        sys.stdout.flush()

    try:
        client.watch(args.stream or ["telemetry", "events", "update", "state"], show, shared=args.shared)
        end = time.monotonic() + args.seconds if args.seconds else float("inf")
        while time.monotonic() < end and (not args.count or count < args.count):
            time.sleep(0.1)
    finally:
        client.close()
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    s = _settings(args)
    client = _client(s)
    try:
        doc = client.promote(_target(args), _key(s), _trust(s))
    finally:
        client.close()
    print(f"promoted {doc.bundle.name} {doc.bundle.version} to all of {doc.target} as #{doc.sequence}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    s = _settings(args)
    client = _client(s)
    try:
        doc = client.rollback(_target(args), _key(s), _trust(s))
    finally:
        client.close()
    print(f"rolled {doc.target} back to {doc.bundle.name} {doc.bundle.version} as #{doc.sequence}")
    return 0


def cmd_provision(args: argparse.Namespace) -> int:
    from edge_runtime.sync import pki

    ca_cert, ca_key = args.ca_dir / "ca.crt", args.ca_dir / "ca.key"
    if not ca_cert.is_file():
        ca_cert, ca_key = pki.create_ca(args.ca_dir, f"edgert {args.fleet_name} CA")
        print(f"created CA {ca_cert}")
    cert, key = pki.issue_client_cert(ca_cert, ca_key, args.out, args.name, days=args.days)
    print(f"issued {cert} and {key} (CN={args.name}); copy them to the device with the CA certificate")
    return 0


def _connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="fleet.toml with a [fleet] table")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--fleet")
    p.add_argument("--ca-file", type=Path)
    p.add_argument("--cert-file", type=Path)
    p.add_argument("--key-file", type=Path)
    p.add_argument("--sign-key", type=Path)
    p.add_argument("--trust-key", type=Path, action="append", default=[])


def _target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--group")
    p.add_argument("--device")


def add_fleet_parser(sub: Any) -> None:
    """Register ``edgert fleet ...`` on the main parser's subcommands."""
    fleet = sub.add_parser("fleet", help="publish models to devices over MQTT and watch them")
    fsub = fleet.add_subparsers(dest="fleet_cmd", required=True)

    pub = fsub.add_parser("publish", help="upload a bundle and point a group or device at it")
    pub.add_argument("bundle", type=Path)
    _target_args(pub)
    pub.add_argument("--canary", type=float, default=100.0, help="percent of devices that go first")
    pub.add_argument("--follow", action="store_true", help="with --canary: promote or abort automatically")
    pub.add_argument("--abort-share", type=float, default=0.5, help="abort when more canaries than this fail")
    pub.add_argument("--timeout", type=float, default=900.0)
    pub.add_argument("--shadow", action="store_true", help="run beside the live model, report agreement")
    pub.add_argument("--shadow-rate", type=float, default=0.2)
    pub.add_argument("--probation", type=float, default=30.0, help="seconds of probation before commit")
    _connection_args(pub)
    pub.set_defaults(func=cmd_publish)

    st = fsub.add_parser("status", help="table of devices: online, model, update state, health")
    st.add_argument("--wait", type=float, default=1.5)
    st.add_argument("--json", action="store_true")
    _connection_args(st)
    st.set_defaults(func=cmd_status)

    w = fsub.add_parser("watch", help="print live telemetry/events/updates as JSON lines")
    w.add_argument("--stream", action="append", default=None, help="telemetry, events, update, state")
    w.add_argument("--shared", help="MQTT 5 shared subscription group (split the fleet between consumers)")
    w.add_argument("--seconds", type=float, default=0.0)
    w.add_argument("--count", type=int, default=0)
    _connection_args(w)
    w.set_defaults(func=cmd_watch, stream=None)

    pr = fsub.add_parser("promote", help="re-issue the current document to all devices (no canary/shadow)")
    _target_args(pr)
    _connection_args(pr)
    pr.set_defaults(func=cmd_promote)

    rb = fsub.add_parser("rollback", help="re-issue the previous document (signed rollback)")
    _target_args(rb)
    _connection_args(rb)
    rb.set_defaults(func=cmd_rollback)

    pv = fsub.add_parser("provision", help="issue a device (or operator) client certificate")
    pv.add_argument("name", help="device id (the certificate CN and MQTT username)")
    pv.add_argument(
        "--ca-dir", type=Path, required=True, help="folder with ca.crt/ca.key (created if missing)"
    )
    pv.add_argument("--out", type=Path, required=True)
    pv.add_argument("--days", type=int, default=825)
    pv.add_argument("--fleet-name", default="fleet")
    pv.set_defaults(func=cmd_provision)
