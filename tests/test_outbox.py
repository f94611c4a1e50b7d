"""The disk-backed outbox: real SQLite files, real threads, a real writer killed with SIGKILL."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import edge_runtime.sync.outbox as outbox_mod
from edge_runtime.errors import OutboxError
from edge_runtime.sync.outbox import RECORD_OVERHEAD_BYTES, Outbox, Record

REPO = Path(__file__).resolve().parent.parent
T0 = 1_700_000_000.0  # a plausible wall clock (TTLs are ignored before 2020)


class FakeClock:
    """An injectable wall clock that only moves when told to."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def size_of(stream: str, payload: bytes) -> int:
    return len(payload) + len(stream) + RECORD_OVERHEAD_BYTES


def everything(box: Outbox) -> list[Record]:
    return box.peek(1_000_000)


def assert_adds_up(box: Outbox) -> dict[str, Any]:
    """produced == delivered + dropped + expired + pending, per stream and against the real rows."""
    stats = box.stats()
    rows = everything(box)
    stats = box.stats()  # peek may have expired records
    assert stats["pending"] == len(rows)
    assert stats["pending_bytes"] == sum(size_of(r.stream, r.payload) for r in rows)
    per_stream: dict[str, int] = {}
    for r in rows:
        per_stream[r.stream] = per_stream.get(r.stream, 0) + 1
    assert stats["pending_by_stream"] == per_stream
    for stream, produced in stats["produced"].items():
        assert produced == (
            stats["delivered"].get(stream, 0)
            + stats["dropped"].get(stream, 0)
            + stats["expired"].get(stream, 0)
            + per_stream.get(stream, 0)
        ), stream
    assert stats["pending_bytes"] <= stats["max_bytes"]
    assert stats["hwm_pending_bytes"] >= stats["pending_bytes"]
    assert stats["hwm_pending"] >= stats["pending"]
    return stats


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def box(tmp_path: Path, clock: FakeClock) -> Iterator[Outbox]:
    with Outbox(tmp_path / "state" / "outbox.db", clock=clock) as ob:
        yield ob


# --------------------------------------------------------------------------- basics


def test_put_stores_json_with_seq_and_ts_and_bytes_as_is(box: Outbox, clock: FakeClock) -> None:
    first = box.put("telemetry", {"cpu": 0.25, "temps": np.array([40.5, 41.0]), "n": np.int64(3)})
    raw = box.put("events", b"\x00raw\xff")
    batch = box.put_many("events", [{}, {"label": "person"}])
    assert [first, raw, *batch] == [1, 2, 3, 4]
    records = {r.seq: r for r in everything(box)}
    assert json.loads(records[1].payload) == {"seq": 1, "ts": T0, "cpu": 0.25, "temps": [40.5, 41.0], "n": 3}
    assert records[2].payload == b"\x00raw\xff"
    assert json.loads(records[3].payload) == {"seq": 3, "ts": T0}
    assert json.loads(records[4].payload) == {"seq": 4, "ts": T0, "label": "person"}
    assert records[1].created == clock.now
    assert box.path.parent.name == "state"  # parent directories were created
    assert box.put_many("events", []) == []


def test_seq_is_never_reused_after_acks_drops_emptied_table_and_reopen(
    tmp_path: Path, clock: FakeClock
) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path, clock=clock) as box:
        seqs = box.put_many("telemetry", [{"i": i} for i in range(5)])
        assert box.ack(seqs) == 5
        assert everything(box) == []
    with Outbox(path, clock=clock, max_bytes=400) as box:
        assert box.put("telemetry", {"i": 5}) == 6
        # Every earlier row gets dropped by the bound: numbering still goes on.
        later = [box.put("telemetry", b"x" * 200) for _ in range(4)]
        assert later == [7, 8, 9, 10]
        assert box.stats()["dropped"]["telemetry"] >= 3
    with Outbox(path, clock=clock) as box:
        box.ack(r.seq for r in everything(box))
        assert box.stats()["pending"] == 0
    with Outbox(path, clock=clock) as box:
        assert box.put("events", {}) == 11
        assert box.stats()["last_seq"] == 11


def test_peek_orders_by_priority_then_seq_and_skips_in_flight(box: Outbox) -> None:
    box.put("telemetry", {"n": 1})  # 1
    box.put("update", {"n": 2}, priority=5)  # 2
    box.put("events", {"n": 3}, priority=1)  # 3
    box.put("update", {"n": 4}, priority=5)  # 4
    box.put("telemetry", {"n": 5}, priority=-1)  # 5
    box.put("events", {"n": 6}, priority=1)  # 6
    assert [r.seq for r in everything(box)] == [2, 4, 3, 6, 1, 5]
    assert [r.seq for r in box.peek(3)] == [2, 4, 3]
    assert [r.seq for r in box.peek(3, exclude={2, 3})] == [4, 6, 1]
    assert box.peek(0) == []
    assert [(r.stream, r.priority) for r in box.peek(2)] == [("update", 5), ("update", 5)]
    assert box.ack([4, 4, 999]) == 1  # duplicates and unknown seqs are ignored
    assert [r.seq for r in everything(box)] == [2, 3, 6, 1, 5]


# --------------------------------------------------------------------------- bound


def test_bound_drops_lowest_priority_then_oldest_counted_per_stream_and_persisted(
    tmp_path: Path, clock: FakeClock
) -> None:
    path = tmp_path / "outbox.db"
    body = b"x" * 100
    per = size_of("telemetry", body)  # "events" and "update" have other lengths: pad them equal
    assert per == size_of("eventsxxx", body)
    with Outbox(path, max_bytes=per * 6, clock=clock) as box:
        t = box.put_many("telemetry", [body] * 3)  # 1..3 priority 0
        e = box.put_many("eventsxxx", [body] * 2, priority=1)  # 4..5
        u = box.put("telemetry", body, priority=2)  # 6: now exactly full
        assert box.stats()["pending_bytes"] == per * 6
        assert box.stats()["dropped"] == {}
        box.put("telemetry", body, priority=1)  # 7 evicts the oldest priority-0 record (1)
        assert [r.seq for r in everything(box)] == [u, *e, 7, t[1], t[2]]
        box.put_many("eventsxxx", [body] * 3, priority=1)  # 8..10 evict 2, 3 (priority 0), then 4 (oldest p1)
        assert [r.seq for r in everything(box)] == [u, e[1], 7, 8, 9, 10]
        stats = assert_adds_up(box)
        assert stats["dropped"] == {"telemetry": 3, "eventsxxx": 1}
        assert stats["hwm_pending_bytes"] == per * 6
        assert stats["hwm_pending"] == 6
    with Outbox(path, max_bytes=per * 6, clock=clock) as box:  # the counts survive a restart
        stats = box.stats()
        assert stats["dropped"] == {"telemetry": 3, "eventsxxx": 1}
        assert (stats["hwm_pending"], stats["hwm_pending_bytes"]) == (6, per * 6)
        report = box.take_drop_report()
        assert report is not None
        assert report["dropped"] == {"telemetry": 3, "eventsxxx": 1}
        assert report["dropped_total"] == 4


def test_new_record_is_dropped_rather_than_evicting_higher_priorities(tmp_path: Path) -> None:
    body = b"y" * 100
    per = size_of("update", body)
    with Outbox(tmp_path / "small.db", max_bytes=per * 2) as small:
        high = small.put_many("update", [body] * 2, priority=3)
        low = small.put("update", body, priority=0)
        assert low > high[-1]  # the seq is assigned (and reported as dropped)
        assert [r.seq for r in everything(small)] == high
        assert small.stats()["dropped"] == {"update": 1}
        same = small.put("update", body, priority=3)  # equal priority: the oldest goes
        assert [r.seq for r in everything(small)] == [high[1], same]
        assert_adds_up(small)


def test_oversize_record_is_refused_and_nothing_is_stored(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", max_bytes=1000) as box:
        box.put("events", b"a")
        too_big = b"z" * (1000 - RECORD_OVERHEAD_BYTES - len("events") + 1)
        with pytest.raises(OutboxError, match=r"more than the whole outbox bound max_bytes=1000"):
            box.put("events", too_big)
        with pytest.raises(OutboxError, match="max_bytes"):
            box.put_many("events", [b"ok", too_big, b"ok"])  # all or nothing
        assert [r.payload for r in everything(box)] == [b"a"]
        fits = too_big[:-1]
        seq = box.put("events", fits)  # exactly max_bytes: evicts the rest
        assert seq == 2  # refused puts consumed no seq
        assert [r.seq for r in everything(box)] == [2]
        assert box.stats()["pending_bytes"] == 1000
        assert box.stats()["dropped"] == {"events": 1}


# --------------------------------------------------------------------------- TTL


def test_ttl_expires_on_peek_and_prune_counted_separately(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "o.db"
    with Outbox(path, default_ttl_s=60.0, clock=clock) as box:
        default = box.put("telemetry", {"a": 1})  # expires at T0 + 60
        box.put("events", {"a": 2}, ttl_s=10.0)  # expires at T0 + 10
        forever = box.put("update", {"a": 3}, ttl_s=None)
        clock.now += 10.0
        assert [r.seq for r in everything(box)] == [default, forever]  # short expired at exactly +10
        clock.now += 50.0
        assert box.prune() == 1
        assert box.prune() == 0
        clock.now += 10 * 365 * 86400.0
        assert [r.seq for r in everything(box)] == [forever]
        stats = assert_adds_up(box)
        assert stats["expired"] == {"events": 1, "telemetry": 1}
        assert stats["dropped"] == {}
    with Outbox(path, clock=clock) as box:
        report = box.take_drop_report()
        assert report is not None
        assert report["expired"] == {"events": 1, "telemetry": 1}
        assert report["expired_total"] == 2
        assert report["dropped_total"] == 0


def test_expired_records_go_before_live_ones_are_evicted(tmp_path: Path, clock: FakeClock) -> None:
    body = b"q" * 100
    per = size_of("events", body)
    with Outbox(tmp_path / "o.db", max_bytes=per * 3, clock=clock) as box:
        keep = box.put("events", body, ttl_s=None)
        stale = box.put("events", body, ttl_s=5.0, priority=9)
        box.put("events", body, ttl_s=None)
        clock.now += 6.0
        new = box.put("events", body, ttl_s=None)  # full: the expired one makes room, not `keep`
        seqs = [r.seq for r in everything(box)]
        assert stale not in seqs
        assert keep in seqs
        assert new in seqs
        stats = box.stats()
        assert stats["expired"] == {"events": 1}
        assert stats["dropped"] == {}


def test_ttl_waits_for_a_plausible_clock(tmp_path: Path) -> None:
    """A device without RTC boots in 1970; records made then must not all expire at the NTP step."""
    clock = FakeClock(1000.0)
    with Outbox(tmp_path / "o.db", default_ttl_s=60.0, clock=clock) as box:
        early = box.put("telemetry", {"boot": True})
        clock.now = T0
        late = box.put("telemetry", {"boot": False})
        assert [r.seq for r in everything(box)] == [early, late]
        clock.now = T0 + 61
        assert [r.seq for r in everything(box)] == [early]


# --------------------------------------------------------------------------- reporting


def test_drop_report_adds_up_and_is_handed_out_once(tmp_path: Path, clock: FakeClock) -> None:
    body = b"r" * 64
    per = size_of("telemetry", body)
    delivered = 0
    reported = {"dropped": 0, "expired": 0}
    with Outbox(tmp_path / "o.db", max_bytes=per * 10, default_ttl_s=30.0, clock=clock) as box:
        assert box.take_drop_report() is None
        for round_ in range(6):
            box.put_many("telemetry", [body] * 7)
            box.put("events", body, ttl_s=None)
            delivered += box.ack([r.seq for r in box.peek(3)])
            clock.now += 20.0
            if round_ % 2:
                report = box.take_drop_report()
                assert report is not None
                reported["dropped"] += report["dropped_total"]
                reported["expired"] += report["expired_total"]
                assert box.take_drop_report() is None  # marked reported
        clock.now += 31.0  # the last round's telemetry expires
        assert box.prune() > 0
        stats = assert_adds_up(box)
        produced = sum(stats["produced"].values())
        assert produced == 6 * 8
        assert sum(stats["delivered"].values()) == delivered
        assert produced == delivered + stats["dropped_total"] + stats["expired_total"] + stats["pending"]
        assert stats["dropped_total"] > 0
        assert stats["expired_total"] > 0
        assert reported["dropped"] + stats["unreported_dropped"] == stats["dropped_total"]
        assert reported["expired"] + stats["unreported_expired"] == stats["expired_total"]


def test_drop_report_can_be_enqueued_atomically(box: Outbox, tmp_path: Path) -> None:
    body = b"d" * 200
    with Outbox(tmp_path / "small.db", max_bytes=size_of("telemetry", body) * 2) as small:
        small.put_many("telemetry", [body] * 4)  # two dropped
        report = small.take_drop_report(enqueue="telemetry", priority=9)
        assert report is not None
        assert report["dropped"] == {"telemetry": 2}
        first = small.peek(1)[0]
        assert first.seq == report["seq"]
        assert first.priority == 9
        stored = json.loads(first.payload)
        assert stored["kind"] == "outbox_dropped"
        assert stored["dropped"] == {"telemetry": 2}
        assert stored["seq"] == report["seq"]
        # Storing the report evicted more records: the next report says so.
        follow = small.take_drop_report()
        assert follow is not None
        assert follow["dropped_total"] == small.stats()["dropped_total"] - 2
    assert box.take_drop_report(enqueue="telemetry") is None  # nothing to report: nothing stored
    assert everything(box) == []


# --------------------------------------------------------------------------- concurrency and crashes


def test_threads_share_one_outbox_without_losing_or_duplicating(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    producers = 4
    produced: list[list[int]] = [[] for _ in range(producers)]
    delivered: list[int] = []
    payload_seqs_ok: list[bool] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def guard(fn: Any) -> Any:
        def run(*args: Any) -> None:
            try:
                fn(*args)
            except BaseException as exc:
                errors.append(exc)
                stop.set()

        return run

    @guard
    def produce(k: int) -> None:
        for i in range(40):
            if i % 4 == 0:
                produced[k].extend(box.put_many("events", [{"k": k, "i": i, "j": j} for j in range(5)]))
            else:
                produced[k].append(box.put("telemetry", {"k": k, "i": i}, priority=i % 3))

    @guard
    def consume(done: threading.Event) -> None:
        while not stop.is_set():
            finished = done.is_set()  # read before peeking: nothing new can arrive after
            records = box.peek(16)
            if not records:
                if finished:
                    return
                time.sleep(0.001)
                continue
            payload_seqs_ok.extend(json.loads(r.payload)["seq"] == r.seq for r in records)
            delivered.extend(r.seq for r in records)
            assert box.ack(r.seq for r in records) == len(records)

    @guard
    def metrics() -> None:
        while not stop.is_set():
            box.stats()
            time.sleep(0.002)

    done = threading.Event()
    threads = [threading.Thread(target=produce, args=(k,)) for k in range(producers)]
    consumer = threading.Thread(target=consume, args=(done,))
    meter = threading.Thread(target=metrics)
    try:
        for t in [*threads, consumer, meter]:
            t.start()
        for t in threads:
            t.join(30)
        done.set()
        consumer.join(30)
    finally:
        stop.set()
        meter.join(30)
        stats = box.stats()
        box.close()
    assert not errors, errors
    everything_put = [s for seqs in produced for s in seqs]
    assert len(everything_put) == producers * (30 + 10 * 5)
    assert len(set(everything_put)) == len(everything_put)  # no seq handed out twice
    for seqs in produced:
        assert seqs == sorted(seqs)  # increasing within each producer
    assert sorted(delivered) == sorted(everything_put)  # nothing lost, nothing twice
    assert all(payload_seqs_ok)
    assert stats["pending"] == 0
    assert sum(stats["delivered"].values()) == len(everything_put)


WRITER = r"""
import sys
from pathlib import Path
from edge_runtime.sync.outbox import Outbox

box = Outbox(Path(sys.argv[1]))
i = 0
while True:
    if i % 7 == 0:
        seqs = box.put_many("events", [{"i": i, "j": j} for j in range(3)], priority=1)
    else:
        seqs = [box.put("telemetry", {"i": i})]
    print("put", *seqs, flush=True)
    if i % 10 == 9:
        oldest = [r.seq for r in box.peek(4)]
        print("acking", *oldest, flush=True)
        box.ack(oldest)
        print("acked", *oldest, flush=True)
    i += 1
"""


def test_kill_9_mid_stream_loses_nothing_committed(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    extra = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *([extra] if extra else [])])}
    lines: list[str] = []
    with subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        assert proc.stderr is not None
        try:
            while sum(line.startswith("put") for line in lines) < 300:
                line = proc.stdout.readline()
                assert line, f"the writer died early: {proc.stderr.read()}"
                lines.append(line)
        finally:
            proc.send_signal(signal.SIGKILL)  # mid-stream: it is writing as fast as it can
            # read() and not communicate(): the lines readline() buffered must not be skipped
            lines += proc.stdout.read().splitlines(keepends=True)
            proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    seen: dict[str, set[int]] = {"put": set(), "acking": set(), "acked": set()}
    for line in lines:
        if line.endswith("\n"):  # else torn by the kill
            kind, *numbers = line.split()
            seen[kind].update(int(n) for n in numbers)
    committed, acked = seen["put"], seen["acked"]
    in_flight = seen["acking"] - acked  # the kill may have hit before or after this ack committed
    assert committed
    assert acked
    assert len(in_flight) <= 4
    with Outbox(path) as box:
        stats = box.stats()
        present = {r.seq for r in everything(box)}
        assert committed - acked - in_flight <= present  # every committed, un-acked record survived
        assert not (present & acked)
        assert stats["quarantined"] == 0
        newest = box.put("telemetry", {"after": "restart"})
        assert newest > max(present | committed)
        assert_adds_up(box)
        if outbox_mod._boot_id() is not None:  # same boot: no gap, nothing reported lost
            assert newest == max(present | committed) + 1
            assert box.take_drop_report() is None


def test_power_loss_resumes_numbering_after_the_durable_reservation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """synchronous=NORMAL may lose the newest commits with power: their seqs must not come back."""
    monkeypatch.setattr(outbox_mod, "_boot_id", lambda: "boot-1")
    path = tmp_path / "outbox.db"
    box = Outbox(path)
    try:
        kept = box.put_many("telemetry", [{"i": i} for i in range(5)])
        with closing(sqlite3.connect(path)) as raw:  # everything so far reaches the main file
            assert raw.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
        survived = tmp_path / "after-power-loss.db"
        shutil.copyfile(path, survived)  # the WAL frames written from now on are "lost"
        lost = [box.put("telemetry", {"i": i}) for i in range(5, 8)]
    finally:
        box.close()
    monkeypatch.setattr(outbox_mod, "_boot_id", lambda: "boot-2")  # the machine rebooted
    with Outbox(survived) as again:
        assert [r.seq for r in everything(again)] == kept
        seq = again.put("telemetry", {"i": "new"})
        assert seq > max(lost)  # not reused, although the database never saw 6..8
        report = again.take_drop_report()
        assert report is not None
        (incident,) = report["incidents"]
        assert incident["kind"] == "unclean_shutdown"
        assert incident["first_seq"] == max(kept) + 1
        assert incident["last_seq"] == seq - 1
    # The same image on the same boot is a kill -9: the OS had every page, no gap.
    monkeypatch.setattr(outbox_mod, "_boot_id", lambda: "boot-1")
    crash = tmp_path / "crash"
    crash.mkdir()
    with Outbox(crash / "o.db") as live:
        live.put_many("events", [{}, {}, {}])
        for suffix in ("", "-wal"):
            shutil.copyfile(crash / f"o.db{suffix}", crash / f"image.db{suffix}")
    with Outbox(crash / "image.db") as image:
        assert [r.seq for r in everything(image)] == [1, 2, 3]
        assert image.put("events", {}) == 4
        assert image.take_drop_report() is None


# --------------------------------------------------------------------------- opening


@pytest.mark.parametrize("damage", ["garbage", "truncated", "state row deleted"])
def test_corrupt_database_is_quarantined_and_reported(
    tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    path = tmp_path / "outbox.db"
    old_max = 0
    if damage == "garbage":
        path.write_bytes(b"definitely not an SQLite database\n" * 200)
    else:
        with Outbox(path, clock=clock) as box:
            old_max = box.put_many("telemetry", [b"p" * 500] * 200)[-1]
        if damage == "truncated":
            with path.open("r+b") as fh:
                fh.truncate(path.stat().st_size // 2)
        else:  # a valid SQLite file that passes quick_check, but not a usable outbox
            with closing(sqlite3.connect(path)) as raw:
                raw.execute("DELETE FROM state")
                raw.commit()
    damaged = path.read_bytes()
    with caplog.at_level(logging.ERROR, logger="edge_runtime.sync.outbox"), Outbox(path, clock=clock) as box:
        seq = box.put("telemetry", {"after": "quarantine"})
        stats = box.stats()
        report = box.take_drop_report()
    assert "is corrupt" in caplog.text
    assert stats["quarantined"] == 1
    assert stats["incidents"][0]["kind"] == "quarantined"
    assert report is not None
    (incident,) = report["incidents"]
    assert incident["kind"] == "quarantined"
    moved = Path(incident["moved_to"])
    assert moved.parent == tmp_path
    assert moved.name.startswith("outbox.db.corrupt-")
    assert moved.read_bytes() == damaged  # kept for inspection, not deleted
    assert seq > old_max
    assert seq > incident["seq_resumed_after"] >= clock.now * 1_000_000 - 1
    if damage == "state row deleted":
        assert incident["lost_pending"] == 200  # salvaged from the bad file
    with Outbox(path, clock=clock) as box:  # the fresh outbox is healthy and keeps counting
        assert box.stats()["quarantined"] == 1
        assert box.take_drop_report() is None
        assert box.put("telemetry", {}) == seq + 1


def test_directory_path_is_refused_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(OutboxError, match="is a directory") as err:
        Outbox(tmp_path)
    assert str(tmp_path) in str(err.value)
    assert "outbox.db" in str(err.value)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    with pytest.raises(OutboxError, match="cannot create the outbox directory"):
        Outbox(blocker / "outbox.db")


def test_newer_schema_and_foreign_database_are_refused_not_quarantined(tmp_path: Path) -> None:
    newer = tmp_path / "newer.db"
    Outbox(newer).close()
    with closing(sqlite3.connect(newer)) as raw:
        raw.execute("PRAGMA user_version = 99")
    with pytest.raises(OutboxError, match=r"schema version 99.*newer edgert.*Upgrade edgert"):
        Outbox(newer)
    foreign = tmp_path / "foreign.db"
    with closing(sqlite3.connect(foreign)) as raw:
        raw.execute("CREATE TABLE photos (id INTEGER)")
        raw.commit()
    with pytest.raises(OutboxError, match="another program"):
        Outbox(foreign)
    assert sorted(p.name for p in tmp_path.iterdir() if ".corrupt-" in p.name) == []


def test_wal_is_truncated_and_space_freed_when_emptied(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with Outbox(path) as box:
        seqs = box.put_many("telemetry", [b"w" * 1000] * 300)
        full = box.stats()["file_bytes"]
        assert Path(f"{path}-wal").stat().st_size > 0
        assert box.ack(seqs) == 300
        assert Path(f"{path}-wal").stat().st_size == 0
        assert box.stats()["file_bytes"] < full / 10
        with closing(sqlite3.connect(path)) as raw:
            assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert raw.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda b: b.put("bad/stream", {}), "invalid outbox stream name"),
        (lambda b: b.put("", {}), "invalid outbox stream name"),
        (lambda b: b.put("events", {"seq": 1}), "reserved key"),
        (lambda b: b.put("events", {"x": float("nan")}), "not JSON-serialisable"),
        (lambda b: b.put("events", {"x": object()}), "not JSON-serialisable"),
        (lambda b: b.put("events", "text"), "must be a mapping or bytes"),
        (lambda b: b.put("events", {}, priority=True), "priority"),
        (lambda b: b.put("events", {}, ttl_s=-1.0), "ttl_s"),
        (lambda b: b.peek(-1), "limit"),
        (lambda b: b.ack(["1"]), "integer seqs"),
    ],
)
def test_invalid_input_raises_outbox_error(box: Outbox, call: Any, match: str) -> None:
    with pytest.raises(OutboxError, match=match):
        call(box)
    assert box.stats()["last_seq"] == 0


def test_closed_outbox_raises_and_close_is_idempotent(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    box.close()
    box.close()
    assert box.closed
    with pytest.raises(OutboxError, match="is closed"):
        box.put("events", {})
    with pytest.raises(OutboxError, match="max_bytes"):
        Outbox(tmp_path / "x.db", max_bytes=0)
    with pytest.raises(OutboxError, match="synchronous"):
        Outbox(tmp_path / "x.db", synchronous="OFF")  # type: ignore[arg-type]


def test_full_synchronous_mode_works(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", synchronous="FULL") as box:
        seqs = box.put_many("events", [{"i": i} for i in range(3)])
        assert box.ack(seqs[:1]) == 1
        with closing(sqlite3.connect(tmp_path / "o.db")) as raw:
            assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with Outbox(tmp_path / "o.db", synchronous="FULL") as box:
        assert [r.seq for r in everything(box)] == seqs[1:]
        assert box.put("events", {}) == 4


# --------------------------------------------------------------------------- property


MAX_BYTES = 1500
STREAMS = st.sampled_from(["telemetry", "events", "update"])


class OutboxMachine(RuleBasedStateMachine):
    """Random put / peek / ack / expire / report / reopen sequences keep every invariant."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="outbox-prop-"))
        self.clock = FakeClock()
        self.box = self.open()
        self.meta: dict[int, tuple[str, int, int, float | None]] = {}  # seq -> stream, prio, size, expires
        self.acked: set[int] = set()
        self.max_seq = 0
        self.reported = 0

    def open(self) -> Outbox:
        return Outbox(self.dir / "o.db", max_bytes=MAX_BYTES, default_ttl_s=None, clock=self.clock)

    def pending(self) -> dict[int, Record]:
        return {r.seq: r for r in everything(self.box)}

    @initialize()
    def start(self) -> None:
        assert self.box.stats()["pending"] == 0

    @rule(
        stream=STREAMS,
        priority=st.integers(0, 2),
        size=st.integers(0, 700),
        ttl=st.none() | st.sampled_from([5.0, 30.0]),
        count=st.integers(1, 3),
    )
    def put(self, stream: str, priority: int, size: int, ttl: float | None, count: int) -> None:
        body = bytes(size)
        record = size_of(stream, body)
        before = self.pending()
        last_seq = self.box.stats()["last_seq"]
        if record > MAX_BYTES:
            with pytest.raises(OutboxError):
                self.box.put_many(stream, [body] * count, priority=priority, ttl_s=ttl)
            assert self.pending().keys() == before.keys()
            assert self.box.stats()["last_seq"] == last_seq
            return
        seqs = self.box.put_many(stream, [body] * count, priority=priority, ttl_s=ttl)
        assert seqs == list(range(seqs[0], seqs[0] + count))
        assert seqs[0] > self.max_seq
        self.max_seq = seqs[-1]
        for seq in seqs:
            self.meta[seq] = (stream, priority, record, None if ttl is None else self.clock.now + ttl)
        after = self.pending()
        assert set(after) - set(before) <= set(seqs)
        gone = set(before) - set(after)
        evicted = {s for s in gone if not self.expired(s)}
        if not evicted:
            return
        # Evicted: only priorities up to the new records', lowest priority then oldest first,
        # and no more than needed.
        key = {s: (self.meta[s][1], s) for s in self.meta}
        assert max(self.meta[s][1] for s in evicted) <= priority
        survivors = [s for s in after if self.meta[s][1] <= priority and s not in seqs]
        if survivors:
            assert max(key[s] for s in evicted) < min(key[s] for s in survivors)
        if len(seqs) == 1 and seqs[0] in after:
            newest_victim = max(evicted, key=lambda s: key[s])
            assert sum(self.meta[s][2] for s in after) + self.meta[newest_victim][2] > MAX_BYTES

    def expired(self, seq: int) -> bool:
        expires = self.meta[seq][3]
        return expires is not None and expires <= self.clock.now

    @rule(n=st.integers(0, 6), noise=st.booleans())
    def ack(self, n: int, noise: bool) -> None:
        before = set(self.pending())
        seqs = [r.seq for r in self.box.peek(n)]
        if noise:
            seqs += [self.max_seq + 10, *seqs[:1], *sorted(self.acked)[:2]]
        assert self.box.ack(seqs) == len(set(seqs) & before)
        self.acked |= set(seqs) & before

    @rule(dt=st.sampled_from([1.0, 6.0, 40.0]))
    def advance_clock(self, dt: float) -> None:
        self.clock.now += dt

    @rule()
    def prune(self) -> None:
        self.box.prune()

    @rule()
    def take_report(self) -> None:
        report = self.box.take_drop_report()
        if report is not None:
            self.reported += report["dropped_total"] + report["expired_total"]

    @rule()
    def reopen(self) -> None:
        self.box.close()
        self.box = self.open()

    @invariant()
    def adds_up(self) -> None:
        stats = assert_adds_up(self.box)
        records = everything(self.box)
        assert [r.seq for r in records] == sorted(
            (r.seq for r in records), key=lambda s: (-self.meta[s][1], s)
        )  # priority desc, then seq asc
        pending = {r.seq for r in records}
        assert pending <= set(self.meta)
        assert not (pending & self.acked)
        assert not any(self.expired(s) for s in pending)
        assert sum(stats["produced"].values()) == len(self.meta)
        assert sum(stats["delivered"].values()) == len(self.acked)
        lost = len(self.meta) - len(self.acked) - len(pending)
        assert stats["dropped_total"] + stats["expired_total"] == lost
        assert self.reported + stats["unreported_dropped"] + stats["unreported_expired"] == lost
        assert stats["last_seq"] >= self.max_seq

    def teardown(self) -> None:
        self.box.close()
        shutil.rmtree(self.dir, ignore_errors=True)


OutboxMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_outbox_state_machine = OutboxMachine.TestCase
