"""Device health metrics read from this real process, this machine and fake sysfs thermal zones."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import psutil
import pytest

from edge_runtime.sync.metrics import SystemMetrics, read_thermal_zones

KEYS = {
    "process_cpu_percent",
    "process_rss_bytes",
    "process_open_fds",
    "process_threads",
    "process_uptime_s",
    "system_cpu_percent",
    "cpu_count",
    "memory_available_bytes",
    "memory_total_bytes",
    "disk_free_bytes",
    "disk_total_bytes",
    "temperature_c",
    "system_uptime_s",
    "load_1m",
    "load_5m",
    "load_15m",
}


def _zone(base: Path, n: int, text: str) -> None:
    (base / f"thermal_zone{n}").mkdir(parents=True)
    (base / f"thermal_zone{n}" / "temp").write_text(text)


def test_collect_reports_this_process(tmp_path: Path) -> None:
    metrics = SystemMetrics(tmp_path, thermal_base=tmp_path / "no-thermal")
    deadline = time.process_time() + 0.05
    while time.process_time() < deadline:  # burn a little CPU so the interval is not empty
        pass
    with (tmp_path / "held.txt").open("w"):
        got = metrics.collect()
    assert set(got) == KEYS
    proc = psutil.Process()
    rss = got["process_rss_bytes"]
    assert isinstance(rss, int) and 0 < rss <= psutil.virtual_memory().total
    assert abs(rss - proc.memory_info().rss) <= 64 << 20  # resident, not virtual, size
    fds = got["process_open_fds"]
    assert isinstance(fds, int) and fds >= 4  # stdin/out/err plus the file held open above
    threads = got["process_threads"]
    assert isinstance(threads, int) and 1 <= threads <= proc.num_threads() + 8
    assert isinstance(got["process_cpu_percent"], float) and got["process_cpu_percent"] > 0.0
    uptime = got["process_uptime_s"]
    assert isinstance(uptime, float) and 0.0 <= uptime <= time.time() - proc.create_time() + 1.0
    sys_uptime = got["system_uptime_s"]
    assert isinstance(sys_uptime, float) and sys_uptime >= uptime
    assert got["cpu_count"] == os.cpu_count()
    avail, total = got["memory_available_bytes"], got["memory_total_bytes"]
    assert isinstance(avail, int) and isinstance(total, int) and 0 < avail <= total
    load = [got["load_1m"], got["load_5m"], got["load_15m"]]
    assert all(isinstance(v, float) and v >= 0.0 for v in load)
    assert got["temperature_c"] is None


def test_disk_numbers_match_the_state_dir_file_system(tmp_path: Path) -> None:
    got = SystemMetrics(tmp_path).collect()
    usage = shutil.disk_usage(tmp_path)
    assert got["disk_total_bytes"] == usage.total
    free = got["disk_free_bytes"]
    assert isinstance(free, int) and 0 <= free <= usage.total
    assert abs(free - usage.free) <= max(256 << 20, usage.total // 100)  # others write meanwhile


def test_missing_state_dir_uses_its_nearest_existing_parent(tmp_path: Path) -> None:
    got = SystemMetrics(tmp_path / "not" / "yet" / "created").collect()
    assert got["disk_total_bytes"] == shutil.disk_usage(tmp_path).total


def test_cpu_percentages_cover_the_time_since_the_last_call(tmp_path: Path) -> None:
    metrics = SystemMetrics(tmp_path)
    metrics.collect()
    deadline = time.process_time() + 0.1
    while time.process_time() < deadline:
        pass
    got = metrics.collect()
    busy, system = got["process_cpu_percent"], got["system_cpu_percent"]
    assert isinstance(busy, float) and busy > 5.0  # this thread was busy for most of the interval
    assert isinstance(system, float) and 0.0 < system <= 100.0


def test_fake_thermal_zones_give_the_hottest_plausible_temperature(tmp_path: Path) -> None:
    base = tmp_path / "thermal"
    _zone(base, 0, "41250\n")
    _zone(base, 1, "57800\n")
    _zone(base, 2, "-273150\n")  # an absent sensor
    _zone(base, 3, "garbage\n")
    _zone(base, 10, "1000000\n")  # 1000 degrees: a broken driver
    (base / "cooling_device0").mkdir()
    assert read_thermal_zones(base) == pytest.approx(57.8)
    assert SystemMetrics(tmp_path, thermal_base=base).collect()["temperature_c"] == pytest.approx(57.8)


def test_unreadable_zone_is_skipped(tmp_path: Path) -> None:
    base = tmp_path / "thermal"
    _zone(base, 0, "30000")
    (base / "thermal_zone1").mkdir()
    (base / "thermal_zone1" / "temp").mkdir()  # reading a directory fails like an EIO read
    assert read_thermal_zones(base) == pytest.approx(30.0)


def test_missing_or_empty_thermal_dir_gives_none(tmp_path: Path) -> None:
    assert read_thermal_zones(tmp_path / "absent") is None
    (tmp_path / "empty").mkdir()
    assert read_thermal_zones(tmp_path / "empty") is None
    assert SystemMetrics(tmp_path, thermal_base=tmp_path / "absent").collect()["temperature_c"] is None


def test_default_temperature_is_a_plausible_reading_or_none(tmp_path: Path) -> None:
    celsius = SystemMetrics(tmp_path).collect()["temperature_c"]
    assert celsius is None or -40.0 <= celsius <= 150.0
