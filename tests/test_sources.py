"""Sources against real parts: video files, an MJPEG-over-HTTP server, ptys, pipes, files."""

from __future__ import annotations

import contextlib
import io
import os
import random
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from edge_runtime.errors import SampleParseError, SourceError
from edge_runtime.sources import (
    SOURCES,
    Backoff,
    CameraSource,
    ImageFolderSource,
    LineParser,
    ReconnectingSource,
    ReplaySource,
    SerialSource,
    Source,
    SourceSpec,
    StdinSource,
    StreamSource,
    VideoFileSource,
    make_source,
    parse_line,
    parse_source_uri,
    redact_uri,
)

# --------------------------------------------------------------------------- helpers


def write_video(path: Path, values: list[int], size: tuple[int, int] = (64, 48)) -> None:
    """A real MJPG/AVI file whose frame i is a flat gray image of brightness values[i]."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 10.0, size)
    assert writer.isOpened(), "this OpenCV build cannot write MJPG/AVI"
    try:
        for v in values:
            writer.write(np.full((size[1], size[0], 3), v, np.uint8))
    finally:
        writer.release()


def brightness(frame_data: np.ndarray) -> float:
    return float(frame_data.mean())


class _MjpegHandler(BaseHTTPRequestHandler):
    server: _MjpegHTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
        self.end_headers()
        ok, buf = cv2.imencode(".jpg", np.full((48, 64, 3), self.server.value, np.uint8))
        assert ok
        part = (
            b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: "
            + str(len(buf)).encode()
            + b"\r\n\r\n"
            + buf.tobytes()
            + b"\r\n"
        )
        with contextlib.suppress(OSError):
            while not self.server.stopping.is_set():
                self.wfile.write(part)
                self.wfile.flush()
                self.server.stopping.wait(0.02)


class _MjpegHTTPServer(ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins the handler threads
    block_on_close = True

    def __init__(self, port: int, value: int) -> None:
        self.value = value
        self.stopping = threading.Event()
        super().__init__(("127.0.0.1", port), _MjpegHandler)


class MjpegServer:
    """An MJPEG-over-HTTP camera on 127.0.0.1 serving flat frames of one brightness."""

    def __init__(self, value: int, port: int = 0) -> None:
        self.httpd = _MjpegHTTPServer(port, value)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/stream.mjpg"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="mjpeg-server"
        )
        self.thread.start()

    def stop(self) -> None:
        self.httpd.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@contextlib.contextmanager
def pty_pair() -> Iterator[tuple[int, str]]:
    """(master fd, slave path) of a real pseudo-terminal; the slave is opened by name."""
    master, slave = os.openpty()
    name = os.ttyname(slave)
    os.close(slave)
    try:
        yield master, name
    finally:
        with contextlib.suppress(OSError):
            os.close(master)


def join(thread: threading.Thread) -> None:
    thread.join(10)
    assert not thread.is_alive(), f"thread {thread.name} did not finish"


# --------------------------------------------------------------------------- video files


def test_video_reads_every_frame_in_order(tmp_path: Path) -> None:
    values = [0, 40, 80, 120, 160, 200]
    path = tmp_path / "clip.avi"
    write_video(path, values)
    src = VideoFileSource(SourceSpec(kind="video", uri=str(path)))
    assert isinstance(src, Source)
    assert src.live is False
    src.open()
    try:
        frames = []
        while (f := src.read()) is not None:
            frames.append(f)
        assert [f.index for f in frames] == list(range(len(values)))
        assert [brightness(f.data) for f in frames] == pytest.approx(values, abs=3)
        assert all(f.kind == "image" and f.data.shape == (48, 64, 3) for f in frames)
        ts = [f.source_ts for f in frames]
        assert ts == pytest.approx([0, 100, 200, 300, 400, 500], abs=1)
        assert src.read() is None
    finally:
        src.close()
    src.close()  # idempotent
    assert src.read() is None


def test_video_loop_restarts_at_end(tmp_path: Path) -> None:
    values = [30, 90, 150]
    path = tmp_path / "loop.avi"
    write_video(path, values)
    src = VideoFileSource(SourceSpec(kind="video", uri=str(path), loop=True))
    src.open()
    try:
        frames = [src.read() for _ in range(8)]
    finally:
        src.close()
    assert all(f is not None for f in frames)
    got = [brightness(f.data) for f in frames if f is not None]
    assert got == pytest.approx((values * 3)[:8], abs=3)
    assert [f.index for f in frames if f is not None] == list(range(8))
    assert src.loops == 2


def test_video_missing_file_names_file_and_fix(tmp_path: Path) -> None:
    src = VideoFileSource(SourceSpec(kind="video", uri=str(tmp_path / "nope.mp4")))
    with pytest.raises(SourceError, match=r"nope\.mp4.*does not exist"):
        src.open()
    src.close()


@pytest.mark.parametrize("content", [b"", b"junk", None])
def test_video_corrupt_file_raises_source_error(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "broken.avi"
    path.write_bytes(content if content is not None else random.Random(1).randbytes(20000))
    src = VideoFileSource(SourceSpec(kind="video", uri=str(path)))
    with pytest.raises(SourceError, match=r"cannot decode video file .*broken\.avi.*re-encode"):
        src.open()
    src.close()


def test_video_folder_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="images"):
        VideoFileSource(SourceSpec(kind="video", uri=str(tmp_path))).open()


# --------------------------------------------------------------------------- cameras


@pytest.mark.parametrize("uri", ["/dev/video99", "99"])
def test_camera_that_does_not_exist(uri: str) -> None:
    src = CameraSource(SourceSpec(kind="camera", uri=uri, width=640, height=480, fps=30))
    assert src.live is True
    with pytest.raises(SourceError) as info:
        src.open()
    message = str(info.value)
    assert uri in message
    assert "connected" in message
    assert "video" in message  # the group / device hint
    src.close()


def test_read_before_open_is_an_error() -> None:
    src = CameraSource(SourceSpec(kind="camera", uri="0"))
    with pytest.raises(SourceError, match="not open"):
        src.read()


# --------------------------------------------------------------------------- network streams


def test_stream_reads_mjpeg_over_http() -> None:
    server = MjpegServer(value=120)
    src = StreamSource(SourceSpec(kind="stream", uri=server.url, open_timeout_s=3))
    try:
        src.open()
        frames = [src.read() for _ in range(3)]
    finally:
        src.close()
        server.stop()
    assert src.live is True
    for f in frames:
        assert f is not None
        assert f.data.shape == (48, 64, 3)
        assert brightness(f.data) == pytest.approx(120, abs=3)
    assert [f.index for f in frames if f is not None] == [0, 1, 2]


def test_stream_unreachable_hides_credentials() -> None:
    server = MjpegServer(value=0)
    url = f"http://bob:s3cret@127.0.0.1:{server.port}/x"
    server.stop()  # nothing listens on the port now
    src = StreamSource(SourceSpec(kind="stream", uri=url, open_timeout_s=2))
    with pytest.raises(SourceError) as info:
        src.open()
    assert "s3cret" not in str(info.value)
    assert "***@127.0.0.1" in str(info.value)
    src.close()


def test_stream_reconnects_when_server_restarts() -> None:
    """The camera (an MJPEG HTTP server) vanishes and comes back: offline, then online."""
    server = MjpegServer(value=60)
    port = server.port
    spec = SourceSpec(
        kind="stream",
        uri=server.url,
        open_timeout_s=2,
        reconnect_min_s=0.05,
        reconnect_max_s=0.2,
    )
    states: list[tuple[str, str]] = []
    went_offline = threading.Event()

    def on_state(state: str, reason: str) -> None:
        states.append((state, reason))
        if state == "offline":
            went_offline.set()

    restarted: list[MjpegServer] = []

    def restart() -> None:
        if went_offline.wait(10):
            time.sleep(0.2)  # a few failed reconnect attempts while nothing listens
            restarted.append(MjpegServer(value=200, port=port))

    src = ReconnectingSource(StreamSource(spec), spec, on_state)
    restarter = threading.Thread(target=restart, name="mjpeg-restart")
    try:
        src.open()
        first = src.read()
        assert first is not None
        assert brightness(first.data) == pytest.approx(60, abs=3)
        restarter.start()
        server.stop()
        deadline = time.monotonic() + 15
        frame = src.read()
        while frame is not None and brightness(frame.data) < 150:
            assert time.monotonic() < deadline, "stream did not come back"
            frame = src.read()
        assert frame is not None
        assert brightness(frame.data) == pytest.approx(200, abs=3)
        more = src.read()
        assert more is not None and brightness(more.data) == pytest.approx(200, abs=3)
    finally:
        src.close()
        went_offline.set()
        join(restarter)
        for s in restarted:
            s.stop()
    names = [s for s, _ in states]
    assert names[0] == "online"
    assert names[-1] == "online"
    assert "offline" in names
    assert names.index("offline") < len(names) - 1
    assert src.reconnects == 1
    assert src.live is True
    assert src.read() is None  # stopped


# --------------------------------------------------------------------------- serial over a pty


def _writer(master: int, chunks: list[bytes | float], name: str) -> threading.Thread:
    """Write bytes to the pty master; a float entry pauses that many seconds."""

    def run() -> None:
        for chunk in chunks:
            if isinstance(chunk, float):
                time.sleep(chunk)
            else:
                os.write(master, chunk)

    thread = threading.Thread(target=run, name=name)
    thread.start()
    return thread


def test_serial_csv_skips_garbage_and_joins_partial_lines() -> None:
    with pty_pair() as (master, path):
        src = SerialSource(SourceSpec(kind="serial", uri=path, baudrate=9600))
        assert src.live is True
        src.open()
        writer = _writer(
            master,
            [
                b"9,9,9\n",  # first line after open: discarded (may be partial)
                b"1,2,3\n",
                b"abc,def\n",  # words after data
                b"1,2\n",  # wrong column count
                b"nan,1,2\n",  # NaN
                b"\xff\xfe\x00\x01junk\x80\n",  # binary junk
                b"\n",  # empty
                b"4,5",  # partial line, completed after a read timeout
                0.5,
                b",6\n",
                b"7, 8 ,9\r\n",
                b"x" * 5000,  # overlong line without newline: dropped
                b"\n10,11,12\n",
            ],
            "pty-writer",
        )
        try:
            frames = [src.read() for _ in range(4)]
        finally:
            join(writer)
            src.close()
    rows = [f.data for f in frames if f is not None]
    assert len(rows) == 4
    assert all(r.shape == (1, 3) and r.dtype == np.float32 for r in rows)
    np.testing.assert_array_equal(np.concatenate(rows), [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]])
    assert [f.kind for f in frames if f is not None] == ["samples"] * 4
    # words, wrong count, NaN, junk, empty, overlong (the tail "\n" makes it an empty line too)
    assert src.bad_lines >= 6
    src.close()


def test_serial_json_with_columns() -> None:
    with pty_pair() as (master, path):
        spec = SourceSpec(kind="serial", uri=path, format="json", columns=["a", "b"])
        src = SerialSource(spec)
        src.open()
        writer = _writer(
            master,
            [
                b'{"a": 0, "b": 0}\n',  # discarded first line
                b'{"b": 2, "a": 1, "name": "imu"}\n',
                b'{"a": 1}\n',  # missing key
                b'{"a": 1, "b": "x"}\n',  # not a number
                b'{"a": 1, "b": tru',  # partial, then the rest of a line of garbage
                0.3,
                b"e}\n",
                b"not json at all\n",
                b"[3, 4]\n",
                b'{"a": 5.5, "b": -6}\n',
            ],
            "pty-writer",
        )
        try:
            frames = [src.read() for _ in range(3)]
        finally:
            join(writer)
            src.close()
    rows = np.concatenate([f.data for f in frames if f is not None])
    np.testing.assert_array_equal(rows, [[1, 2], [3, 4], [5.5, -6]])
    assert src.bad_lines == 4
    assert src.channel_names == ["a", "b"]


def test_serial_missing_port_says_how_to_fix(tmp_path: Path) -> None:
    src = SerialSource(SourceSpec(kind="serial", uri=str(tmp_path / "ttyUSB7")))
    with pytest.raises(SourceError, match=r"ttyUSB7.*dialout"):
        src.open()
    src.close()
    assert src.read() is None


def test_serial_reconnects_when_port_vanishes_and_returns(tmp_path: Path) -> None:
    """A USB serial adapter unplugged and replugged: a stable symlink to a pty that dies."""
    link = tmp_path / "ttyACM-sensor"
    m1, s1 = os.openpty()
    link.symlink_to(os.ttyname(s1))
    os.close(s1)
    spec = SourceSpec(kind="serial", uri=str(link), reconnect_min_s=0.05, reconnect_max_s=0.2)
    states: list[tuple[str, str]] = []
    src = ReconnectingSource(SerialSource(spec), spec, lambda s, r: states.append((s, r)))
    feeding = threading.Event()
    m2: list[int] = []

    def feed(fd: int, line: bytes) -> None:
        while not feeding.is_set():
            with contextlib.suppress(OSError):
                os.write(fd, line)
            feeding.wait(0.02)

    feeder1 = threading.Thread(target=feed, args=(m1, b"1,2\n"), name="feeder-1")
    feeder2: threading.Thread | None = None
    try:
        src.open()
        assert states == [("online", "")]
        feeder1.start()
        first = src.read()
        assert first is not None
        np.testing.assert_array_equal(first.data, [[1, 2]])
        # unplug: the pty disappears
        feeding.set()
        join(feeder1)
        os.close(m1)
        m1 = -1
        # the reader notices, goes offline, and retries while the device is absent
        result: list[Any] = []
        reader = threading.Thread(target=lambda: result.append(src.read()), name="reader")
        reader.start()
        deadline = time.monotonic() + 10
        while not any(s == "offline" for s, _ in states):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.3)
        # replug: a new pty behind the same stable name
        fd, slave = os.openpty()
        m2.append(fd)
        tmp_link = tmp_path / "link.tmp"
        tmp_link.symlink_to(os.ttyname(slave))
        tmp_link.replace(link)
        os.close(slave)
        feeding.clear()
        feeder2 = threading.Thread(target=feed, args=(fd, b"7,8\n"), name="feeder-2")
        feeder2.start()
        join(reader)
        frame = result[0]
        assert frame is not None
        np.testing.assert_array_equal(frame.data, [[7, 8]])
    finally:
        feeding.set()
        if feeder2 is not None:
            join(feeder2)
        src.close()
        if m1 >= 0:
            os.close(m1)
        for fd in m2:
            os.close(fd)
    names = [s for s, _ in states]
    assert names[0] == "online" and names[-1] == "online"
    offline_reasons = [r for s, r in states if s == "offline"]
    assert offline_reasons and "ttyACM-sensor" in offline_reasons[0]
    assert src.reconnects == 1


# --------------------------------------------------------------------------- replay files


def test_replay_csv_header_selects_columns(tmp_path: Path) -> None:
    path = tmp_path / "imu.csv"
    path.write_text("t,ax,ay\n0,1,2\n1,3,4\nbad,line,here\n2,5,6\n")
    src = ReplaySource(SourceSpec(kind="replay", uri=str(path), columns=["ay", "ax"]))
    assert src.live is False
    src.open()
    try:
        frames = []
        while (f := src.read()) is not None:
            frames.append(f)
    finally:
        src.close()
    np.testing.assert_array_equal(np.concatenate([f.data for f in frames]), [[2, 1], [4, 3], [6, 5]])
    assert [f.index for f in frames] == [0, 1, 2]
    assert src.bad_lines == 1
    assert src.channel_names == ["ay", "ax"]


def test_replay_csv_header_without_columns(tmp_path: Path) -> None:
    path = tmp_path / "imu.csv"
    path.write_text("t, ax ,ay\r\n0,1,2\r\n1,3\r\n")
    src = ReplaySource(SourceSpec(kind="replay", uri=str(path)))
    src.open()
    first, second = src.read(), src.read()
    src.close()
    assert first is not None and first.data.shape == (1, 3)
    assert second is None
    assert src.channel_names == ["t", "ax", "ay"]
    assert src.bad_lines == 1


def test_replay_jsonl_format_from_extension(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_text('{"x": 1, "id": "s1", "y": 2}\n[3, 4]\n{"x": NaN, "y": 1}\n{"x": 5, "y": 6}\n')
    src = ReplaySource(SourceSpec(kind="replay", uri=str(path)))
    assert src.format == "json"
    src.open()
    rows = []
    while (f := src.read()) is not None:
        rows.append(f.data)
    src.close()
    np.testing.assert_array_equal(np.concatenate(rows), [[1, 2], [3, 4], [5, 6]])
    assert src.bad_lines == 1


def test_replay_loop_repeats_and_ignores_repeated_header(tmp_path: Path) -> None:
    path = tmp_path / "loop.csv"
    path.write_text("a\n1\n2\n3\n")
    src = ReplaySource(SourceSpec(kind="replay", uri=str(path), loop=True))
    src.open()
    try:
        frames = [src.read() for _ in range(7)]
    finally:
        src.close()
    assert [float(f.data[0, 0]) for f in frames if f is not None] == [1, 2, 3, 1, 2, 3, 1]
    assert src.bad_lines == 0
    assert src.loops == 2


def test_replay_loop_of_only_garbage_ends(tmp_path: Path) -> None:
    path = tmp_path / "junk.csv"
    path.write_text("x;1\n\n")
    src = ReplaySource(SourceSpec(kind="replay", uri=str(path), loop=True))
    src.open()
    assert src.read() is None
    src.close()


def _drain(src: ReplaySource, pause: float = 0.0) -> tuple[int, float]:
    start = time.monotonic()
    n = 0
    while src.read() is not None:
        n += 1
        if pause:
            time.sleep(pause)
    return n, time.monotonic() - start


def test_replay_rate_paces_lines(tmp_path: Path) -> None:
    path = tmp_path / "paced.csv"
    path.write_text("".join(f"{i}\n" for i in range(11)))
    fast = ReplaySource(SourceSpec(kind="replay", uri=str(path)))
    fast.open()
    n_fast, t_fast = _drain(fast)
    fast.close()
    paced = ReplaySource(SourceSpec(kind="replay", uri=str(path), rate_hz=50))
    paced.open()
    n_paced, t_paced = _drain(paced)
    paced.close()
    assert n_fast == n_paced == 11
    assert t_paced >= 10 / 50 - 0.005  # 10 periods between 11 lines, never early
    assert t_paced < 3.0  # loose: the machine is busy
    assert t_fast < t_paced / 2


def test_replay_rate_schedule_does_not_drift(tmp_path: Path) -> None:
    """A consumer that spends most of a period elsewhere does not stretch the schedule."""
    path = tmp_path / "paced.csv"
    path.write_text("".join(f"{i}\n" for i in range(11)))
    src = ReplaySource(SourceSpec(kind="replay", uri=str(path), rate_hz=20))
    src.open()
    n, elapsed = _drain(src, pause=0.035)
    src.close()
    assert n == 11
    # deadlines: ~10 * 0.05 + 0.035 = 0.535 s; sleeping a period after each read: 0.885 s
    assert 0.45 < elapsed < 0.8


def test_replay_close_interrupts_pacing_wait(tmp_path: Path) -> None:
    path = tmp_path / "slow.csv"
    path.write_text("1\n2\n3\n")
    src = ReplaySource(SourceSpec(kind="replay", uri=str(path), rate_hz=0.2))
    src.open()
    assert src.read() is not None
    timer = threading.Timer(0.1, src.close)
    timer.name = "closer"
    timer.start()
    start = time.monotonic()
    assert src.read() is None
    assert time.monotonic() - start < 2.5  # not the 5 s period
    join(timer)


def test_replay_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"gone\.csv.*does not exist"):
        ReplaySource(SourceSpec(kind="replay", uri=str(tmp_path / "gone.csv"))).open()


# --------------------------------------------------------------------------- stdin


def test_stdin_reads_a_pipe_until_eof() -> None:
    r, w = os.pipe()
    with os.fdopen(r, "r", encoding="utf-8") as stream, os.fdopen(w, "w") as out:
        out.write('{"v": 1}\n{"v": 2}\ngarbage\n{"v": 3}\n')
        out.close()
        src = StdinSource(SourceSpec(kind="stdin", format="json"), stream=stream)
        assert src.live is True
        src.open()
        values = []
        while (f := src.read()) is not None:
            values.append(float(f.data[0, 0]))
        src.close()
        src.close()
    assert values == [1, 2, 3]
    assert src.bad_lines == 1


def test_stdin_defaults_to_sys_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("1,2\n3,4\n"))
    src = make_source(parse_source_uri("stdin:csv"))
    assert isinstance(src, StdinSource)
    src.open()
    assert (f := src.read()) is not None and f.data.tolist() == [[1, 2]]
    src.close()
    assert src.read() is None


# --------------------------------------------------------------------------- image folders


def test_image_folder_natural_order_skip_and_loop(tmp_path: Path) -> None:
    for i, v in [(1, 10), (2, 20), (10, 100)]:
        assert cv2.imwrite(str(tmp_path / f"img{i}.png"), np.full((8, 8), v, np.uint8))
    (tmp_path / "img5.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "notes.txt").write_text("ignored")
    src = ImageFolderSource(SourceSpec(kind="images", uri=str(tmp_path), loop=True))
    src.open()
    frames = [src.read() for _ in range(6)]
    src.close()
    assert src.read() is None
    got = [brightness(f.data) for f in frames if f is not None]
    assert got == [10, 20, 100, 10, 20, 100]
    assert frames[0] is not None and frames[0].data.shape == (8, 8, 3)
    assert src.skipped == 2  # img5.jpg on each pass
    assert [p.name for p in src.files] == ["img1.png", "img2.png", "img5.jpg", "img10.png"]


def test_image_folder_ends_without_loop(tmp_path: Path) -> None:
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((4, 4, 3), np.uint8))
    src = ImageFolderSource(SourceSpec(kind="images", uri=str(tmp_path)))
    src.open()
    assert src.read() is not None
    assert src.read() is None
    src.close()


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="holds no image files"):
        ImageFolderSource(SourceSpec(kind="images", uri=str(tmp_path))).open()
    with pytest.raises(SourceError, match="does not exist"):
        ImageFolderSource(SourceSpec(kind="images", uri=str(tmp_path / "missing"))).open()
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    src = ImageFolderSource(SourceSpec(kind="images", uri=str(tmp_path), loop=True))
    src.open()
    with pytest.raises(SourceError, match="could be decoded"):
        src.read()
    src.close()


# --------------------------------------------------------------------------- line parsing


def test_parse_line_csv_and_json() -> None:
    row = parse_line(" 1.5, -2 ,3e2 ", "csv")
    assert row.dtype == np.float32 and row.tolist() == [1.5, -2, 300]
    assert parse_line('{"a": 1, "b": 2.5, "s": "x", "t": true}', "json").tolist() == [1, 2.5]
    assert parse_line('{"b": 2, "a": 1}', "json", ["a", "b"]).tolist() == [1, 2]
    assert parse_line("[1, 2, 3]", "json").tolist() == [1, 2, 3]
    assert parse_line("7", "json").tolist() == [7]


@pytest.mark.parametrize(
    ("line", "fmt", "columns", "expected", "match"),
    [
        ("", "csv", None, None, "empty"),
        ("1,two,3", "csv", None, None, "field 2"),
        ("1,2", "csv", ["a", "b", "c"], None, "expected 3"),
        ("1,2", "csv", None, 3, "expected 3"),
        ("1,nan", "csv", None, None, "NaN"),
        ("1,inf", "csv", None, None, "infinite"),
        ("1e39", "csv", None, None, "float32"),
        ("1,,2", "csv", None, None, "not a number"),
        ("{bad", "json", None, None, "not valid JSON"),
        ('{"a": 1}', "json", ["a", "b"], None, "'b' missing"),
        ('{"a": true}', "json", ["a"], None, "expected a number"),
        ('{"s": "x"}', "json", None, None, "no numeric"),
        ('[1, "2"]', "json", None, None, "list of numbers"),
        ("[]", "json", None, None, "list of numbers"),
        ('"text"', "json", None, None, "object or a list"),
        ("[1, NaN]", "json", None, None, "NaN"),
        ("[1, 2]", "json", None, 3, "expected 3"),
    ],
)
def test_parse_line_garbage(
    line: str, fmt: Any, columns: list[str] | None, expected: int | None, match: str
) -> None:
    with pytest.raises(SampleParseError, match=match):
        parse_line(line, fmt, columns, expected=expected)


def test_parse_line_error_truncates_long_lines() -> None:
    line = "x" * 500
    with pytest.raises(SampleParseError) as info:
        parse_line(line, "csv")
    assert "x" * 77 + "..." in str(info.value)
    assert "x" * 100 not in str(info.value)


def test_line_parser_drops_banner_mistaken_for_header() -> None:
    parser = LineParser("csv")
    assert parser.parse("Sensor ready") is None  # looks like a one-column header
    row = parser.parse("1,2,3")  # wider data: it was a banner
    assert row is not None and row.tolist() == [1, 2, 3]
    assert parser.header is None
    with pytest.raises(SampleParseError):
        parser.parse("x,y,z")  # names after data are garbage
    with pytest.raises(SampleParseError, match="expected 3"):
        parser.parse("1,2")


def test_line_parser_header_missing_configured_column_is_garbage() -> None:
    parser = LineParser("csv", ["gx"])
    with pytest.raises(SampleParseError, match="lacks the configured"):
        parser.parse("ax,ay")


# --------------------------------------------------------------------------- back-off


def test_backoff_grows_and_is_capped() -> None:
    b = Backoff(0.1, 1.0, jitter=0)
    assert [b.next_delay() for _ in range(7)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1, 1, 1])
    b.reset()
    assert b.next_delay() == pytest.approx(0.1)
    b.attempt = 100_000  # no overflow
    assert b.next_delay() == pytest.approx(1.0)


def test_backoff_jitter_stays_within_bounds() -> None:
    b = Backoff(0.5, 8.0, jitter=0.5, rng=random.Random(7))
    delays = []
    for _ in range(40):
        base = b.base_delay()
        d = b.next_delay()
        assert base * 0.5 <= d <= base <= 8.0
        delays.append(d)
    assert len({round(d, 6) for d in delays[10:]}) > 5  # jittered, not constant at the cap
    full = Backoff(1.0, 1.0, jitter=1.0, rng=random.Random(3))
    assert all(0 <= full.next_delay() <= 1.0 for _ in range(50))


@pytest.mark.parametrize(
    "kwargs",
    [{"min_s": 0, "max_s": 1}, {"min_s": 2, "max_s": 1}, {"min_s": 1, "max_s": 2, "jitter": 2}],
)
def test_backoff_rejects_bad_settings(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Backoff(**kwargs)


def test_reconnecting_source_waits_offline_until_stopped(tmp_path: Path) -> None:
    spec = SourceSpec(
        kind="serial", uri=str(tmp_path / "ttyNone"), reconnect_min_s=0.02, reconnect_max_s=0.05
    )
    states: list[tuple[str, str]] = []
    stop = threading.Event()
    src = ReconnectingSource(SerialSource(spec), spec, lambda s, r: states.append((s, r)), stop=stop)
    src.open()  # does not raise: the device may appear later
    assert src.state == "offline"
    timer = threading.Timer(0.3, stop.set)
    timer.start()
    assert src.read() is None
    join(timer)
    src.close()
    assert src.live is True
    assert [s for s, _ in states] == ["offline"]  # reported once while the reason is unchanged
    assert "ttyNone" in states[0][1]
    assert src.reconnects == 0
    assert src.backoff.attempt > 2


def test_reconnecting_source_close_interrupts_backoff(tmp_path: Path) -> None:
    spec = SourceSpec(kind="serial", uri=str(tmp_path / "ttyNone"), reconnect_min_s=20)
    src = ReconnectingSource(SerialSource(spec), spec)
    src.open()
    timer = threading.Timer(0.1, src.close)
    timer.start()
    start = time.monotonic()
    assert src.read() is None
    assert time.monotonic() - start < 5
    join(timer)


def test_reconnecting_source_passes_end_of_stream_through() -> None:
    spec = SourceSpec(kind="stdin")
    inner = StdinSource(spec, stream=io.StringIO("1\n"))
    src = ReconnectingSource(inner, spec)
    src.open()
    assert src.read() is not None
    assert src.read() is None
    src.close()


# --------------------------------------------------------------------------- registry and URIs


def test_registry_and_make_source(tmp_path: Path) -> None:
    assert set(SOURCES) == {"camera", "stream", "video", "images", "serial", "replay", "stdin"}
    src = make_source(SourceSpec(kind="images", uri=str(tmp_path)))
    assert isinstance(src, ImageFolderSource)
    assert isinstance(make_source(SourceSpec(kind="video", uri="x.mp4")), VideoFileSource)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("camera:0", {"kind": "camera", "uri": "0"}),
        ("0", {"kind": "camera", "uri": "0"}),
        ("2", {"kind": "camera", "uri": "2"}),
        ("/dev/video0", {"kind": "camera", "uri": "/dev/video0"}),
        (
            "camera:/dev/video1?width=640&height=480&fps=15",
            {"kind": "camera", "uri": "/dev/video1", "width": 640, "height": 480, "fps": 15},
        ),
        ("rtsp://u:p@cam.local:554/s?ch=1", {"kind": "stream", "uri": "rtsp://u:p@cam.local:554/s?ch=1"}),
        ("http://10.0.0.2/mjpg", {"kind": "stream", "uri": "http://10.0.0.2/mjpg"}),
        ("https://x.org/live.m3u8", {"kind": "stream", "uri": "https://x.org/live.m3u8"}),
        ("stream:rtsp://cam/1", {"kind": "stream", "uri": "rtsp://cam/1"}),
        ("video:clips/a.bin", {"kind": "video", "uri": "clips/a.bin", "loop": False}),
        ("video:a.mp4?loop=1", {"kind": "video", "uri": "a.mp4", "loop": True}),
        ("a.MP4", {"kind": "video", "uri": "a.MP4"}),
        ("x/b.avi", {"kind": "video", "uri": "x/b.avi"}),
        ("c.mkv", {"kind": "video"}),
        ("d.mov", {"kind": "video"}),
        ("e.webm?loop=true", {"kind": "video", "loop": True}),
        ("images:frames?loop=1", {"kind": "images", "uri": "frames", "loop": True}),
        (
            "serial:/dev/ttyUSB0?baud=9600&format=json",
            {"kind": "serial", "uri": "/dev/ttyUSB0", "baudrate": 9600, "format": "json"},
        ),
        ("serial:COM3", {"kind": "serial", "uri": "COM3", "baudrate": 115200}),
        ("/dev/ttyACM0", {"kind": "serial", "uri": "/dev/ttyACM0"}),
        ("/dev/ttyUSB1?baud=57600", {"kind": "serial", "baudrate": 57600}),
        ("COM4", {"kind": "serial", "uri": "COM4"}),
        (
            "replay:rec.csv?rate=100&loop=1",
            {"kind": "replay", "uri": "rec.csv", "rate_hz": 100, "loop": True, "format": "csv"},
        ),
        ("replay:rec.jsonl", {"kind": "replay", "format": "json"}),
        ("replay:rec.txt?format=json", {"kind": "replay", "format": "json"}),
        ("rec.csv", {"kind": "replay", "uri": "rec.csv", "format": "csv"}),
        ("rec.jsonl?rate=5", {"kind": "replay", "format": "json", "rate_hz": 5}),
        ("stdin:csv", {"kind": "stdin", "uri": "", "format": "csv"}),
        ("stdin:json?columns=ax,ay", {"kind": "stdin", "format": "json", "columns": ["ax", "ay"]}),
        ("stdin", {"kind": "stdin"}),
        ("-", {"kind": "stdin"}),
    ],
)
def test_parse_source_uri_forms(text: str, expected: dict[str, Any]) -> None:
    spec = parse_source_uri(text)
    for key, value in expected.items():
        assert getattr(spec, key) == value, key


def test_parse_source_uri_bare_directory(tmp_path: Path) -> None:
    spec = parse_source_uri(str(tmp_path))
    assert spec.kind == "images" and spec.uri == str(tmp_path)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "empty"),
        ("nonsense", "no such file"),
        ("camera:", "needs a camera index"),
        ("video:", "needs a path"),
        ("stdin:xml", "csv or json"),
        ("video:a.mp4?speed=2", "unknown option 'speed'"),
        ("video:a.mp4?loop=maybe", "loop must be"),
        ("serial:/dev/ttyS0?baud=fast", "baudrate"),
        ("replay:r.csv?rate=-1", "rate_hz"),
        ("camera:0?width=0", "width"),
    ],
)
def test_parse_source_uri_errors(text: str, match: str) -> None:
    with pytest.raises(SourceError, match=match) as info:
        parse_source_uri(text)
    assert "accepted --source forms" in str(info.value)


def test_parse_source_uri_unknown_file_kind(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("x")
    with pytest.raises(SourceError, match="kind:"):
        parse_source_uri(str(path))


def test_redact_uri() -> None:
    assert redact_uri("rtsp://admin:pw@10.0.0.3:554/s") == "rtsp://***@10.0.0.3:554/s"
    assert redact_uri("/dev/video0") == "/dev/video0"
