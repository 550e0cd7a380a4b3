"""spa-server stats: counts from the event store the daemon wrote."""

from __future__ import annotations

import os
from pathlib import Path

from spa.server import admin
from spa.server.events import Event
from tests.server_world import World

A, B, C = "192.0.2.10", "198.51.100.7", "203.0.113.5"


def test_stats_count_what_the_daemon_recorded(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.init()
    w.enroll("alice")
    w.enroll("bob", "https")
    server = w.start()
    server.handle(w.packet("alice", duration=60), A)
    server.handle(w.packet("alice", "https", duration=60), A)
    server.handle(w.packet("bob", "https", duration=60), A)
    replayed = w.packet("bob", "https", duration=60)
    for _ in range(3):
        server.handle(replayed, B)
    server.handle(w.packet("bob", "ssh"), B)  # bob may not use ssh
    for _ in range(5):
        server.handle(b"\x01" + os.urandom(160), C)
    server.events.record(Event(w.clock.now, "dropped", source=C, service="ssh", count=40))
    server.events.record(Event(w.clock.now, "scan", source=C, service="ssh,https", count=40))
    server.events.flush()
    report = admin.stats(admin.events(w.config_path, since=None, now=w.clock.now))
    assert report["accepted"] == 4  # three opens and the first copy of the replayed one
    assert report["accepted_by_client"] == {"alice": 2, "bob": 2}
    assert report["accepted_by_service"] == {"https": 3, "ssh": 1}
    assert report["refused_by_reason"] == {"unknown_tag": 5, "replay": 2,
                                           "service_not_allowed": 1}
    assert report["refused_by_client"] == {"bob": 3}
    assert (report["dropped"], report["scans"]) == (40, 1)
    assert report["dropped_by_source"] == {C: 40}
    assert report["scans_by_source"] == {C: 1}
    assert list(report["top_sources"])[:2] == [C, B]  # type: ignore[call-overload]
    later = admin.stats(admin.events(w.config_path, since=1, now=w.clock.now + 3600))
    assert later["accepted"] == 0 and later["refused"] == 0


def test_failed_attempts_by_country_and_by_month_from_a_geoip_database(
        tmp_path: Path) -> None:
    from spa.server.geoip import Countries
    from tests.geoip_db import make_country_db

    db = make_country_db(tmp_path / "c.mmdb", {"192.0.2.0/24": "FR", "198.51.100.0/24": "BR",
                                               "2001:db8::/32": "JP"})
    october, november = 1_790_000_000.0, 1_792_700_000.0  # 2026-09-21, 2026-10-22 UTC
    rows = [Event(october, "refused", reason="bad_mac", source=A, count=7),
            Event(october, "dropped", source=B, service="ssh", count=3),
            Event(november, "refused", reason="replay", source="2001:db8::5", count=2),
            Event(november, "dropped", source=C, service="ssh", count=4),  # not in the db
            Event(november, "scan", source=B, service="ssh,https", count=20),
            Event(november, "accepted", client="alice", source=A, service="ssh")]
    report = admin.stats(rows, countries=Countries(db))
    assert report["geoip"] is True
    assert report["failed_by_country"] == {"FR": 7, "-": 4, "BR": 3, "JP": 2}
    assert report["scans_by_country"] == {"BR": 1}
    assert report["monthly"] == {
        "2026-09": {"failed": 10, "scans": 0, "failed_by_country": {"FR": 7, "BR": 3}},
        "2026-10": {"failed": 6, "scans": 1, "failed_by_country": {"-": 4, "JP": 2}},
    }
    plain = admin.stats(rows)  # no database: the same counts, country unknown
    assert plain["geoip"] is False
    assert plain["failed_by_country"] == {"-": 16}


def test_a_missing_or_foreign_geoip_file_is_one_clear_error(tmp_path: Path) -> None:
    import pytest

    from spa.server.errors import LocalError
    from spa.server.geoip import Countries

    with pytest.raises(LocalError, match="does not exist; install one"):
        Countries(tmp_path / "none.mmdb")
    junk = tmp_path / "junk.mmdb"
    junk.write_bytes(b"not a database" * 10)
    with pytest.raises(LocalError, match="is not a MaxMind DB file"):
        Countries(junk)


def test_the_summary_gives_the_same_report_as_every_row(tmp_path: Path) -> None:
    """The dashboard reads sums per month, not every row: same report."""
    from spa.server.events import read_events, read_summary
    from spa.server.geoip import Countries
    from tests.geoip_db import make_country_db

    w = World(tmp_path)
    w.init()
    w.enroll("alice")
    server = w.start()
    for step in range(40):  # a day apart: two months of knocks, refusals, drops, scans
        server.handle(w.packet("alice", duration=60), A)
        server.handle(b"\x01" + os.urandom(160), C)
        if step % 3 == 0:
            server.events.record(Event(w.clock.now, "dropped", source=B, service="ssh",
                                       count=step))
            server.events.record(Event(w.clock.now, "scan", source=B, service="ssh", count=9))
        server.events.flush()
        w.clock.advance(86400)
    db = tmp_path / "state" / "events.sqlite3"
    rows, summary = read_events(db), read_summary(db)
    assert len(summary) < len(rows) / 4
    countries = Countries(make_country_db(tmp_path / "c.mmdb", {"198.51.100.0/24": "BR"}))
    assert admin.stats(summary, countries=countries) == admin.stats(rows, countries=countries)
    since = w.clock.now - 10 * 86400
    assert admin.stats(read_summary(db, since=since)) == admin.stats(read_events(db,
                                                                                 since=since))
