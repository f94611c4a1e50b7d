"""Fleet sync end to end: a real daemon, a real mosquitto with mutual TLS, real signed bundles.

The device runs the demo shapes classifier on the demo video (looped, paced). The fleet
publishes candidates built from the same trained model: a good one (committed with no frame
lost), and bad ones that must be rolled back or rejected with the reason reported - a
failing self-test, a 10x slower model, and one whose outputs collapse onto one class.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from mqtt_broker import Broker
from sync_helpers import FAST, Device, collapse, make_candidate, mark, slow, updates, wait_phase

from edge_runtime.bundle import load_private_key
from edge_runtime.sync.mqtt import LinkSettings
from edge_runtime.sync.publisher import FleetClient


def test_publish_downloads_verifies_swaps_and_commits_without_dropping_frames(
    tmp_path: Path, broker: Broker, keys: tuple[Path, Path], device: Device, fleet: FleetClient
) -> None:
    watcher = updates(broker)
    packed = make_candidate(tmp_path, keys[0], "1.1.0")
    doc = fleet.publish(packed, "group:cams", load_private_key(keys[0]), rollout=FAST)
    assert doc.bundle.version == "1.1.0"
    done = wait_phase(watcher, {"committed", "rolled_back", "rejected"})
    assert done["phase"] == "committed", done
    phases = [json.loads(m.payload)["phase"] for m in watcher.messages("edgert/test/device/dev1/update")]
    for step in ("downloading", "verifying", "staged", "selftest", "probation", "committed"):
        assert step in phases
    assert device.serving() == "1.1.0"
    # zero dropped frames: the result stream's frame indices have no gap across the swap
    time.sleep(0.3)
    rows = [json.loads(line) for line in device.results.read_text().splitlines() if line.strip()]
    models = [r["model"] for r in rows]
    assert "shapes@1.1.0" in models and models[0].startswith("shapes@")
    first_new = models.index("shapes@1.1.0")
    window = [r["frame"] for r in rows[max(0, first_new - 50) : first_new + 50]]
    assert window == list(range(window[0], window[0] + len(window)))
    summary = device.agent.host.summary()
    assert summary["dropped"] == 0 and summary["model_swaps"] == 1
    # state survives: state.json names the committed slot
    state = device.state_json()
    assert state["active"]["version"] == "1.1.0" and state["phase"] == "committed"
    # the retained device state shows the new model
    status = {s.device: s for s in fleet.status()}
    assert status["dev1"].online and status["dev1"].model == "shapes 1.1.0"


@pytest.mark.parametrize(
    ("case", "expect_phase", "words"),
    [
        ("selftest", "rejected", "self-test failed"),
        ("slow", "rolled_back", "inference p50"),
        ("collapsed", "rolled_back", "output distribution"),
    ],
)
def test_bad_candidate_is_refused_with_the_reason_and_the_old_model_keeps_serving(
    tmp_path: Path,
    broker: Broker,
    keys: tuple[Path, Path],
    device: Device,
    fleet: FleetClient,
    case: str,
    expect_phase: str,
    words: str,
) -> None:
    if case == "selftest":
        packed = make_candidate(tmp_path, keys[0], "1.2.0", latency_budget_ms=1e-6)
    elif case == "slow":
        packed = make_candidate(tmp_path, keys[0], "1.2.0", slow, latency_budget_ms=10_000)
    else:
        packed = make_candidate(tmp_path, keys[0], "1.2.0", collapse)
    watcher = updates(broker)
    fleet.publish(packed, "group:cams", load_private_key(keys[0]), rollout=FAST)
    done = wait_phase(watcher, {"committed", "rolled_back", "rejected"})
    assert done["phase"] == expect_phase, done
    assert words in done["reason"], done["reason"]
    assert device.serving() == "1.0.0"
    state = device.state_json()
    assert state["phase"] == expect_phase and state["candidate"] is None
    assert words in state["reason"]


def test_device_offline_during_publish_gets_the_update_with_the_publisher_gone(
    tmp_path: Path, broker: Broker, keys: tuple[Path, Path], devices: Callable[..., Device]
) -> None:
    watcher = updates(broker)
    packed = make_candidate(tmp_path, keys[0], "1.1.0")
    cert, key = broker.client_cert("fleet-admin")
    settings = LinkSettings(
        host="127.0.0.1", port=broker.port, client_id="pub-once", ca_file=broker.ca_path, cert_file=cert,
        key_file=key,
    )  # fmt: skip
    with FleetClient(settings, "test") as publisher:
        publisher.publish(packed, "group:cams", load_private_key(keys[0]), rollout=FAST)
    # the publisher is gone; the device comes online only now
    dev = devices("dev1")
    done = wait_phase(watcher, {"committed", "rolled_back", "rejected"})
    assert done["phase"] == "committed", done
    assert dev.serving() == "1.1.0"
    # and after a restart it serves the committed model (not the factory bundle)
    dev.stop()
    dev.start()
    assert dev.serving() == "1.1.0"


def test_telemetry_survives_a_60_s_broker_outage_and_a_daemon_restart(
    broker: Broker, devices: Callable[..., Device]
) -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    consumer = broker.client("fleet-admin", client_id="seq-consumer", clean_start=False, properties=props)
    for leaf in ("telemetry", "events", "update"):
        consumer.subscribe_wait(f"edgert/test/device/dev1/{leaf}")
    dev = devices("dev1")
    time.sleep(2.0)
    broker.stop()
    outage = float(os.environ.get("EDGERT_OUTAGE_S", "60"))
    t0 = time.monotonic()
    time.sleep(outage / 2)
    dev.stop()  # the daemon restarts in the middle of the outage
    dev.start(connected=False)
    time.sleep(max(0.0, outage - (time.monotonic() - t0)))
    produced_offline = dev.agent.outbox.stats()["pending"]
    assert produced_offline > 0
    broker.start()
    assert dev.agent.flush(60.0), dev.agent.outbox.stats()
    last = dev.agent.outbox.stats()["last_seq"]
    end = time.monotonic() + 30
    seqs: list[int] = []
    while time.monotonic() < end:
        seqs = [
            json.loads(m.payload)["seq"]
            for leaf in ("telemetry", "events", "update")
            for m in consumer.messages(f"edgert/test/device/dev1/{leaf}")
        ]
        if set(range(1, last + 1)) <= set(seqs):
            break
        time.sleep(0.2)
    missing = sorted(set(range(1, last + 1)) - set(seqs))
    assert not missing, f"{len(missing)} of {last} sequence numbers never arrived: {missing[:20]}"
    dupes = len(seqs) - len(set(seqs))
    assert dupes >= 0  # duplicates (at-least-once) are removable by seq
    stats = dev.agent.outbox.stats()
    assert stats["dropped_total"] == 0 and stats["expired_total"] == 0


def test_shadow_mode_reports_agreement_then_promote_commits(
    tmp_path: Path, broker: Broker, keys: tuple[Path, Path], device: Device, fleet: FleetClient
) -> None:
    from edge_runtime.sync.protocol import ShadowOptions

    watcher = updates(broker)
    packed = make_candidate(tmp_path, keys[0], "1.1.0")
    shadow = ShadowOptions(sample_rate=0.5, min_frames=20, report_every_s=0.5)
    fleet.publish(
        packed, "group:cams", load_private_key(keys[0]), rollout=FAST.model_copy(update={"shadow": shadow})
    )
    end = time.monotonic() + 60
    ready: dict[str, Any] = {}
    while time.monotonic() < end and not ready:
        for msg in watcher.messages("edgert/test/device/dev1/update"):
            body = json.loads(msg.payload)
            if body["phase"] == "shadow" and body.get("reason") == "ready for promotion":
                ready = body
        time.sleep(0.1)
    assert ready, [json.loads(m.payload) for m in watcher.messages("edgert/test/device/dev1/update")]
    assert ready["shadow"]["frames"] >= 20 and ready["shadow"]["top1_agreement"] == 1.0
    assert device.serving() == "1.0.0"  # shadow results are never emitted
    rows = [json.loads(line) for line in device.results.read_text().splitlines() if line.strip()]
    assert {r["model"] for r in rows} == {"shapes@1.0.0"}
    fleet.promote("group:cams", load_private_key(keys[0]))
    done = wait_phase(watcher, {"committed", "rolled_back", "rejected"})
    assert done["phase"] == "committed", done
    assert device.serving() == "1.1.0"


def test_downgrade_replay_expiry_and_bad_signatures_are_refused(
    tmp_path: Path, broker: Broker, keys: tuple[Path, Path], device: Device, fleet: FleetClient
) -> None:
    from edge_runtime.bundle import generate_keypair
    from edge_runtime.sync.protocol import DesiredDocument, seal, utc_iso

    watcher = updates(broker)
    key = load_private_key(keys[0])
    packed = make_candidate(tmp_path, keys[0], "1.1.0")
    doc = fleet.publish(packed, "group:cams", key, rollout=FAST)
    assert wait_phase(watcher, {"committed", "rolled_back", "rejected"})["phase"] == "committed"
    topic = "edgert/test/group/cams/desired"
    # a replay of an older signed document (captured earlier) is refused
    older = doc.model_copy(update={"sequence": doc.sequence - 5})
    n = mark(watcher)
    fleet._publish_wait(topic, seal(older, key))
    assert "replayed" in wait_phase(watcher, {"rejected"}, since=n)["reason"]
    # a lower version without a signed rollback is refused; the model keeps serving
    old_bundle, _ = fleet.upload_bundle(make_candidate(tmp_path, keys[0], "1.0.5"))
    n = mark(watcher)
    fleet.publish_document("group:cams", old_bundle, key, rollout=FAST)
    assert "downgrade" in wait_phase(watcher, {"rejected"}, version="1.0.5", since=n)["reason"]
    assert device.serving() == "1.1.0"
    # expired documents are refused (a frozen, stale retained document)
    stale = doc.model_copy(
        update={
            "sequence": doc.sequence + 10**9,
            "issued_at": utc_iso(time.time() - 7200),
            "expires_at": utc_iso(time.time() - 3600),
        }
    )
    n = mark(watcher)
    fleet._publish_wait(topic, seal(DesiredDocument.model_validate(stale.model_dump()), key))
    assert "expired" in wait_phase(watcher, {"rejected"}, timeout=20, since=n)["reason"]
    # a document signed by an unknown key is refused
    rogue_key, _ = generate_keypair(tmp_path / "rogue")
    forged = doc.model_copy(update={"sequence": doc.sequence + 2 * 10**9})
    n = mark(watcher)
    fleet._publish_wait(topic, seal(forged, load_private_key(rogue_key)))
    assert "not trusted" in wait_phase(watcher, {"rejected"}, timeout=20, since=n)["reason"]
    # an explicit, signed rollback to the lower version is accepted
    n = mark(watcher)
    fleet.publish_document("group:cams", old_bundle, key, rollout=FAST, rollback=True)
    done = wait_phase(watcher, {"committed", "rolled_back"}, version="1.0.5", since=n)
    assert done["phase"] == "committed", done
    assert device.serving() == "1.0.5"


def test_canary_rollout_aborts_on_failing_canaries_and_promotes_good_ones(
    tmp_path: Path,
    broker: Broker,
    keys: tuple[Path, Path],
    devices: Callable[..., Device],
    fleet: FleetClient,
) -> None:
    from edge_runtime.sync.protocol import canary_bucket
    from edge_runtime.sync.publisher import follow_rollout

    broker.add_device("dev3", ["cams"])
    dev1, dev3 = devices("dev1"), devices("dev3")
    watcher = updates(broker)
    key = load_private_key(keys[0])
    fleet.publish(make_candidate(tmp_path, keys[0], "1.1.0"), "group:cams", key, rollout=FAST)
    for d in ("dev1", "dev3"):
        assert (
            wait_phase(watcher, {"committed", "rolled_back"}, device=d, version="1.1.0")["phase"]
            == "committed"
        )

    def canary_of_one(sha: str) -> tuple[float, str, str]:
        b = {d: canary_bucket(d, sha) for d in ("dev1", "dev3")}
        first, second = sorted(b, key=b.__getitem__)
        return (b[first] + b[second]) / 2, first, second

    # a bad candidate goes to one canary only, which rolls back; the rollout aborts
    bad, _ = fleet.upload_bundle(make_candidate(tmp_path, keys[0], "1.2.0", collapse))
    pct, canary, other = canary_of_one(bad.sha256)
    n = {d: mark(watcher, d) for d in ("dev1", "dev3")}
    doc = fleet.publish_document(
        "group:cams", bad, key, rollout=FAST.model_copy(update={"canary_percent": pct})
    )
    outcome = follow_rollout(fleet, doc, ["dev1", "dev3"], key, abort_share=0.0, timeout_s=60)
    assert outcome.result == "aborted" and outcome.canaries == [canary]
    assert "output distribution" in outcome.failed[canary]
    assert outcome.document is not None and outcome.document.rollback
    assert outcome.document.bundle.version == "1.1.0"
    skipped = wait_phase(watcher, {"skipped"}, device=other, version="1.2.0", since=n[other])
    assert "canary" in skipped["reason"]
    time.sleep(1.0)
    assert dev1.serving() == dev3.serving() == "1.1.0"
    # a good candidate: the canary commits, the rollout is promoted, every device follows
    good, _ = fleet.upload_bundle(make_candidate(tmp_path, keys[0], "1.3.0"))
    pct, canary, other = canary_of_one(good.sha256)
    doc = fleet.publish_document(
        "group:cams", good, key, rollout=FAST.model_copy(update={"canary_percent": pct})
    )
    outcome = follow_rollout(fleet, doc, ["dev1", "dev3"], key, abort_share=0.0, timeout_s=60)
    assert outcome.result == "promoted" and outcome.committed == [canary]
    done = wait_phase(watcher, {"committed", "rolled_back"}, device=other, version="1.3.0")
    assert done["phase"] == "committed"
    assert dev1.serving() == dev3.serving() == "1.3.0"
