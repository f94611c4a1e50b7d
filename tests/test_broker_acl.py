"""Fleet broker security against a real mosquitto: certificates, generated config and ACL, MQTT v5.

What mosquitto 2.0.11 really does, pinned by these tests (see also edge_runtime/sync/broker_config.py):

* A QoS 1 PUBLISH the ACL refuses is answered with PUBACK reason code 0x87 (Not authorized) to an
  MQTT v5 client; the message is dropped and the connection stays open.
* The ``acl_file`` does not check SUBSCRIBE at all (mosquitto's default ACL check returns success
  for subscribe), so SUBACK always grants the QoS (0x01 here), never 0x87. ``read`` rules are
  enforced on every delivery, live or retained, against the message's real topic; this is also
  how ``$share/<group>/...`` subscriptions are filtered.
* A forbidden last-will topic does not refuse the CONNECT; the will is dropped when it fires.

"Nothing arrived" is proven with an ordering barrier, never a sleep: after the forbidden messages,
the same sender publishes a marker the watcher may receive; mosquitto delivers one sender's messages
to one subscriber in order, so once the marker is in, any forbidden message would be in too.

Run ``python tests/test_broker_acl.py`` to rewrite systemd/mosquitto/{edgert.conf,acl.example}.
"""

from __future__ import annotations

import datetime as dt
import gc
import os
import re
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from mqtt_broker import Broker, BrokerClient, connect_client, free_port, spawn_mosquitto, wait_tls_ready
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from edge_runtime.errors import BrokerError, ConfigError
from edge_runtime.sync import broker_config, pki

NOT_AUTHORIZED = 0x87
SUCCESS = 0x00
NO_MATCHING_SUBSCRIBERS = 0x10  # MQTT 5: accepted, but nobody is subscribed (still a success)
GRANTED_QOS_1 = 0x01
SHA = "ab" * 32

EXAMPLE_DIR = REPO / "systemd" / "mosquitto"
EXAMPLE_FLEET = "plant1"
EXAMPLE_DEVICES = {"cam-01": ["cams", "line-a"], "vib-01": ["sensors", "line-a"]}
EXAMPLE_OPERATORS = ["fleet-admin", "telemetry-consumer"]
EXAMPLE_PATHS: dict[str, Any] = {
    "cafile": "/etc/mosquitto/ca_certificates/edgert-ca.crt",
    "certfile": "/etc/mosquitto/certs/edgert-server.crt",
    "keyfile": "/etc/mosquitto/certs/edgert-server.key",
    "acl_file": "/etc/mosquitto/edgert.acl",
}
EXAMPLE_CONF_HEADER = """\
edge-runtime fleet broker for the fleet 'plant1' (mosquitto 2.0, Debian/Ubuntu 'mosquitto' package).
Install as /etc/mosquitto/conf.d/edgert.conf with its ACL /etc/mosquitto/edgert.acl (acl.example).
Debian's /etc/mosquitto/mosquitto.conf already sets persistence_location, pid_file and log_dest and
includes conf.d: do not repeat persistence_location here (mosquitto refuses a duplicate).

Provisioning
1. On an admin machine with edge-runtime installed (the CA key stays there, never on the broker):
     from edge_runtime.sync import broker_config, pki
     ca, ca_key = pki.create_ca("pki", "plant1 fleet CA")
     pki.issue_server_cert(ca, ca_key, "pki", dns_names=["broker.plant1.lan"], ip_addresses=["10.0.0.5"])
     pki.issue_client_cert(ca, ca_key, "pki", "fleet-admin")   # each operator
     pki.issue_client_cert(ca, ca_key, "pki", "cam-01")        # each device: CN = device id
     acl = broker_config.render_acl("plant1", {"cam-01": ["cams", "line-a"]}, ["fleet-admin"])
2. On the broker, as root (mosquitto reads these after switching to the 'mosquitto' user):
     install -m 0644 pki/ca.crt /etc/mosquitto/ca_certificates/edgert-ca.crt
     install -m 0644 pki/server.crt /etc/mosquitto/certs/edgert-server.crt
     install -o root -g mosquitto -m 0640 pki/server.key /etc/mosquitto/certs/edgert-server.key
     install -o root -g mosquitto -m 0640 edgert.acl /etc/mosquitto/edgert.acl
     install -m 0644 edgert.conf /etc/mosquitto/conf.d/edgert.conf
     systemctl restart mosquitto
3. Each device gets ca.crt, <id>.crt and <id>.key (mode 0600, owned by the edgert user).
New device or group change: render and install the ACL again, then 'systemctl reload mosquitto'.
These example files are rendered by 'python tests/test_broker_acl.py' (a test keeps them in step)."""
EXAMPLE_ACL_HEADER = """\
Example ACL for the fleet 'plant1': install as /etc/mosquitto/edgert.acl (see edgert.conf)."""


def render_examples() -> dict[Path, str]:
    """The shipped example files, rendered by edge_runtime.sync.broker_config."""
    acl = broker_config.render_acl(
        EXAMPLE_FLEET, EXAMPLE_DEVICES, EXAMPLE_OPERATORS, header=EXAMPLE_ACL_HEADER
    )
    conf = broker_config.render_mosquitto_conf(**EXAMPLE_PATHS, header=EXAMPLE_CONF_HEADER)
    return {EXAMPLE_DIR / "edgert.conf": conf, EXAMPLE_DIR / "acl.example": acl}


def _marker(sender: BrokerClient, topic: str, watcher: BrokerClient, tag: str) -> None:
    """Ordering barrier: ``sender`` publishes ``tag`` on ``topic``; wait until ``watcher`` has it."""
    assert sender.publish_wait(topic, tag.encode()).value == SUCCESS  # the watcher is subscribed
    watcher.wait_message(topic, tag.encode())


def _wait_until(ready: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _seen(client: BrokerClient) -> set[tuple[str, bytes]]:
    return {(m.topic, bytes(m.payload)) for m in client.messages()}


# -- pki -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("good", ["dev1", "cam-01", "A_b.9", "x" * 64])
def test_validate_device_id_accepts_safe_names(good: str) -> None:
    assert pki.validate_device_id(good) == good


@pytest.mark.parametrize("bad", ["", "x" * 65, "a/b", "a+", "#", "+", "a b", "dév", "a\n", "$SYS", "%u"])
def test_validate_device_id_refuses_topic_unsafe_names(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"invalid device id .*letters, digits.*wildcards"):
        pki.validate_device_id(bad)


def test_pki_issues_a_p256_chain_with_private_keys_written_0600(tmp_path: Path) -> None:
    ca, ca_key = pki.create_ca(tmp_path / "pki", "fleet CA", days=30)
    server, server_key = pki.issue_server_cert(
        ca, ca_key, tmp_path / "pki", dns_names=["localhost", "broker.lan"], ip_addresses=["127.0.0.1", "::1"]
    )
    client, client_key = pki.issue_client_cert(ca, ca_key, tmp_path / "pki", "dev-7", days=10)
    assert (client.name, client_key.name, ca.name, server.name) == (
        "dev-7.crt",
        "dev-7.key",
        "ca.crt",
        "server.crt",
    )
    for key in (ca_key, server_key, client_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert stat.S_IMODE(client.stat().st_mode) == 0o644
    assert sorted(p.name for p in (tmp_path / "pki").iterdir()) == sorted(
        ["ca.crt", "ca.key", "server.crt", "server.key", "dev-7.crt", "dev-7.key"]
    ), "no temporary files may be left behind"

    ca_cert = x509.load_pem_x509_certificate(ca.read_bytes())
    srv = x509.load_pem_x509_certificate(server.read_bytes())
    cli = x509.load_pem_x509_certificate(client.read_bytes())
    assert ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for cert in (srv, cli):
        cert.verify_directly_issued_by(ca_cert)
        public_key = cert.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey) and public_key.curve.name == "secp256r1"
        assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cli.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-7"
    eku = cli.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    lifetime = cli.not_valid_after_utc - dt.datetime.now(dt.timezone.utc)
    assert dt.timedelta(days=9) < lifetime <= dt.timedelta(days=10)
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "broker.lan"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert list(srv.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH
    ]


def test_pki_refuses_what_would_break_the_fleet(tmp_path: Path) -> None:
    ca, ca_key = pki.create_ca(tmp_path, "fleet CA")
    before = ca.read_bytes()
    with pytest.raises(ConfigError, match="a CA already exists"):
        pki.create_ca(tmp_path, "fleet CA")
    with pytest.raises(ConfigError, match="overwrite the CA's own files"):
        pki.issue_client_cert(ca, ca_key, tmp_path, "ca")
    assert ca.read_bytes() == before
    with pytest.raises(ConfigError, match="invalid client certificate name 'dev/1'"):
        pki.issue_client_cert(ca, ca_key, tmp_path, "dev/1")
    with pytest.raises(ConfigError, match="validity 0 days"):
        pki.issue_client_cert(ca, ca_key, tmp_path, "dev1", days=0)
    with pytest.raises(ConfigError, match="invalid IP address 'localhost'"):
        pki.issue_server_cert(ca, ca_key, tmp_path, ip_addresses=["localhost"])
    other, other_key = pki.create_ca(tmp_path / "other", "other CA")
    with pytest.raises(ConfigError, match="does not belong to the CA certificate"):
        pki.issue_client_cert(ca, other_key, tmp_path, "dev1")
    with pytest.raises(ConfigError, match="cannot read the CA"):
        pki.issue_client_cert(tmp_path / "missing.crt", ca_key, tmp_path, "dev1")
    with pytest.raises(ConfigError, match="not a PEM certificate"):
        pki.issue_client_cert(ca_key, ca_key, tmp_path, "dev1")
    rotated, _ = pki.create_ca(tmp_path, "fleet CA 2", overwrite=True)
    assert rotated.read_bytes() != before
    assert other.exists()


# -- broker_config ---------------------------------------------------------------------------------


def test_render_acl_uses_patterns_for_devices_and_user_blocks_for_groups() -> None:
    acl = broker_config.render_acl("f1", {"dev2": ["b", "a", "a"], "dev1": []}, ["op"])
    rules = [line for line in acl.splitlines() if line and not line.startswith("#")]
    assert rules == [
        "pattern write edgert/f1/device/%u/state",
        "pattern write edgert/f1/device/%u/telemetry",
        "pattern write edgert/f1/device/%u/events",
        "pattern write edgert/f1/device/%u/update",
        "pattern read edgert/f1/device/%u/cmd",
        "pattern read edgert/f1/device/%u/desired",
        "user dev1",
        "topic read edgert/f1/bundle/+/meta",
        "topic read edgert/f1/bundle/+/chunk/+",
        "user dev2",
        "topic read edgert/f1/bundle/+/meta",
        "topic read edgert/f1/bundle/+/chunk/+",
        "topic read edgert/f1/group/a/desired",
        "topic read edgert/f1/group/b/desired",
        "user op",
        "topic readwrite edgert/f1/#",
    ]
    assert acl == broker_config.render_acl("f1", {"dev1": [], "dev2": ["a", "b"]}, ["op"]), "deterministic"


@pytest.mark.parametrize(
    ("fleet", "devices", "operators", "match"),
    [
        ("f/1", {}, ["op"], "invalid fleet name"),
        ("f1", {"dev+": []}, ["op"], "invalid device id 'dev\\+'"),
        ("f1", {"dev1": ["#"]}, ["op"], "invalid group of device 'dev1'"),
        ("f1", {"dev1": "cams"}, ["op"], "must be a list of names"),
        ("f1", {}, "op", "must be a list of names"),
        ("f1", {"op": []}, ["op"], "both as devices and as operators"),
    ],
)
def test_render_acl_refuses_unsafe_input(
    fleet: str, devices: dict[str, list[str]], operators: list[str], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        broker_config.render_acl(fleet, devices, operators)


def test_render_conf_tls_listener_persistence_and_optional_plain_listener() -> None:
    files: dict[str, Any] = {"cafile": "ca.crt", "certfile": "s.crt", "keyfile": "s.key", "acl_file": "acl"}
    conf = broker_config.render_mosquitto_conf(**files, port=18883, persistence_location="db", header="hi")
    lines = conf.splitlines()
    assert lines[0] == "# hi"
    for line in [
        "allow_anonymous false",
        "acl_file acl",
        "persistence true",
        "persistence_location db/",
        "listener 18883",
        "require_certificate true",
        "use_identity_as_username true",
        "cafile ca.crt",
    ]:
        assert line in lines, line
    assert "password_file" not in conf and conf.count("\nlistener ") == 1
    assert not [line for line in lines if line.startswith("user ")]
    plain = broker_config.render_mosquitto_conf(
        **files, bind_address="127.0.0.1", plain_port=1883, password_file="pw", persistence=False
    )
    assert "listener 1883 127.0.0.1" in plain.splitlines() and "password_file pw" in plain.splitlines()
    assert "persistence false" in plain.splitlines() and "persistence_location" not in plain
    assert "listener 8883 127.0.0.1" in plain.splitlines()
    bad: list[tuple[dict[str, Any], str]] = [
        ({"plain_port": 1883}, "needs a password_file"),
        ({"password_file": "pw"}, "also give plain_port"),
        ({"plain_port": 8883, "password_file": "pw"}, "two different ports"),
        ({"port": 0}, "between 1 and 65535"),
        ({"acl_file": "acl\nlistener 1883"}, "without line breaks"),
        ({"user": "mosq uitto"}, "invalid mosquitto user"),
        ({"log_types": ["all\n"]}, "invalid log type"),
    ]
    for kwargs, match in bad:
        with pytest.raises(ConfigError, match=match):
            broker_config.render_mosquitto_conf(**{**files, **kwargs})


def test_shipped_examples_are_what_the_module_renders() -> None:
    for path, text in render_examples().items():
        assert path.read_text() == text, f"{path} is stale: run python tests/test_broker_acl.py"
    assert not re.search(r"/(home|tmp|work|Users)/", (EXAMPLE_DIR / "edgert.conf").read_text())


def test_ensure_mosquitto_script_is_quiet_when_present_and_explains_when_missing() -> None:
    script = REPO / "scripts" / "ensure-mosquitto.sh"
    present = subprocess.run(["bash", str(script)], capture_output=True, text=True, check=False)
    assert (present.returncode, present.stdout, present.stderr) == (0, "", "")
    # Missing, as an unprivileged user (root would apt-get install): exit 1 with the install command.
    env = {"PATH": "/usr/bin:/bin", "EDGERT_MOSQUITTO_DIRS": "/nonexistent"}
    drop: dict[str, Any] = {"user": 65534, "group": 65534, "extra_groups": []} if os.geteuid() == 0 else {}
    missing = subprocess.run(  # the script arrives on stdin: nobody may not be able to read the checkout
        ["bash", "-s"],
        input=script.read_text(),
        capture_output=True,
        text=True,
        check=False,
        env=env,
        cwd="/",
        **drop,
    )
    assert missing.returncode == 1 and missing.stdout == ""
    assert "apt-get install -y mosquitto" in missing.stderr
    # make test runs it before pytest, and CI runs make test.
    recipe = re.search(r"^test: setup\n((?:\t.*\n)+)", (REPO / "Makefile").read_text(), re.M)
    assert recipe is not None
    steps = recipe.group(1).splitlines()
    assert steps[0] == "\tbash scripts/ensure-mosquitto.sh" and "pytest" in steps[-1]
    assert re.search(r"^make test$", (REPO / ".ci" / "run").read_text(), re.M)


# -- the real broker -------------------------------------------------------------------------------


def test_shipped_example_runs_as_a_debian_conf_d_drop_in(tmp_path: Path) -> None:
    pki_dir = tmp_path / "pki"
    ca, ca_key = pki.create_ca(pki_dir, "plant1 test CA", days=2)
    server = pki.issue_server_cert(ca, ca_key, pki_dir, days=2)
    certs = {
        name: pki.issue_client_cert(ca, ca_key, pki_dir, name, days=2) for name in ["cam-01", "fleet-admin"]
    }
    port = free_port()
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "db").mkdir()
    (tmp_path / "edgert.acl").write_text((EXAMPLE_DIR / "acl.example").read_text())
    conf = (EXAMPLE_DIR / "edgert.conf").read_text()
    for shipped, ours in [
        (EXAMPLE_PATHS["cafile"], ca),
        (EXAMPLE_PATHS["certfile"], server[0]),
        (EXAMPLE_PATHS["keyfile"], server[1]),
        (EXAMPLE_PATHS["acl_file"], tmp_path / "edgert.acl"),
        ("\nlistener 8883\n", f"\nlistener {port} 127.0.0.1\n"),
    ]:
        assert str(shipped) in conf
        conf = conf.replace(str(shipped), str(ours))
    (tmp_path / "conf.d" / "edgert.conf").write_text(conf)
    main = tmp_path / "mosquitto.conf"  # what Debian's /etc/mosquitto/mosquitto.conf says
    main.write_text(
        ("user root\n" if os.geteuid() == 0 else "")
        + f"pid_file {tmp_path / 'pid'}\npersistence true\npersistence_location {tmp_path / 'db'}/\n"
        + f"include_dir {tmp_path / 'conf.d'}\n"
    )
    log = tmp_path / "mosquitto.log"
    proc = spawn_mosquitto(main, log)
    clients: list[BrokerClient] = []
    try:
        wait_tls_ready(proc, port, ca, certs["fleet-admin"], log)
        op, cam = (BrokerClient(f"{n}-x") for n in ("fleet-admin", "cam-01"))
        clients += [op, cam]
        connect_client(op, port, ca, certs["fleet-admin"])
        connect_client(cam, port, ca, certs["cam-01"])
        assert op.subscribe_wait("edgert/plant1/#").value == GRANTED_QOS_1
        assert cam.publish_wait("edgert/plant1/device/vib-01/telemetry", b"forged").value == NOT_AUTHORIZED
        _marker(cam, "edgert/plant1/device/cam-01/telemetry", op, "t1")
        assert op.topics() == ["edgert/plant1/device/cam-01/telemetry"]
    finally:
        for client in clients:
            client.close()
        proc.terminate()
        proc.wait(timeout=10)


def test_device_cannot_publish_outside_its_own_topics(broker: Broker) -> None:
    op = broker.client("fleet-admin")
    dev1 = broker.client("dev1")
    assert op.subscribe_wait(broker.topic("#")).value == GRANTED_QOS_1
    forbidden = [
        ("device", "dev2", "telemetry"),
        ("device", "dev2", "state"),
        ("device", "dev2", "events"),
        ("device", "dev2", "update"),
        ("device", "dev1", "desired"),
        ("device", "dev1", "cmd"),
        ("device", "dev2", "cmd"),
        ("group", "cams", "desired"),
        ("group", "sensors", "desired"),
        ("bundle", SHA, "meta"),
        ("bundle", SHA, "chunk", "0"),
        ("fleet-admin",),
    ]
    for levels in forbidden:
        for retain in (False, True):
            rc = dev1.publish_wait(broker.topic(*levels), b"forged", retain=retain)
            assert rc.value == NOT_AUTHORIZED, (levels, retain, rc)
    assert dev1.publish_wait("edgert/other-fleet/device/dev1/telemetry", b"forged").value == NOT_AUTHORIZED
    assert dev1.is_connected(), "a refused publish does not end the session"
    _marker(dev1, broker.topic("device", "dev1", "telemetry"), op, "after")
    assert op.topics() == [broker.topic("device", "dev1", "telemetry")]
    # Nor was anything retained: a new subscriber gets no retained message, only a live marker.
    late = broker.client("fleet-admin")
    assert late.subscribe_wait(broker.topic("#")).value == GRANTED_QOS_1
    _marker(op, broker.topic("device", "dev1", "cmd"), late, "late")
    assert late.topics() == [broker.topic("device", "dev1", "cmd")]


def test_device_publishes_its_own_topics_and_its_last_will(broker: Broker) -> None:
    op = broker.client("fleet-admin")
    assert op.subscribe_wait(broker.topic("device", "+", "+")).value == GRANTED_QOS_1
    state = broker.topic("device", "dev1", "state")
    dev1 = broker.client("dev1", will=(state, b"offline"))
    sent = {
        state: b"online",
        broker.topic("device", "dev1", "telemetry"): b"t",
        broker.topic("device", "dev1", "events"): b"e",
        broker.topic("device", "dev1", "update"): b"u",
    }
    for topic, payload in sent.items():
        assert dev1.publish_wait(topic, payload, retain=topic == state).value == SUCCESS
    for topic, payload in sent.items():
        op.wait_message(topic, payload)
    # The will on its own state topic is delivered when the connection drops ...
    dev1.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message"))
    op.wait_message(state, b"offline")
    # ... but a will on another device's state is accepted at CONNECT and dropped when it fires.
    forger = broker.client(
        "dev1", client_id="forger", will=(broker.topic("device", "dev2", "state"), b"offline")
    )
    assert forger.connacks[0].value == SUCCESS
    forger.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message"))
    broker.wait_for_log("Client forger disconnected")
    witness = broker.client("dev1")
    _marker(witness, broker.topic("device", "dev1", "telemetry"), op, "after-will")
    assert not op.messages(broker.topic("device", "dev2", "#"))


def test_device_reads_only_its_own_cmd_desired_groups_and_bundles(broker: Broker) -> None:
    op = broker.client("fleet-admin")
    readable = {
        broker.topic("group", "cams", "desired"): b"cams-doc",
        broker.topic("device", "dev1", "desired"): b"dev1-doc",
        broker.topic("device", "dev1", "cmd"): b"dev1-cmd",
        broker.topic("bundle", SHA, "meta"): b"meta",
        broker.topic("bundle", SHA, "chunk", "3"): b"chunk3",
    }
    hidden = {
        broker.topic("group", "sensors", "desired"): b"sensors-doc",
        broker.topic("device", "dev2", "desired"): b"dev2-doc",
        broker.topic("device", "dev2", "cmd"): b"dev2-cmd",
        broker.topic("device", "dev2", "state"): b"online",
    }
    for topic, payload in {**readable, **hidden}.items():
        assert op.publish_wait(topic, payload, retain=True).value in (SUCCESS, NO_MATCHING_SUBSCRIBERS)
    dev1 = broker.client("dev1")
    # mosquitto's acl_file grants every SUBSCRIBE (never SUBACK 0x87) and filters each delivery.
    for topic in [*hidden, *readable, broker.topic("#"), broker.topic("group", "+", "desired")]:
        assert dev1.subscribe_wait(topic).value == GRANTED_QOS_1, topic
    _marker(op, broker.topic("device", "dev1", "cmd"), dev1, "retained-done")
    assert _seen(dev1) == {*readable.items(), (broker.topic("device", "dev1", "cmd"), b"retained-done")}
    # Live messages are filtered the same way.
    for topic in hidden:
        # PUBACK says Success (dev1's subscription matches); the read check then drops dev1's copy.
        assert op.publish_wait(topic, b"live").value == SUCCESS
    _marker(op, broker.topic("group", "cams", "desired"), dev1, "live-done")
    assert not {t for t, _ in _seen(dev1)} & set(hidden)


def test_operator_writes_documents_and_chunks_and_shares_telemetry(broker: Broker) -> None:
    op = broker.client("fleet-admin")
    docs = {
        broker.topic("group", "cams", "desired"): b'{"model": "m"}',
        broker.topic("device", "dev1", "desired"): b'{"model": "n"}',
        broker.topic("bundle", SHA, "meta"): b'{"chunks": 2}',
        broker.topic("bundle", SHA, "chunk", "0"): b"\x00" * 2048,
        broker.topic("bundle", SHA, "chunk", "1"): b"\x01" * 10,
        broker.topic("device", "dev1", "cmd"): b'{"cmd": "reboot"}',
    }
    for topic, payload in docs.items():
        assert op.publish_wait(topic, payload, retain=True).value in (SUCCESS, NO_MATCHING_SUBSCRIBERS)
    dev1 = broker.client("dev1")
    assert dev1.subscribe_wait(broker.topic("#")).value == GRANTED_QOS_1
    _marker(op, broker.topic("device", "dev1", "cmd"), dev1, "docs-done")
    assert set(docs.items()) <= _seen(dev1)

    shared = "$share/consumers/" + broker.topic("device", "+", "telemetry")
    consumers = [broker.client("fleet-admin") for _ in range(2)]
    for consumer in consumers:
        assert consumer.subscribe_wait(shared).value == GRANTED_QOS_1
    dev2 = broker.client("dev2")
    expected = set()
    for i in range(10):
        for name, device in (("dev1", dev1), ("dev2", dev2)):
            topic = broker.topic("device", name, "telemetry")
            assert device.publish_wait(topic, str(i).encode()).value == SUCCESS
            expected.add((topic, str(i).encode()))
    a, b = consumers
    _wait_until(lambda: len(a.received) + len(b.received) >= 20, "20 telemetry messages")
    got_a, got_b = _seen(a), _seen(b)
    assert got_a and got_b and not got_a & got_b, "each message goes to exactly one consumer"
    assert got_a | got_b == expected and len(a.received) + len(b.received) == 20


def test_known_limitation_a_device_joining_the_operators_share_group_swallows_messages(
    broker: Broker,
) -> None:
    """mosquitto's acl_file cannot refuse SUBSCRIBE, so a device may join ``$share/consumers/...``.

    Round-robin then hands it its turn and the read check drops the message: the operators lose it.
    Mitigations (not in the acl_file's power): an unguessable share group name per deployment, or
    mosquitto's dynamic-security plugin, whose subscribe ACLs do refuse such a SUBSCRIBE.
    """
    shared = "$share/consumers/" + broker.topic("device", "+", "telemetry")
    op = broker.client("fleet-admin")
    assert op.subscribe_wait(shared).value == GRANTED_QOS_1
    assert op.subscribe_wait(broker.topic("device", "dev2", "events")).value == GRANTED_QOS_1
    dev1 = broker.client("dev1")
    assert dev1.subscribe_wait(shared).value == GRANTED_QOS_1
    dev2 = broker.client("dev2")
    for i in range(6):
        assert (
            dev2.publish_wait(broker.topic("device", "dev2", "telemetry"), str(i).encode()).value == SUCCESS
        )
    _marker(dev2, broker.topic("device", "dev2", "events"), op, "done")
    assert not dev1.received
    assert 0 < len(op.messages(broker.topic("device", "+", "telemetry"))) < 6


def _connects(client: BrokerClient, port: int, ca: Path | None, cert: tuple[Path, Path] | None) -> bool:
    """Whether the broker accepts this client with a successful CONNACK (``ca`` None: plain TCP).

    Drives paho's loop by hand, so a refused client does not sit in paho's reconnect back-off.
    """
    if ca is not None:
        client.tls_set(
            ca_certs=str(ca),
            certfile=None if cert is None else str(cert[0]),
            keyfile=None if cert is None else str(cert[1]),
        )
    try:
        client.connect("127.0.0.1", port)
    except OSError:  # ssl.SSLError included: the handshake itself failed
        return False
    deadline = time.monotonic() + 10
    while not (client.connacks or client.disconnects) and time.monotonic() < deadline:
        client.loop(timeout=0.05)
    accepted = any(not rc.is_failure for rc in client.connacks)
    if client.is_connected():
        client.disconnect()
        client.loop(timeout=0.05)
    assert client.connacks or client.disconnects, "neither accepted nor refused within 10 s"
    return accepted


def test_broker_refuses_plain_tcp_no_certificate_and_a_foreign_ca(broker: Broker, tmp_path: Path) -> None:
    assert not _connects(BrokerClient("plain"), broker.port, None, None)
    assert not _connects(BrokerClient("no-cert"), broker.port, broker.ca_path, None)
    other_ca, other_key = pki.create_ca(tmp_path / "other", "impostor CA")
    forged = pki.issue_client_cert(other_ca, other_key, tmp_path / "other", "dev1")
    assert not _connects(BrokerClient("foreign"), broker.port, broker.ca_path, forged)
    assert _connects(BrokerClient("genuine"), broker.port, broker.ca_path, broker.client_cert("dev1"))
    log = broker.log()
    assert "peer did not return a certificate" in log and "certificate verify failed" in log


def test_retained_messages_survive_a_restart_and_kill_is_a_crash(broker: Broker) -> None:
    op = broker.client("fleet-admin")
    kept = {
        broker.topic("group", "cams", "desired"): b"doc-v2",
        broker.topic("bundle", SHA, "meta"): b"meta",
        broker.topic("bundle", SHA, "chunk", "0"): b"chunk0",
    }
    for topic, payload in kept.items():
        assert op.publish_wait(topic, payload, retain=True).value in (SUCCESS, NO_MATCHING_SUBSCRIBERS)
    op.close()
    port, pid = broker.port, broker.pid
    broker.restart()
    assert (broker.port, broker.running) == (port, True) and broker.pid != pid

    def retained_after_start() -> set[tuple[str, bytes]]:
        reader = broker.client("fleet-admin")
        assert reader.subscribe_wait(broker.topic("#")).value == GRANTED_QOS_1
        _marker(reader, broker.topic("device", "dev1", "cmd"), reader, "probe")
        reader.close()
        return _seen(reader) - {(broker.topic("device", "dev1", "cmd"), b"probe")}

    assert retained_after_start() == set(kept.items())
    broker.kill()
    assert not broker.running
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    broker.start()
    assert retained_after_start() == set(kept.items()), "the database saved at the last stop is loaded"


def test_add_device_reloads_the_acl_of_a_running_broker(broker: Broker) -> None:
    op = broker.client("fleet-admin")
    cams = broker.topic("group", "cams", "desired")
    assert op.publish_wait(cams, b"cams-doc", retain=True).value == NO_MATCHING_SUBSCRIBERS
    assert op.subscribe_wait(broker.topic("device", "+", "telemetry")).value == GRANTED_QOS_1
    # A certificate from the fleet CA for an id not in the ACL: the %u patterns already apply ...
    dev3 = broker.client("dev3")
    _marker(dev3, broker.topic("device", "dev3", "telemetry"), op, "t")
    assert dev3.subscribe_wait(broker.topic("device", "dev3", "cmd")).value == GRANTED_QOS_1
    assert dev3.subscribe_wait(cams).value == GRANTED_QOS_1
    _marker(op, broker.topic("device", "dev3", "cmd"), dev3, "before")
    assert (cams, b"cams-doc") not in _seen(dev3), "... but no group rights before add_device"
    pid = broker.pid
    broker.add_device("dev3", ["cams"])
    assert broker.pid == pid, "reloaded with SIGHUP, not restarted"
    assert "user dev3" in broker.acl_path.read_text()
    fresh = broker.client("dev3")
    assert fresh.subscribe_wait(cams).value == GRANTED_QOS_1
    fresh.wait_message(cams, b"cams-doc")
    with pytest.raises(ConfigError):
        broker.add_device("dev#4")


def test_broker_close_and_finalizer_leave_no_mosquitto_behind(tmp_path: Path) -> None:
    with Broker(tmp_path / "a", devices={"dev1": []}) as first:
        client = first.client("dev1")
        pid = first.pid
    assert pid is not None and not first.running and not client.is_connected()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    first.close()  # idempotent

    second = Broker(tmp_path / "b")
    second.start()
    pid = second.pid
    assert pid is not None
    del second
    gc.collect()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    broken = Broker(tmp_path / "c")
    broken.server_key.write_text("not a key")
    with pytest.raises(BrokerError, match="mosquitto exited"):
        broken.start()
    assert not broken.running


if __name__ == "__main__":
    for example_path, example_text in render_examples().items():
        example_path.parent.mkdir(parents=True, exist_ok=True)
        example_path.write_text(example_text)
        sys.stdout.write(f"wrote {example_path.relative_to(REPO)}\n")
