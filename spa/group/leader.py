"""Which configured endpoint is etcd's leader, so that a claim's transaction
goes there first (issue 18: a write sent to a follower is forwarded to the
leader, one more hop: 0.1-0.3 ms a claim on this machine, docs/benchmarks.md,
"The etcd round trip path by path").

Invariants:
- The leader is only ever one of the configured endpoints: a client URL that
  etcd advertises for its leader and that is not in the member's config is
  never dialled; then the configured order stands (as without this module).
- Pure: etcd's answers (its maintenance status, which names the leader's
  member id and the raft term, and its member list, which maps ids to client
  URLs) in, an index out; time is an argument.
- Forgotten, and learned again, when the leader fails a call (`lost`) or an
  answer carries a newer raft term than the one it was learned at (an
  election happened: `seen_term`).  One learning at a time, and after a
  failed or fruitless one not again for RETRY seconds unless the term moves.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

RETRY = 5.0  # seconds before learning again after a failed or fruitless try


def _host_port(url: str) -> tuple[str, int] | None:
    """https://host:port (an IPv6 host in brackets) -> (host, port), host in
    lower case; None for anything else."""
    scheme, _, rest = url.strip().partition("://")
    host, _, port = rest.rstrip("/").rpartition(":")
    if scheme.lower() != "https" or not host or not (port.isascii() and port.isdigit()):
        return None
    return host.strip("[]").lower(), int(port)


def leader_index(endpoints: Sequence[str], status: Mapping[str, Any],
                 members: Mapping[str, Any]) -> int | None:
    """The index in `endpoints` of the leader that `status` names, by the
    client URLs `members` lists for it; None when there is no leader, or
    none of its URLs is a configured endpoint."""
    leader = str(status.get("leader", "0"))
    if leader in ("", "0"):
        return None
    for member in members.get("members", []):
        if str(member.get("ID", "")) != leader:
            continue
        theirs = {_host_port(str(url)) for url in member.get("clientURLs", [])} - {None}
        for index, url in enumerate(endpoints):
            if _host_port(url) in theirs:
                return index
    return None


def term_of(answer: Mapping[str, Any]) -> int:
    """The raft term an answer of etcd's carries in its header (0 if none)."""
    try:
        return int(answer.get("header", {}).get("raft_term", 0))
    except (TypeError, ValueError, AttributeError):
        return 0


class Leader:
    """What this member knows of the leader, shared by its claim threads."""

    def __init__(self, count: int) -> None:
        self._count = count
        self._lock = threading.Lock()
        self.index: int | None = None  # the leader's endpoint, when known
        self.term = 0  # the raft term it was learned at
        self._learning = False
        self._not_before = 0.0  # no learning before this time (after a failed try)

    def first(self, current: int) -> int:
        """Where a claim starts: the leader's endpoint, else `current`."""
        index = self.index
        return current if index is None else index

    def should_learn(self, now: float) -> bool:
        """Whether to learn now (and if so, the caller must end with learned
        or failed): unknown, nobody learning, not just failed; never with a
        single endpoint (nothing to choose)."""
        with self._lock:
            if self._count < 2 or self.index is not None or self._learning or \
                    now < self._not_before:
                return False
            self._learning = True
            return True

    def learned(self, index: int | None, term: int, now: float) -> None:
        """etcd's status named this endpoint (None: none of ours) at this
        raft term (0: it did not say).  An answer older than a term already
        seen is not taken (an election came since): learned again."""
        with self._lock:
            self._learning = False
            if term and term < self.term:
                return
            self.index, self.term = index, max(term, self.term)
            if index is None:
                self._not_before = now + RETRY

    def failed(self, now: float) -> None:
        with self._lock:
            self._learning = False
            self._not_before = now + RETRY

    def lost(self, index: int) -> None:
        """The endpoint at index failed a call: if it was the leader, forget it."""
        with self._lock:
            if self.index == index:
                self.index = None
                self._not_before = 0.0

    def seen_term(self, term: int) -> None:
        """An answer carried this raft term: a newer one than we learned at
        means an election; forget the leader and learn again."""
        if term <= self.term:
            return
        with self._lock:
            if term > self.term:
                self.index = None
                self.term = term
                self._not_before = 0.0
