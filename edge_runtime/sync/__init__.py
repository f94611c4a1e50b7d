"""Fleet sync over MQTT: signed resumable model updates, A/B slots, telemetry outbox."""
