"""Deployment targets: which int8 scheme is fast *and* exact on which CPU.

``--target`` picks :class:`QuantOptions` plus ONNX Runtime specifics. The choices follow what
the int8 kernels of ONNX Runtime (MLAS) and LiteRT (XNNPACK) actually do on each CPU:

=========  ==========================================  ==========================================
target     CPU                                         int8 scheme
=========  ==========================================  ==========================================
x86-vnni   x86-64 with AVX512-VNNI or AVX-VNNI         U8S8 (uint8 activations, int8 weights),
                                                       per-channel weights, full 8-bit range
x86        x86-64 with AVX2/AVX-512 but no VNNI        U8S8 per-channel with ``reduce_range``
                                                       (7-bit weights: VPMADDUBSW adds two
                                                       u8*s8 products into int16 and saturates
                                                       with full-range weights)
rpi4       Cortex-A72 (ARMv8.0, no dot-product)        S8S8 per-channel; int8 gains are small
rpi5       Cortex-A76 (ARMv8.2 with SDOT)              S8S8 per-channel
jetson     Orin/Xavier CPU (SDOT) + TensorRT           S8S8 per-channel, symmetric activations
                                                       (TensorRT takes zero-point-0 int8 only)
=========  ==========================================  ==========================================

Measured on the reference machine (AMD EPYC, AVX-512 VNNI, 2 threads, ORT 1.31.1),
MobileNetV2 224: fp32 3.40 ms; ORT's default S8S8 QDQ 5.03 ms; U8S8 per-channel 1.56 ms; U8S8
per-tensor 1.44 ms. Re-measured with :func:`converters.evaluate.compare_latency` (8 quiet
rounds, paired medians): fp32 2.66 ms, S8S8 per-channel 2.77 ms (0.98x), U8S8 per-channel
1.29 ms (2.10x), U8S8 per-tensor 1.20 ms (2.19x). ORT's x86 int8 kernels are built around
u8 x s8 products (VPMADDUBSW / VPDPBUSD), so S8S8 gains nothing there. Per-channel costs ~4-8 %
over per-tensor but keeps depthwise convolutions exact, so it is the default everywhere.

``auto`` reads the conversion host's CPU flags (:func:`edge_runtime.doctor.cpu_features`):
use it when converting on (or for) a machine like the one running the conversion.
:func:`preflight` warns before quantizing when int8 is unlikely to beat fp32.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from converters.types import QuantOptions
from edge_runtime.errors import ConversionError

__all__ = [
    "MIN_INT8_MACS",
    "NARROW_CHANNELS",
    "TARGETS",
    "ModelCost",
    "TargetName",
    "TargetProfile",
    "estimate_onnx_cost",
    "preflight",
    "resolve_target",
]

log = logging.getLogger(__name__)

TargetName = Literal["auto", "x86", "x86-vnni", "rpi4", "rpi5", "jetson"]
TARGETS: tuple[str, ...] = ("auto", "x86", "x86-vnni", "rpi4", "rpi5", "jetson")

MIN_INT8_MACS = 100_000_000
"""Below this many multiply-accumulates per inference, fixed per-operator costs dominate and
int8 rarely reaches 2x over fp32 on x86 with ONNX Runtime. Measured with 2 threads (paired
medians): shapes CNN 64x64, 15 M MACs: 1.0x; MobileNetV2 width 0.35-0.5 at 96-160 px, 12-50 M:
1.15-1.33x; width 1.0 at 128/160/224 px, 99/154/300 M: 1.89x/1.91x/2.10x."""

NARROW_CHANNELS = 64
"""Convolutions with fewer output channels gain little from int8 kernels: quantize/requantize
and data movement cost as much as the arithmetic saves (measured: the shapes CNN architecture,
16-96 channels, scaled to 224x224 and 181 M MACs: 0.93x; doubled to 32-192 channels: 1.7-2.0x)."""

NARROW_SHARE = 0.4
"""Warn when more than this share of the MACs is in narrow convolutions."""

_ARM = ("aarch64", "arm64", "armv7l", "armv8l")


@dataclass(frozen=True)
class TargetProfile:
    """A resolved target: quantization options plus the runtime facts behind them."""

    name: str
    description: str
    options: QuantOptions
    int8_fast: bool
    """The CPU has int8 dot-product instructions (VNNI / SDOT)."""
    isa: tuple[str, ...] = ()
    """ISA hints for the bundle manifest's ``models[].isa``."""
    preferred_format: Literal["onnx", "tflite"] = "onnx"
    threads: int = 2
    ort_extra_options: Mapping[str, Any] = field(default_factory=dict)
    """Passed to ``onnxruntime.quantization.quantize_static(extra_options=...)``."""
    float_op_types: tuple[str, ...] = ("Softmax",)
    """Op types kept in float: a final softmax costs nothing in float and uint8 probabilities
    lose everything below 1/255."""
    notes: tuple[str, ...] = ()
    detected: str | None = None
    """For ``auto``: what was detected on this machine."""

    def with_options(self, **changes: Any) -> TargetProfile:
        """A copy with some :class:`QuantOptions` fields overridden (e.g. ``method="entropy"``)."""
        return dataclasses.replace(self, options=dataclasses.replace(self.options, **changes))


def _x86_vnni() -> TargetProfile:
    return TargetProfile(
        name="x86-vnni",
        description="x86-64 with AVX512-VNNI / AVX-VNNI: U8S8 per-channel QDQ",
        options=QuantOptions(activation="uint8", weight="int8", per_channel=True, reduce_range=False),
        int8_fast=True,
        isa=("x86_64", "avx512_vnni"),
        notes=(
            "ORT fuses U8S8 QDQ into QLinearConv/QGemm using VNNI (vpdpbusd); S8S8 measured no "
            "faster than fp32 here (MobileNetV2: 0.98x, and 5.03 ms vs 3.40 ms in an earlier run)",
        ),
    )


def _x86() -> TargetProfile:
    return TargetProfile(
        name="x86",
        description="x86-64 with AVX2/AVX-512, no VNNI: U8S8 per-channel, 7-bit weights",
        options=QuantOptions(activation="uint8", weight="int8", per_channel=True, reduce_range=True),
        int8_fast=False,
        isa=("x86_64", "avx2"),
        notes=(
            "without VNNI, ORT's U8S8 kernel uses VPMADDUBSW, whose int16 sums saturate with "
            "full-range weights: reduce_range (7-bit weights) keeps results exact",
            "without int8 dot-product instructions int8 gains over fp32 are small (~1.2-1.5x)",
        ),
    )


def _arm(name: str, fast: bool, description: str, threads: int = 4) -> TargetProfile:
    notes = ["on Arm both runtimes have S8S8 int8 kernels; LiteRT/XNNPACK is usually fastest"]
    if not fast:
        notes.append("Cortex-A72 has no SDOT: int8 is ~1.3-2x over fp32 at best, check the report")
    return TargetProfile(
        name=name,
        description=description,
        options=QuantOptions(activation="int8", weight="int8", per_channel=True, reduce_range=False),
        int8_fast=fast,
        isa=("aarch64", "asimddp") if fast else ("aarch64",),
        preferred_format="tflite",
        threads=threads,
        notes=tuple(notes),
    )


def _jetson() -> TargetProfile:
    return TargetProfile(
        name="jetson",
        description="NVIDIA Jetson (Orin/Xavier): S8S8 symmetric QDQ for TensorRT, SDOT on the CPU",
        options=QuantOptions(activation="int8", weight="int8", per_channel=True, reduce_range=False),
        int8_fast=True,
        isa=("aarch64", "asimddp", "cuda"),
        preferred_format="onnx",
        threads=4,
        ort_extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
        notes=(
            "TensorRT's execution provider reads QDQ graphs with symmetric int8 (zero point 0) "
            "activations and weights; fp16 is the fallback when int8 accuracy is not enough",
        ),
    )


_PROFILES = {
    "x86-vnni": _x86_vnni,
    "x86": _x86,
    "rpi4": lambda: _arm("rpi4", False, "Raspberry Pi 4 (Cortex-A72, ARMv8.0): S8S8 per-channel"),
    "rpi5": lambda: _arm("rpi5", True, "Raspberry Pi 5 (Cortex-A76, ARMv8.2 SDOT): S8S8 per-channel"),
    "jetson": _jetson,
}


def resolve_target(target: str = "auto", *, features: Mapping[str, Any] | None = None) -> TargetProfile:
    """The :class:`TargetProfile` for ``target``; ``auto`` looks at this machine's CPU.

    ``features`` is a :func:`edge_runtime.doctor.cpu_features` result (read from this machine
    when omitted), optionally with ``"jetson": True``.
    """
    if target != "auto":
        make = _PROFILES.get(target)
        if make is None:
            raise ConversionError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
        return make()
    if features is None:
        from edge_runtime.doctor import cpu_features

        features = dict(cpu_features())
        features["jetson"] = Path("/etc/nv_tegra_release").exists()
    machine = str(features.get("machine") or platform.machine()).lower()
    flags = {k for k, v in dict(features.get("features", {})).items() if v}
    if machine in _ARM:
        name = "jetson" if features.get("jetson") else ("rpi5" if "asimddp" in flags else "rpi4")
    elif flags & {"avx512_vnni", "avx_vnni"}:
        name = "x86-vnni"
    else:
        name = "x86"
    profile = _PROFILES[name]()
    detected = f"{machine} [{', '.join(sorted(flags)) or 'no int8 flags'}]"
    log.info("target auto -> %s (%s)", name, detected)
    return dataclasses.replace(profile, detected=detected)


# --------------------------------------------------------------------------- cost model


@dataclass(frozen=True)
class ModelCost:
    """Work per inference, estimated from an ONNX graph with inferred shapes."""

    macs: int
    """Multiply-accumulates in Conv/ConvTranspose/Gemm/MatMul (what int8 speeds up)."""
    params: int
    nodes: int
    heavy_nodes: int
    """Conv/Gemm/MatMul nodes."""
    unknown_shapes: int
    """Heavy nodes whose output shape could not be inferred (their MACs are missing)."""
    narrow_macs: int = 0
    """MACs in convolutions with fewer than :data:`NARROW_CHANNELS` output channels."""


def _dims(value_info: Any) -> list[int] | None:
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return None
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
    if any(d <= 0 for d in dims[1:]):
        return None
    return [max(d, 1) for d in dims]


def estimate_onnx_cost(model: Path) -> ModelCost:
    """Count MACs of the compute-heavy ops (dynamic batch counts as 1)."""
    from converters import deps

    onnx = deps.onnx()
    try:
        proto = onnx.load(str(model))
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception as exc:
        raise ConversionError(f"cannot read ONNX model {model.name}: {exc}") from exc
    shapes: dict[str, list[int] | None] = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]:
        shapes[vi.name] = _dims(vi)
    inits = {i.name: list(i.dims) for i in inferred.graph.initializer}
    params = sum(int(_prod(d)) for d in inits.values())
    macs = heavy = unknown = narrow = 0
    for node in inferred.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        heavy += 1
        out = shapes.get(node.output[0])
        inp = shapes.get(node.input[0])
        w = inits.get(node.input[1]) if len(node.input) > 1 else None
        if w is None and len(node.input) > 1:
            w = shapes.get(node.input[1])
        if out is None or w is None or (node.op_type == "ConvTranspose" and inp is None):
            unknown += 1
            continue
        if node.op_type == "Conv":
            n = _prod(out) * _prod(w[1:])  # weights (Cout, Cin/group, kh, kw)
            macs += n
            narrow += n if int(w[0]) < NARROW_CHANNELS else 0
        elif node.op_type == "ConvTranspose":
            assert inp is not None
            macs += _prod(inp) * _prod(w[1:])  # weights (Cin, Cout/group, kh, kw)
        elif node.op_type == "Gemm":
            trans_b = any(a.name == "transB" and a.i == 1 for a in node.attribute)
            macs += _prod(out) * int(w[1] if trans_b else w[0])
        else:
            macs += _prod(out) * int(w[-2] if len(w) >= 2 else w[0])
    return ModelCost(macs, params, len(inferred.graph.node), heavy, unknown, narrow)


def _prod(values: Any) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


# --------------------------------------------------------------------------- preflight


def preflight(target: TargetProfile | str, model: Path, options: QuantOptions | None = None) -> list[str]:
    """Warnings (empty when none) about int8 being unlikely to beat fp32 for ``model`` on ``target``.

    Checks: int8 dot-product instructions on the target; the activation type for the CPU
    (S8S8 on x86 is slower than fp32 in ONNX Runtime); ``reduce_range`` without VNNI; and how
    much work the model does (small models are dominated by per-operator overhead).
    """
    profile = resolve_target(target) if isinstance(target, str) else target
    opts = options or profile.options
    warnings: list[str] = []
    if not profile.int8_fast:
        warnings.append(
            f"target {profile.name} has no int8 dot-product instructions (VNNI/SDOT): int8 may be "
            "little faster than fp32 - compare the measured latencies in the report"
        )
    if profile.name.startswith("x86") and opts.activation == "int8":
        warnings.append(
            "int8 activations (S8S8) on x86: ONNX Runtime has no VNNI kernel for them and was "
            "measured no faster than fp32 (MobileNetV2: 0.98x; U8S8 2.1x) - use uint8 activations"
        )
    if (
        profile.name == "x86"
        and opts.activation == "uint8"
        and opts.weight == "int8"
        and not opts.reduce_range
    ):
        warnings.append(
            "U8S8 without reduce_range on a CPU without VNNI can saturate (VPMADDUBSW int16 sums) "
            "and lose accuracy - keep reduce_range=True for target x86"
        )
    if model.suffix.lower() == ".onnx":
        try:
            cost = estimate_onnx_cost(model)
        except ConversionError as exc:
            warnings.append(f"could not estimate the model's cost: {exc}")
        else:
            if cost.heavy_nodes == 0:
                warnings.append(
                    f"{model.name} has no Conv/Gemm/MatMul: int8 has nothing to speed up, keep fp32"
                )
            elif cost.macs < MIN_INT8_MACS and cost.unknown_shapes == 0:
                warnings.append(
                    f"{model.name} does only {cost.macs / 1e6:.1f} M multiply-accumulates per inference "
                    f"(< {MIN_INT8_MACS / 1e6:.0f} M): fixed per-operator costs dominate, so int8 is "
                    "unlikely to be 2x faster than fp32; it still makes the file ~4x smaller"
                )
            elif cost.macs and cost.narrow_macs / cost.macs > NARROW_SHARE:
                warnings.append(
                    f"{100 * cost.narrow_macs / cost.macs:.0f} % of {model.name}'s multiply-accumulates "
                    f"are in convolutions with fewer than {NARROW_CHANNELS} output channels, where int8 "
                    "kernels gain little: int8 is unlikely to be 2x faster than fp32"
                )
    for w in warnings:
        log.warning("preflight: %s", w)
    return warnings
