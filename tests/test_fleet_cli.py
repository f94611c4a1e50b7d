"""`edgert fleet ...` against a real broker, and the [sync] config section."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from mqtt_broker import Broker

from edge_runtime.bundle import TrustStore, create_bundle
from edge_runtime.config import parse_config
from edge_runtime.errors import ConfigError
from edge_runtime.sync.protocol import DesiredDocument, open_envelope

ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def edgert(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_runtime", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
        check=False,
    )


@pytest.fixture
def fleet_toml(tmp_path: Path, broker: Broker, keys: tuple[Path, Path]) -> Path:
    cert, key = broker.client_cert("fleet-admin")
    path = tmp_path / "fleet.toml"
    path.write_text(
        "[fleet]\n"
        f'host = "127.0.0.1"\nport = {broker.port}\nfleet = "test"\n'
        f'ca_file = "{broker.ca_path}"\ncert_file = "{cert}"\nkey_file = "{key}"\n'
        f'sign_key = "{keys[0]}"\ntrust_keys = ["{keys[1]}"]\n'
    )
    return path


def packed(
    tmp_path: Path, cnn_onnx: Path, golden_images: object, keys: tuple[Path, Path], version: str
) -> Path:
    from edge_runtime.decoders.specs import ClassificationSpec
    from edge_runtime.preprocess_spec import ImagePreprocess

    out = tmp_path / f"b-{version}.edgebundle"
    create_bundle(
        tmp_path / f"b-{version}", models=[cnn_onnx], name="tiny-cnn", version=version, task="classification",
        preprocess=ImagePreprocess(resize="stretch"), decoder=ClassificationSpec(),
        labels=["a", "b", "c", "d"], golden_frames=golden_images, sign_key=keys[0], pack=out,
    )  # fmt: skip
    return out


def retained_doc(broker: Broker, keys: tuple[Path, Path]) -> DesiredDocument:
    reader = broker.client("fleet-admin")
    reader.subscribe_wait("edgert/test/group/cams/desired")
    msg = reader.wait_count("edgert/test/group/cams/desired", 1)[-1]
    doc, _ = open_envelope(msg.payload, TrustStore.from_files([keys[1]]), DesiredDocument)
    reader.close()
    return doc  # type: ignore[no-any-return]


def test_publish_status_promote_rollback(
    tmp_path: Path,
    broker: Broker,
    keys: tuple[Path, Path],
    fleet_toml: Path,
    cnn_onnx: Path,
    golden_images: object,
) -> None:
    first = packed(tmp_path, cnn_onnx, golden_images, keys, "1.0.0")
    proc = edgert("fleet", "publish", str(first), "--group", "cams", "--config", str(fleet_toml))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "published tiny-cnn 1.0.0" in proc.stdout
    doc1 = retained_doc(broker, keys)
    assert doc1.bundle.version == "1.0.0" and doc1.rollout.canary_percent == 100
    second = packed(tmp_path, cnn_onnx, golden_images, keys, "1.1.0")
    proc = edgert(
        "fleet", "publish", str(second), "--group", "cams", "--canary", "10", "--config", str(fleet_toml)
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc2 = retained_doc(broker, keys)
    assert (
        doc2.bundle.version == "1.1.0" and doc2.rollout.canary_percent == 10 and doc2.sequence > doc1.sequence
    )
    proc = edgert("fleet", "promote", "--group", "cams", "--config", str(fleet_toml))
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc3 = retained_doc(broker, keys)
    assert doc3.rollout.canary_percent == 100 and doc3.sequence > doc2.sequence
    proc = edgert("fleet", "rollback", "--group", "cams", "--config", str(fleet_toml))
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc4 = retained_doc(broker, keys)
    assert doc4.rollback and doc4.bundle.version == "1.0.0" and doc4.sequence > doc3.sequence
    # status: a device's retained state shows up in the table
    dev = broker.client("dev1")
    body = {
        "online": True,
        "model": {"name": "tiny-cnn", "version": "1.0.0"},
        "phase": "committed",
        "ts": 1.0,
    }
    dev.publish_wait("edgert/test/device/dev1/state", json.dumps(body).encode(), retain=True)
    proc = edgert("fleet", "status", "--config", str(fleet_toml), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["device"]: r for r in json.loads(proc.stdout)}
    assert rows["dev1"]["online"] and rows["dev1"]["model"] == "tiny-cnn 1.0.0"
    proc = edgert("fleet", "status", "--config", str(fleet_toml))
    assert "dev1" in proc.stdout and "committed" in proc.stdout


def test_fleet_errors_are_named(tmp_path: Path, broker: Broker, fleet_toml: Path) -> None:
    proc = edgert("fleet", "rollback", "--group", "cams", "--config", str(fleet_toml))
    assert proc.returncode == 1 and "no previous document" in proc.stderr and "Traceback" not in proc.stderr
    proc = edgert("fleet", "status", "--config", str(fleet_toml), "--port", "1")
    assert proc.returncode == 1 and "cannot connect" in proc.stderr
    proc = edgert("fleet", "promote", "--config", str(fleet_toml))
    assert proc.returncode == 2 and "--group" in proc.stderr
    missing = tmp_path / "nokey.toml"
    missing.write_text(fleet_toml.read_text().replace("sign_key", "#sign_key"))
    proc = edgert("fleet", "promote", "--group", "cams", "--config", str(missing))
    assert proc.returncode == 2 and "sign-key" in proc.stderr


def test_sync_config_section(
    tmp_path: Path, keys: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    base = {
        "model": {"bundle": "b"},
        "source": {"kind": "video", "uri": "v.avi"},
        "trust": {"keys": [str(keys[1])]},
    }
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    with pytest.raises(ConfigError, match="device_id is required"):
        parse_config({**base, "sync": {"enabled": True, "ca_file": str(ca)}}, tmp_path)
    with pytest.raises(ConfigError, match="ca_file is missing"):
        parse_config({**base, "sync": {"enabled": True, "device_id": "d1"}}, tmp_path)
    with pytest.raises(ConfigError, match=r"sync\.cert_file: .* does not exist"):
        parse_config(
            {
                **base,
                "sync": {
                    "enabled": True,
                    "device_id": "d1",
                    "ca_file": "ca.pem",
                    "cert_file": "c",
                    "key_file": "k",
                },
            },
            tmp_path,
        )
    with pytest.raises(ConfigError, match=r"sync\.bogus"):
        parse_config({**base, "sync": {"bogus": 1}}, tmp_path)
    with pytest.raises(ConfigError, match=r"needs trust\.keys"):
        parse_config(
            {
                "model": {"bundle": "b"},
                "source": {"kind": "video", "uri": "v"},
                "sync": {"enabled": True, "device_id": "d", "ca_file": "ca.pem"},
            },
            tmp_path,
        )
    # secrets: bare names come from $CREDENTIALS_DIRECTORY (systemd LoadCredential=)
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt-password").write_text("s3cret\n")
    (creds / "dev.crt").write_text("x")
    (creds / "dev.key").write_text("x")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    cfg = parse_config(
        {
            **base,
            "sync": {
                "enabled": True, "device_id": "d1", "ca_file": "ca.pem", "cert_file": "dev.crt",
                "key_file": "dev.key", "username": "d1", "password_file": "mqtt-password",
            },
        },
        tmp_path,
    )  # fmt: skip
    assert cfg.sync.password == "s3cret" and cfg.sync.key_file == creds / "dev.key"
    assert "s3cret" not in cfg.model_dump_json()
