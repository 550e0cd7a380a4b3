"""Limits on forged packets that carry a live knock tag.

A knock tag is not a secret from whoever sees a client's packet on the wire:
with a captured tag an attacker can send packets that pass the tag lookup and
cost the server an HMAC each.  This module bounds that work without letting
one tag's failures refuse anyone else (docs/threat-model.md, "Floods";
docs/protocol.md, "Verification order").

Invariants:
- Only authentication failures count (a bad MAC, a bad ciphertext, a body
  that does not parse: what nobody holding the keys would send).  Packets that
  authenticate never count, whatever happens to them next.
- Failures are counted per knock tag and per (tag, source) pair, in fixed
  one-second windows, never per source alone: one tag's failures from a
  source never refuse another tag from that source, nor another client.
- The budget of a tag, per second, for sources its client is not trusted
  from: `per_tag` failures in all.  A pair that failed this second or the last
  one spends its own `per_pair`, and only while the tag has used less than
  `per_tag - new_reserve`; a pair not seen failing draws on the rest.  So
  forgeries from a few sources (a NAT neighbour, a spoofer of one victim)
  never stop a new source from being verified; only `new_reserve` or more new
  sources in one second can spend the tag's budget.
- A (client, source) pair that authenticated within `trust_seconds` is
  trusted: its tag's packets from there pass every limit above but their own,
  `per_trusted_pair` failures per (tag, source) per second, so forging a
  trusted source costs bounded HMACs too.  At most MAX_TRUSTED_PER_CLIENT
  sources per client, most recent kept; `dump_trust`/`restore_trust` carry
  them over a restart.
- No hand-over of a refused knock.  A packet refused here is not
  authenticated, so its nonce cannot be burned: a copy sent later from
  another address would pass the MAC and open for that address.  Which
  refused packet was the client's cannot be told apart from the flood before
  the cryptography, and the flood is the attacker's (any bounded memory of
  refused nonces is churned by it, any allowance for authenticating refused
  packets is spent by it first).  So a refusal that any source could meet
  *seals* the tag until `live_until` (the end of the last second in which a
  packet carrying it can pass the time window): the tag's budget ran out, or
  a trusted pair's allowance did.  A sealed tag is refused before any
  cryptography from every source its client is not trusted from, so a copy of
  a refused packet can only ever be accepted at an address the client itself
  authenticated from.  A refusal of a pair over its own `per_pair` does not
  seal: it needs forgeries from that very address in this second or the last,
  before the client's packet, from an address the client never knocked from.
  Residuals: that case; and a client on an address it never used whose tag
  was sealed waits for its next tag (its next 30-second step; its first knock
  of a step is never refused by this, as nobody knew that tag before).  No
  fresh packet from a trusted source is refused by a seal.
- Memory is bounded and each packet costs O(1): the per-second counters are
  replaced every second and hold at most `max_pairs` untrusted pairs
  (beyond, a pair counts as new: the tag's budget still bounds it) besides
  the trusted ones (always counted); tag counters and seals
  exist only for tags in the verifier's table; trust is per enrolled client.
- Time is an argument (`now`, Unix seconds).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable

PER_TAG = 200  # untrusted authentication failures per tag per second (HMACs a tag can cost)
NEW_RESERVE = 100  # of PER_TAG, kept for (tag, source) pairs not seen failing
PER_PAIR = 8  # failures per second of a (tag, source) pair that failed this second or the last
PER_TRUSTED_PAIR = 100  # failures per second of a (tag, source) pair its client is trusted from
TRUST_SECONDS = 3600.0  # a (client, source) pair that authenticated is trusted this long
MAX_TRUSTED_PER_CLIENT = 16  # trusted sources kept per client, the most recent
MAX_PAIRS = 65_536  # (tag, source) pairs counted per second (beyond: they count as new)

Pair = tuple[bytes, Hashable]
TrustEntry = tuple[str, str, float]  # client, source (as text), trusted until


class FailureLimiter:
    """Owned by the receive thread (the verifier's); not thread-safe."""

    __slots__ = ("_last_pairs", "_last_refused", "_pairs", "_refused", "_sealed", "_second",
                 "_tags", "_trusted",
                 "max_pairs", "new_reserve", "per_pair", "per_tag", "per_trusted_pair",
                 "trust_revision", "trust_seconds")

    def __init__(self, *, per_tag: int = PER_TAG, new_reserve: int = NEW_RESERVE,
                 per_pair: int = PER_PAIR, per_trusted_pair: int = PER_TRUSTED_PAIR,
                 trust_seconds: float = TRUST_SECONDS, max_pairs: int = MAX_PAIRS) -> None:
        """Raises ValueError for a limit below 1 (or a reserve not below per_tag)."""
        if (min(per_tag, per_pair, per_trusted_pair, max_pairs) < 1 or trust_seconds < 0
                or not 0 <= new_reserve < per_tag):
            raise ValueError("limits must be positive (and new_reserve below per_tag)")
        self.per_tag = per_tag
        self.new_reserve = new_reserve
        self.per_pair = per_pair
        self.per_trusted_pair = per_trusted_pair
        self.trust_seconds = trust_seconds
        self.max_pairs = max_pairs
        self.trust_revision = 0  # moves whenever trust changes (the daemon saves it then)
        self._second = -1
        self._tags: dict[bytes, int] = {}  # untrusted failures this second
        self._pairs: dict[Pair, int] = {}  # failures this second
        self._last_pairs: dict[Pair, int] = {}  # the last second's
        self._sealed: dict[bytes, tuple[float, str]] = {}  # tag -> (until, client)
        # tag -> (refusals before any cryptography, client): this second, the last
        self._refused: dict[bytes, tuple[int, str]] = {}
        self._last_refused: dict[bytes, tuple[int, str]] = {}
        # client -> {source: until}, in the order of the last authentication
        self._trusted: dict[str, dict[Hashable, float]] = {}

    # ---- the receive path --------------------------------------------------

    def blocked(self, tag: bytes, source: Hashable, client: str, now: float,
                live_until: float) -> bool:
        """Whether to refuse this packet before any cryptography.  A refusal
        that any source could meet seals the tag until `live_until`."""
        if int(now) != self._second:
            self._roll(now)
        pair = (tag, source)
        count = self._pairs.get(pair, 0)
        if self._is_trusted(client, source, now):
            if count < self.per_trusted_pair:
                return False
            self._seal(tag, client, live_until)
            return self._refuse(tag, client)
        sealed = self._sealed.get(tag)
        if sealed is not None:
            if sealed[0] > now:
                return self._refuse(tag, client)
            del self._sealed[tag]
        used = self._tags.get(tag, 0)
        if count == 0 and pair not in self._last_pairs:
            # a pair not seen failing: the tag's whole budget
            return used >= self.per_tag and self._refuse(tag, client)
        return ((count >= self.per_pair or used >= self.per_tag - self.new_reserve)
                and self._refuse(tag, client))

    def failed(self, tag: bytes, source: Hashable, client: str, now: float,
               live_until: float) -> None:
        """Count one authentication failure; a tag whose budget it spends is
        sealed until `live_until`."""
        if int(now) != self._second:
            self._roll(now)
        pairs = self._pairs
        pair = (tag, source)
        count = pairs.get(pair)
        trusted = self._is_trusted(client, source, now)
        if count is not None:
            pairs[pair] = count + 1
        elif trusted or len(pairs) < self.max_pairs:
            # a trusted pair is always counted (there are at most
            # MAX_TRUSTED_PER_CLIENT per client): a table filled by spoofed
            # pairs once left it without any limit
            pairs[pair] = 1
        if trusted:
            return  # spends its pair's own allowance only
        used = self._tags.get(tag, 0) + 1
        self._tags[tag] = used
        if used >= self.per_tag:
            self._seal(tag, client, live_until)

    def trust(self, client: str, source: Hashable, now: float) -> None:
        """`client` authenticated from `source` at `now`."""
        sources = self._trusted.get(client)
        if sources is None:
            sources = self._trusted[client] = {}
        else:
            sources.pop(source, None)  # to the end: the most recent
        sources[source] = now + self.trust_seconds
        if len(sources) > MAX_TRUSTED_PER_CLIENT:
            del sources[next(iter(sources))]
        self.trust_revision += 1

    def distrust(self, client: str, source: Hashable) -> None:
        """A knock from `source` was refused after all (its route back says
        the source is forged): not a source the client authenticated from."""
        sources = self._trusted.get(client)
        if sources is not None and sources.pop(source, None) is not None:
            self.trust_revision += 1

    def forget(self, client: str) -> None:
        """A revoked or removed client's sources are trusted no more."""
        if self._trusted.pop(client, None) is not None:
            self.trust_revision += 1
        for tag in [tag for tag, (_, name) in self._sealed.items() if name == client]:
            del self._sealed[tag]

    # ---- what the kernel side and the state directory read -----------------

    def shut_tags(self, now: float) -> dict[bytes, str]:
        """The knock tags (8 bytes) refused now to every source their client
        is not trusted from, mapped to that client: those over their per-tag
        limit this second, and those sealed since (see the module docstring),
        until no packet carrying them can pass the time window."""
        return {tag: client for tag, (until, client) in self._sealed.items() if until > now}

    def refusals(self, now: float) -> dict[bytes, tuple[int, str]]:
        """Per tag, the packets refused before any cryptography in the last
        whole second or this one (the larger), with their client: a flood
        from one source spends only its pair's allowance and seals nothing,
        yet every copy wakes the receive path (the kernel side shuts a tag
        refused at a high rate, spa.server.shut_tags)."""
        if int(now) > self._second + 1:
            return {}
        found = dict(self._last_refused) if int(now) == self._second else {}
        for tag, (count, client) in self._refused.items():
            if count > found.get(tag, (0, ""))[0]:
                found[tag] = (count, client)
        return found

    def trusted_sources(self, client: str, now: float) -> list[str]:
        """The sources (as the text passed to verify) `client` authenticated
        from within trust_seconds, most recent first, at most
        MAX_TRUSTED_PER_CLIENT."""
        sources = self._trusted.get(client, {})
        return [str(source) for source, until in reversed(sources.items()) if until > now]

    def dump_trust(self, now: float) -> list[TrustEntry]:
        """Every live trusted pair, oldest first per client (to save)."""
        return [(client, str(source), until) for client, sources in self._trusted.items()
                for source, until in sources.items() if until > now]

    def restore_trust(self, entries: Iterable[TrustEntry], now: float) -> None:
        """Trust saved by `dump_trust` (at start): expired entries are
        dropped, each client keeps its MAX_TRUSTED_PER_CLIENT latest, and
        nothing is trusted for longer than trust_seconds from `now`."""
        latest = now + self.trust_seconds
        for client, source, until in sorted(entries, key=lambda entry: entry[2]):
            if until > now:
                self.trust(client, source, now)
                self._trusted[client][source] = min(until, latest)

    # ---- internals ---------------------------------------------------------

    def _is_trusted(self, client: str, source: Hashable, now: float) -> bool:
        sources = self._trusted.get(client)
        if sources is None:
            return False
        until = sources.get(source)
        return until is not None and until > now

    def _refuse(self, tag: bytes, client: str) -> bool:
        """Count a refusal before the cryptography (for `shut_tags`)."""
        count = self._refused.get(tag)
        self._refused[tag] = (1 if count is None else count[0] + 1, client)
        return True

    def _seal(self, tag: bytes, client: str, until: float) -> None:
        self._sealed[tag] = (until, client)

    def _roll(self, now: float) -> None:
        """A new second: fresh counters; the last second's pairs are kept one
        more second (they are not new), seals that ended are dropped."""
        second = int(now)
        self._last_pairs = self._pairs if second == self._second + 1 else {}
        self._last_refused = self._refused if second == self._second + 1 else {}
        self._pairs = {}
        self._refused = {}
        self._tags = {}
        self._second = second
        sealed = self._sealed
        if sealed:
            for tag in [tag for tag, (until, _) in sealed.items() if until <= now]:
                del sealed[tag]
