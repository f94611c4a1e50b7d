"""systemd/edgert.service: parsed by systemd itself, hardened, and using what the daemon supports."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO

UNIT = REPO / "systemd" / "edgert.service"


def _directives() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_unit_has_notify_watchdog_and_hardening() -> None:
    d = _directives()
    assert d["Type"] == ["notify"] and d["NotifyAccess"] == ["main"]
    assert int(d["WatchdogSec"][0]) > 0 and d["Restart"] == ["on-failure"]
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert d["StateDirectory"] == ["edgert"] and d["User"] == ["edgert"]
    for flag in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert d[flag] == ["yes"], flag
    assert d["ProtectSystem"] == ["strict"]
    assert "char-video4linux rw" in d["DeviceAllow"] and d["DevicePolicy"] == ["closed"]
    assert "run --config" in d["ExecStart"][0]


def _verifiable_copy(tmp_path: Path) -> Path:
    text = re.sub(
        r"^ExecStart=\S+",
        f"ExecStart={Path(sys.executable).resolve()} -m edge_runtime",
        UNIT.read_text(),
        flags=re.M,
    )
    copy = tmp_path / "edgert.service"
    copy.write_text(text)
    return copy


def test_systemd_accepts_the_unit_and_rates_it_hardened(tmp_path: Path) -> None:
    """systemd-analyze (where systemd is installed) parses the unit and scores its exposure."""
    analyze = shutil.which("systemd-analyze")
    copy = _verifiable_copy(tmp_path)
    if analyze is None:  # not a systemd host (e.g. macOS): the directive checks above still ran
        assert copy.read_text().count("[Service]") == 1
        return
    verify = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, check=False)
    assert verify.returncode == 0, verify.stderr
    assert verify.stderr.strip() == ""
    sec = subprocess.run(
        [analyze, "security", "--offline=yes", str(copy)], capture_output=True, text=True, check=False
    )
    match = re.search(r"Overall exposure level for edgert.service: ([0-9.]+)", sec.stdout + sec.stderr)
    assert match, sec.stdout + sec.stderr
    assert float(match.group(1)) <= 3.0
