"""Windower against a simple reference: concatenate every row, then slice."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_runtime.errors import SampleParseError, SourceError
from edge_runtime.sources import Windower, WindowSpec
from edge_runtime.types import Frame


def reference(rows: np.ndarray, size: int, hop: int) -> list[np.ndarray]:
    """Window i covers rows[i*hop : i*hop+size] while that fits."""
    out = []
    start = 0
    while start + size <= len(rows):
        out.append(rows[start : start + size])
        start += hop
    return out


def make_frames(chunks: list[int], channels: int, seed: int = 0) -> list[Frame]:
    rng = np.random.default_rng(seed)
    frames = []
    for i, n in enumerate(chunks):
        data = rng.normal(size=(n, channels)).astype(np.float32)
        frames.append(Frame(data=data, index=i, t_capture=100.0 + i, kind="samples", source_ts=i))
    return frames


def run(size: int, hop: int | None, chunks: list[int], channels: int) -> None:
    w = Windower(WindowSpec(size=size, hop=hop))
    frames = make_frames(chunks, channels)
    got: list[Frame] = []
    newest_frame: list[int] = []  # index of the frame that delivered each window's newest row
    for f in frames:
        emitted = w.push(f)
        got.extend(emitted)
        newest_frame.extend([f.index] * len(emitted))
    all_rows = np.concatenate([f.data for f in frames]) if frames else np.zeros((0, channels), np.float32)
    expected = reference(all_rows, size, hop or size)
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g.kind == "samples"
        assert g.index == i
        assert g.data.shape == (size, channels)
        assert g.data.dtype == np.float32
        np.testing.assert_array_equal(g.data, e)
    # t_capture / source_ts come from the frame holding each window's newest sample
    ends = np.cumsum([f.data.shape[0] for f in frames])
    for i, g in enumerate(got):
        last_row = i * (hop or size) + size - 1
        owner = int(np.searchsorted(ends, last_row, side="right"))
        assert owner == newest_frame[i]
        assert g.t_capture == frames[owner].t_capture
        assert g.source_ts == frames[owner].source_ts


@pytest.mark.parametrize(
    ("size", "hop"),
    [(4, None), (4, 4), (4, 1), (4, 2), (4, 3), (3, 5), (2, 7), (1, 1), (1, 3), (6, 12)],
)
def test_single_row_pushes(size: int, hop: int | None) -> None:
    run(size, hop, [1] * 40, channels=3)


@pytest.mark.parametrize(("size", "hop"), [(4, None), (4, 1), (5, 2), (3, 8), (8, 3), (16, 16), (2, 1)])
def test_multi_row_pushes(size: int, hop: int | None) -> None:
    rng = random.Random(size * 100 + (hop or 0))
    chunks = [rng.choice([0, 1, 2, 3, 7, 20, 45]) for _ in range(30)]
    run(size, hop, chunks, channels=2)


def test_one_huge_push_emits_every_window() -> None:
    run(5, 2, [101], channels=4)
    run(5, 9, [101], channels=1)


@settings(max_examples=150, deadline=None)
@given(
    size=st.integers(1, 9),
    hop=st.one_of(st.none(), st.integers(1, 14)),
    channels=st.integers(1, 3),
    chunks=st.lists(st.integers(0, 25), max_size=25),
)
def test_matches_reference(size: int, hop: int | None, channels: int, chunks: list[int]) -> None:
    run(size, hop, chunks, channels)


def test_one_dimensional_frame_is_one_row() -> None:
    w = Windower(WindowSpec(size=2))
    assert w.push(Frame(data=np.array([1, 2], np.float64), index=0, t_capture=1, kind="samples")) == []
    (out,) = w.push(Frame(data=np.array([3, 4]), index=1, t_capture=2, kind="samples"))
    assert out.data.tolist() == [[1, 2], [3, 4]]
    assert out.data.dtype == np.float32


def test_channel_change_is_rejected_and_state_kept() -> None:
    w = Windower(WindowSpec(size=2, hop=1))
    w.push(Frame(data=np.ones((1, 3), np.float32), index=0, t_capture=0, kind="samples"))
    with pytest.raises(SampleParseError, match="2 channels but earlier samples had 3"):
        w.push(Frame(data=np.ones((1, 2), np.float32), index=1, t_capture=0, kind="samples"))
    (out,) = w.push(Frame(data=np.full((1, 3), 2, np.float32), index=2, t_capture=0, kind="samples"))
    assert out.data.tolist() == [[1, 1, 1], [2, 2, 2]]
    assert isinstance(SampleParseError("x"), SourceError)


def test_image_frames_and_bad_shapes_are_rejected() -> None:
    w = Windower(WindowSpec(size=2))
    with pytest.raises(SourceError, match="image"):
        w.push(Frame(data=np.zeros((4, 4, 3), np.uint8), index=0, t_capture=0))
    with pytest.raises(SourceError, match="shape"):
        w.push(Frame(data=np.zeros((2, 2, 2), np.float32), index=0, t_capture=0, kind="samples"))
    with pytest.raises(SourceError, match="shape"):
        w.push(Frame(data=np.zeros((3, 0), np.float32), index=0, t_capture=0, kind="samples"))
    assert w.channels is None


def test_no_reallocation_and_windows_are_independent_copies() -> None:
    w = Windower(WindowSpec(size=4, hop=1))
    frames = make_frames([1] * 3, channels=2)
    for f in frames:
        w.push(f)
    ring = w._ring
    assert ring is not None
    windows = []
    for f in make_frames([1, 2, 1, 5, 1], channels=2, seed=1):
        windows.extend(w.push(f))
        assert w._ring is ring  # the buffer is allocated once
    assert len(windows) == 10
    for win in windows:
        assert not np.shares_memory(win.data, ring)
    before = windows[-1].data.copy()
    windows[-2].data[:] = -1  # a consumer scribbling on one window affects nothing else
    np.testing.assert_array_equal(windows[-1].data, before)


def test_reset_starts_a_fresh_window() -> None:
    w = Windower(WindowSpec(size=3))
    w.push(Frame(data=np.ones((2, 1), np.float32), index=0, t_capture=0, kind="samples"))
    w.reset()
    assert w.push(Frame(data=np.ones((2, 1), np.float32), index=1, t_capture=0, kind="samples")) == []
    (out,) = w.push(Frame(data=np.zeros((1, 1), np.float32), index=2, t_capture=0, kind="samples"))
    assert out.data.ravel().tolist() == [1, 1, 0]
