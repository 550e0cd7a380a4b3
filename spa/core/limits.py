"""Limits on forged packets that carry a live knock tag.

A knock tag is not a secret from whoever sees a client's packet on the wire:
with a captured tag an attacker can send packets that pass the tag lookup and
cost the server an HMAC each.  This module bounds that work
(docs/threat-model.md, "Floods"; docs/protocol.md, "Verification order").

Invariants:
- Only authentication failures count (a bad MAC, a bad ciphertext, a body
  that does not parse: what nobody holding the keys would send).  Packets that
  authenticate never count, whatever happens to them next.
- Counts are per knock tag and per source address, in fixed one-second
  windows.  Once a tag (or a source) has `per_tag` (`per_source`) failures in
  the current second, further packets with that tag (from that source) are
  refused before any cryptography until the second ends.
- A source from which a client authenticated within `trust_seconds` keeps
  passing for that client, so a flood that spoofs or shares a tag cannot lock
  a known client out.  A client on a new address waits at most until the
  flood stops or the tag rotates (the next step, <= 30 s).
- Memory is bounded: the counters are cleared every second and hold at most
  `max_sources` sources; the trusted set holds only authenticated pairs and is
  cleared when it reaches `max_trusted`.
- Time is an argument (`now`, Unix seconds).
"""

from __future__ import annotations

from collections.abc import Hashable

PER_TAG = 200  # authentication failures per tag per second before the tag is shut
PER_SOURCE = 50  # authentication failures per source address per second
TRUST_SECONDS = 3600.0  # a (client, source) pair that authenticated passes this long
MAX_SOURCES = 65_536  # sources counted per second (beyond: only the tag counts)
MAX_TRUSTED = 65_536  # trusted pairs kept (only authenticated packets add one)


class FailureLimiter:
    __slots__ = ("_refused", "_second", "_sources", "_tag_clients", "_tags", "_trusted",
                 "max_sources", "max_trusted", "per_source", "per_tag", "trust_seconds")

    def __init__(self, *, per_tag: int = PER_TAG, per_source: int = PER_SOURCE,
                 trust_seconds: float = TRUST_SECONDS, max_sources: int = MAX_SOURCES,
                 max_trusted: int = MAX_TRUSTED) -> None:
        """Raises ValueError for a limit below 1."""
        if min(per_tag, per_source, max_sources, max_trusted) < 1 or trust_seconds < 0:
            raise ValueError("limits must be positive")
        self.per_tag = per_tag
        self.per_source = per_source
        self.trust_seconds = trust_seconds
        self.max_sources = max_sources
        self.max_trusted = max_trusted
        self._second = -1
        self._tags: dict[bytes, int] = {}
        self._sources: dict[Hashable, int] = {}
        self._trusted: dict[tuple[str, Hashable], float] = {}
        self._tag_clients: dict[bytes, str] = {}  # stand-in: tags over a limit this second
        self._refused: dict[bytes, int] = {}  # stand-in: their packets refused this second

    def blocked(self, tag: bytes, source: Hashable, client: str, now: float) -> bool:
        """Whether to refuse this packet before any cryptography."""
        second = int(now)
        if second != self._second:
            self._second = second
            self._tags.clear()
            self._sources.clear()
            self._tag_clients.clear()
            self._refused.clear()
            return False
        if (self._tags.get(tag, 0) < self.per_tag
                and self._sources.get(source, 0) < self.per_source):
            return False
        self._tag_clients[tag] = client  # stand-in (shut_tags), off the common path
        until = self._trusted.get((client, source))
        if until is None or until <= now:
            self._refused[tag] = self._refused.get(tag, 0) + 1
            return True
        return False

    def failed(self, tag: bytes, source: Hashable, now: float) -> None:
        """Count one authentication failure."""
        second = int(now)
        if second != self._second:
            self._second = second
            self._tags.clear()
            self._sources.clear()
            self._tag_clients.clear()
            self._refused.clear()
        tags = self._tags
        tags[tag] = tags.get(tag, 0) + 1
        sources = self._sources
        count = sources.get(source)
        if count is not None:
            sources[source] = count + 1
        elif len(sources) < self.max_sources:
            sources[source] = 1

    def trust(self, client: str, source: Hashable, now: float) -> None:
        """`client` authenticated from `source` at `now`."""
        trusted = self._trusted
        if len(trusted) >= self.max_trusted and (client, source) not in trusted:
            trusted.clear()  # losing trust costs a known client nothing but this shield
        trusted[(client, source)] = now + self.trust_seconds

    def forget(self, client: str) -> None:
        """A revoked client's sources are trusted no more."""
        for key in [key for key in self._trusted if key[0] == client]:
            del self._trusted[key]

    # stand-in, replaced by the per-pair limiter (issue 13): the two methods the
    # daemon's kernel filter reads, built on what this class holds today
    def shut_tags(self, now: float) -> dict[bytes, str]:
        """The knock tags over their per-tag limit in the current second,
        mapped to their client's name (stand-in: failures and refusals
        together, so that a flood from one source, which its source's limit
        stops at per_source failures, counts too)."""
        if int(now) != self._second:
            return {}
        failed, refused, per_tag = self._tags, self._refused, self.per_tag
        return {tag: client for tag, client in self._tag_clients.items()
                if failed.get(tag, 0) + refused.get(tag, 0) >= per_tag}

    def trusted_sources(self, client: str, now: float) -> list[str]:
        """The source addresses (text, as passed to verify) from which
        `client` authenticated within trust_seconds, most recent first, at
        most 16 (stand-in)."""
        found = sorted(((until, source) for (name, source), until in self._trusted.items()
                        if name == client and until > now), key=lambda item: -item[0])
        return [str(source) for _, source in found[:16]]
