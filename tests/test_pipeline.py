"""The pipeline with real models, real video files and real sinks."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_runtime.bundle import open_bundle
from edge_runtime.config import JsonlSinkConfig, SqliteSinkConfig
from edge_runtime.model import LoadedModel, load_model
from edge_runtime.pipeline import Pipeline, PipelineOptions
from edge_runtime.sinks import JsonlSink, SqliteSink
from edge_runtime.sources import SourceSpec, VideoFileSource
from edge_runtime.types import Frame


def _model(path: Path) -> LoadedModel:
    return load_model(open_bundle(path, require_signature=False))


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


class SyntheticLiveSource:
    """A live source that produces frames as fast as asked, for drop accounting (the seam is
    the Source protocol; real live sources are tested in test_sources.py)."""

    live = True

    def __init__(self, frames: list[np.ndarray], interval_s: float = 0.0) -> None:
        self._frames = frames
        self._interval = interval_s
        self._i = 0
        self.closed = threading.Event()

    def open(self) -> None:
        self._i = 0

    def read(self) -> Frame | None:
        if self.closed.is_set() or self._i >= len(self._frames):
            return None
        if self._interval:
            time.sleep(self._interval)
        frame = Frame(self._frames[self._i], self._i, time.monotonic())
        self._i += 1
        return frame

    def close(self) -> None:
        self.closed.set()


def test_file_source_processes_every_frame_in_order(
    make_cnn_bundle: Callable[..., Path], video: Path, tmp_path: Path
) -> None:
    out = tmp_path / "r.jsonl"
    model = _model(make_cnn_bundle())
    source = VideoFileSource(SourceSpec(kind="video", uri=str(video)))
    pipe = Pipeline(model, source, [JsonlSink(JsonlSinkConfig(path=str(out)))], PipelineOptions(queue_size=2))
    summary = pipe.run()
    rows = _lines(out)
    assert [r["frame"] for r in rows] == list(range(20))
    assert summary["frames"] == 20 and summary["dropped"] == 0 and summary["errors"] == {}
    # Results equal a direct run of the same model on the same decoded frames.
    direct = VideoFileSource(SourceSpec(kind="video", uri=str(video)))
    direct.open()
    frame = direct.read()
    assert frame is not None
    outputs, _ = model.infer(frame.data)
    direct.close()
    assert rows[0]["top"][0]["index"] == int(np.argmax(outputs[0]))
    assert rows[0]["top"][0]["score"] == pytest.approx(float(np.max(outputs[0])), abs=1e-4)
    for stage in ("queue", "preprocess", "inference", "decode", "total"):
        assert set(summary["latency_ms"][stage]) == {"p50", "p95", "p99"}


def test_live_source_latest_frame_wins_and_counts_drops(
    make_cnn_bundle: Callable[..., Path], tmp_path: Path
) -> None:
    out = tmp_path / "r.jsonl"
    frames = [np.full((48, 64, 3), i % 256, np.uint8) for i in range(300)]
    source = SyntheticLiveSource(frames, interval_s=0.001)
    pipe = Pipeline(
        _model(make_cnn_bundle()),
        source,
        [JsonlSink(JsonlSinkConfig(path=str(out)))],
        PipelineOptions(max_fps=50),
    )
    summary = pipe.run()
    rows = _lines(out)
    indices = [r["frame"] for r in rows]
    assert indices == sorted(indices)
    assert summary["dropped"] > 0
    # Every captured frame is accounted for: processed, dropped, or left in the queue at the end.
    assert summary["frames_in"] - summary["frames"] - summary["dropped"] in (0, 1)
    assert summary["frames"] == len(rows) < 300


def test_bad_frames_are_counted_and_the_pipeline_keeps_going(
    make_cnn_bundle: Callable[..., Path], tmp_path: Path
) -> None:
    good = np.zeros((48, 64, 3), np.uint8)
    frames = [
        good,
        np.zeros((48, 64, 2), np.uint8),
        good,
        np.zeros((48, 64, 3), np.float32),
        np.zeros((0, 64, 3), np.uint8),
        good,
    ]
    source = SyntheticLiveSource(frames)
    source.live = False  # back-pressure: process every frame
    out = tmp_path / "r.jsonl"
    pipe = Pipeline(_model(make_cnn_bundle()), source, [JsonlSink(JsonlSinkConfig(path=str(out)))])
    summary = pipe.run()
    assert [r["frame"] for r in _lines(out)] == [0, 2, 5]
    assert summary["errors"] == {"preprocess": 3}


def test_hot_swap_between_inferences_drops_no_frame(
    make_cnn_bundle: Callable[..., Path], tmp_path: Path
) -> None:
    from conftest import write_video

    video = write_video(tmp_path / "long.avi", frames=60)
    v1 = _model(make_cnn_bundle("1.0.0"))
    v2 = _model(make_cnn_bundle("2.0.0"))
    out = tmp_path / "r.jsonl"
    source = VideoFileSource(SourceSpec(kind="video", uri=str(video)))
    pipe = Pipeline(v1, source, [JsonlSink(JsonlSinkConfig(path=str(out)))], PipelineOptions(max_fps=200))
    pipe.start()
    while pipe.stats.frames < 15:
        time.sleep(0.005)
    done, retired = pipe.swap_model(v2)
    assert done.wait(5)
    assert retired == [v1]
    pipe.wait(20)
    pipe.stop()
    rows = _lines(out)
    assert [r["frame"] for r in rows] == list(range(60))
    models = [r["model"] for r in rows]
    first_v2 = models.index("tiny-cnn@2.0.0")
    assert 15 <= first_v2 < 60
    assert set(models[:first_v2]) == {"tiny-cnn@1.0.0"} and set(models[first_v2:]) == {"tiny-cnn@2.0.0"}
    assert pipe.summary()["model_swaps"] == 1


def test_sqlite_sink_bounded_and_events_only(
    make_cnn_bundle: Callable[..., Path], tmp_path: Path, yolo_bundle: Path
) -> None:
    import sqlite3

    from conftest import write_video

    video = write_video(tmp_path / "v.avi", frames=30)
    db = tmp_path / "events.db"
    sink = SqliteSink(SqliteSinkConfig(path=db, max_rows=10))
    pipe = Pipeline(_model(yolo_bundle), VideoFileSource(SourceSpec(kind="video", uri=str(video))), [sink])
    summary = pipe.run()
    assert summary["frames"] == 30
    rows = sqlite3.connect(db).execute("SELECT frame, event, body FROM results ORDER BY id").fetchall()
    assert 10 <= len(rows) <= 30  # trimmed to max_rows within one tenth of it
    assert rows[-1][0] == 29
    body = json.loads(rows[-1][2])
    assert body["task"] == "detection" and rows[-1][1] == int(bool(body["detections"]))


def test_sensor_windows_are_batched_with_the_same_results(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    """A dynamic-batch sensor model: batch=8 gives exactly the per-window results of batch=1."""
    from conftest import build_sensor_onnx

    from edge_runtime.bundle import create_bundle
    from edge_runtime.decoders.specs import RawSpec
    from edge_runtime.preprocess_spec import TensorPreprocess
    from edge_runtime.sources import ReplaySource, Windower, WindowSpec

    rng = np.random.default_rng(2)
    samples = rng.standard_normal((1000, 3)) * np.linspace(0.5, 3, 1000)[:, None]
    csv = tmp_path / "s.csv"
    csv.write_text("ax,ay,az\n" + "\n".join(",".join(f"{v:.5f}" for v in row) for row in samples) + "\n")
    bundle = create_bundle(
        tmp_path / "b",
        models=[build_sensor_onnx(tmp_path / "m.onnx", batch="N")],
        name="energy",
        version="1.0.0",
        task="anomaly",
        preprocess=TensorPreprocess(window=32, hop=16, channels=3),
        decoder=RawSpec(anomaly_threshold=2.0),
        golden_frames=rng.standard_normal((2, 32, 3)).astype(np.float32),
    )
    results = {}
    for batch in (1, 8):
        out = tmp_path / f"r{batch}.jsonl"
        source = ReplaySource(SourceSpec(kind="replay", uri=str(csv)))
        pipe = Pipeline(
            _model(bundle),
            source,
            [JsonlSink(JsonlSinkConfig(path=str(out)))],
            PipelineOptions(batch=batch),
            windower=Windower(WindowSpec(size=32, hop=16)),
        )
        summary = pipe.run()
        assert summary["errors"] == {}
        results[batch] = _lines(out)
    assert len(results[1]) == (1000 - 32) // 16 + 1
    assert [r["frame"] for r in results[8]] == [r["frame"] for r in results[1]]
    for a, b in zip(results[1], results[8], strict=True):
        assert a["score"] == pytest.approx(b["score"], rel=1e-5)
        assert a["anomaly"] == b["anomaly"]
    # Reference: the energy of each window computed directly.
    windows = np.lib.stride_tricks.sliding_window_view(samples.astype(np.float32), (32, 3))[::16, 0]
    expected = (windows.astype(np.float64) ** 2).mean(axis=(1, 2))
    assert [r["score"] for r in results[8]] == pytest.approx(expected.tolist(), rel=1e-4)


def test_batch_larger_than_a_fixed_model_batch_is_a_config_error(
    make_cnn_bundle: Callable[..., Path], video: Path
) -> None:
    from edge_runtime.errors import ConfigError

    with pytest.raises(ConfigError, match="fixed batch dimension of 1"):
        Pipeline(
            _model(make_cnn_bundle()),
            VideoFileSource(SourceSpec(kind="video", uri=str(video))),
            [],
            PipelineOptions(batch=4),
        )


def test_a_faulty_sink_does_not_stall_the_pipeline(
    make_cnn_bundle: Callable[..., Path], video: Path, tmp_path: Path
) -> None:
    """A sink that raises something unexpected is counted; the other sinks still get every result."""

    class Broken:
        def write(self, result: object) -> None:
            raise RuntimeError("disk on fire")

        def flush(self) -> None:
            return None

        def close(self) -> None:
            return None

    out = tmp_path / "r.jsonl"
    source = VideoFileSource(SourceSpec(kind="video", uri=str(video)))
    pipe = Pipeline(_model(make_cnn_bundle()), source, [Broken(), JsonlSink(JsonlSinkConfig(path=str(out)))])
    summary = pipe.run()
    assert len(_lines(out)) == 20
    assert summary["errors"]["sink"] >= 1
