"""Device health for fleet telemetry: CPU, memory, disk, file descriptors, temperature, uptime.

:class:`SystemMetrics` reads psutil and sysfs. Every reading is independent and cheap (no sleeps,
a handful of small file reads); a reading the platform does not offer, or that fails, is None and
never an exception, so a telemetry loop can call :meth:`SystemMetrics.collect` unguarded.
"""

from __future__ import annotations

import logging
import math
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import psutil

__all__ = ["DEFAULT_THERMAL_BASE", "SystemMetrics", "read_thermal_zones"]

log = logging.getLogger(__name__)

DEFAULT_THERMAL_BASE = Path("/sys/class/thermal")
"""Where Linux exposes ``thermal_zone*/temp`` (millidegrees Celsius)."""

_MIN_C, _MAX_C = -40.0, 150.0  # readings outside are sensor errors (e.g. -273.15 or 0x7fff)

_T = TypeVar("_T")
_ERRORS = (psutil.Error, OSError, ValueError, AttributeError, NotImplementedError, RuntimeError)


def _plausible(celsius: float) -> bool:
    return math.isfinite(celsius) and _MIN_C <= celsius <= _MAX_C


def read_thermal_zones(base: Path) -> float | None:
    """Hottest plausible temperature in °C of ``base/thermal_zone*/temp``, None when there is none.

    Values are millidegrees as the Linux thermal ABI defines; unreadable zones (some drivers fail
    reads with EIO/ENODATA when a sensor sleeps) and implausible values are skipped.
    """
    best: float | None = None
    try:
        zones = sorted(base.glob("thermal_zone*/temp"))
    except OSError:
        return None
    for path in zones:
        try:
            celsius = int(path.read_text(encoding="ascii").strip()) / 1000.0
        except (OSError, ValueError):
            continue
        if _plausible(celsius) and (best is None or celsius > best):
            best = celsius
    return best


def _psutil_temperature() -> float | None:
    """Hottest plausible current temperature psutil reports (None where unsupported)."""
    sensors = getattr(psutil, "sensors_temperatures", None)
    if sensors is None:
        return None
    readings = [t.current for entries in sensors().values() for t in entries if t.current is not None]
    plausible = [float(c) for c in readings if _plausible(float(c))]
    return max(plausible) if plausible else None


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing ancestor (the state dir may not exist yet)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return path


class SystemMetrics:
    """Collects device and process health; one instance per process, called from one thread.

    ``state_dir`` is the folder whose file system's free space matters (the device state dir).
    ``thermal_base`` reads temperatures only from that sysfs-style folder (``thermal_zone*/temp``);
    by default psutil's sensors are used, then :data:`DEFAULT_THERMAL_BASE`. CPU percentages
    cover the time since the previous :meth:`collect` (or since construction).
    """

    def __init__(self, state_dir: Path | str, *, thermal_base: Path | str | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.thermal_base = Path(thermal_base) if thermal_base is not None else None
        self._lock = threading.Lock()
        self._failed: set[str] = set()
        proc = self._safe("process", psutil.Process)
        self._proc = proc
        if proc is not None:  # the first cpu_percent call only starts the interval
            self._safe("process_cpu_percent", lambda: proc.cpu_percent(None))
        self._cpu_times = self._safe("system_cpu_percent", self._busy_total)

    def _safe(self, key: str, fn: Callable[[], _T]) -> _T | None:
        try:
            return fn()
        except _ERRORS as exc:
            if key not in self._failed:
                self._failed.add(key)
                log.info("system metric %s is unavailable here: %s", key, exc)
            return None

    @staticmethod
    def _busy_total() -> tuple[float, float]:
        """Busy and total CPU seconds of all cores (guest time is already inside user/nice)."""
        t = psutil.cpu_times()
        total = sum(t) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)
        idle = t.idle + getattr(t, "iowait", 0.0)
        return total - idle, total

    def _system_cpu_percent(self) -> float | None:
        now = self._busy_total()
        last, self._cpu_times = self._cpu_times, now
        if last is None or now[1] <= last[1]:
            return None
        return round(min(100.0, max(0.0, 100.0 * (now[0] - last[0]) / (now[1] - last[1]))), 2)

    def temperature(self) -> float | None:
        """Hottest plausible temperature in °C, None when the device exposes none."""
        if self.thermal_base is not None:
            return read_thermal_zones(self.thermal_base)
        celsius = self._safe("temperature_c", _psutil_temperature)
        return celsius if celsius is not None else read_thermal_zones(DEFAULT_THERMAL_BASE)

    def collect(self) -> dict[str, float | int | None]:
        """One reading of every metric; unavailable ones are None.

        Keys: ``process_cpu_percent`` (100 = one core busy), ``process_rss_bytes``,
        ``process_open_fds``, ``process_threads``, ``process_uptime_s``, ``system_cpu_percent``
        (all cores, 0-100), ``cpu_count``, ``memory_available_bytes``, ``memory_total_bytes``,
        ``disk_free_bytes``, ``disk_total_bytes`` (the file system of ``state_dir``),
        ``temperature_c``, ``system_uptime_s``, ``load_1m``, ``load_5m``, ``load_15m``.
        """
        with self._lock:
            return self._collect()

    def _collect(self) -> dict[str, float | int | None]:
        proc = self._proc
        out: dict[str, float | int | None] = {}
        safe = self._safe
        out["process_cpu_percent"] = (
            safe("process_cpu_percent", lambda: round(proc.cpu_percent(None), 2)) if proc else None
        )
        mem_info = safe("process_rss_bytes", proc.memory_info) if proc else None
        out["process_rss_bytes"] = int(mem_info.rss) if mem_info is not None else None
        out["process_open_fds"] = safe("process_open_fds", proc.num_fds) if proc else None
        out["process_threads"] = safe("process_threads", proc.num_threads) if proc else None
        created = safe("process_uptime_s", proc.create_time) if proc else None
        now = time.time()
        out["process_uptime_s"] = round(max(0.0, now - created), 1) if created is not None else None
        out["system_cpu_percent"] = safe("system_cpu_percent", self._system_cpu_percent)
        out["cpu_count"] = safe("cpu_count", psutil.cpu_count)
        vm = safe("memory", psutil.virtual_memory)
        out["memory_available_bytes"] = int(vm.available) if vm is not None else None
        out["memory_total_bytes"] = int(vm.total) if vm is not None else None
        disk = safe("disk", lambda: shutil.disk_usage(_existing(self.state_dir)))
        out["disk_free_bytes"] = int(disk.free) if disk is not None else None
        out["disk_total_bytes"] = int(disk.total) if disk is not None else None
        celsius = safe("temperature_c", self.temperature)
        out["temperature_c"] = round(celsius, 1) if celsius is not None else None
        boot = safe("system_uptime_s", psutil.boot_time)
        out["system_uptime_s"] = round(max(0.0, now - boot), 1) if boot is not None else None
        load = safe("load", psutil.getloadavg)
        for key, value in zip(("load_1m", "load_5m", "load_15m"), load or (None, None, None), strict=True):
            out[key] = round(value, 2) if value is not None else None
        return out
