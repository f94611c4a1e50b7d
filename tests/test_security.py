"""Security checks of fleet sync against real parts: a real daemon, real mosquitto, real signatures.

* TLS is required unless explicitly disabled: ``[sync]`` without ``ca_file`` is a config error
  while ``tls`` is on (its default); ``tls = false`` connects to a plain listener only when set,
  and a device left on TLS never talks to a plain listener.
* Commands on ``device/{id}/cmd`` must be signed by a trusted key, untampered, fresh, for this
  device and never seen before; a properly signed rollback during probation is obeyed, and a
  replay of it is refused - also after a later document was accepted.
* Document expiry stops a freeze attack: an old, validly signed document kept retained on the
  broker is refused by a freshly booted device (which has no replay memory yet) with the reason.

That a device certificate cannot publish a desired document or a command is enforced by the
broker ACL and tested in tests/test_broker_acl.py (test_device_cannot_publish_outside_its_own_topics).
"""

from __future__ import annotations

import base64
import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from mqtt_broker import Broker, _terminate, free_port, spawn_mosquitto
from sync_helpers import FAST, Device, make_candidate, mark, updates, wait_phase

from edge_runtime.bundle import generate_keypair, load_private_key
from edge_runtime.config import load_config, parse_config
from edge_runtime.errors import ConfigError
from edge_runtime.sync.protocol import Command, DesiredDocument, Rollout, seal, utc_iso
from edge_runtime.sync.publisher import FleetClient

CONF = """
[model]
bundle = "{bundle}"

[source]
kind = "video"
uri = "{video}"

[trust]
keys = ["{key}"]

[sync]
enabled = true
host = "127.0.0.1"
device_id = "dev1"
{extra}
"""


def _config_text(tmp_path: Path, extra: str) -> Path:
    from conftest import DEMO

    path = tmp_path / "edgert.toml"
    path.write_text(
        CONF.format(
            bundle=DEMO / "shapes", video=DEMO / "shapes.avi", key=DEMO / "keys" / "demo.pub", extra=extra
        )
    )
    return path


# -- TLS ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", ["", "tls = true", 'cert_file = "c.pem"\nkey_file = "k.pem"'])
def test_sync_without_ca_file_is_a_config_error_while_tls_is_on(tmp_path: Path, extra: str) -> None:
    with pytest.raises(ConfigError, match="tls is on but ca_file is missing"):
        load_config(_config_text(tmp_path, extra))


def test_tls_off_must_be_said_explicitly_and_then_needs_no_ca(tmp_path: Path) -> None:
    config = load_config(_config_text(tmp_path, "tls = false\nport = 1883"))
    assert config.sync.tls is False and config.sync.ca_file is None
    # the same as a dict (what tests and tools pass): the default is TLS
    data: dict[str, Any] = {
        "model": {"bundle": "b"},
        "source": {"kind": "video", "uri": "v.avi"},
        "trust": {"keys": [str(config.trust.keys[0])]},
        "sync": {"enabled": True, "device_id": "dev1"},
    }
    with pytest.raises(ConfigError, match="ca_file is missing"):
        parse_config(data, tmp_path)
    data["sync"]["tls"] = False
    assert parse_config(data, tmp_path).sync.tls is False


@pytest.fixture
def plain_broker(tmp_path: Path) -> Iterator[int]:
    """A mosquitto with one PLAIN (no TLS) listener on 127.0.0.1 that accepts anyone."""
    port = free_port()
    conf = tmp_path / "plain.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = spawn_mosquitto(conf, tmp_path / "plain.log")
    try:
        end = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < end, (tmp_path / "plain.log").read_text()
                time.sleep(0.02)
        yield port
    finally:
        _terminate(proc)


def test_tls_false_talks_to_a_plain_listener_and_tls_never_does(
    plain_broker: int, devices: Callable[..., Device], broker: Broker
) -> None:
    plain = {"port": plain_broker, "ca_file": None, "cert_file": None, "key_file": None}
    # the device that says tls = false connects and publishes its retained state
    dev1 = devices("dev1", sync={**plain, "tls": False})
    assert dev1.agent.link.connected and dev1.agent.opts.link.tls is False
    # a device on the default (TLS, the fleet CA) never completes a session with the plain listener
    dev2 = devices("dev2", "sensors", start=False, sync={"port": plain_broker})
    assert dev2.config.sync.tls is True
    dev2.start(connected=False)
    time.sleep(2.0)
    assert not dev2.agent.link.connected
    assert dev2.agent.link.connects == 0 and "cannot connect" in dev2.agent.link.last_error, (
        dev2.agent.link.last_error
    )


# -- commands -----------------------------------------------------------------------------------------


def _command(sequence: int, action: str = "rollback", device: str = "dev1", **extra: Any) -> Command:
    now = time.time()
    fields: dict[str, Any] = {
        "fleet": "test",
        "device": device,
        "action": action,
        "sequence": sequence,
        "issued_at": utc_iso(now),
        "expires_at": utc_iso(now + 3600),
        "reason": "operator says no",
        **extra,
    }
    return Command(**fields)


def _reason_after(watcher: Any, since: int, phases: set[str], timeout: float = 20.0) -> dict[str, Any]:
    return wait_phase(watcher, phases, timeout=timeout, since=since)


def test_commands_must_be_signed_fresh_and_new_and_a_signed_rollback_is_obeyed(
    tmp_path: Path, broker: Broker, keys: tuple[Path, Path], device: Device, fleet: FleetClient
) -> None:
    watcher = updates(broker)
    key = load_private_key(keys[0])
    rogue = load_private_key(generate_keypair(tmp_path / "rogue")[0])
    topic = "edgert/test/device/dev1/cmd"
    seq = int(time.time() * 1000)

    def send(payload: bytes, phases: set[str] | None = None) -> dict[str, Any]:
        n = mark(watcher)
        fleet._publish_wait(topic, payload, retain=False)
        return _reason_after(watcher, n, phases or {"rejected"})

    # unsigned: the bare command document
    bare = json.dumps(_command(seq + 1).model_dump(mode="json")).encode()
    assert "command refused: not a signed edgert message" in send(bare)["reason"]
    # signed by a key the device does not trust
    got = send(seal(_command(seq + 2), rogue))["reason"]
    assert "command refused: signature refused" in got and "not trusted" in got, got
    # a trusted signature over other bytes: a 'report' command's signature on a 'rollback' body
    env = json.loads(seal(_command(seq + 3, action="report"), key))
    env["doc"] = base64.b64encode(
        json.dumps(_command(seq + 3).model_dump(mode="json"), sort_keys=True, separators=(",", ":")).encode()
    ).decode()
    got = send(json.dumps(env).encode())["reason"]
    assert "signature refused" in got and "does not match" in got, got
    # expired
    stale = _command(seq + 4, issued_at=utc_iso(time.time() - 7200), expires_at=utc_iso(time.time() - 3600))
    assert f"command #{seq + 4} expired or replayed" in send(seal(stale, key))["reason"]
    # for another device, published on this one's topic
    assert "command for test/dev2 refused" in send(seal(_command(seq + 5, device="dev2"), key))["reason"]
    assert device.serving() == "1.0.0"

    # a signed rollback during probation is obeyed at once
    hold = Rollout(probation_s=120, probation_min_frames=10**6)
    fleet.publish(make_candidate(tmp_path, keys[0], "1.1.0"), "group:cams", key, rollout=hold)
    assert wait_phase(watcher, {"probation", "rejected"}, version="1.1.0")["phase"] == "probation"
    assert device.serving() == "1.1.0"
    rollback = seal(_command(seq + 10), key)
    done = send(rollback, {"rolled_back", "committed", "rejected"})
    assert done["phase"] == "rolled_back" and done["reason"] == "rollback command: operator says no", done
    assert device.serving() == "1.0.0"
    # the same signed command again is a replay
    assert f"command #{seq + 10} expired or replayed" in send(rollback)["reason"]

    # a later update is accepted; the captured rollback replayed during ITS probation is refused
    n = mark(watcher)
    fleet.publish(make_candidate(tmp_path, keys[0], "1.2.0"), "group:cams", key, rollout=hold)
    assert wait_phase(watcher, {"probation", "rejected"}, version="1.2.0", since=n)["phase"] == "probation"
    n = mark(watcher)
    fleet._publish_wait(topic, rollback, retain=False)
    time.sleep(1.0)
    seen = [json.loads(m.payload) for m in watcher.messages("edgert/test/device/dev1/update")[n:]]
    assert not [s for s in seen if s["phase"] == "rolled_back"], seen
    # (the refusal is not reported again: the fleet was already told of this very replay)
    assert device.agent.state.last_document["command_sequence"] == seq + 10
    assert device.serving() == "1.2.0" and device.state_json()["phase"] == "probation"


# -- document expiry (freeze attack) ------------------------------------------------------------------


def test_an_expired_retained_document_is_refused_by_a_fresh_device(
    tmp_path: Path,
    broker: Broker,
    keys: tuple[Path, Path],
    devices: Callable[..., Device],
    fleet: FleetClient,
) -> None:
    """A document captured while it was valid, kept retained by an attacker (or a stale broker)
    after it expired, must not steer a device that has no replay memory (first boot)."""
    key = load_private_key(keys[0])
    bundle, _ = fleet.upload_bundle(make_candidate(tmp_path, keys[0], "1.1.0"))
    old = DesiredDocument(
        fleet="test",
        target="group:cams",
        sequence=int(time.time() * 1000),
        issued_at=utc_iso(time.time() - 30 * 86400),
        expires_at=utc_iso(time.time() - 86400),
        bundle=bundle,
        rollout=FAST,
    )
    fleet._publish_wait("edgert/test/group/cams/desired", seal(old, key))
    watcher = updates(broker)
    dev = devices("dev1")
    got = wait_phase(watcher, {"rejected", "downloading", "committed"}, timeout=30)
    assert got["phase"] == "rejected", got
    assert f"desired document group:cams#{old.sequence} expired at {old.expires_at}" == got["reason"]
    time.sleep(1.0)
    phases = [json.loads(m.payload)["phase"] for m in watcher.messages("edgert/test/device/dev1/update")]
    assert "downloading" not in phases, phases
    assert dev.serving() == "1.0.0" and dev.agent.state.last_document is None
