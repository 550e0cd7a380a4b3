"""Which flooded knock tags the kernel filter shuts, and for how long.

A knock tag over its failure limit (spa.core.limits: a captured tag being
flooded with forgeries) is shut in the kernel filter: it passes only from the
sources its client authenticated from, and one copy in SHUT_SAMPLE from
anywhere else (spa.server.capture), so that the flood no longer fills the
socket queue the other knocks need (docs/threat-model.md, "Floods").

Invariants:
- What is shut comes from the limiter alone (`shut_tags`, `refusals`,
  `trusted_sources`), read by the receive thread, which owns it
  (`read_shut`); housekeeping only holds the result.
- A tag seen shut stays shut until HOLD_SECONDS after the second in which it
  was last seen (to the end of the next second): the sampled copies keep a
  steady flood over the limit in every second, so the program is not
  rebuilt at every housekeeping round; when the flood ends the tag lifts
  within HOLD_SECONDS + 1 s.
- A tag not shut is left exactly as it was: this only ever narrows a shut
  tag to its client's sources.
- Time is an argument.
"""

from __future__ import annotations

from collections.abc import Container, Mapping

from spa.core.limits import FailureLimiter
from spa.server.sources import MAX_SHUT_SOURCES, SHUT_SAMPLE

HOLD_SECONDS = 1  # whole seconds a tag stays shut after the second it was last seen shut in
# refusals a second (before any cryptography) that shut a tag: what the receive
# path handles without a sweat (about 6-8 us each: 3-4 % of a core); a flood
# above it would fill the core and the socket queue that other knocks need
SHUT_RATE = 5_000

Seen = dict[bytes, tuple[str, ...]]  # a shut tag -> its client's trusted sources


def read_shut(limiter: FailureLimiter, now: float, shut_now: Container[bytes] = ()) -> Seen:
    """The tags to shut, each with the sources its client authenticated
    from (receive thread only: it owns the limiter): those the limiter has
    sealed, and those refused before any cryptography at SHUT_RATE or more a
    second (a flood from one source seals nothing but wakes the receive path
    with every copy).  For a tag in `shut_now` the kernel lets one copy in
    SHUT_SAMPLE through: its refusals count SHUT_SAMPLE times, so a steady
    flood keeps it shut and one that fell below SHUT_RATE lifts."""
    shut = limiter.shut_tags(now)
    for tag, (count, client) in limiter.refusals(now).items():
        if count * (SHUT_SAMPLE if tag in shut_now else 1) >= SHUT_RATE:
            shut.setdefault(tag, client)
    sources = {client: tuple(limiter.trusted_sources(client, now)[:MAX_SHUT_SOURCES])
               for client in set(shut.values())}
    return {tag: sources[client] for tag, client in shut.items()}


class ShutTags:
    """The shut tags, held across the seconds in which the limiter has not
    yet seen a flood's next copies."""

    def __init__(self) -> None:
        self._until: dict[bytes, int] = {}
        self._sources: dict[bytes, tuple[str, ...]] = {}

    def observe(self, seen: Mapping[bytes, tuple[str, ...]], at: float) -> None:
        """The limiter said `seen` at `at` (the same reading twice is harmless)."""
        until = int(at) + 1 + HOLD_SECONDS
        for tag, sources in seen.items():
            self._until[tag] = max(self._until.get(tag, 0), until)
            self._sources[tag] = sources

    def current(self, now: float) -> Seen:
        """The tags shut at `now`, with their sources (sorted: a stable value
        to compare with what the filter holds)."""
        for tag in [tag for tag, until in self._until.items() if until <= now]:
            del self._until[tag], self._sources[tag]
        return dict(sorted(self._sources.items()))
