"""Tests for edge_runtime.config: real TOML files on disk, validated by load_config."""

from __future__ import annotations

from pathlib import Path

import pytest

import edge_runtime
from edge_runtime.config import (
    Config,
    JsonlSinkConfig,
    SnapshotSinkConfig,
    SqliteSinkConfig,
    load_config,
    parse_config,
    read_secret,
)
from edge_runtime.errors import ConfigError

MINIMAL = """
[model]
bundle = "bundles/shapes"

[source]
kind = "video"
uri = "clips/in.avi"
"""


def write(tmp_path: Path, text: str, name: str = "edgert.toml") -> Path:
    path = tmp_path / "etc" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def config_error(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message  # every error says which file
    return message


@pytest.fixture
def pub_key(tmp_path: Path) -> Path:
    _, pub = edge_runtime.generate_keypair(tmp_path / "etc" / "keys")
    return pub


# ================================================================== valid files


def test_minimal_config_defaults_and_relative_paths(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    config = load_config(path)
    assert isinstance(config, Config)
    base = tmp_path / "etc"
    assert config.model.bundle == base / "bundles" / "shapes"
    assert config.source.uri == str(base / "clips" / "in.avi")
    assert config.model.format == "auto" and config.model.threads == 2 and config.model.providers == ["auto"]
    assert config.model.selftest is True
    assert config.state.dir == base / "state"
    assert config.trust.require_signature is False and config.trust.keys == []
    assert config.sinks == [JsonlSinkConfig(kind="jsonl", path="-", flush_every=64)]
    assert config.pipeline.queue_size == 4 and config.pipeline.max_fps is None
    assert config.log.level == "info"


def test_relative_paths_resolve_against_config_folder_not_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pub_key: Path
) -> None:
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    text = f"""
[model]
bundle = "../models/shapes.edgebundle"
format = "onnx"
threads = 4
providers = ["cpu"]
delegates = [{{ library = "libedgetpu.so.1", options = {{ device = "usb" }} }}]

[source]
kind = "replay"
uri = "data/vib.csv"
rate_hz = 100.0
columns = ["ax", "ay", "az"]

[window]
size = 128
hop = 64

[[sinks]]
kind = "jsonl"
path = "out/results.jsonl"

[[sinks]]
kind = "jsonl"

[[sinks]]
kind = "sqlite"
path = "db/events.sqlite"
only_events = true

[[sinks]]
kind = "snapshots"
dir = "/var/lib/edgert/snaps"

[trust]
keys = ["keys/{pub_key.name}"]
require_signature = true

[state]
dir = "var"

[log]
level = "debug"
stats_interval_s = 0
"""
    config = load_config(Path("..") / "etc" / write(tmp_path, text).name)
    base = (tmp_path / "etc").resolve()
    assert config.model.bundle == base / ".." / "models" / "shapes.edgebundle"
    assert (config.model.format, config.model.threads, config.model.providers) == ("onnx", 4, ["cpu"])
    assert config.model.delegates[0].library == "libedgetpu.so.1"
    assert config.model.delegates[0].options == {"device": "usb"}
    assert config.source.uri == str(base / "data" / "vib.csv")
    assert config.source.columns == ["ax", "ay", "az"]
    assert config.window is not None and (config.window.size, config.window.hop) == (128, 64)
    jsonl, stdout, sqlite, snaps = config.sinks
    assert isinstance(jsonl, JsonlSinkConfig) and jsonl.path == str(base / "out" / "results.jsonl")
    assert isinstance(stdout, JsonlSinkConfig) and stdout.path == "-"
    assert isinstance(sqlite, SqliteSinkConfig) and sqlite.path == base / "db" / "events.sqlite"
    assert sqlite.only_events
    assert isinstance(snaps, SnapshotSinkConfig) and snaps.dir == Path("/var/lib/edgert/snaps")
    assert config.trust.keys == [base / "keys" / pub_key.name]
    assert config.trust.require_signature
    assert config.state.dir == base / "var"
    assert (config.log.level, config.log.stats_interval_s) == ("debug", 0)


@pytest.mark.parametrize(
    ("kind", "uri", "resolved"),
    [
        ("camera", "0", False),
        ("camera", "/dev/video2", False),
        ("stream", "rtsp://cam.local/stream", False),
        ("serial", "/dev/ttyUSB0", False),
        ("images", "frames", True),
        ("video", "file://clip.avi", False),
    ],
)
def test_source_uri_resolution_by_kind(tmp_path: Path, kind: str, uri: str, resolved: bool) -> None:
    text = f'[model]\nbundle = "b"\n[source]\nkind = "{kind}"\nuri = "{uri}"\n'
    config = load_config(write(tmp_path, text))
    expected = str(tmp_path / "etc" / uri) if resolved else uri
    assert config.source.uri == expected


def test_stdin_source_needs_no_uri(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, '[model]\nbundle = "b"\n[source]\nkind = "stdin"\nformat = "json"\n')
    )
    assert config.source.kind == "stdin" and config.source.uri == ""


def test_home_relative_path_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = load_config(write(tmp_path, '[model]\nbundle = "~/b"\n[source]\nkind = "stdin"\n'))
    assert config.model.bundle == tmp_path / "home" / "b"


def test_edge_runtime_level_load_config(tmp_path: Path) -> None:
    config = edge_runtime.load_config(write(tmp_path, MINIMAL))
    assert isinstance(config, edge_runtime.Config)


# ================================================================== errors


def test_unknown_field_names_its_path(tmp_path: Path) -> None:
    msg = config_error(tmp_path, MINIMAL.replace('uri = "clips/in.avi"', 'urii = "clips/in.avi"'))
    assert "source.urii: unknown field" in msg


@pytest.mark.parametrize(
    ("extra", "path"),
    [
        ("[model.extra]\nx = 1\n", "model.extra"),
        ('[[sinks]]\nkind = "jsonl"\nflush = 3\n', "sinks.0.jsonl.flush"),
        ("[pipeline]\nmax_fpss = 3\n", "pipeline.max_fpss"),
        ("[loggg]\nlevel = 'info'\n", "loggg"),
    ],
)
def test_unknown_nested_fields(tmp_path: Path, extra: str, path: str) -> None:
    assert f"{path}: unknown field" in config_error(tmp_path, MINIMAL + extra)


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ('[source]\nkind = "video"\nuri = "x"\n', "model: required field is missing"),
        ('[model]\nbundle = "b"\n', "source: required field is missing"),
        ('[model]\nthreads = 2\n[source]\nkind = "stdin"\n', "model.bundle: required field is missing"),
        ('[model]\nbundle = "b"\n[source]\nuri = "x"\n', "source"),
        ('[model]\nbundle = "b"\n[source]\nkind = "video"\n', "needs 'uri'"),
        (MINIMAL + '[[sinks]]\nkind = "sqlite"\n', "sinks.0.sqlite.path: required field is missing"),
    ],
)
def test_missing_required(tmp_path: Path, text: str, path: str) -> None:
    assert path in config_error(tmp_path, text)


@pytest.mark.parametrize(
    ("replace", "path"),
    [
        ('bundle = "bundles/shapes"\nthreads = "four"', "model.threads"),
        ('bundle = "bundles/shapes"\nthreads = 0', "model.threads"),
        ('bundle = "bundles/shapes"\nformat = "pt"', "model.format"),
        ('bundle = "bundles/shapes"\nproviders = "cpu"', "model.providers"),
        ('bundle = "bundles/shapes"\nselftest = "maybe"', "model.selftest"),
        ("bundle = 5", "model.bundle"),
    ],
)
def test_wrong_types(tmp_path: Path, replace: str, path: str) -> None:
    msg = config_error(tmp_path, MINIMAL.replace('bundle = "bundles/shapes"', replace))
    assert f"{path}:" in msg


@pytest.mark.parametrize(
    ("extra", "path"),
    [
        ('[[sinks]]\nkind = "kafka"\n', "sinks.0"),
        ("[pipeline]\nqueue_size = 0\n", "pipeline.queue_size"),
        ("[log]\nlevel = 'verbose'\n", "log.level"),
        ("[window]\nsize = 0\n", "window.size"),
        ('[[sinks]]\nkind = "snapshots"\ndir = "s"\nquality = 5\n', "sinks.0.snapshots.quality"),
    ],
)
def test_out_of_range_values(tmp_path: Path, extra: str, path: str) -> None:
    assert f"{path}:" in config_error(tmp_path, MINIMAL + extra)


def test_sinks_must_be_a_list(tmp_path: Path) -> None:
    assert "sinks" in config_error(tmp_path, MINIMAL + '[sinks]\nkind = "jsonl"\n')


def test_require_signature_without_keys(tmp_path: Path) -> None:
    msg = config_error(tmp_path, MINIMAL + "[trust]\nrequire_signature = true\n")
    assert "trust: " in msg and "no keys are listed" in msg and "require_signature = false" in msg


def test_trust_key_that_does_not_exist(tmp_path: Path) -> None:
    msg = config_error(tmp_path, MINIMAL + '[trust]\nkeys = ["keys/missing.pub"]\n')
    assert "trust.keys" in msg and str(tmp_path / "etc" / "keys" / "missing.pub") in msg


def test_invalid_toml(tmp_path: Path) -> None:
    msg = config_error(tmp_path, MINIMAL + "[model\nbroken = \n")
    assert "not valid TOML" in msg
    msg = config_error(tmp_path, MINIMAL + '[model]\nbundle = "again"\n')
    assert "not valid TOML" in msg


def test_unreadable_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path)
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(MINIMAL.replace("shapes", "sh\xe4pes").encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(latin1)


def test_parse_config_uses_origin_and_base(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^inline: model: required field is missing"):
        parse_config({"source": {"kind": "stdin"}}, origin="inline")
    config = parse_config({"model": {"bundle": "b"}, "source": {"kind": "stdin"}}, base=tmp_path)
    assert config.model.bundle == tmp_path / "b"


# ================================================================== secrets


def test_read_secret_prefers_credentials_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt_password").write_text("from-systemd\n")
    local = tmp_path / "cwd"
    local.mkdir()
    (local / "mqtt_password").write_text("from-cwd\n")
    (local / "sub").mkdir()
    (local / "sub" / "mqtt_password").write_text("  from-sub \n")
    monkeypatch.chdir(local)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert read_secret(Path("mqtt_password")) == "from-systemd"
    # a path (not a bare name) is never looked up in the credentials directory
    assert read_secret(Path("sub/mqtt_password")) == "from-sub"
    assert read_secret(local / "mqtt_password") == "from-cwd"
    # falls back to the plain path when systemd did not provide it
    (creds / "mqtt_password").unlink()
    assert read_secret(Path("mqtt_password")) == "from-cwd"
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    assert read_secret(Path("mqtt_password")) == "from-cwd"


def test_read_secret_missing_says_where_it_looked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    with pytest.raises(ConfigError) as err:
        read_secret(Path("token"))
    msg = str(err.value)
    assert "secret file token not found" in msg
    assert str(creds / "token") in msg and "LoadCredential=" in msg
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    with pytest.raises(ConfigError, match="not found"):
        read_secret(tmp_path / "absent" / "token")
    # a folder is not a secret file
    with pytest.raises(ConfigError, match="not found"):
        read_secret(creds)
