"""Verifying fwknop's packets: bytes, source, now -> CompatAccepted | Refused.

Invariants (docs/protocol.md, "fwknop compatibility"; docs/threat-model.md,
"fwknop clients"; STYLE principle 3):
- Cheapest check first: length and base64 shape, fwknop's GnuPG length rule,
  a replay-set lookup (an accepted packet's copy costs no HMAC), the HMAC
  work budget (`HmacBudget`), then the HMAC-SHA256 under each compat
  client's key in turn (fwknop has no tag: the HMAC names the client), in
  constant time, before any decryption.  Then decryption, the strict parse,
  the message type (command and local NAT messages refused), the time window,
  the replay cache's record, and policy (each `proto/port` mapped onto the
  client's service reached on that protocol and port of this host).
- A NAT access message (`fwknop -N HOST:PORT`) opens exactly one gateway
  service: the one whose literal host and port it names, reached on the
  port its access message names (the published port, `--nat-port`), and
  only as policy lets this client open it; anything else is refused
  `nat_message`.  A destination is never the client's choice, nor resolved.
- A packet no key authenticates is refused `unknown_sender`; at most
  DIAGNOSES_PER_SECOND of them are looked at again to say why an old client
  fails (`no_hmac`: its first block decrypts to fwknop's random value under a
  client's key; `weak_hmac`, `other_hmac`: an HMAC-MD5, -SHA1, -SHA384 or
  -SHA512 under a client's key; `legacy_iv`: a short key's legacy mode).  A
  diagnosis is never an acceptance.
- `verify` never raises for any packet bytes, and never accepts bytes that
  a compat client's keys did not make (the HMAC covers every byte).
- Work is bounded: HMACs a second in all (`max_hmacs`), packets a second per
  source (`per_source`), except sources a client authenticated from within
  TRUST_SECONDS, which keep `per_trusted` of their own (a flood spoofing other
  addresses never locks a known client out).  Memory: at most MAX_SOURCES
  sources counted a second, MAX_TRUSTED trusted, MAX_OWNERS replay owners.
- Time is an argument.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Hashable, Mapping
from typing import NamedTuple

from spa.core.errors import PacketError, Reason
from spa.core.fwknop import (
    GPG_MIN,
    HMAC_B64,
    OTHER_HMAC_B64,
    SALTED_B64,
    UNSPECIFIED,
    FwknopKeys,
    SpaData,
    b64,
    check_shape,
    decode,
    decrypt,
    is_fwknop_plaintext,
    unb64,
)
from spa.core.keys import HmacSha256
from spa.core.policy import Decision, Policy
from spa.core.replay import Check, ReplayCache
from spa.core.verify import DEFAULT_WINDOW, REPLAY_REASONS, Refused, parse_source
from spa.core.wire import Action, IPAddress, Request

REPLAY_KEY = 24  # bytes of SHA-256(packet) the replay cache keeps (its nonce size)
MAX_HMACS = 200_000  # HMACs a second in all (about 0.2 s of one core; docs/benchmarks.md)
PER_SOURCE = 20  # packets a second from one source that get HMACs
PER_TRUSTED = 20  # ... from a source a client authenticated from (outside the total)
TRUST_SECONDS = 3600.0
MAX_SOURCES = 65_536  # sources counted in one second (beyond: the total alone bounds them)
MAX_TRUSTED = 4_096  # trusted sources kept (the most recent)
MAX_OWNERS = 65_536  # accepted packets whose replay is refused before any HMAC
DIAGNOSES_PER_SECOND = 4  # unauthenticated packets looked at again to say why
MAX_CLIENTS = 1_000  # compat clients at most (docs/benchmarks.md: HMAC cost per packet)
_HMAC_REASONS = {"md5": Reason.WEAK_HMAC, "sha1": Reason.WEAK_HMAC, "sha384": Reason.OTHER_HMAC,
                 "sha512": Reason.OTHER_HMAC}


class CompatAccepted(NamedTuple):
    client: str
    decisions: tuple[Decision, ...]  # one per proto/port asked for
    source: IPAddress
    data: SpaData


class HmacBudget:
    """Packets given HMACs, per source and in all, in one-second windows."""

    __slots__ = ("_second", "_sources", "_spent", "_trusted", "max_hmacs", "per_source",
                 "per_trusted")

    def __init__(self, *, max_hmacs: int = MAX_HMACS, per_source: int = PER_SOURCE,
                 per_trusted: int = PER_TRUSTED) -> None:
        """Raises ValueError for a limit below 1."""
        if min(max_hmacs, per_source, per_trusted) < 1:
            raise ValueError("limits must be positive")
        self.max_hmacs, self.per_source, self.per_trusted = max_hmacs, per_source, per_trusted
        self._second = -1
        self._spent = 0
        self._sources: dict[Hashable, int] = {}
        self._trusted: dict[Hashable, float] = {}

    def admit(self, source: Hashable, hmacs: int, now: float) -> bool:
        """Whether a packet from `source` may cost `hmacs` HMACs now (counted)."""
        if int(now) != self._second:
            self._second, self._spent, self._sources = int(now), 0, {}
        count = self._sources.get(source, 0)
        until = self._trusted.get(source)
        if until is not None and until > now:
            if count >= self.per_trusted:
                return False
            self._sources[source] = count + 1
            return True
        if count >= self.per_source or self._spent + hmacs > self.max_hmacs:
            return False
        if count or len(self._sources) < MAX_SOURCES:
            self._sources[source] = count + 1
        self._spent += hmacs
        return True

    def trust(self, source: Hashable, now: float) -> None:
        """A compat client authenticated from `source`."""
        self._trusted.pop(source, None)
        self._trusted[source] = now + TRUST_SECONDS
        if len(self._trusted) > MAX_TRUSTED:
            del self._trusted[next(iter(self._trusted))]


class CompatVerifier:
    """The compat listener's view: keys, policy, replay cache, budget.
    Owned by one thread (not thread-safe)."""

    def __init__(self, clients: Mapping[str, FwknopKeys], policy: Policy, *,
                 window: float = DEFAULT_WINDOW, replay: ReplayCache | None = None,
                 budget: HmacBudget | None = None) -> None:
        """Raises ValueError for a bad window or more than MAX_CLIENTS clients."""
        if window <= 0:
            raise ValueError("window must be positive")
        self.window = window
        self.replay = replay if replay is not None else ReplayCache(window)
        if self.replay.window < window:
            self.replay.set_window(window)
        self.budget = budget if budget is not None else HmacBudget()
        self._keys: dict[str, FwknopKeys] = {}
        self._macs: dict[str, HmacSha256] = {}
        self._owners: dict[bytes, str] = {}
        self._diagnosed = (-1, 0)  # (second, diagnoses in it)
        self.policy = policy
        for name, keys in clients.items():
            self.add_client(name, keys)

    @property
    def policy(self) -> Policy:
        return self._policy

    @policy.setter
    def policy(self, policy: Policy) -> None:
        self._policy = policy
        # (protocol, the port a client names) -> service, a service of this
        # host before a gateway's: what a client with no service there meets
        ports: dict[tuple[str, int], str] = {}
        for service in sorted(policy.services.values(), key=lambda s: not s.gateway):
            ports[(service.protocol, service.client_port)] = service.name
        self._services = ports

    @property
    def clients(self) -> list[str]:
        return list(self._keys)

    def add_client(self, name: str, keys: FwknopKeys) -> None:
        """Enroll or re-key.  Raises ValueError past MAX_CLIENTS."""
        if name not in self._keys and len(self._keys) >= MAX_CLIENTS:
            raise ValueError(f"at most {MAX_CLIENTS} fwknop clients")
        self._keys[name] = keys
        self._macs[name] = HmacSha256(keys.hmac)

    def remove_client(self, name: str) -> None:
        self._keys.pop(name, None)
        self._macs.pop(name, None)

    def verify(self, packet: bytes, source: str | IPAddress, now: float
               ) -> CompatAccepted | Refused:
        """Every check in order; never raises for any packet bytes."""
        try:
            check_shape(packet)
        except PacketError as exc:
            return Refused(exc.reason)
        text, tail = packet[:-HMAC_B64], packet[-HMAC_B64:]
        if len(text) >= GPG_MIN:
            return Refused(Reason.GPG_MODE)
        key = hashlib.sha256(packet).digest()[:REPLAY_KEY]
        owner = self._owners.get(key)
        if owner is not None and self.replay.seen(owner, key):
            return Refused(Reason.REPLAY, owner)
        if not self.budget.admit(source, len(self._macs), now):
            return Refused(Reason.HMAC_BUDGET)
        signed = SALTED_B64 + text
        client = self._authenticate(signed, tail)
        if client is None:
            return Refused(*(self._diagnose(packet, now) or (Reason.UNKNOWN_SENDER, None)))
        try:
            data = self._open(signed, self._keys[client].rijndael)
        except PacketError as exc:
            return Refused(exc.reason, client)
        if now - data.timestamp > self.window:
            return Refused(Reason.STALE, client)
        if data.timestamp - now > self.window:
            return Refused(Reason.FUTURE, client)
        check = self.replay.check_and_add(client, key, now)
        if check is not Check.FRESH:
            return Refused(REPLAY_REASONS[check], client)
        self._remember(key, client)
        address = parse_source(source)
        decisions = self._decide(client, data, address)
        if isinstance(decisions, Reason):
            return Refused(decisions, client)
        self.budget.trust(source, now)
        return CompatAccepted(client, decisions, address, data)

    def _authenticate(self, signed: bytes, tail: bytes) -> str | None:
        """The client whose HMAC key made `tail` over `signed` (canonical base64 only)."""
        try:
            mac = unb64(tail)
        except PacketError:
            return None
        if b64(mac) != tail:
            return None
        for name, key in self._macs.items():
            if hmac.compare_digest(key.digest(signed), mac):
                return name
        return None

    @staticmethod
    def _open(signed: bytes, key: bytes) -> SpaData:
        """Decrypt and decode; a short key that only decrypts in legacy IV
        mode is refused LEGACY_IV.  Raises PacketError."""
        try:
            return decode(decrypt(signed, key))
        except PacketError as exc:
            if exc.reason not in (Reason.BAD_CIPHERTEXT, Reason.MALFORMED) or len(key) >= 16:
                raise
            try:
                decode(decrypt(signed, key, legacy=True))
            except PacketError:
                raise exc from None
            raise PacketError(Reason.LEGACY_IV) from None

    def _diagnose(self, packet: bytes, now: float) -> tuple[Reason, str] | None:
        """Why an unauthenticated packet fails, if an old client's way of
        making it fits a client's key (budgeted: DIAGNOSES_PER_SECOND)."""
        second, done = self._diagnosed
        if int(now) != second:
            second, done = int(now), 0
        if done >= DIAGNOSES_PER_SECOND:
            return None
        self._diagnosed = (second, done + 1)
        for size, name in OTHER_HMAC_B64.items():
            signed, tail = SALTED_B64 + packet[:-size], packet[-size:]
            for client, keys in self._keys.items():
                if hmac.compare_digest(b64(hmac.digest(keys.hmac, signed, name)), tail):
                    return _HMAC_REASONS[name], client
        whole = SALTED_B64 + packet
        for client, keys in self._keys.items():
            if is_fwknop_plaintext(whole, keys.rijndael):
                return Reason.NO_HMAC, client
            if len(keys.rijndael) < 16 and is_fwknop_plaintext(whole, keys.rijndael, legacy=True):
                return Reason.LEGACY_IV, client  # the client refuses legacy mode with an HMAC
        return None

    def _remember(self, key: bytes, client: str) -> None:
        owners = self._owners
        if len(owners) >= MAX_OWNERS:
            del owners[next(iter(owners))]
        owners[key] = client

    def _decide(self, client: str, data: SpaData, source: IPAddress
                ) -> tuple[Decision, ...] | Reason:
        """Each proto/port onto a service of the client's; all or nothing (as
        fwknopd: one port refused refuses the packet).  A NAT message onto
        the one gateway service it names exactly, or refused NAT_MESSAGE."""
        address = None if data.allow_ip == UNSPECIFIED else data.allow_ip
        if data.nat is not None:
            found = self._nat_service(client, data)
            if found is None:
                return Reason.NAT_MESSAGE
            names = [found]
        else:
            names = []
            for protocol, port in data.ports:
                found = self._service(client, protocol, port)
                if found is None:
                    return Reason.SERVICE_NOT_ALLOWED
                names.append(found)
        decisions = []
        for name in names:
            request = Request(data.timestamp * 1000, Action.OPEN, name, data.client_timeout,
                              address)
            decision = self._policy.decide(client, request, source)
            if isinstance(decision, Reason):
                return decision
            decisions.append(decision)
        return tuple(decisions)

    def _service(self, client: str, protocol: str, port: int) -> str | None:
        """The service `protocol/port` opens for this client: its own service
        a client reaches on that port (fwknop's -A names a port of this host:
        a gateway's published port, or without one its port), a service of
        this host before a gateway's; None when two gateways share it."""
        rules = self._policy.clients.get(client)
        if rules is not None:
            own = [service for name in sorted(rules.services)
                   if (service := self._policy.services.get(name)) is not None
                   and service.protocol == protocol and service.client_port == port]
            local = [service for service in own if not service.gateway]
            if local or len(own) == 1:
                return (local or own)[0].name
            if own:
                return None
        return self._services.get((protocol, port))

    def _nat_service(self, client: str, data: SpaData) -> str | None:
        """The gateway service a NAT message names exactly, or None: its one
        proto/port is the service's port on this host (`--nat-port`, the
        published port; without one, its port) and its destination the
        service's literal host and port.  A name is never resolved; a
        destination no service names is never opened (fwknopd let a client
        name any)."""
        assert data.nat is not None
        if len(data.ports) != 1:
            return None
        (protocol, port), (host, nat_port) = data.ports[0], data.nat
        try:
            address = ipaddress.IPv4Address(host)
        except ValueError:
            return None
        rules = self._policy.clients.get(client)
        mine = rules.services if rules is not None else frozenset()
        found = sorted((service.name not in mine, service.name)
                       for service in self._policy.services.values()
                       if service.host == address and service.port == nat_port
                       and service.protocol == protocol and service.client_port == port)
        return found[0][1] if found else None
