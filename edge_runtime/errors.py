"""The one exception hierarchy of edge-runtime.

Every error the package raises on purpose derives from :class:`EdgeRuntimeError`.
Third-party errors (ONNX Runtime, LiteRT, OpenCV, pyserial, cryptography, pydantic)
are translated where they cross into our code with ``raise ... from exc`` so callers
only ever need to catch these::

    EdgeRuntimeError                 base; ``str(err)`` says what is wrong and how to fix it
    +-- ConfigError                  bad TOML or config values (CLI exit code 2)
    +-- MissingDependencyError       an optional dependency is not installed; names the extra
    +-- BundleError                  anything wrong with a model bundle
    |   +-- ManifestError            manifest.json missing, malformed, unknown or missing fields
    |   +-- IntegrityError           a file's size or sha256 does not match the manifest
    |   +-- SignatureError           missing, malformed, untrusted or wrong signature
    |   +-- UnsafeArchiveError       path traversal, links, device files, oversize members
    |   +-- SelfTestError            golden outputs or latency budget not met
    +-- BackendError                 the inference runtime failed
    |   +-- ModelLoadError           corrupt, truncated or unsupported model file
    |   +-- ProviderUnavailableError an execution provider or delegate that is not present
    |   +-- InferenceError           a run failed (wrong input shape, runtime error)
    +-- PreprocessError              a frame of the wrong size, channels or dtype
    +-- DecoderError                 model outputs that do not fit the configured decoder
    +-- SourceError                  a source could not be opened or read
    |   +-- SourceDisconnectedError  a live source vanished (the daemon reconnects)
    |   +-- SampleParseError         a sensor line that is not valid CSV/JSON samples
    +-- SinkError                    a sink could not write
    +-- ConversionError              the converter cannot produce a result (names problem and fix)
        +-- CalibrationError         empty, unreadable or mis-shaped calibration/evaluation data
        +-- AccuracyBudgetError      --max-accuracy-drop could not be met (best result kept)
    +-- SyncError                    fleet sync over MQTT
    |   +-- BrokerError              the broker cannot be reached or refused us (TLS, credentials, ACL)
    |   +-- DocumentError            a desired-model document or command that is malformed,
    |   |                            unsigned, expired, replayed or a refused downgrade
    |   +-- TransferError            a bundle chunk or download that fails its checks
    |   +-- UpdateError              an update that cannot be installed (the reason is reported)
    +-- StateError                   the device state directory is unreadable or inconsistent
    +-- OutboxError                  the disk-backed telemetry outbox cannot be opened or written
"""

from __future__ import annotations

__all__ = [
    "AccuracyBudgetError",
    "BackendError",
    "CalibrationError",
    "ConversionError",
    "BundleError",
    "ConfigError",
    "DecoderError",
    "EdgeRuntimeError",
    "InferenceError",
    "IntegrityError",
    "ManifestError",
    "MissingDependencyError",
    "ModelLoadError",
    "PreprocessError",
    "ProviderUnavailableError",
    "SampleParseError",
    "SelfTestError",
    "SignatureError",
    "SinkError",
    "SourceDisconnectedError",
    "SourceError",
    "UnsafeArchiveError",
    "SyncError",
    "BrokerError",
    "DocumentError",
    "TransferError",
    "UpdateError",
    "StateError",
    "OutboxError",
]


class EdgeRuntimeError(Exception):
    """Base of every error raised on purpose by edge-runtime."""


class ConfigError(EdgeRuntimeError):
    """The daemon configuration is invalid; the message names the field path and the fix."""


class MissingDependencyError(EdgeRuntimeError, ImportError):
    """An optional dependency is missing; the message names the extra to install."""

    def __init__(self, package: str, extra: str, purpose: str) -> None:
        super().__init__(
            f"{purpose} needs the Python package {package!r}, which is not installed; "
            f"install it with: pip install 'edge-runtime[{extra}]'"
        )
        self.package = package
        self.extra = extra


class BundleError(EdgeRuntimeError):
    """A model bundle is unusable."""


class ManifestError(BundleError):
    """manifest.json is missing, malformed or has missing/unknown fields."""


class IntegrityError(BundleError):
    """A bundle file's size or sha256 differs from the manifest."""


class SignatureError(BundleError):
    """The bundle signature is missing, malformed, untrusted or does not verify."""


class UnsafeArchiveError(BundleError):
    """A packed bundle holds a member that must never be unpacked."""


class SelfTestError(BundleError):
    """The bundle's self-test failed (outputs outside tolerance or latency over budget)."""


class BackendError(EdgeRuntimeError):
    """The inference runtime failed."""


class ModelLoadError(BackendError):
    """The model file could not be loaded (corrupt, truncated, unsupported)."""


class ProviderUnavailableError(BackendError):
    """A requested execution provider or delegate is not available on this machine."""


class InferenceError(BackendError):
    """One inference failed."""


class PreprocessError(EdgeRuntimeError):
    """A frame cannot be turned into the model's input."""


class DecoderError(EdgeRuntimeError):
    """The model's outputs do not fit the configured decoder."""


class SourceError(EdgeRuntimeError):
    """A source could not be opened or read."""


class SourceDisconnectedError(SourceError):
    """A live source (camera, stream, serial port) went away; it will be reopened."""


class SampleParseError(SourceError):
    """A sensor line could not be parsed into numeric samples."""


class SinkError(EdgeRuntimeError):
    """A result sink could not write."""


class ConversionError(EdgeRuntimeError):
    """The converter cannot produce a result; the message names the problem and the fix."""


class CalibrationError(ConversionError):
    """Calibration or evaluation data is empty, unreadable or does not fit the model."""


class AccuracyBudgetError(ConversionError):
    """The accuracy budget could not be met; the best result found is kept and reported."""


class SyncError(EdgeRuntimeError):
    """Fleet sync over MQTT failed."""


class BrokerError(SyncError):
    """The MQTT broker cannot be reached, or refused the connection, a publish or a subscription."""


class DocumentError(SyncError):
    """A desired-model document or command is malformed, unsigned, expired, replayed or a downgrade."""


class TransferError(SyncError):
    """A bundle chunk or a whole download does not match what the signed document promised."""


class UpdateError(SyncError):
    """A model update cannot be installed; the reason is reported to the fleet."""


class StateError(EdgeRuntimeError):
    """The device's state directory is unreadable or inconsistent."""


class OutboxError(EdgeRuntimeError):
    """The disk-backed telemetry outbox cannot be opened or written."""
