"""Drift monitoring: PSI by hand, reference histograms of real bundles, the live monitor."""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_runtime.bundle import create_bundle, open_bundle
from edge_runtime.bundle.create import reference_statistics
from edge_runtime.decoders.specs import ClassificationSpec, RawSpec
from edge_runtime.drift import (
    DriftMonitor,
    frame_mean,
    frame_means,
    load_reference,
    psi,
    quantile_histogram,
    scores_of,
)
from edge_runtime.errors import BundleError, ConfigError
from edge_runtime.model import LoadedModel, load_model
from edge_runtime.preprocess import quantize
from edge_runtime.preprocess_spec import ImagePreprocess
from edge_runtime.types import TensorSpec

# ===================================================================================== psi


def test_psi_matches_hand_computation() -> None:
    # (0.4-0.5)ln(0.4/0.5) + (0.4-0.3)ln(0.4/0.3) + 0 = 0.0223144 + 0.0287682
    assert psi([0.5, 0.3, 0.2], [40, 40, 20]) == pytest.approx(0.0510826, abs=1e-6)
    # empty bins are raised to eps: 2 * (1 - 1e-4) * ln(1e4)
    assert psi([1.0, 0.0], [0, 7]) == pytest.approx(18.4188387, abs=1e-6)
    assert psi([1.0, 0.0], [0.0, 1.0], eps=1e-2) == pytest.approx(2 * 0.99 * math.log(100), abs=1e-9)


def test_psi_of_identical_distributions_is_zero_and_counts_equal_fractions() -> None:
    expected = [0.1, 0.2, 0.3, 0.4]
    assert psi(expected, [1, 2, 3, 4]) == pytest.approx(0.0, abs=1e-12)
    assert psi(expected, [0.1, 0.2, 0.3, 0.4]) == pytest.approx(0.0, abs=1e-12)
    assert psi([0.5, 0.5, 0.0], [10, 10, 0]) == pytest.approx(0.0, abs=1e-12)
    assert psi(expected, [4, 3, 2, 1]) == pytest.approx(psi(expected, [0.4, 0.3, 0.2, 0.1]))


@pytest.mark.parametrize(
    ("expected", "actual", "match"),
    [
        ([0.5, 0.5], [1, 1, 1], "reference has 2 bins but 3"),
        ([0.5, 0.5], [0, 0], "not all zero"),
        ([0.5, -0.5], [1, 1], "non-negative"),
        ([0.5, float("nan")], [1, 1], "finite"),
    ],
)
def test_psi_rejects_histograms_that_do_not_fit(
    expected: list[float], actual: list[float], match: str
) -> None:
    with pytest.raises(BundleError, match=match):
        psi(expected, actual)


# ======================================================================= histograms, means


def test_quantile_histogram_has_ten_open_ended_bins_of_equal_share() -> None:
    values = np.random.default_rng(0).normal(size=1000)
    hist = quantile_histogram(values)
    assert hist is not None
    edges, fractions = hist["edges"], hist["fractions"]
    assert len(edges) == 9 and len(fractions) == 10
    assert edges == sorted(edges)
    assert sum(fractions) == pytest.approx(1.0)
    assert fractions == pytest.approx([0.1] * 10, abs=0.002)
    # far outside the data still falls in the open first / last bins
    assert np.searchsorted(edges, [-1e9, 1e9], side="right").tolist() == [0, 9]


def test_quantile_histogram_dedupes_edges_and_handles_small_or_odd_samples() -> None:
    ties = quantile_histogram([1.0] * 50 + [2.0] * 50)  # nine quantiles collapse to three edges
    assert ties == {"edges": [1.0, 1.5, 2.0], "fractions": [0.0, 0.5, 0.0, 0.5]}
    constant = quantile_histogram(np.full(30, 3.5))
    assert constant == {"edges": [3.5], "fractions": [0.0, 1.0]}
    small = quantile_histogram([1.0, 2.0, 3.0, 4.0])  # 4 golden frames: 2 bins, not 10 near-empty ones
    assert small is not None and len(small["fractions"]) == 2
    assert quantile_histogram([math.nan, math.inf]) is None
    with_nan = quantile_histogram([math.nan, *range(20)])
    assert with_nan is not None and sum(with_nan["fractions"]) == pytest.approx(1.0)


def test_frame_mean_samples_every_channel_and_matches_frame_means() -> None:
    rng = np.random.default_rng(1)
    small = rng.random((1, 8, 8, 3), dtype=np.float32)
    assert frame_mean(small) == pytest.approx(float(small.astype(np.float64).mean()), rel=1e-12)
    # big frames are sampled; channel 2 alone is bright, the sample must see it in 1/3 of its values
    # (a 128x128x3 frame needs a step of 12 to stay under 4096 samples: it must not be a multiple of 3)
    for size in (96, 128):
        img = np.zeros((1, size, size, 3), np.uint8)
        img[..., 2] = 255
        assert frame_mean(img) == pytest.approx(85.0, abs=0.1)
    batch = rng.integers(0, 256, (5, 1, 96, 96, 3), dtype=np.uint8)
    means = frame_means(batch)
    assert means.tolist() == [frame_mean(f) for f in batch]
    # a sample of 3950 of 27648 uniform pixels (std 74): within 5 standard errors of the full mean
    assert means == pytest.approx(batch.reshape(5, -1).mean(axis=1), abs=6.0)


def test_scores_of_follows_the_raw_decoder_modes() -> None:
    out = np.array([[3.0, 4.0], [-1.0, 0.5]], np.float32)
    assert scores_of(out, "first").tolist() == [3.0, -1.0]
    assert scores_of(out, "max").tolist() == [4.0, 0.5]
    assert scores_of(out, "l2") == pytest.approx([5.0, math.sqrt(1.25)])
    with pytest.raises(ConfigError, match="score mode"):
        scores_of(out, "mean")


# ============================================================== reference_statistics, bundles


def _reference(bundle: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((bundle / "reference.json").read_text())
    return doc


def test_classifier_bundle_reference_has_psi_histograms(make_cnn_bundle: Any) -> None:
    bundle = make_cnn_bundle()
    ref = _reference(bundle)
    for key in ("frames", "input", "outputs", "class_histogram", "input_frame_mean"):
        assert key in ref
    assert ref["frames"] == 4
    hist = ref["input_frame_mean"]
    assert len(hist["fractions"]) == len(hist["edges"]) + 1 == 2  # 4 frames -> 2 bins
    assert sum(hist["fractions"]) == pytest.approx(1.0)
    assert len(ref["class_histogram"]) == 4 and sum(ref["class_histogram"]) == pytest.approx(1.0)
    assert "score_hist" not in ref
    assert load_reference(open_bundle(bundle, require_signature=False)) == ref


def test_sensor_bundle_reference_has_score_histogram(sensor_bundle: Path) -> None:
    ref = _reference(sensor_bundle)
    assert ref["score_mode"] == "first"
    assert sum(ref["score_hist"]["fractions"]) == pytest.approx(1.0)
    assert len(ref["score_hist"]["fractions"]) == len(ref["score_hist"]["edges"]) + 1
    assert "input_frame_mean" in ref and "class_histogram" not in ref
    # energy scores are positive: every edge lies inside the observed score range
    assert ref["score"]["min"] <= min(ref["score_hist"]["edges"]) <= ref["score"]["max"]


def test_reference_statistics_scores_like_the_decoder() -> None:
    rng = np.random.default_rng(2)
    inputs = rng.random((40, 1, 16, 3), dtype=np.float32)
    outputs = [rng.normal(size=(40, 1, 5)).astype(np.float32)]
    ref = reference_statistics(inputs, outputs, RawSpec(score="max"))
    assert ref["score_mode"] == "max"
    assert ref["score"]["max"] == pytest.approx(float(outputs[0].max()))
    assert ref["score_hist"] == quantile_histogram(outputs[0].reshape(40, -1).max(axis=1))
    expected = quantile_histogram(inputs.reshape(40, -1).astype(np.float64).mean(axis=1))
    assert expected is not None
    assert ref["input_frame_mean"]["edges"] == pytest.approx(expected["edges"], abs=1e-9)
    assert ref["input_frame_mean"]["fractions"] == expected["fractions"]
    assert len(ref["input_frame_mean"]["fractions"]) == 8  # 40 values -> 40 // 5 bins


# ===================================================================== the monitor, real model

_BRIGHTNESS = np.random.default_rng(11).uniform(40, 160, 60)


def _frames(offset: float = 0.0, seed: int = 12) -> np.ndarray:
    """60 noisy BGR frames whose brightness spreads over 40..160 (+ ``offset``)."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(0, 20, (60, 24, 32, 3))
    return np.clip(_BRIGHTNESS[:, None, None, None] + offset + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def classifier(
    tmp_path_factory: pytest.TempPathFactory, cnn_onnx: Path, keys: tuple[Path, Path]
) -> Iterator[LoadedModel]:
    root = create_bundle(
        tmp_path_factory.mktemp("drift") / "bundle",
        models=[cnn_onnx],
        name="tiny-cnn",
        version="1.0.0",
        task="classification",
        preprocess=ImagePreprocess(resize="stretch"),
        decoder=ClassificationSpec(top_k=1),
        labels=["a", "b", "c", "d"],
        golden_frames=_frames(),
        sign_key=keys[0],
    )
    model = load_model(open_bundle(root, require_signature=False))
    yield model
    model.close()


def _observe(monitor: DriftMonitor, model: LoadedModel, frames: np.ndarray) -> None:
    buf = model.preprocessor.new_buffer()
    for frame in frames:
        outputs, transform = model.infer(frame, buf)
        monitor.observe(buf, outputs, model.decoder.decode(outputs, transform))


def test_monitor_on_the_reference_frames_sees_no_drift(classifier: LoadedModel) -> None:
    ref = load_reference(classifier.bundle)
    assert len(ref["input_frame_mean"]["fractions"]) == 10
    monitor = DriftMonitor(ref, window=100, min_frames=50)
    assert monitor.monitored == ["input", "class"]
    _observe(monitor, classifier, _frames())
    snap = monitor.snapshot()
    assert snap["frames"] == snap["observed"] == 60
    assert snap["input_psi"] == pytest.approx(0.0, abs=1e-9)  # same frames, same bins, bit for bit
    assert snap["class_psi"] == pytest.approx(0.0, abs=1e-9)
    assert snap["score_psi"] is None
    assert snap["top1_share"] == pytest.approx(max(ref["class_histogram"]), abs=1e-6)
    assert snap["alerts"] == [] and snap["level"] == "ok"


def test_brighter_input_raises_an_input_alert(classifier: LoadedModel) -> None:
    monitor = DriftMonitor(load_reference(classifier.bundle), window=120, min_frames=50)
    _observe(monitor, classifier, _frames(offset=70.0, seed=13))
    snap = monitor.snapshot()
    assert snap["input_psi"] > 0.25
    alert = next(a for a in snap["alerts"] if a["metric"] == "input_psi")
    assert alert == {"metric": "input_psi", "level": "alert", "value": snap["input_psi"], "threshold": 0.25}
    assert snap["level"] == "alert"


def test_anomaly_monitor_uses_the_decoded_score(sensor_bundle: Path) -> None:
    model = load_model(open_bundle(sensor_bundle, require_signature=False))
    try:
        ref = load_reference(model.bundle)
        monitor = DriftMonitor(ref, window=8, min_frames=4)
        assert monitor.monitored == ["input", "score"]
        golden = model.bundle.selftest_data()["frames"]
        buf = model.preprocessor.new_buffer()
        for window in golden:
            outputs, transform = model.infer(window, buf)
            monitor.observe(buf, outputs, model.decoder.decode(outputs, transform))
        snap = monitor.snapshot()
        assert snap["score_psi"] == pytest.approx(0.0, abs=1e-4)  # decoded scores are rounded to 6 digits
        assert snap["input_psi"] == pytest.approx(0.0, abs=1e-9)
        assert snap["class_psi"] is None and snap["top1_share"] is None
        monitor.reset()
        top = ref["score"]["max"] * 10
        for window in golden:  # raw outputs say "normal", the decoded score says "far above the reference"
            outputs, _ = model.infer(window, buf)
            monitor.observe(buf, outputs, {"task": "raw", "score": top})
        snap = monitor.snapshot()
        assert snap["score_psi"] > 0.25 and snap["level"] == "alert"
    finally:
        model.close()


# ================================================================== the monitor, synthetic

_CLASSIFIER_REF: dict[str, Any] = {
    "frames": 400,
    "input_frame_mean": {"edges": [0.25, 0.5, 0.75], "fractions": [0.25, 0.25, 0.25, 0.25]},
    "class_histogram": [0.25, 0.25, 0.25, 0.25],
}


def _probs(cls: int, classes: int = 4) -> list[np.ndarray]:
    p = np.full((1, classes), 0.1 / (classes - 1), np.float32)
    p[0, cls] = 0.9
    return [p]


def test_collapsed_output_distribution_raises_a_class_alert() -> None:
    monitor = DriftMonitor(_CLASSIFIER_REF, window=200, min_frames=100)
    frame = np.full((1, 4, 4, 3), 0.6, np.float32)
    for i in range(99):
        monitor.observe(frame + (i % 4) * 0.25 - 0.5, _probs(2))
    early = monitor.snapshot()
    assert early["class_psi"] > 0.25 and early["alerts"] == []  # not enough frames to alert yet
    monitor.observe(frame, _probs(2))
    snap = monitor.snapshot()
    assert snap["top1_share"] == 1.0 and snap["top1_class"] == 2
    # (1 - .25) ln(1 / .25) + 3 (1e-4 - .25) ln(1e-4 / .25)
    assert snap["class_psi"] == pytest.approx(
        0.75 * math.log(4) + 3 * (1e-4 - 0.25) * math.log(4e-4), abs=1e-5
    )
    assert [a["metric"] for a in snap["alerts"]] == ["class_psi"]
    assert snap["input_psi"] < 0.1 and snap["level"] == "alert"


def test_warn_level_between_thresholds_and_configurable_thresholds() -> None:
    ref = {"class_histogram": [0.5, 0.5]}
    outputs = [_probs(0, 2)] * 65 + [_probs(1, 2)] * 35  # psi = .15 ln(1.3) - .15 ln(.7) = 0.0929
    loose = DriftMonitor(ref, window=100, min_frames=10, warn=0.05, alert=0.5)
    strict = DriftMonitor(ref, window=100, min_frames=10)
    for out in outputs:
        loose.observe(None, out)
        strict.observe(None, out)
    assert loose.snapshot()["alerts"] == [
        {"metric": "class_psi", "level": "warn", "value": pytest.approx(0.0929, abs=1e-4), "threshold": 0.05}
    ]
    assert loose.snapshot()["level"] == "warn"
    assert strict.snapshot()["alerts"] == [] and strict.snapshot()["level"] == "ok"


def test_window_slides_and_reset_forgets() -> None:
    monitor = DriftMonitor(_CLASSIFIER_REF, window=10, min_frames=1)
    for _ in range(10):
        monitor.observe(np.zeros((1, 2, 2, 3), np.float32), _probs(0))
    for _ in range(10):
        monitor.observe(np.ones((1, 2, 2, 3), np.float32), _probs(3))
    snap = monitor.snapshot()
    assert (snap["frames"], snap["observed"]) == (10, 20)
    assert (snap["top1_class"], snap["top1_share"]) == (3, 1.0)
    # only the bright frames are left: all in the last input bin
    assert snap["input_psi"] == pytest.approx(psi([0.25] * 4, [0, 0, 0, 1]))
    monitor.reset()
    snap = monitor.snapshot()
    assert (snap["frames"], snap["observed"], snap["input_psi"], snap["class_psi"]) == (0, 0, None, None)
    assert snap["top1_share"] is None and snap["alerts"] == []


def test_quantized_input_is_compared_in_model_values() -> None:
    spec = TensorSpec("input", (1, 8, 8, 3), "uint8", scale=1 / 255, zero_point=0)
    rng = np.random.default_rng(4)
    plain = DriftMonitor(_CLASSIFIER_REF, window=50, min_frames=1)
    quant = DriftMonitor(_CLASSIFIER_REF, window=50, min_frames=1, input_spec=spec)
    for _ in range(50):
        x = rng.uniform(0.0, 1.0, (1, 8, 8, 3)).astype(np.float32) * rng.uniform(0.2, 1.0)
        plain.observe(x, _probs(0))
        quant.observe(quantize(x, spec), _probs(0))
    assert quant.snapshot()["input_psi"] == pytest.approx(plain.snapshot()["input_psi"], abs=0.05)
    assert plain.snapshot()["input_psi"] > 0.1  # the data really does differ from the reference


def test_old_reference_without_histograms_gives_none() -> None:
    old = {"frames": 4, "input": {"mean": 0.5, "std": 0.1}, "outputs": [{"mean": 0.25}]}
    monitor = DriftMonitor(old, window=5, min_frames=1)
    assert monitor.monitored == []
    for _ in range(7):
        monitor.observe(np.ones((1, 4, 4, 3), np.float32), _probs(1), {"score": 1.0})
    snap = monitor.snapshot()
    assert snap["frames"] == 5 and snap["observed"] == 7
    assert snap["input_psi"] is None and snap["class_psi"] is None and snap["score_psi"] is None
    assert snap["top1_share"] is None and snap["alerts"] == [] and snap["level"] == "ok"
    assert DriftMonitor({}).snapshot()["input_psi"] is None


def test_malformed_reference_parts_are_skipped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    bad = {
        "input_frame_mean": {"edges": [0.5, 0.2], "fractions": [0.3, 0.3, 0.4]},  # unsorted
        "score_hist": {"edges": [0.5], "fractions": [1.0]},  # one fraction short
        "class_histogram": [0.5, 0.5],
    }
    with caplog.at_level(logging.WARNING, logger="edge_runtime.drift"):
        monitor = DriftMonitor(bad)
    assert monitor.monitored == ["class"]
    assert "input_frame_mean" in caplog.text and "score_hist" in caplog.text


def test_odd_observations_are_skipped_not_raised() -> None:
    ref = {**_CLASSIFIER_REF, "score_hist": {"edges": [0.0], "fractions": [0.5, 0.5]}}
    monitor = DriftMonitor(ref, window=10, min_frames=1)
    monitor.observe(np.full((1, 2, 2), np.nan, np.float32), [np.zeros((1, 0), np.float32)], {"score": "x"})
    monitor.observe(np.zeros((0,), np.float32), [], None)
    monitor.observe(np.zeros((1, 2, 2), np.float32), _probs(7, classes=9), {"score": math.nan})
    snap = monitor.snapshot()
    assert snap["observed"] == 3
    assert snap["input_psi"] == pytest.approx(psi([0.25] * 4, [1, 0, 0, 0]))  # only the last frame binned
    assert snap["class_psi"] is None and snap["score_psi"] is None  # nothing binned


def test_bad_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="warn <= alert"):
        DriftMonitor({}, warn=0.3, alert=0.2)
    with pytest.raises(ConfigError, match="window"):
        DriftMonitor({}, window=0)
    with pytest.raises(ConfigError, match="min_frames"):
        DriftMonitor({}, min_frames=0)


def test_one_writer_and_one_reader_thread() -> None:
    monitor = DriftMonitor(_CLASSIFIER_REF, window=64, min_frames=1)
    frame = np.full((1, 8, 8, 3), 0.4, np.float32)
    done = threading.Event()
    errors: list[BaseException] = []

    def write() -> None:
        try:
            for i in range(3000):
                monitor.observe(frame, _probs(i % 4))
        except BaseException as exc:
            errors.append(exc)
        finally:
            done.set()

    writer = threading.Thread(target=write)
    writer.start()
    snaps = []
    while not done.is_set():
        snaps.append(monitor.snapshot())
    writer.join()
    assert not errors
    assert all(s["frames"] <= 64 for s in snaps)
    final = monitor.snapshot()
    assert final["frames"] == 64 and final["observed"] == 3000
    assert final["class_psi"] == pytest.approx(0.0, abs=1e-12)  # 16 of each class in the last 64
    assert final["input_psi"] == pytest.approx(psi([0.25] * 4, [0, 1, 0, 0]))
