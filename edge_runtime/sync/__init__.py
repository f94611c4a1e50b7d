"""Fleet sync over MQTT: signed resumable model updates, A/B slots, telemetry outbox.

Public names load lazily (``import edge_runtime.sync`` imports neither paho nor a runtime)::

    >>> from edge_runtime.sync import Topics
    >>> Topics("plant1").group_desired("cameras")
    'edgert/plant1/group/cameras/desired'
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "AgentOptions": "edge_runtime.sync.agent",
    "SyncAgent": "edge_runtime.sync.agent",
    "Command": "edge_runtime.sync.protocol",
    "DesiredBundle": "edge_runtime.sync.protocol",
    "DesiredDocument": "edge_runtime.sync.protocol",
    "Rollout": "edge_runtime.sync.protocol",
    "ShadowOptions": "edge_runtime.sync.protocol",
    "Topics": "edge_runtime.sync.protocol",
    "canary_bucket": "edge_runtime.sync.protocol",
    "open_envelope": "edge_runtime.sync.protocol",
    "seal": "edge_runtime.sync.protocol",
    "BundleMeta": "edge_runtime.sync.transfer",
    "ChunkAssembler": "edge_runtime.sync.transfer",
    "DeviceState": "edge_runtime.sync.slots",
    "StateStore": "edge_runtime.sync.slots",
    "Outbox": "edge_runtime.sync.outbox",
    "LinkSettings": "edge_runtime.sync.mqtt",
    "MqttLink": "edge_runtime.sync.mqtt",
    "FleetClient": "edge_runtime.sync.publisher",
    "follow_rollout": "edge_runtime.sync.publisher",
}

__all__ = [
    "AgentOptions",
    "BundleMeta",
    "ChunkAssembler",
    "Command",
    "DesiredBundle",
    "DesiredDocument",
    "DeviceState",
    "FleetClient",
    "LinkSettings",
    "MqttLink",
    "Outbox",
    "Rollout",
    "ShadowOptions",
    "StateStore",
    "SyncAgent",
    "Topics",
    "canary_bucket",
    "follow_rollout",
    "open_envelope",
    "seal",
]

if TYPE_CHECKING:
    from edge_runtime.sync.agent import AgentOptions, SyncAgent
    from edge_runtime.sync.mqtt import LinkSettings, MqttLink
    from edge_runtime.sync.outbox import Outbox
    from edge_runtime.sync.protocol import (
        Command,
        DesiredBundle,
        DesiredDocument,
        Rollout,
        ShadowOptions,
        Topics,
        canary_bucket,
        open_envelope,
        seal,
    )
    from edge_runtime.sync.publisher import FleetClient, follow_rollout
    from edge_runtime.sync.slots import DeviceState, StateStore
    from edge_runtime.sync.transfer import BundleMeta, ChunkAssembler


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'edge_runtime.sync' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
