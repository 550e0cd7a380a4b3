"""What a compat knock causes is marked legacy: events, log lines, metrics;
an event store an older version made gets the column (spa/server/events.py)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from spa.server.events import EventSink, read_events
from spa.server.metrics import Metrics

OLD_SCHEMA = """
CREATE TABLE events (id INTEGER PRIMARY KEY, time REAL NOT NULL, outcome TEXT NOT NULL,
    action TEXT, reason TEXT, client TEXT, source TEXT, service TEXT, duration INTEGER,
    count INTEGER NOT NULL DEFAULT 1);
INSERT INTO events (time, outcome, reason, source) VALUES (1.0, 'refused', 'bad_mac', '192.0.2.1');
"""  # the events table as commit b29a68c made it


def test_legacy_refusals_are_marked_and_counted_apart(tmp_path: Path) -> None:
    lines: list[str] = []
    sink = EventSink(tmp_path / "events.sqlite3", lines.append, retention_days=1)
    sink.refuse(10.0, "no_hmac", "oldphone", "198.51.100.7", legacy=True)
    sink.refuse(10.0, "unknown_tag", None, "198.51.100.7")
    written = sink.flush(11.0)
    assert sorted(lines) == ["refused reason=no_hmac client=oldphone src=198.51.100.7 legacy",
                             "refused reason=unknown_tag src=198.51.100.7"]
    metrics = Metrics()
    metrics.observe(written)
    assert metrics.registry.get_sample_value(
        "spa_legacy_knocks_total", {"outcome": "refused", "reason": "no_hmac"}) == 1
    assert metrics.registry.get_sample_value(
        "spa_knocks_total", {"outcome": "refused", "reason": "no_hmac"}) is None
    sink.close()
    assert sorted(e.legacy for e in read_events(tmp_path / "events.sqlite3")) == [False, True]


def test_an_event_store_made_before_legacy_gets_the_column(tmp_path: Path) -> None:
    path = tmp_path / "events.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA)
    db.close()
    path.chmod(0o600)
    assert [e.legacy for e in read_events(path)] == [False]  # a reader before the daemon
    sink = EventSink(path, lambda line: None, retention_days=1)
    sink.refuse(2.0, "gpg_mode", None, "192.0.2.2", legacy=True)
    sink.close()
    assert [(e.reason, e.legacy) for e in read_events(path)] == [("bad_mac", False),
                                                                 ("gpg_mode", True)]
