"""A bundle's self-test: golden frames through the real preprocessing and runtime.

Each golden frame must reproduce the outputs recorded at bundle creation within the
manifest's tolerances, and the median inference latency must be within the latency budget.
The device runs it before a model is allowed to serve.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_runtime.errors import SelfTestError
from edge_runtime.model import LoadedModel

__all__ = ["SelfTestReport", "run_selftest"]


@dataclass
class SelfTestReport:
    """The outcome of one self-test."""

    passed: bool
    frames: int
    matched: int
    max_abs_error: float
    latency_ms_p50: float
    latency_budget_ms: float
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "frames": self.frames,
            "matched": self.matched,
            "max_abs_error": round(self.max_abs_error, 6),
            "latency_ms_p50": round(self.latency_ms_p50, 3),
            "latency_budget_ms": self.latency_budget_ms,
            "reasons": self.reasons,
        }


def run_selftest(model: LoadedModel, *, raise_on_fail: bool = True) -> SelfTestReport:
    """Run the bundle's self-test on ``model``; raise :class:`SelfTestError` when it fails."""
    spec = model.bundle.manifest.selftest
    if spec is None:
        return SelfTestReport(True, 0, 0, 0.0, 0.0, 0.0, ["bundle has no self-test"])
    data = model.bundle.selftest_data()
    frames = data.get("frames")
    if frames is None or len(frames) == 0:
        raise SelfTestError(f"{spec.path} has no 'frames' array; rebuild the bundle")
    n_out = len(model.backend.outputs)
    golden = [data.get(f"{model.format}.out{i}") for i in range(n_out)]
    if any(g is None or len(g) != len(frames) for g in golden):
        raise SelfTestError(
            f"{spec.path} has no golden outputs for the {model.format} model ({n_out} outputs "
            f"x {len(frames)} frames); rebuild the bundle"
        )
    buffer = model.preprocessor.new_buffer()
    matched = 0
    max_err = 0.0
    latencies = []
    for i, frame in enumerate(frames):
        model.preprocessor(frame, buffer)
        t0 = time.perf_counter()
        outputs = model.backend.run([buffer])
        latencies.append((time.perf_counter() - t0) * 1000.0)
        ok = True
        for out, ref in zip(outputs, golden, strict=True):
            assert ref is not None
            expected = ref[i]
            if out.shape != expected.shape:
                ok = False
                max_err = float("inf")
                continue
            err = np.abs(out.astype(np.float64) - expected)
            finite = np.isfinite(err)
            max_err = max(max_err, float(err[finite].max()) if finite.any() else float("inf"))
            if not np.all(finite) or not np.allclose(out, expected, atol=spec.atol, rtol=spec.rtol):
                ok = False
        matched += int(ok)
    p50 = statistics.median(latencies)
    reasons = []
    need = spec.min_match * len(frames)
    if matched < need:
        reasons.append(
            f"only {matched}/{len(frames)} golden frames reproduced their outputs within "
            f"atol={spec.atol} rtol={spec.rtol} (max abs error {max_err:.4g})"
        )
    if p50 > spec.latency_budget_ms:
        reasons.append(f"median latency {p50:.1f} ms exceeds the budget of {spec.latency_budget_ms:.1f} ms")
    report = SelfTestReport(not reasons, len(frames), matched, max_err, p50, spec.latency_budget_ms, reasons)
    if reasons and raise_on_fail:
        raise SelfTestError(
            f"self-test of {model.name} {model.version} ({model.format}) failed: " + "; ".join(reasons)
        )
    return report
