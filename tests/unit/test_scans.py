"""Drop counters -> dropped attempts and scans (sans-IO)."""

from __future__ import annotations

from spa.server.scans import SCAN_ATTEMPTS, SCAN_WINDOW, Dropped, Knock, Scan, ScanDetector

NOW = 1_800_000_000.0


def test_counters_become_attempts_since_the_last_reading() -> None:
    detector = ScanDetector()
    dropped, scans = detector.observe({("198.51.100.7", 22): 3}, NOW)
    assert dropped == [Dropped("198.51.100.7", 22, 3)] and scans == []
    dropped, _ = detector.observe({("198.51.100.7", 22): 5}, NOW + 5)
    assert dropped == [Dropped("198.51.100.7", 22, 2)]
    dropped, _ = detector.observe({("198.51.100.7", 22): 5}, NOW + 10)
    assert dropped == []
    dropped, _ = detector.observe({("198.51.100.7", 22): 1}, NOW + 700)  # timed out, back
    assert dropped == [Dropped("198.51.100.7", 22, 1)]


def test_two_protected_ports_or_many_attempts_are_a_scan_reported_once() -> None:
    detector = ScanDetector()
    _, scans = detector.observe({("198.51.100.7", 22): 1, ("198.51.100.7", 443): 1,
                                 ("203.0.113.5", 22): 1}, NOW)
    assert scans == [Scan("198.51.100.7", (22, 443), 2)]
    _, scans = detector.observe({("198.51.100.7", 22): 9, ("198.51.100.7", 443): 9,
                                 ("203.0.113.5", 22): 1}, NOW + 5)
    assert scans == [], "one report per source per window"
    _, scans = detector.observe({("198.51.100.7", 22): 9, ("198.51.100.7", 443): 9,
                                 ("203.0.113.5", 22): 1 + SCAN_ATTEMPTS}, NOW + 10)
    assert scans == [Scan("203.0.113.5", (22,), 1 + SCAN_ATTEMPTS)], "brute force on one port"
    _, scans = detector.observe({("198.51.100.7", 22): 10, ("198.51.100.7", 443): 10,
                                 ("203.0.113.5", 22): 1 + SCAN_ATTEMPTS}, NOW + SCAN_WINDOW + 1)
    assert [s.source for s in scans] == ["198.51.100.7"], "still at it after a window"


def test_history_is_forgotten_after_the_window() -> None:
    detector = ScanDetector()
    detector.observe({("198.51.100.7", 22): 1}, NOW)
    _, scans = detector.observe({("198.51.100.7", 22): 1, ("198.51.100.7", 443): 1},
                                NOW + SCAN_WINDOW + 1)
    assert scans == [], "one port now and one a window ago are not a scan"
    assert list(detector._history) == ["198.51.100.7"]
    detector.observe({("198.51.100.7", 22): 1, ("198.51.100.7", 443): 1}, NOW + 3 * SCAN_WINDOW)
    assert detector._history == {}


def test_a_client_that_knocked_may_probe_its_port_but_not_a_second_one() -> None:
    """A refused client (clock skew, revoked, a wrong code) keeps probing the
    port it asked for while it waits: not a brute-force run."""
    client, stranger = "192.0.2.10", "203.0.113.5"
    detector = ScanDetector()
    many = 5 * SCAN_ATTEMPTS
    knocked = {client: Knock(NOW - 10, frozenset({22}))}
    dropped, scans = detector.observe({(client, 22): many, (stranger, 22): many}, NOW,
                                      knocked)
    assert scans == [Scan(stranger, (22,), many)]
    assert Dropped(client, 22, many) in dropped, "its drops are still counted"
    _, scans = detector.observe({(client, 22): many, (client, 443): SCAN_ATTEMPTS}, NOW + 5,
                                knocked)
    assert scans == [Scan(client, (443,), SCAN_ATTEMPTS)], "another port counts as anyone's"
    later = ScanDetector()
    _, scans = later.observe({(client, 22): many}, NOW + SCAN_WINDOW, knocked)
    assert scans == [Scan(client, (22,), many)], "a knock a window ago spares nothing"


def test_the_last_reading_carries_over_so_a_restart_records_nothing_old() -> None:
    """Issue 12: each start once took the kernel's counters of the last
    minutes for new drops (249 of one user's SYNs, at every restart)."""
    first = ScanDetector()
    first.observe({("198.51.100.7", 22): 249}, NOW)
    again = ScanDetector(first.last)
    assert again.observe({("198.51.100.7", 22): 249}, NOW + 60) == ([], [])
    assert again.observe({("198.51.100.7", 22): 251}, NOW + 65)[0] == [
        Dropped("198.51.100.7", 22, 2)]
