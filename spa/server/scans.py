"""Dropped attempts and port scans, from the firewall's per-(source, port)
drop counters (nftables: the drops_v4/v6 sets; read every few seconds).

Invariants (issue 8; sans-IO: counters and `now` in, findings out):
- `observe` turns cumulative counters into the attempts made since the last
  reading; a counter lower than before (its element timed out and came back)
  counts from zero.
- A source is a scan when, within SCAN_WINDOW seconds, it tried SCAN_PORTS
  or more protected ports, or SCAN_ATTEMPTS or more attempts in all.  A scan
  is reported once per source per SCAN_WINDOW, however long it goes on.
- The attempts rule spares a source that sent an authenticated knock within
  the window (`knocked`): a client whose knock was refused (clock skew,
  revoked, a wrong code) keeps probing its one port while it waits, and that
  is not a brute-force run (a refused `spa-client open --timeout 4` made 23
  to 43 attempts, enough to be called a scan before this rule; the check is
  tests/netns/test_dashboard_browser.py).  Its drops
  are still counted, and trying a second port is still a scan.
- Memory is bounded: the last counters mirror the kernel's sets (bounded by
  their size); per-source history keeps only the window.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import NamedTuple

SCAN_WINDOW = 60.0  # seconds
SCAN_PORTS = 2  # distinct protected ports from one source within the window
SCAN_ATTEMPTS = 20  # dropped attempts from one source within the window

Counters = dict[tuple[str, int], int]  # (source, port) -> packets dropped so far


class Dropped(NamedTuple):
    source: str
    port: int
    attempts: int  # since the last reading


class Scan(NamedTuple):
    source: str
    ports: tuple[int, ...]
    attempts: int  # within the window


class ScanDetector:
    def __init__(self) -> None:
        self._last: Counters = {}
        self._history: dict[str, deque[tuple[float, int, int]]] = {}  # (time, port, n)
        self._reported: dict[str, float] = {}

    def observe(self, counters: Counters, now: float, knocked: Mapping[str, float] | None = None
                ) -> tuple[list[Dropped], list[Scan]]:
        """`knocked`: source -> when it last sent an authenticated knock."""
        knocked = knocked or {}
        dropped = []
        for key, total in counters.items():
            before = self._last.get(key, 0)
            delta = total - before if total >= before else total
            if delta > 0:
                dropped.append(Dropped(key[0], key[1], delta))
        self._last = dict(counters)
        for item in dropped:
            self._history.setdefault(item.source, deque()).append(
                (now, item.port, item.attempts))
        scans = []
        for source in list(self._history):
            history = self._history[source]
            while history and history[0][0] <= now - SCAN_WINDOW:
                history.popleft()
            if not history:
                del self._history[source]
                self._reported.pop(source, None)
                continue
            ports = tuple(sorted({port for _, port, _ in history}))
            attempts = sum(n for _, _, n in history)
            last = self._reported.get(source)
            client = knocked.get(source, -SCAN_WINDOW) > now - SCAN_WINDOW
            if (len(ports) >= SCAN_PORTS or (attempts >= SCAN_ATTEMPTS and not client)) and (
                    last is None or now - last >= SCAN_WINDOW):
                self._reported[source] = now
                scans.append(Scan(source, ports, attempts))
        return sorted(dropped), scans
