"""How much the daemon costs over a bare runtime loop, and what its pipelining buys.

Run from the repository root (the device venv plus ``onnx`` is enough)::

    PYTHONPATH=. python bench/pipeline.py [--threads 2] [--seconds 0.4] [--rounds 15] [--json out.json]

All figures come from ONE run on ONE model, a MobileNetV2 (width 1.0, 224 x 224, 3.5 M
parameters, random weights; see :mod:`bench.models`), wrapped in a real bundle:

1. **daemon / bare fps**: the real :class:`~edge_runtime.pipeline.Pipeline` (capture, inference
   and sink threads) reading a real 224 x 224 MJPG video file (looped) into a real JSONL sink
   writing to ``/dev/null``, against a tight ``session.run`` loop on one prepared input tensor
   (same model bytes, same session options, same threads). 224 x 224 frames are the fair
   source: the daemon still decodes every frame and converts it to the model input (BGR to
   RGB, ``x / 127.5 - 1``), which it must, but does no resize that the bare loop would skip.
   ``backend.run`` in a loop is measured too (the backend wrapper's share). With fewer CPUs
   than ``--threads`` + 1 the figure is repeated with ``cores - 1`` threads, which leaves a core
   to the capture and sink threads (``--no-spare-core`` skips it).
2. **overhead per inference** (us), three ways: *wall* = ``1/daemon_fps - 1/bare_fps`` (all
   the daemon costs, including runtime threads stalled by the capture and sink threads);
   *stages* = the pipeline's own ``inference`` + ``decode`` timings (means over the results
   the sink received) minus the bare ``run`` time, with *untimed* = ``1/daemon_fps`` minus
   those stages (queue hand-off, wake-ups, stats, building the result, waits for capture);
   *CPU* = on a null model (a few us of compute, one thread) the inference thread's CPU time
   per result minus that of a bare ``run`` (``/proc/self/task/*/schedstat``), robust to other
   load but including a blocking wait per frame (the null model waits for capture).
3. **daemon / naive serial fps** on a 1280 x 720 MJPG video resized to 224: a one-thread loop
   ``cv2 read -> Preprocessor -> backend.run -> decoder.decode`` against the pipeline, same
   model with ``--serial-threads`` (default 1) intra-op threads, so that decode + preprocess
   are at least a third of the serial frame time (the measured share is printed).
4. **cold start**: ``python -m edge_runtime run ...`` launched as a subprocess (bundle checks,
   model load, self-test included) until its first JSON line on stdout, and the peak RSS of
   that process (``wait4`` rusage of that one child).

With ``--tf-python PATH`` (a Python with tensorflow-cpu + keras) a Keras
MobileNetV2 ``.tflite`` is built once (cached) and figures 1-2 are repeated for LiteRT (bare
loop: ``invoke()`` on an input set once); a cached ``.tflite`` is used without that flag.

The machine is a noisy shared box. Every comparison alternates its arms in short trials
(the order flips every round) and reports medians of per-round figures. Before each round
the bench waits (``--max-load``, ``--quiet-budget``) for other processes to calm down, measures
their CPU use during every trial (``/proc/stat`` minus this process), and uses only the
rounds free of outside load when there are at least 3. No absolute time is asserted.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

if __package__ in (None, ""):  # run as a script: make ``bench`` and ``edge_runtime`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.models import (
    BUILD_DIR,
    MobileNetV2Config,
    build_mobilenet_v2_tflite,
    build_null_onnx,
    count_params,
    ensure_bundle,
    ensure_onnx_model,
)

__all__ = [
    "BenchConfig",
    "DaemonTrial",
    "LoopTrial",
    "SerialTrial",
    "bare_litert_loop",
    "bare_ort_loop",
    "backend_loop",
    "cold_start",
    "daemon_trial",
    "main",
    "make_video",
    "run_bench",
    "serial_trial",
]

REPO = Path(__file__).resolve().parent.parent
GOAL_RATIO = 0.95
GOAL_OVERHEAD_US = 50.0
GOAL_SERIAL = 1.3
GOAL_SHARE = 1.0 / 3.0


# -- inputs ------------------------------------------------------------------------------------
def make_video(path: Path, width: int, height: int, frames: int, seed: int = 0, codec: str = "MJPG") -> Path:
    """An ``.avi`` of moving, camera-like frames (smooth texture + noise), cached by name.

    ``codec="MJPG"`` (what most USB cameras send when asked for high resolutions) or ``"raw"``
    (uncompressed, like a camera delivering raw frames: decoding is a copy).
    """
    import cv2

    if path.is_file() and path.stat().st_size > 0:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = cv2.resize(
        rng.integers(0, 256, (max(2, height // 8), max(2, width // 8) * 2, 3), dtype=np.uint8),
        (width * 2, height),
        interpolation=cv2.INTER_CUBIC,
    )
    tmp = path.with_name(path.stem + ".tmp.avi")
    fourcc = 0 if codec == "raw" else cv2.VideoWriter.fourcc(*codec)
    writer = cv2.VideoWriter(str(tmp), fourcc, 30.0, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write {codec} video {tmp}")
    try:
        for i in range(frames):
            shift = (i * 4) % width
            frame = np.ascontiguousarray(base[:, shift : shift + width])
            noise = rng.integers(0, 12, frame.shape, dtype=np.uint8)
            cv2.add(frame, noise, dst=frame)
            writer.write(frame)
    finally:
        writer.release()
    tmp.replace(path)
    return path


# -- measurement primitives ------------------------------------------------------------------------
def _task_cpu_ns() -> dict[int, int]:
    """CPU time (ns) of every thread of this process, from ``/proc/self/task/*/schedstat``."""
    out: dict[int, int] = {}
    try:
        names = os.listdir("/proc/self/task")
    except OSError:
        return out
    for name in names:
        try:
            with open(f"/proc/self/task/{name}/schedstat", encoding="ascii") as fh:
                out[int(name)] = int(fh.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return out


def _cpu_by_role(before: dict[int, int], after: dict[int, int], roles: dict[int, str]) -> dict[str, float]:
    """CPU seconds per role between two snapshots; threads not in ``roles`` count as ``runtime``
    (the runtime's own worker threads: ONNX Runtime's intra-op pool, XNNPACK's)."""
    out: dict[str, float] = {}
    for tid, ns in after.items():
        role = roles.get(tid, "runtime")
        out[role] = out.get(role, 0.0) + (ns - before.get(tid, 0)) / 1e9
    return out


def _busy_s() -> float | None:
    """Seconds of CPU used by everything on the machine (all CPUs), from ``/proc/stat``."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class LoadMeter:
    """Share of the machine's CPUs (0..1) used by OTHER processes between start and stop."""

    def __init__(self) -> None:
        self._t0 = time.monotonic()
        self._busy0 = _busy_s()
        self._own0 = _own_cpu_s()

    def stop(self) -> float:
        wall = time.monotonic() - self._t0
        busy1 = _busy_s()
        if self._busy0 is None or busy1 is None or wall <= 0:
            return math.nan
        other = (busy1 - self._busy0) - (_own_cpu_s() - self._own0)
        return max(0.0, min(1.0, other / (wall * (os.cpu_count() or 1))))


class QuietWait:
    """Before each round, wait (within a total ``budget_s``) until other processes use less
    than ``max_load`` of the machine; counts the rounds that had to start anyway."""

    def __init__(self, max_load: float, budget_s: float) -> None:
        self.max_load = max_load
        self.budget_s = budget_s
        self.waited_s = 0.0
        self.busy_starts = 0

    def wait(self) -> None:
        if self.budget_s <= 0:
            return
        while True:
            meter = LoadMeter()
            time.sleep(0.2)
            load = meter.stop()
            self.waited_s += 0.2
            if math.isnan(load) or load < self.max_load:
                return
            if self.waited_s >= self.budget_s:
                self.busy_starts += 1
                return


@dataclass
class LoopTrial:
    """A tight loop: ``n`` calls in ``elapsed_s``; per-call median and mean in ms."""

    n: int
    elapsed_s: float
    median_ms: float
    mean_ms: float
    cpu_us: dict[str, float] = field(default_factory=dict)
    load: float = math.nan

    @property
    def fps(self) -> float:
        return self.n / self.elapsed_s if self.elapsed_s > 0 else 0.0


def _timed_loop(call: Callable[[], Any], seconds: float, warmup: int = 3) -> LoopTrial:
    for _ in range(warmup):
        call()
    clock = time.perf_counter
    times: list[float] = []
    roles = {threading.get_native_id(): "caller"}
    meter = LoadMeter()
    cpu0 = _task_cpu_ns()
    start = clock()
    deadline = start + seconds
    t = start
    while t < deadline:
        call()
        now = clock()
        times.append(now - t)
        t = now
    elapsed = t - start
    cpu = _cpu_by_role(cpu0, _task_cpu_ns(), roles)
    n = len(times)
    return LoopTrial(
        n,
        elapsed,
        statistics.median(times) * 1e3,
        elapsed / n * 1e3,
        {k: v / n * 1e6 for k, v in cpu.items()},
        meter.stop(),
    )


def ort_session(path: Path, threads: int) -> Any:
    """An ONNX Runtime session with exactly the options of ``OnnxRuntimeBackend``."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(path.read_bytes(), sess_options=so, providers=["CPUExecutionProvider"])


def bare_ort_loop(session: Any, tensor: npt.NDArray[Any], seconds: float) -> LoopTrial:
    """``session.run`` on one prepared input tensor, in a tight loop."""
    feed = {session.get_inputs()[0].name: tensor}
    names = [o.name for o in session.get_outputs()]
    run = session.run
    return _timed_loop(lambda: run(names, feed), seconds)


def litert_interpreter(path: Path, threads: int) -> Any:
    """A LiteRT interpreter with exactly the options of ``LiteRTBackend`` (XNNPACK on CPU)."""
    from ai_edge_litert import interpreter

    interp = interpreter.Interpreter(model_content=path.read_bytes(), num_threads=threads)
    interp.allocate_tensors()
    return interp


def bare_litert_loop(interp: Any, tensor: npt.NDArray[Any], seconds: float) -> LoopTrial:
    """``invoke()`` in a tight loop on an input set once (the barest LiteRT loop)."""
    interp.set_tensor(interp.get_input_details()[0]["index"], tensor)
    return _timed_loop(interp.invoke, seconds)


def backend_loop(model: Any, tensor: npt.NDArray[Any], seconds: float) -> LoopTrial:
    """The daemon's backend wrapper (``backend.run``) in a tight loop."""
    run = model.backend.run
    inputs = [tensor]
    return _timed_loop(lambda: run(inputs), seconds)


class _ClockSink:
    """A sink that stamps every result as the sink thread receives it (after the JSONL sink)."""

    def __init__(self, warmup: int) -> None:
        self.stamps: list[float] = []
        self.timings: list[dict[str, float]] = []
        self.warm = threading.Event()
        self._warmup = warmup

    def write(self, result: Any) -> None:
        self.stamps.append(time.perf_counter())
        self.timings.append(result.timings_ms)
        if len(self.stamps) >= self._warmup:
            self.warm.set()

    def flush(self) -> None:
        return None

    def close(self) -> None:
        return None


@dataclass
class DaemonTrial:
    """One pipeline run: steady-state fps at the sink, mean per-stage timings (ms) from the
    pipeline's own ``timings_ms``, CPU per result (us) by thread role, and the outside load."""

    frames: int
    fps: float
    stages_ms: dict[str, float]
    dropped: int
    errors: dict[str, int]
    cpu_us: dict[str, float] = field(default_factory=dict)
    load: float = math.nan


_ROLES = {"edgert-capture": "capture", "edgert-infer": "infer", "edgert-sink": "sink"}


def _pipeline_roles() -> dict[int, str]:
    roles = {threading.main_thread().native_id or 0: "main"}
    for thread in threading.enumerate():
        role = _ROLES.get(thread.name)
        if role is not None and thread.native_id is not None:
            roles[thread.native_id] = role
    return roles


def daemon_trial(
    model: Any,
    video: Path,
    seconds: float,
    *,
    sink_path: str = os.devnull,
    warmup: int = 5,
) -> DaemonTrial:
    """Run the real Pipeline (looped video source, JSONL sink) for ``seconds`` after ``warmup``
    results; fps is measured where the sink thread hands results over."""
    from edge_runtime.config import JsonlSinkConfig
    from edge_runtime.pipeline import Pipeline, PipelineOptions
    from edge_runtime.sinks import make_sinks
    from edge_runtime.sources import SourceSpec, make_source
    from edge_runtime.stats import PipelineStats

    clock = _ClockSink(warmup)
    sinks = [*make_sinks([JsonlSinkConfig(path=sink_path)]), clock]
    source = make_source(SourceSpec(kind="video", uri=str(video), loop=True))
    stats = PipelineStats()
    pipeline = Pipeline(model, source, sinks, PipelineOptions(), stats=stats)
    pipeline.start()
    try:
        if not clock.warm.wait(30.0):
            raise RuntimeError(f"the pipeline gave no results in 30 s: {pipeline.summary()}")
        roles = _pipeline_roles()
        meter = LoadMeter()
        cpu0 = _task_cpu_ns()
        first = len(clock.stamps) - 1
        time.sleep(seconds)
        deadline = time.monotonic() + 30.0
        while len(clock.stamps) - 1 - first < 3 and time.monotonic() < deadline:
            time.sleep(0.01)  # a very slow model: wait for a few results to time
        last = len(clock.stamps) - 1
        cpu = _cpu_by_role(cpu0, _task_cpu_ns(), roles)
        load = meter.stop()
    finally:
        pipeline.stop()
    stamps = clock.stamps[first : last + 1]
    timings = clock.timings[first + 1 : last + 1]
    n = len(stamps) - 1
    span = stamps[-1] - stamps[0]
    fps = n / span if span > 0 else 0.0
    stages = {k: statistics.fmean(t[k] for t in timings) for k in timings[0]} if timings else {}
    cpu_us = {k: v / n * 1e6 for k, v in cpu.items()} if n > 0 else {}
    return DaemonTrial(n, fps, stages, stats.dropped, dict(stats.errors), cpu_us, load)


@dataclass
class SerialTrial:
    """The naive one-thread loop: fps and mean ms per stage (read = cv2 decode)."""

    frames: int
    fps: float
    stages_ms: dict[str, float]
    load: float = math.nan

    @property
    def capture_share(self) -> float:
        """(decode + preprocess) / frame time."""
        s = self.stages_ms
        total = sum(s.values())
        return (s["read"] + s["preprocess"]) / total if total > 0 else 0.0


def serial_trial(model: Any, video: Path, seconds: float, warmup: int = 3) -> SerialTrial:
    """read (cv2) -> preprocess (the model's Preprocessor) -> run -> decode, in one thread."""
    import cv2

    pre = model.preprocessor
    run = model.backend.run
    decode = model.decoder.decode
    buf = pre.new_buffer()
    clock = time.perf_counter
    cap = cv2.VideoCapture(str(video), cv2.CAP_ANY)
    acc = {"read": 0.0, "preprocess": 0.0, "inference": 0.0, "decode": 0.0}
    n = -warmup
    start = deadline = 0.0
    meter = LoadMeter()
    try:
        while True:
            t0 = clock()
            ok, image = cap.read()
            if not ok:
                cap.release()
                cap = cv2.VideoCapture(str(video), cv2.CAP_ANY)
                ok, image = cap.read()
                if not ok:
                    raise RuntimeError(f"cannot read {video}")
            t1 = clock()
            transform = pre(image, buf)
            t2 = clock()
            outputs = run([buf])
            t3 = clock()
            decode(outputs, transform)
            t4 = clock()
            n += 1
            if n == 0:
                start, deadline = t4, t4 + seconds
                meter = LoadMeter()
                continue
            if n > 0:
                acc["read"] += t1 - t0
                acc["preprocess"] += t2 - t1
                acc["inference"] += t3 - t2
                acc["decode"] += t4 - t3
                if t4 >= deadline:
                    break
    finally:
        cap.release()
    elapsed = clock() - start
    return SerialTrial(n, n / elapsed, {k: v / n * 1e3 for k, v in acc.items()}, meter.stop())


@dataclass
class ColdStart:
    """Process start to first JSON result line, and the daemon process's peak RSS."""

    first_result_s: float
    peak_rss_mib: float
    pipeline_first_result_s: float | None
    exit_code: int


def cold_start(bundle: Path, video: Path, threads: int, max_frames: int = 10) -> ColdStart:
    """Launch ``python -m edge_runtime run`` on ``bundle``; time its first stdout line."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    cmd = [
        sys.executable, "-m", "edge_runtime", "--log-level", "warning", "run",
        "--bundle", str(bundle), "--source", f"video:{video}", "--sink", "jsonl:-",
        "--max-frames", str(max_frames), "--threads", str(threads),
    ]  # fmt: skip
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, cwd=REPO, env=env)
        assert proc.stdout is not None
        first = proc.stdout.readline()
        t_first = time.perf_counter() - t0
        proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        proc.stdout.close()
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    if not first.startswith(b"{") or proc.returncode != 0:
        raise RuntimeError(f"daemon failed (exit {proc.returncode}): {stderr[-2000:]}")
    summary_first = None
    for line in stderr.splitlines():
        if line.startswith('{"summary"'):
            summary_first = json.loads(line)["summary"].get("first_result_s")
    # ru_maxrss is in KiB on Linux
    return ColdStart(t_first, usage.ru_maxrss / 1024.0, summary_first, proc.returncode)


# -- the bench -----------------------------------------------------------------------------------
@dataclass
class BenchConfig:
    """What to run; the defaults are the documented configuration."""

    model: MobileNetV2Config = field(default_factory=MobileNetV2Config)
    threads: int = 2
    serial_threads: int = 1
    seconds: float = 0.4
    rounds: int = 15
    video_frames: int = 600
    big_video: tuple[int, int] = (1280, 720)
    big_video_frames: int = 150
    cold_runs: int = 3
    tf_python: Path | None = None
    litert: bool = True
    spare_core: bool = True
    max_load: float = 0.25
    quiet_budget_s: float = 30.0
    build_dir: Path = BUILD_DIR


def _load(bundle: Path, fmt: str, threads: int) -> Any:
    from edge_runtime.backends import BackendOptions
    from edge_runtime.bundle import open_bundle
    from edge_runtime.model import load_model
    from edge_runtime.selftest import run_selftest

    model = load_model(open_bundle(bundle, require_signature=False), fmt, BackendOptions(threads=threads))
    run_selftest(model)
    return model


def _prepared_input(model: Any, video: Path) -> npt.NDArray[Any]:
    """The model input tensor for the video's first frame, through the real Preprocessor."""
    import cv2

    cap = cv2.VideoCapture(str(video))
    ok, image = cap.read()
    cap.release()
    if not ok:
        raise RuntimeError(f"cannot read {video}")
    buf: npt.NDArray[Any] = model.preprocessor.new_buffer()
    model.preprocessor(image, buf)
    return buf


def _alternate(
    arms: dict[str, Callable[[], Any]], rounds: int, quiet: QuietWait | None = None
) -> dict[str, list[Any]]:
    """Run every arm once per round, reversing the order every other round (ABBA...), so slow
    drifts of the machine's load hit every arm alike; optionally wait for a quiet box first."""
    out: dict[str, list[Any]] = {k: [] for k in arms}
    names = list(arms)
    for r in range(rounds):
        if quiet is not None:
            quiet.wait()
        for name in names if r % 2 == 0 else reversed(names):
            out[name].append(arms[name]())
    return out


def _clean(trials: dict[str, list[Any]], max_load: float) -> tuple[dict[str, list[Any]], dict[str, int]]:
    """Keep the rounds in which no arm saw other processes use ``max_load`` of the CPUs or
    more (all rounds when fewer than 3 are clean); returns the kept trials and the counts."""
    n = len(next(iter(trials.values())))
    clean = [i for i in range(n) if all(not t[i].load >= max_load for t in trials.values())]
    keep = clean if len(clean) >= min(3, n) else list(range(n))
    kept = {k: [v[i] for i in keep] for k, v in trials.items()}
    return kept, {"rounds": n, "clean": len(clean), "used": len(keep)}


def _median(values: Sequence[float]) -> float:
    clean = [v for v in values if not math.isnan(v)]
    return float(statistics.median(clean)) if clean else math.nan


def _median_dict(dicts: Sequence[dict[str, float]]) -> dict[str, float]:
    keys = dict.fromkeys(k for d in dicts for k in d)
    return {k: _median([d.get(k, 0.0) for d in dicts]) for k in keys}


def _runtime_ratio(
    label: str,
    bare: Callable[[], LoopTrial],
    model: Any,
    video: Path,
    tensor: npt.NDArray[Any],
    cfg: BenchConfig,
    quiet: QuietWait,
    threads: int,
) -> dict[str, Any]:
    """Figures 1 and 2 for one runtime: daemon vs backend.run vs bare loop, alternated."""
    trials = _alternate(
        {
            "bare": bare,
            "backend": lambda: backend_loop(model, tensor, cfg.seconds),
            "daemon": lambda: daemon_trial(model, video, cfg.seconds),
        },
        cfg.rounds,
        quiet,
    )
    trials, rounds = _clean(trials, cfg.max_load)
    bare_t: list[LoopTrial] = trials["bare"]
    back_t: list[LoopTrial] = trials["backend"]
    dae_t: list[DaemonTrial] = trials["daemon"]
    pairs = list(zip(dae_t, bare_t, strict=True))
    timed = [d.stages_ms["inference"] + d.stages_ms["decode"] for d in dae_t]
    return {
        "runtime": label,
        "threads": threads,
        "rounds": rounds,
        "ratio": _median([d.fps / b.fps for d, b in pairs]),
        "ratio_per_round": [round(d.fps / b.fps, 4) for d, b in pairs],
        "bare_fps": _median([b.fps for b in bare_t]),
        "bare_run_median_ms": _median([b.median_ms for b in bare_t]),
        "backend_fps": _median([k.fps for k in back_t]),
        "daemon_fps": _median([d.fps for d in dae_t]),
        "overhead_wall_us": _median([(1.0 / d.fps - 1.0 / b.fps) * 1e6 for d, b in pairs]),
        "overhead_stages_us": _median([(tm - b.mean_ms) * 1e3 for tm, b in zip(timed, bare_t, strict=True)]),
        "untimed_us": _median([1e6 / d.fps - tm * 1e3 for d, tm in zip(dae_t, timed, strict=True)]),
        "backend_wrapper_us": _median(
            [(k.mean_ms - b.mean_ms) * 1e3 for k, b in zip(back_t, bare_t, strict=True)]
        ),
        "daemon_stage_means_ms": _median_dict([d.stages_ms for d in dae_t]),
        "cpu_us_per_inference": {
            "bare": _median_dict([b.cpu_us for b in bare_t]),
            "backend": _median_dict([k.cpu_us for k in back_t]),
            "daemon": _median_dict([d.cpu_us for d in dae_t]),
        },
        "external_load": _median(
            [t.load for t in bare_t] + [t.load for t in back_t] + [t.load for t in dae_t]
        ),
        "daemon_frames": sum(d.frames for d in dae_t),
        "daemon_dropped": sum(d.dropped for d in dae_t),
        "daemon_errors": sum(sum(d.errors.values()) for d in dae_t),
    }


def _onnx_ratio(
    bundle: Path, video: Path, cfg: BenchConfig, quiet: QuietWait, threads: int
) -> dict[str, Any]:
    """Figures 1 and 2 for ONNX Runtime with ``threads`` intra-op threads."""
    model = _load(bundle, "onnx", threads)
    try:
        tensor = _prepared_input(model, video)
        session = ort_session(bundle / "model.onnx", threads)
        return _runtime_ratio(
            "onnxruntime",
            lambda: bare_ort_loop(session, tensor, cfg.seconds),
            model,
            video,
            tensor,
            cfg,
            quiet,
            threads,
        )
    finally:
        model.close()


def _pipeline_cpu(cfg: BenchConfig, video: Path, quiet: QuietWait) -> dict[str, Any]:
    """Figure 2, third way: the inference thread's CPU per result on a null model (a few us of
    compute), minus the CPU of a bare ``session.run`` of it: the pipeline's own work per result
    (backend wrapper, decode, stats, result, queue hand-offs), free of CPU contention effects.
    One intra-op thread, so no runtime worker thread spins."""
    size, classes = cfg.model.size, cfg.model.classes
    path = cfg.build_dir / f"null_{size}_c{classes}.onnx"
    if not path.is_file():
        build_null_onnx(path, size, classes)
    bundle = ensure_bundle(path, size=size, build_dir=cfg.build_dir, threads=1)
    model = _load(bundle, "onnx", 1)
    try:
        tensor = _prepared_input(model, video)
        session = ort_session(bundle / "model.onnx", 1)
        seconds = max(0.2, cfg.seconds / 2)
        trials = _alternate(
            {
                "bare": lambda: bare_ort_loop(session, tensor, seconds),
                "daemon": lambda: daemon_trial(model, video, seconds),
            },
            cfg.rounds,
            quiet,
        )
    finally:
        model.close()
    trials, rounds = _clean(trials, cfg.max_load)
    bare_t: list[LoopTrial] = trials["bare"]
    dae_t: list[DaemonTrial] = trials["daemon"]
    return {
        "rounds": rounds,
        "overhead_cpu_us": _median(
            [
                d.cpu_us.get("infer", 0.0) - b.cpu_us.get("caller", 0.0)
                for d, b in zip(dae_t, bare_t, strict=True)
            ]
        ),
        "bare_run_cpu_us": _median([b.cpu_us.get("caller", 0.0) for b in bare_t]),
        "daemon_fps": _median([d.fps for d in dae_t]),
        "daemon_stage_means_ms": _median_dict([d.stages_ms for d in dae_t]),
        "daemon_cpu_us_per_result": _median_dict([d.cpu_us for d in dae_t]),
    }


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build what is missing, run every figure, return them as a dict (see :func:`format_report`)."""
    import onnxruntime as ort

    t_start = time.perf_counter()
    quiet = QuietWait(cfg.max_load, cfg.quiet_budget_s)
    onnx_path = ensure_onnx_model(cfg.model, cfg.build_dir)
    size = cfg.model.size
    bundle = ensure_bundle(onnx_path, size=size, build_dir=cfg.build_dir, threads=cfg.threads)
    small = make_video(cfg.build_dir / f"clip_{size}x{size}_mjpg.avi", size, size, cfg.video_frames)
    bw, bh = cfg.big_video
    big = make_video(cfg.build_dir / f"clip_{bw}x{bh}_mjpg.avi", bw, bh, cfg.big_video_frames)
    report: dict[str, Any] = {
        "model": {
            "file": onnx_path.name,
            "params": count_params(onnx_path),
            "input": [1, size, size, 3],
            "width": cfg.model.width,
        },
        "config": {
            "threads": cfg.threads,
            "serial_threads": cfg.serial_threads,
            "seconds": cfg.seconds,
            "rounds": cfg.rounds,
            "video": f"{size}x{size} MJPG",
            "big_video": f"{bw}x{bh} MJPG",
            "cpus": _cpus(),
            "onnxruntime": ort.__version__,
            "max_load": cfg.max_load,
            "quiet_budget_s": cfg.quiet_budget_s,
        },
    }

    log(f"[1/4] onnxruntime: bare session.run vs backend.run vs daemon ({cfg.rounds} rounds)")
    report["onnx"] = _onnx_ratio(bundle, small, cfg, quiet, cfg.threads)
    spare = max(1, _cpus() - 1)
    if cfg.spare_core and spare < cfg.threads:
        log(f"[1a] the same with {spare} thread(s), leaving a core to the capture and sink threads")
        report["onnx_spare"] = _onnx_ratio(bundle, small, cfg, quiet, spare)
    log(f"[1c] the same with {cfg.threads} thread(s) on an uncompressed {size}x{size} video")
    raw = make_video(cfg.build_dir / f"clip_{size}x{size}_raw.avi", size, size, 300, codec="raw")
    report["onnx_raw"] = _onnx_ratio(bundle, raw, cfg, quiet, cfg.threads)

    log("[1b] the pipeline's own CPU per result, on a null model")
    report["pipeline_cpu"] = _pipeline_cpu(cfg, small, quiet)

    log(f"[2/4] daemon vs naive serial loop on {bw}x{bh} ({cfg.serial_threads} thread(s))")
    model = _load(bundle, "onnx", cfg.serial_threads)
    try:
        trials = _alternate(
            {
                "serial": lambda: serial_trial(model, big, cfg.seconds),
                "daemon": lambda: daemon_trial(model, big, cfg.seconds),
            },
            cfg.rounds,
            quiet,
        )
    finally:
        model.close()
    trials, rounds = _clean(trials, cfg.max_load)
    serial_t: list[SerialTrial] = trials["serial"]
    dae_t: list[DaemonTrial] = trials["daemon"]
    pairs = list(zip(dae_t, serial_t, strict=True))
    report["serial"] = {
        "threads": cfg.serial_threads,
        "rounds": rounds,
        "ratio": _median([d.fps / s.fps for d, s in pairs]),
        "ratio_per_round": [round(d.fps / s.fps, 4) for d, s in pairs],
        "serial_fps": _median([s.fps for s in serial_t]),
        "daemon_fps": _median([d.fps for d in dae_t]),
        "capture_share": _median([s.capture_share for s in serial_t]),
        "serial_stage_means_ms": _median_dict([s.stages_ms for s in serial_t]),
        "daemon_stage_means_ms": _median_dict([d.stages_ms for d in dae_t]),
        "daemon_cpu_us_per_result": _median_dict([d.cpu_us for d in dae_t]),
        "external_load": _median([t.load for t in serial_t] + [t.load for t in dae_t]),
    }

    log(f"[3/4] cold start x{cfg.cold_runs}: python -m edge_runtime run -> first JSON line")
    colds = []
    for _ in range(cfg.cold_runs):
        quiet.wait()
        colds.append(cold_start(bundle, small, cfg.threads))
    report["cold_start"] = {
        "runs": cfg.cold_runs,
        "first_result_s": _median([c.first_result_s for c in colds]),
        "first_result_s_each": [round(c.first_result_s, 3) for c in colds],
        "pipeline_first_result_s": _median(
            [c.pipeline_first_result_s for c in colds if c.pipeline_first_result_s is not None]
        ),
        "peak_rss_mib": max(c.peak_rss_mib for c in colds),
    }

    log("[4/4] LiteRT: bare invoke vs backend.run vs daemon")
    report["litert"] = _litert(cfg, small, quiet)
    report["quiet"] = {
        "waited_s": round(quiet.waited_s, 1),
        "rounds_started_busy": quiet.busy_starts,
    }
    report["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    return report


def _litert(cfg: BenchConfig, video: Path, quiet: QuietWait) -> dict[str, Any]:
    """Figure 1 for LiteRT, when a MobileNetV2 .tflite is cached or can be built."""
    if not cfg.litert:
        return {"skipped": "disabled (--no-litert)"}
    cached = cfg.build_dir / f"keras_{cfg.model.tag}.tflite"
    if not cached.is_file():
        tf_python = cfg.tf_python
        if tf_python is None and importlib.util.find_spec("tensorflow") is not None:
            tf_python = Path(sys.executable)  # make test/make bench venvs carry the convert extra
        if tf_python is None:
            return {
                "skipped": "no .tflite cached; pass --tf-python PATH (a Python with tensorflow-cpu "
                "+ keras) to build Keras' MobileNetV2 once"
            }
        try:
            cached = build_mobilenet_v2_tflite(tf_python, cfg.model, cfg.build_dir)
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            return {"skipped": f"building the .tflite failed: {exc}"}
    bundle = ensure_bundle(cached, size=cfg.model.size, build_dir=cfg.build_dir, threads=cfg.threads)
    model = _load(bundle, "tflite", cfg.threads)
    try:
        tensor = _prepared_input(model, video)
        interp = litert_interpreter(bundle / "model.tflite", cfg.threads)
        out = _runtime_ratio(
            "litert",
            lambda: bare_litert_loop(interp, tensor, cfg.seconds),
            model,
            video,
            tensor,
            cfg,
            quiet,
            cfg.threads,
        )
    finally:
        model.close()
    out["model_file"] = cached.name
    return out


# -- report --------------------------------------------------------------------------------------
def _mark(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _fmt_ms(d: dict[str, float], digits: int = 3) -> str:
    return ", ".join(f"{k} {v:.{digits}f}" for k, v in d.items())


def _fmt_rounds(r: dict[str, int]) -> str:
    return f"rounds used {r['used']}/{r['rounds']} ({r['clean']} free of outside load)"


def _fmt_cpu(d: dict[str, float]) -> str:
    parts = [f"{k} {v:.0f}" for k, v in d.items()]
    return ", ".join(parts) + f" (total {sum(d.values()):.0f})"


def _summary_rows(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    c, o, s = report["config"], report["onnx"], report["serial"]
    cs, lt, pc = report["cold_start"], report["litert"], report["pipeline_cpu"]
    rows = [
        (f"daemon fps / bare session.run fps (ORT, {o['threads']} thr)",
         f"{o['ratio']:.3f}", f">= {GOAL_RATIO}", _mark(o["ratio"] >= GOAL_RATIO)),
        ("overhead per inference, wall (1/daemon - 1/bare)",
         f"{o['overhead_wall_us']:.0f} us", f"<= {GOAL_OVERHEAD_US:.0f} us",
         _mark(o["overhead_wall_us"] <= GOAL_OVERHEAD_US)),
        ("overhead per inference, stages (infer+decode - bare run)",
         f"{o['overhead_stages_us']:.0f} us", f"<= {GOAL_OVERHEAD_US:.0f} us",
         _mark(o["overhead_stages_us"] <= GOAL_OVERHEAD_US)),
        ("overhead per inference, CPU (null model, infer thread)",
         f"{pc['overhead_cpu_us']:.0f} us", f"<= {GOAL_OVERHEAD_US:.0f} us",
         _mark(pc["overhead_cpu_us"] <= GOAL_OVERHEAD_US)),
        (f"daemon fps / naive serial fps ({c['big_video']}, {s['threads']} thr)",
         f"{s['ratio']:.3f}", f">= {GOAL_SERIAL}", _mark(s["ratio"] >= GOAL_SERIAL)),
        ("  decode+preprocess share of serial frame time",
         f"{s['capture_share']:.2f}", f">= {GOAL_SHARE:.2f}", _mark(s["capture_share"] >= GOAL_SHARE)),
        ("cold start: process start -> first JSON line",
         f"{cs['first_result_s']:.2f} s", "report", "-"),
        ("peak RSS of the daemon process", f"{cs['peak_rss_mib']:.0f} MiB", "report", "-"),
    ]  # fmt: skip
    rw = report.get("onnx_raw")
    if rw is not None:
        rows += [
            (f"daemon fps / bare fps (ORT, {rw['threads']} thr, uncompressed video)", f"{rw['ratio']:.3f}",
             f">= {GOAL_RATIO}", _mark(rw["ratio"] >= GOAL_RATIO)),
            (f"  overhead per inference, wall ({rw['threads']} thr, uncompressed)",
             f"{rw['overhead_wall_us']:.0f} us", f"<= {GOAL_OVERHEAD_US:.0f} us",
             _mark(rw["overhead_wall_us"] <= GOAL_OVERHEAD_US)),
        ]  # fmt: skip
    sp = report.get("onnx_spare")
    if sp is not None:
        rows += [
            (f"daemon fps / bare fps (ORT, {sp['threads']} thr, a core spare)", f"{sp['ratio']:.3f}",
             f">= {GOAL_RATIO}", _mark(sp["ratio"] >= GOAL_RATIO)),
            (f"  overhead per inference, wall ({sp['threads']} thr)", f"{sp['overhead_wall_us']:.0f} us",
             f"<= {GOAL_OVERHEAD_US:.0f} us", _mark(sp["overhead_wall_us"] <= GOAL_OVERHEAD_US)),
            (f"  overhead per inference, stages ({sp['threads']} thr)", f"{sp['overhead_stages_us']:.0f} us",
             f"<= {GOAL_OVERHEAD_US:.0f} us", _mark(sp["overhead_stages_us"] <= GOAL_OVERHEAD_US)),
        ]  # fmt: skip
    if "ratio" in lt:
        rows += [
            (f"daemon fps / bare invoke fps (LiteRT, {lt['threads']} thr)", f"{lt['ratio']:.3f}",
             f">= {GOAL_RATIO}", _mark(lt["ratio"] >= GOAL_RATIO)),
            ("  LiteRT overhead per inference, wall", f"{lt['overhead_wall_us']:.0f} us",
             f"<= {GOAL_OVERHEAD_US:.0f} us", _mark(lt["overhead_wall_us"] <= GOAL_OVERHEAD_US)),
        ]  # fmt: skip
    else:
        rows.append(("daemon fps / bare invoke fps (LiteRT)", "skipped", f">= {GOAL_RATIO}", "-"))
    return rows


def _runtime_details(d: dict[str, Any]) -> list[str]:
    cpu = d["cpu_us_per_inference"]
    return [
        f"  {d['runtime']} ({d['threads']} threads), other processes used "
        f"{d['external_load']:.0%} of the CPUs: bare {d['bare_fps']:.1f} fps (run median "
        f"{d['bare_run_median_ms']:.3f} ms), backend.run {d['backend_fps']:.1f} fps, daemon "
        f"{d['daemon_fps']:.1f} fps",
        f"    {_fmt_rounds(d['rounds'])}; ratio per round: {d['ratio_per_round']}",
        f"    daemon stage means (ms): {_fmt_ms(d['daemon_stage_means_ms'])}",
        f"    overhead (us): wall {d['overhead_wall_us']:.0f}; stages {d['overhead_stages_us']:.0f} "
        f"(of which backend wrapper {d['backend_wrapper_us']:.0f}); untimed inference-thread "
        f"time {d['untimed_us']:.0f}",
        f"    CPU us per inference, bare: {_fmt_cpu(cpu['bare'])}",
        f"    CPU us per inference, backend.run: {_fmt_cpu(cpu['backend'])}",
        f"    CPU us per inference, daemon: {_fmt_cpu(cpu['daemon'])}",
        f"    {d['daemon_frames']} daemon results, {d['daemon_dropped']} dropped, "
        f"{d['daemon_errors']} errors",
    ]


def format_report(report: dict[str, Any], command: str) -> str:
    """The human-readable table (figures, goals, PASS/FAIL) and the details under it."""
    m, c, s, cs = report["model"], report["config"], report["serial"], report["cold_start"]
    rows = _summary_rows(report)
    w0 = max(len(r[0]) for r in rows)
    lines = [
        f"edge-runtime pipeline bench: {m['file']} ({m['params']:,} params, input {m['input']}), "
        f"{c['cpus']} CPUs, onnxruntime {c['onnxruntime']}",
        f"{c['rounds']} alternated rounds x {c['seconds']:g} s per arm; medians of per-round figures",
        "",
        f"{'figure':<{w0}}  {'measured':>10}  {'goal':>10}  result",
        f"{'-' * w0}  {'-' * 10}  {'-' * 10}  ------",
    ]
    lines += [f"{a:<{w0}}  {b:>10}  {g:>10}  {r}" for a, b, g, r in rows]
    lines += ["", "details:"]
    for key in ("onnx", "onnx_spare", "onnx_raw", "litert"):
        if key not in report:
            continue
        if "ratio" in report[key]:
            lines += _runtime_details(report[key])
        else:
            lines.append(f"  {key}: {report[key].get('skipped', 'skipped')}")
    q, pc = report["quiet"], report["pipeline_cpu"]
    lines += [
        f"  null model (1 thread): daemon {pc['daemon_fps']:.0f} fps; bare run CPU "
        f"{pc['bare_run_cpu_us']:.1f} us; daemon stage means (ms): {_fmt_ms(pc['daemon_stage_means_ms'])}",
        f"    daemon CPU us per result: {_fmt_cpu(pc['daemon_cpu_us_per_result'])}; "
        f"{_fmt_rounds(pc['rounds'])}",
        f"  serial vs daemon ({s['threads']} thread(s), {c['big_video']} -> {m['input'][1]}), other "
        f"processes used {s['external_load']:.0%}: serial {s['serial_fps']:.1f} fps, daemon "
        f"{s['daemon_fps']:.1f} fps",
        f"    {_fmt_rounds(s['rounds'])}; ratio per round {s['ratio_per_round']}",
        f"    serial stage means (ms): {_fmt_ms(s['serial_stage_means_ms'])}",
        f"    daemon stage means (ms): {_fmt_ms(s['daemon_stage_means_ms'])}",
        f"    daemon CPU us per result: {_fmt_cpu(s['daemon_cpu_us_per_result'])}",
        f"  cold start runs (s): {cs['first_result_s_each']}; the daemon's own first_result_s "
        f"(bundle check + model load + self-test + first frame): {cs['pipeline_first_result_s']:.2f} s",
        f"  waited {q['waited_s']} s for a quiet machine (other load < {c['max_load']:.0%}); "
        f"{q['rounds_started_busy']} rounds started busy; elapsed {report['elapsed_s']} s",
        "",
        f"command: {command}",
    ]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="intra-op threads, figures 1-2 (default 2)")
    p.add_argument("--serial-threads", type=int, default=1, help="threads for figure 3 (default 1)")
    p.add_argument("--seconds", type=float, default=0.4, help="seconds per timed trial (default 0.4)")
    p.add_argument("--rounds", type=int, default=15, help="alternated rounds per comparison (default 15)")
    p.add_argument("--cold-runs", type=int, default=3, help="cold starts to time (default 3)")
    p.add_argument("--width", type=float, default=1.0, help="MobileNetV2 width multiplier (default 1)")
    p.add_argument("--size", type=int, default=224, help="model input size (default 224)")
    p.add_argument("--tf-python", type=Path, help="a Python with tensorflow-cpu to build the .tflite")
    p.add_argument("--no-litert", action="store_true", help="skip the LiteRT figures")
    p.add_argument("--no-spare-core", action="store_true", help="skip figures 1-2 with cores - 1 threads")
    p.add_argument("--max-load", type=float, default=0.25,
                   help="before each round wait until other processes use less than this share "
                   "of the CPUs (default 0.25) ...")  # fmt: skip
    p.add_argument(
        "--quiet-budget",
        type=float,
        default=30.0,
        help="... but wait at most this many seconds in all (default 30; 0: never wait)",
    )
    p.add_argument("--json", type=Path, help="also write the figures as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the bench, print the table, optionally write JSON."""
    args = _parser().parse_args(argv)
    cfg = BenchConfig(
        model=MobileNetV2Config(width=args.width, size=args.size),
        threads=args.threads,
        serial_threads=args.serial_threads,
        seconds=args.seconds,
        rounds=args.rounds,
        cold_runs=args.cold_runs,
        tf_python=args.tf_python,
        litert=not args.no_litert,
        spare_core=not args.no_spare_core,
        max_load=args.max_load,
        quiet_budget_s=args.quiet_budget,
    )
    argv_list = list(sys.argv[1:] if argv is None else argv)
    command = " ".join(["PYTHONPATH=. python bench/pipeline.py", *(shlex.quote(a) for a in argv_list)])
    report = run_bench(cfg, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    report["command"] = command
    print(format_report(report, command))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
