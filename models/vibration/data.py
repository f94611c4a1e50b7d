"""Synthetic 3-axis machine vibration (accelerometer, in g) for the anomaly-detection recipe.

TensorFlow-free on purpose: the recipe (training) and the tests (device venv) share it.

A rotating machine runs at a shaft frequency ``f_rot`` of 22-28 Hz (1320-1680 rpm), sampled at
:data:`FS` Hz on three axes (``ax``/``ay`` radial, ``az`` axial, ``az`` carrying 1 g of
gravity). Conditions:

* ``normal``: 1x, 2x, 3x rotation harmonics (amplitudes scale together with load), a slow
  amplitude wobble and broadband sensor noise;
* ``imbalance``: the 1x component on the radial axes grows 2.2-4x;
* ``bearing``: an outer-race defect - impulses every ``1 / (3.57 f_rot)`` s (with jitter), each
  ringing a structural resonance at 220-380 Hz that decays within a few ms;
* ``looseness``: sub-harmonics (0.5x, 1.5x, 2.5x) and a comb of higher harmonics (4x-9x).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt

__all__ = [
    "CHANNELS",
    "COLUMNS",
    "CONDITIONS",
    "FS",
    "WINDOW",
    "Fault",
    "Machine",
    "make_windows",
    "synthesize",
    "write_demo_csv",
]

FS = 1000.0
"""Sample rate in Hz."""

WINDOW = 256
"""Samples per model window (256 ms at :data:`FS`)."""

CHANNELS = 3
COLUMNS: tuple[str, ...] = ("ax", "ay", "az")
CONDITIONS: tuple[str, ...] = ("normal", "imbalance", "bearing", "looseness")

F32Array = npt.NDArray[np.float32]
F64Array = npt.NDArray[np.float64]

_AXIS_GAIN = np.array([1.0, 0.8, 0.35])  # radial x, radial y, axial
_GRAVITY = np.array([0.0, 0.0, 1.0])


@dataclass(frozen=True)
class Machine:
    """The healthy machine: shaft speed, harmonic amplitudes/phases, noise level."""

    f_rot: float
    amps: F64Array  # (3 harmonics, 3 axes), g
    phases: F64Array  # (3 harmonics, 3 axes), rad
    noise: float  # g rms
    wobble_hz: float
    wobble_depth: float

    @classmethod
    def random(cls, rng: np.random.Generator) -> Machine:
        """A machine with load, balance and sensor noise drawn from the normal range."""
        load = rng.uniform(0.8, 1.25)
        base = np.array([0.20, 0.09, 0.045])[:, None] * _AXIS_GAIN[None, :]
        amps = base * load * rng.uniform(0.85, 1.15, (3, 3))
        return cls(
            f_rot=float(rng.uniform(22.0, 28.0)),
            amps=amps,
            phases=rng.uniform(0, 2 * math.pi, (3, 3)),
            noise=float(rng.uniform(0.02, 0.045)),
            wobble_hz=float(rng.uniform(0.2, 1.0)),
            wobble_depth=float(rng.uniform(0.0, 0.08)),
        )


@dataclass(frozen=True)
class Fault:
    """One fault and its severity parameters (``kind`` is one of :data:`CONDITIONS`)."""

    kind: str
    gain: float = 1.0  # imbalance: 1x multiplier
    amplitude: float = 0.0  # bearing: impulse peak (g); looseness: harmonic level (g)
    resonance_hz: float = 300.0
    decay_s: float = 0.004
    defect_ratio: float = 3.57  # BPFO / f_rot
    offset_s: float = 0.0
    seed: int = 0  # bearing: per-impulse jitter stream
    phases: tuple[float, ...] = ()

    @classmethod
    def random(cls, kind: str, rng: np.random.Generator) -> Fault:
        """A fault of ``kind`` with a random (but clearly present) severity."""
        if kind == "normal":
            return cls(kind)
        if kind == "imbalance":
            return cls(kind, gain=float(rng.uniform(2.5, 4.5)))
        if kind == "bearing":
            return cls(
                kind,
                amplitude=float(rng.uniform(0.2, 0.6)),
                resonance_hz=float(rng.uniform(220.0, 380.0)),
                decay_s=float(rng.uniform(0.002, 0.005)),
                defect_ratio=float(rng.uniform(3.4, 3.8)),
                offset_s=float(rng.uniform(0.0, 0.05)),
                seed=int(rng.integers(2**31)),
            )
        if kind == "looseness":
            return cls(
                kind,
                amplitude=float(rng.uniform(0.05, 0.12)),
                phases=tuple(float(p) for p in rng.uniform(0, 2 * math.pi, 10)),
            )
        raise ValueError(f"unknown condition {kind!r}")


_LOOSE_ORDERS = (0.5, 1.5, 2.5, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 3.5)


def synthesize(
    n: int,
    machine: Machine,
    fault: Fault,
    rng: np.random.Generator,
    t0: float = 0.0,
) -> F32Array:
    """``n`` samples (``n x 3`` float32, g) starting at time ``t0`` s.

    Deterministic in ``machine``/``fault``/``t0`` apart from the noise drawn from ``rng``, so
    consecutive calls with increasing ``t0`` give a phase-continuous signal.
    """
    t = t0 + np.arange(n, dtype=np.float64) / FS
    w = 2 * math.pi * machine.f_rot
    env = 1.0 + machine.wobble_depth * np.sin(2 * math.pi * machine.wobble_hz * t)
    x = np.zeros((n, CHANNELS), dtype=np.float64)
    for k in range(3):
        x += machine.amps[k] * np.sin((k + 1) * w * t[:, None] + machine.phases[k])
    if fault.kind == "imbalance":
        extra = (fault.gain - 1.0) * machine.amps[0].copy()
        extra[2] *= 0.2  # mostly radial
        # radial axes 90 degrees apart, as an unbalanced rotor whirls
        ph = machine.phases[0].copy()
        ph[1] = ph[0] + math.pi / 2
        x += extra * np.sin(w * t[:, None] + ph)
    x *= env[:, None]
    if fault.kind == "bearing":
        period = 1.0 / (fault.defect_ratio * machine.f_rot)
        tail = 8 * fault.decay_s
        first = math.floor((t[0] - tail - fault.offset_s) / period)
        last = math.ceil((t[-1] - fault.offset_s) / period)
        gains = np.array([1.0, 0.7, 0.3])
        for i in range(first, last + 1):
            ti = fault.offset_s + i * period
            # deterministic per-impulse jitter / amplitude (so the signal is time-continuous)
            jr = np.random.default_rng([fault.seed, i + 2**20])
            ti += jr.normal(0, 0.01 * period)
            a = fault.amplitude * (0.75 + 0.25 * math.cos(w * ti)) * jr.uniform(0.8, 1.2)
            dt = t - ti
            m = (dt >= 0) & (dt < tail)
            if m.any():
                d = dt[m]
                ring = a * np.exp(-d / fault.decay_s) * np.sin(2 * math.pi * fault.resonance_hz * d)
                x[m] += ring[:, None] * gains
    if fault.kind == "looseness":
        gains = np.array([0.6, 1.0, 0.3])
        for order, ph in zip(_LOOSE_ORDERS, fault.phases, strict=False):
            a = fault.amplitude / math.sqrt(order)
            x += (a * np.sin(order * w * t + ph))[:, None] * gains
    x += rng.normal(0, machine.noise, x.shape)
    x += _GRAVITY
    return x.astype(np.float32)


def make_windows(
    n: int, seed: int, conditions: tuple[str, ...] = CONDITIONS
) -> tuple[F32Array, npt.NDArray[np.int64]]:
    """``n`` independent windows (``n x WINDOW x 3``), balanced over ``conditions``.

    Each window comes from a freshly drawn machine and fault at a random time. Returns the
    windows and their labels as indices into :data:`CONDITIONS`.
    """
    rng = np.random.default_rng(seed)
    labels = np.array([CONDITIONS.index(conditions[i % len(conditions)]) for i in range(n)])
    rng.shuffle(labels)
    out = np.empty((n, WINDOW, CHANNELS), dtype=np.float32)
    for i, lab in enumerate(labels):
        machine = Machine.random(rng)
        fault = Fault.random(CONDITIONS[int(lab)], rng)
        out[i] = synthesize(WINDOW, machine, fault, rng, t0=float(rng.uniform(0, 30)))
    return out, labels.astype(np.int64)


DEMO_SEGMENTS: tuple[tuple[str, int], ...] = (("normal", 2000), ("bearing", 1500), ("normal", 1500))
"""The demo file: condition and sample count of each segment, in order."""


def demo_signal(seed: int = 11) -> tuple[F32Array, npt.NDArray[np.int64]]:
    """The demo recording (one machine, phase-continuous) and each sample's condition index."""
    rng = np.random.default_rng(seed)
    # a machine with a mid-range sensor noise level (the training range is 0.02-0.045 g)
    machine = replace(Machine.random(rng), noise=0.03)
    parts, labels = [], []
    t0 = 0.0
    for kind, n in DEMO_SEGMENTS:
        fault = Fault.random(kind, rng)
        parts.append(synthesize(n, machine, fault, rng, t0=t0))
        labels.append(np.full(n, CONDITIONS.index(kind), dtype=np.int64))
        t0 += n / FS
    return np.concatenate(parts), np.concatenate(labels)


def write_demo_csv(path: Path, seed: int = 11) -> npt.NDArray[np.int64]:
    """Write the demo recording as CSV (header ``ax,ay,az``); returns per-sample labels."""
    x, labels = demo_signal(seed)
    lines = [",".join(COLUMNS)]
    lines += [f"{a:.5f},{b:.5f},{c:.5f}" for a, b, c in x.tolist()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return labels
