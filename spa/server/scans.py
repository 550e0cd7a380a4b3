"""Dropped attempts and port scans, from the firewall's per-(source, port)
drop counters (nftables: the drops_v4/v6 sets; read every few seconds).

Invariants (issue 8; sans-IO: counters and `now` in, findings out):
- `observe` turns cumulative counters into the attempts made since the last
  reading; a counter lower than before (its element timed out and came back)
  counts from zero.
- A source is a scan when, within SCAN_WINDOW seconds, it tried SCAN_PORTS
  or more protected ports, or SCAN_ATTEMPTS or more attempts in all.  A scan
  is reported once per source per SCAN_WINDOW, however long it goes on.
- A source that sent an authenticated knock within the window (`knocked`,
  even one refused afterwards: clock skew, revoked, a wrong code) is spared
  on the ports its client may open: its client keeps probing its port while
  it waits (a refused `spa-client open --timeout 4` made 23 to 43 attempts),
  and that proves nothing.  Those drops are still counted; attempts on any
  other port count as anyone's (tests/netns/test_dashboard_browser.py,
  tests/netns/test_counts.py).
- Counters are deltas against the last reading, which the daemon keeps in
  the state directory (`last`, `ScanDetector(last=...)`), so a restart
  records nothing the kernel counted before it.
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


class Knock(NamedTuple):
    """An authenticated knock from a source: when, and the ports its client
    may open (the ones it will probe)."""

    when: float
    ports: frozenset[int]


class ScanDetector:
    def __init__(self, last: Counters | None = None) -> None:
        self._last: Counters = dict(last or {})
        self._history: dict[str, deque[tuple[float, int, int]]] = {}  # (time, port, n)
        self._reported: dict[str, float] = {}

    @property
    def last(self) -> Counters:
        """The last reading (the daemon saves it: deltas survive a restart)."""
        return self._last

    def observe(self, counters: Counters, now: float, knocked: Mapping[str, Knock] | None = None
                ) -> tuple[list[Dropped], list[Scan]]:
        """`knocked`: source -> its last authenticated knock."""
        knocked = knocked or {}
        dropped = []
        for key, total in counters.items():
            before = self._last.get(key, 0)
            delta = total - before if total >= before else total
            if delta > 0:
                dropped.append(Dropped(key[0], key[1], delta))
        self._last = dict(counters)
        for item in dropped:
            knock = knocked.get(item.source)
            if knock is not None and knock.when > now - SCAN_WINDOW and item.port in knock.ports:
                continue  # its client probing its own port: counted, but no evidence
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
            if (len(ports) >= SCAN_PORTS or attempts >= SCAN_ATTEMPTS) and (
                    last is None or now - last >= SCAN_WINDOW):
                self._reported[source] = now
                scans.append(Scan(source, ports, attempts))
        return sorted(dropped), scans
