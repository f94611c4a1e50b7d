"""Bundle manifest v1: schema, validation and canonical bytes.

The manifest is the one place a bundle describes itself: the model files with their io,
preprocessing, decoder, labels, self-test and, for every file, its size and sha256. The
signature (``manifest.sig``) covers the manifest's exact bytes, so one signature covers the
whole bundle. See ``docs/bundle.md``.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edge_runtime.decoders.specs import DecoderSpec
from edge_runtime.errors import ManifestError
from edge_runtime.preprocess_spec import PreprocessSpec
from edge_runtime.types import TensorSpec

__all__ = [
    "MANIFEST_NAME",
    "MAX_MANIFEST_BYTES",
    "SCHEMA_VERSION",
    "SIGNATURE_NAME",
    "FileEntry",
    "Manifest",
    "ModelEntry",
    "SelfTestSpec",
    "TensorInfo",
    "canonical_bytes",
    "check_runtime_version",
    "format_validation_error",
    "parse_manifest",
]

SCHEMA_VERSION: Literal[1] = 1
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
MAX_MANIFEST_BYTES = 1 << 20
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileEntry(_Model):
    """Size and sha256 of one bundle file."""

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class TensorInfo(_Model):
    """One model input or output as recorded at bundle creation."""

    name: str
    shape: list[int | None]
    dtype: str
    scale: float | None = None
    zero_point: int | None = None

    def to_spec(self) -> TensorSpec:
        return TensorSpec(self.name, tuple(self.shape), self.dtype, self.scale, self.zero_point)

    @classmethod
    def from_spec(cls, spec: TensorSpec) -> TensorInfo:
        return cls(**spec.to_dict())


class ModelEntry(_Model):
    """One model file of the bundle (a bundle can carry the same model as ONNX and TFLite)."""

    path: str
    format: Literal["onnx", "tflite"]
    precision: Literal["fp32", "fp16", "int8", "mixed"] = "fp32"
    isa: list[str] = Field(default_factory=list, description="target ISA hints, e.g. x86-vnni")
    inputs: list[TensorInfo] = Field(min_length=1)
    outputs: list[TensorInfo] = Field(min_length=1)


class SelfTestSpec(_Model):
    """Golden inputs/outputs (``path``, an .npz) with tolerances and a latency budget."""

    path: str = "selftest.npz"
    atol: float = Field(default=1e-3, ge=0)
    rtol: float = Field(default=1e-3, ge=0)
    min_match: float = Field(default=1.0, ge=0, le=1, description="share of golden frames that must match")
    latency_budget_ms: float = Field(default=1000.0, gt=0)


class Manifest(_Model):
    """manifest.json of bundle format v1."""

    schema_version: Literal[1]
    name: str = Field(pattern=_SAFE_NAME.pattern)
    version: str
    created: str
    task: Literal["classification", "detection", "regression", "anomaly"]
    description: str = ""
    min_runtime_version: str = "0.1.0"
    models: list[ModelEntry] = Field(min_length=1, max_length=8)
    preprocess: PreprocessSpec
    decoder: DecoderSpec
    labels: str | None = None
    selftest: SelfTestSpec | None = None
    reference: str | None = None
    report: str | None = None
    files: dict[str, FileEntry]

    @field_validator("version", "min_runtime_version")
    @classmethod
    def _semver(cls, value: str) -> str:
        if not _SEMVER.match(value):
            raise ValueError(f"{value!r} is not a semantic version like 1.2.3")
        return value

    @field_validator("files")
    @classmethod
    def _file_names(cls, files: dict[str, FileEntry]) -> dict[str, FileEntry]:
        for path in files:
            if not _SAFE_NAME.match(path) or path in (MANIFEST_NAME, SIGNATURE_NAME):
                raise ValueError(
                    f"file name {path!r} is not allowed: bundle files are flat names of letters, "
                    "digits, '.', '_' and '-', and never manifest.json/manifest.sig"
                )
        return files

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        referenced = [m.path for m in self.models]
        referenced += [p for p in (self.labels, self.reference, self.report) if p]
        if self.selftest:
            referenced.append(self.selftest.path)
        for path in referenced:
            if path not in self.files:
                raise ValueError(f"{path!r} is referenced but not listed in 'files'")
        formats = [m.format for m in self.models]
        if len(set(formats)) != len(formats):
            raise ValueError("each model format (onnx, tflite) may appear once in 'models'")
        return self

    def model(self, fmt: str) -> ModelEntry | None:
        """The model entry of format ``fmt`` (``onnx``/``tflite``), if present."""
        return next((m for m in self.models if m.format == fmt), None)


def canonical_bytes(manifest: Manifest) -> bytes:
    """The exact bytes written as manifest.json (and signed): sorted keys, compact, UTF-8."""
    data = manifest.model_dump(mode="json", exclude_none=True)
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _version_key(version: str) -> tuple[int, int, int, int, str]:
    """Sort key of a semantic version (a pre-release sorts before its release)."""
    m = _SEMVER.match(version)
    if m is None:
        raise ManifestError(f"{version!r} is not a semantic version like 1.2.3")
    pre = version[m.end(3) :].partition("+")[0].removeprefix("-")
    return int(m.group(1)), int(m.group(2)), int(m.group(3)), 0 if pre else 1, pre


def check_runtime_version(manifest: Manifest, runtime: str | None = None) -> None:
    """Raise :class:`ManifestError` when the bundle needs a newer edge-runtime than ``runtime``.

    ``runtime`` defaults to this package's version. The loader calls this for every bundle it
    opens or unpacks (after the signature check), so a bundle built for a newer runtime is
    refused with the reason instead of failing later in some unexpected way.
    """
    if runtime is None:
        import edge_runtime

        runtime = edge_runtime.__version__
    if _version_key(manifest.min_runtime_version) > _version_key(runtime):
        raise ManifestError(
            f"bundle {manifest.name} {manifest.version} needs edge-runtime >= "
            f"{manifest.min_runtime_version} (min_runtime_version) but this is edge-runtime {runtime}; "
            "upgrade edge-runtime on this device or rebuild the bundle for this runtime"
        )


def format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """One line per problem: ``field.path: message``."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        where = f"{prefix}{loc}" if loc else prefix.rstrip(".") or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field; remove it or check its spelling"
        elif err["type"] == "missing":
            msg = "required field is missing"
        lines.append(f"{where}: {msg}")
    return "; ".join(lines)


def parse_manifest(raw: bytes) -> Manifest:
    """Parse and validate manifest bytes; raise :class:`ManifestError` naming each bad field."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest.json is {len(raw)} bytes; the limit is {MAX_MANIFEST_BYTES}")
    try:
        data: Any = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"manifest.json is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ManifestError("manifest.json must hold a JSON object")
    version = data.get("schema_version")
    if type(version) is not int or version != SCHEMA_VERSION:
        raise ManifestError(
            f"manifest schema_version {version!r} is not supported by this runtime "
            f"(supports {SCHEMA_VERSION}); upgrade edge-runtime or rebuild the bundle"
        )
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        raise ManifestError(f"invalid manifest: {format_validation_error(exc)}") from exc
