"""The verification pipeline: bytes, source, now -> Accepted | Refused(reason).

Invariants (docs/protocol.md, "Verification order"; STYLE principle 3):
- Checks run cheapest first and stop at the first failure: exact length,
  version, knock-tag lookup (one dict lookup), the forged-packet limits
  (spa.core.limits: per tag and per (tag, source), never per source alone;
  a refusal there that any source could meet seals the tag for sources its
  client is not trusted from, so a refused knock is never handed over to
  another address), a replay-cache membership test (a set lookup: a
  replayed packet costs no cryptography), HMAC (constant time), AEAD
  decryption, strict body parse, time window and step consistency, the
  replay cache's record, policy.  No cryptography runs for a packet with an
  unknown tag, a replayed nonce, or a tag or source over its failure limit.
- `verify` never raises for any packet bytes: every refusal is a value with a
  `Reason`.  It never accepts a packet whose bytes differ from what an
  enrolled client sealed.
- Time is an argument: `now` is Unix seconds from the caller's clock.
- Per client the verifier keeps the master secret and its tag key; the MAC
  and cipher keys are derived when a packet's tag first matches that client
  (only enrolled clients' tags match), and at most HOT_CLIENTS clients' are
  kept, so memory follows the clients that knock, not those enrolled.
- A group's client (docs/groups.md) is added by its derived keys instead
  (`add_client_keys`): the verifier never sees its master secret, and its
  packets pass exactly the checks a secret's would, in the same order.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Mapping
from typing import NamedTuple

from spa.core.errors import PacketError, Reason
from spa.core.keys import (
    KEY_SIZE,
    ClientKeys,
    HmacSha256,
    check_server_id,
    derive_keys,
    derive_tag_key,
)
from spa.core.knock import (
    STEP_SECONDS,
    TagTable,
    step_of,
    step_of_ms,
    step_start,
    steps_for_window,
)
from spa.core.limits import FailureLimiter
from spa.core.otp import OtpChecker
from spa.core.policy import Decision, Policy
from spa.core.replay import Check, ReplayCache
from spa.core.wire import (
    HEADER_SIZE,
    NONCE_OFFSET,
    NONCE_SIZE,
    PACKET_SIZE,
    VERSION,
    Action,
    IPAddress,
    Request,
    open_packet,
)

DEFAULT_WINDOW = 30.0  # seconds either side of the server's clock
# clients whose MAC and cipher keys stay derived (about 1 KB each); past it the
# oldest is derived again at its next knock (4 HMACs, after the tag matched)
HOT_CLIENTS = 16384


class Accepted(NamedTuple):
    """A packet that passed every check.  (NamedTuples here and in Refused:
    immutable like frozen dataclasses, and cheaper on the receive path.)"""

    client: str
    request: Request
    decision: Decision
    source: IPAddress
    # the time step of the authenticator code this packet used up (None: it
    # carried none); a group member claims it at every member (spa.group.otpclaim)
    otp_step: int | None = None


class Refused(NamedTuple):
    reason: Reason
    client: str | None = None  # known once the tag matched


# Refusals that carry no client are constants: the cheapest checks return
# them without building anything (or hashing an Enum member).
_BAD_LENGTH = Refused(Reason.BAD_LENGTH)
_BAD_VERSION = Refused(Reason.BAD_VERSION)
_UNKNOWN_TAG = Refused(Reason.UNKNOWN_TAG)
_AUTHENTICATION = frozenset({Reason.BAD_MAC, Reason.BAD_CIPHERTEXT, Reason.MALFORMED})
# what the replay cache's answer refuses a packet for (both listeners')
REPLAY_REASONS = {Check.REPLAY: Reason.REPLAY, Check.FULL: Reason.REPLAY_CACHE_FULL}


def parse_source(source: str | IPAddress) -> IPAddress:
    """The packet's source as an address; IPv4-mapped IPv6 becomes IPv4.

    Raises ValueError for a string that is not an address (a caller bug).
    """
    if isinstance(source, str):
        return _parse_source_text(source)
    if isinstance(source, ipaddress.IPv6Address):
        if source.ipv4_mapped is not None:
            return source.ipv4_mapped
        if source.scope_id is not None:  # fe80::1%eth0: the zone is not part of it
            return ipaddress.IPv6Address(source.packed)
    return source


@functools.lru_cache(maxsize=4096)
def _parse_source_text(source: str) -> IPAddress:
    """Cached: only authenticated packets get here, so the cache holds the
    addresses of enrolled clients, not whatever a flood sends."""
    return parse_source(ipaddress.ip_address(source))


class Verifier:
    """Holds the server's live view: keys, tag table, replay cache, policy."""

    def __init__(
        self,
        server_id: bytes,
        secrets: Mapping[str, bytes],
        policy: Policy,
        *,
        now: float,
        window: float = DEFAULT_WINDOW,
        replay: ReplayCache | None = None,
        limiter: FailureLimiter | None = None,
        otp: OtpChecker | None = None,
        warm_later: bool = False,
    ) -> None:
        """`secrets` maps client name -> 32-byte master secret (and NAME~old
        -> the secret a rotate replaced, while its grace lasts: its packets
        count as NAME's).  `warm_later`: the tag table starts with the
        current step's tags alone (spa.core.knock.TagTable).

        Raises ValueError for a bad server id, secret or window.
        """
        check_server_id(server_id)
        if window <= 0:
            raise ValueError("window must be positive")
        self.server_id = server_id
        self.window = window
        self.policy = policy
        self.replay = replay if replay is not None else ReplayCache(window)
        self.limiter = limiter if limiter is not None else FailureLimiter()
        self.otp = otp if otp is not None else OtpChecker({})
        if self.replay.window < window:
            self.replay.set_window(window)  # never forget an entry before it is stale
        self._secrets: dict[str, bytes] = dict(secrets)
        # name -> keys given already derived (a group's clients): never a secret
        self._given: dict[str, ClientKeys] = {}
        # name -> (keys, MAC): derived at the first packet whose tag matched
        self._hot: dict[str, tuple[ClientKeys, HmacSha256]] = {}
        step = step_of(now)
        self._tags = TagTable(
            {name: derive_tag_key(secret, server_id) for name, secret in secrets.items()},
            step,
            skew=steps_for_window(window),
            warm_later=warm_later,
        )
        self._refresh_at = step_start(step + 1)

    @property
    def tags(self) -> TagTable:
        return self._tags

    def add_client(self, name: str, secret: bytes) -> None:
        """Enroll or re-key a client (takes effect for the next packet)."""
        tag_key = derive_tag_key(secret, self.server_id)  # raises before anything changes
        self._secrets[name] = secret
        self._given.pop(name, None)
        self._hot.pop(name, None)
        self._tags.add(name, tag_key)

    def add_client_keys(self, name: str, keys: ClientKeys) -> None:
        """Enroll or re-key a client by the keys derived for this server id
        (a group's record holds those, never the secret; NAME~old as in
        add_client).  Takes effect for the next packet.  Raises ValueError
        for keys of the wrong size."""
        self.add_clients_keys({name: keys})

    def add_clients_keys(self, keys: Mapping[str, ClientKeys], *, later: bool = False) -> None:
        """add_client_keys of every (name, keys), the tags in one go
        (TagTable.add_many).  Raises ValueError for keys of the wrong size,
        before anything changes."""
        if not all(len(key) == KEY_SIZE for given in keys.values()
                   for key in (given.tag_key, given.cipher_key, given.mac_key)):
            raise ValueError(f"a client's keys are {KEY_SIZE} bytes each")
        self._given.update(keys)
        secrets, hot = self._secrets, self._hot
        for name in keys:
            secrets.pop(name, None)
            hot.pop(name, None)
        self._tags.add_many(((name, given.tag_key) for name, given in keys.items()),
                            later=later)

    def remove_client(self, name: str) -> None:
        """Forget a client's keys and tags at once."""
        self._secrets.pop(name, None)
        self._given.pop(name, None)
        self._hot.pop(name, None)
        self._tags.remove(name)
        self.limiter.forget(name)

    def _keys_of(self, name: str) -> tuple[ClientKeys, HmacSha256]:
        """The client's MAC and cipher keys, derived now if not kept."""
        hot = self._hot
        found = hot.get(name)
        if found is None:
            secret = self._secrets.get(name)
            keys = (self._given[name] if secret is None
                    else derive_keys(secret, self.server_id))
            found = (keys, HmacSha256(keys.mac_key))
            if len(hot) >= HOT_CLIENTS:
                del hot[next(iter(hot))]  # the oldest derived
            hot[name] = found
        return found

    @property
    def next_step_at(self) -> float:
        """When the tag table next moves (the next step boundary)."""
        return self._refresh_at

    def refresh(self, now: float) -> None:
        """Move the tag table to the step of `now` (forwards, or backwards after
        the clock was set back).  Cheap when `now` is in the current step."""
        if self._refresh_at - STEP_SECONDS <= now < self._refresh_at:
            return
        step = step_of(now)
        self._tags.advance(step)
        self._refresh_at = step_start(step + 1)

    def verify(self, packet: bytes | bytearray | memoryview, source: str | IPAddress,
               now: float) -> Accepted | Refused:
        """Run every check in order; never raises for any packet bytes."""
        if type(packet) is not bytes:
            packet = bytes(packet)  # a bytearray or memoryview: hashable, sliceable
        if len(packet) != PACKET_SIZE:
            return _BAD_LENGTH
        if packet[0] != VERSION:
            return _BAD_VERSION
        if not self._refresh_at - STEP_SECONDS <= now < self._refresh_at:
            self.refresh(now)
        tag = packet[1:HEADER_SIZE]
        found = self._tags.lookup(tag)
        if found is None:
            return _UNKNOWN_TAG
        key_name, tag_step = found
        # a rotated-out secret in its grace period is keyed NAME~old
        client = key_name.partition("~")[0] if "~" in key_name else key_name
        limiter = self.limiter
        # no packet with this tag passes the time window after this (its timestamp is in the
        # tag's step): how long a seal must last (spa.core.limits)
        live_until = step_start(tag_step + 1) + self.window
        if limiter.blocked(tag, source, client, now, live_until):
            return Refused(Reason.RATE_LIMITED, client)
        nonce = packet[NONCE_OFFSET : NONCE_OFFSET + NONCE_SIZE]
        if self.replay.seen(client, nonce):
            return Refused(Reason.REPLAY, client)
        keys, mac = self._keys_of(key_name)
        try:
            request = open_packet(packet, keys, self.server_id, mac)
        except PacketError as exc:
            if exc.reason in _AUTHENTICATION:
                limiter.failed(tag, source, client, now, live_until)
            return Refused(exc.reason, client)
        sent = request.timestamp_ms / 1000
        if now - sent > self.window:
            return Refused(Reason.STALE, client)
        if sent - now > self.window:
            return Refused(Reason.FUTURE, client)
        if step_of_ms(request.timestamp_ms) != tag_step:
            return Refused(Reason.STEP_MISMATCH, client)
        check = self.replay.check_and_add(client, nonce, now)
        if check is not Check.FRESH:
            return Refused(REPLAY_REASONS[check], client)
        address = parse_source(source)
        decision = self.policy.decide(client, request, address)
        if isinstance(decision, Reason):
            return Refused(decision, client)
        step = None
        if request.action is Action.OPEN:
            refusal = self.otp.check(client, request.otp, now)
            if refusal is not None:
                return Refused(refusal, client)
            if self.otp.required(client):
                step = self.otp.last_step(client)
        limiter.trust(client, source, now)  # only a knock that passed everything
        return Accepted(client, request, decision, address, step)
