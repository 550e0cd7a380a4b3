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
    assert report["scans_by_source"] == {C: 1}
    assert list(report["top_sources"])[:2] == [C, B]  # type: ignore[call-overload]
    later = admin.stats(admin.events(w.config_path, since=1, now=w.clock.now + 3600))
    assert later["accepted"] == 0 and later["refused"] == 0
