"""The packets of benchmarks/fuzz_live.py: what the attacker sends, and the
ledger of what the server must accept.

Pure (STYLE 1, 2): time is an argument (Unix seconds), randomness comes from
the caller's `random.Random` (a seed replays a run), addresses are strings;
no sockets, no files, no clock.

Invariants:
- A ledger knock is a fresh, unmutated, well-formed open knock of a live
  client, made once, sent once from one of that client's own addresses; its
  Grant (client, address opened, service) is what the server may record as
  accepted.  A client with an authenticator code knocks at most once per code
  step (a code works once).
- Every fuzz datagram is refused by a correct server in any state, by
  construction: it differs from anything a client sealed (flips, cuts,
  extensions, random bytes, a live tag in front of random bytes), or was
  sealed with keys the server does not hold (a rotated-out secret, another
  server's id), or is sealed right but says what policy refuses (a stale,
  future or mismatched time, a forbidden service or address, a revoked or
  expired client, a missing, wrong or used code, another server's id in the
  AAD, a body that does not parse), or is a ledger knock the server has
  already accepted (a replay, from anywhere), or is a fresh knock from a
  forged source whose route back leaves elsewhere (never for a client with
  allow_other_address, which may name any address; never from the
  attacker's own link, where the reverse-path check cannot see the forgery:
  docs/threat-model.md, "Forged sources on the same path").
- Nonce-burning refusals (those judged after the replay record) are held to
  a quota per client, kind and chunk (2: at most 12 per client per chunk, a
  chunk being a second or more), so they never fill a client's replay cache
  (1,024 live entries for 60 s) and lock its ledger knocks out.
- Every chunk of at least len(KINDS) datagrams holds every kind.
"""

from __future__ import annotations

import hmac
import ipaddress
import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import pyotp

from spa.core import aead
from spa.core.keys import ClientKeys, derive_keys
from spa.core.knock import STEP_SECONDS, knock_tag, step_of
from spa.core.wire import (
    CIPHERTEXT_OFFSET,
    HEADER_SIZE,
    MAC_OFFSET,
    NONCE_OFFSET,
    NONCE_SIZE,
    PACKET_SIZE,
    VERSION_BYTE,
    Action,
    Request,
    aad,
    encode_body,
    seal,
)

LEDGER_DURATION = 10  # seconds a ledger knock asks for
MAX_PAYLOAD = 1400  # what benchmarks/fuzz_send.c sends at most
BASES = 24  # unsent valid knocks per live client and chunk, the material of the flips
ANYWHERE = 20_000  # random public source addresses in the mix (the server's per-source
# tables are bounded: the limiter's at 65,536 a second, the event buffer's at 10,000 keys)
MARGIN = 10.0  # seconds beyond the window for stale and future packets (chunks are late)
OTP_STEP = 30  # seconds per authenticator code (RFC 6238, what spa.core.otp uses)
REGIONS = {  # the wire format's regions (docs/protocol.md, "Wire format")
    "version": (0, 1),
    "tag": (1, HEADER_SIZE),
    "nonce": (NONCE_OFFSET, CIPHERTEXT_OFFSET),
    "ciphertext": (CIPHERTEXT_OFFSET, MAC_OFFSET),
    "mac": (MAC_OFFSET, PACKET_SIZE),
}


@dataclass(frozen=True, slots=True)
class Client:
    name: str
    keys: ClientKeys
    service: str  # the service it may open
    addresses: tuple[str, ...] = ()  # its own source addresses (ledger knocks only)
    otp_secret: str = ""
    allow_other: bool = False


def client(name: str, secret: bytes, server_id: bytes, service: str, *,
           addresses: tuple[str, ...] = (), otp_secret: str = "",
           allow_other: bool = False) -> Client:
    return Client(name, derive_keys(secret, server_id), service, addresses, otp_secret,
                  allow_other)


@dataclass(frozen=True, slots=True)
class Cast:
    """Who is who: the server, its clients, and the addresses of the run."""

    server_id: bytes
    live: tuple[Client, ...]  # the ledger's clients
    revoked: Client  # enrolled, then revoked: refused `revoked`
    expired: Client  # enrolled with --expires, never used in time: `enrollment_expired`
    rotated_out: Client  # keys of the secret a rotate (no grace) replaced
    other_server: Client  # a live client's secret under another server id ...
    other_server_id: bytes  # ... this one
    forbidden_service: str  # a service the server has that no client may open
    attacker: tuple[str, ...]  # the attacker's own addresses
    same_link: tuple[str, ...]  # unused addresses on the attacker's link (forged)
    off_path: tuple[str, ...]  # addresses the server has no route back to (forged)
    spare: tuple[str, ...]  # client-side addresses nobody knocks from (forged)
    window: float = 30.0  # the server's time window, seconds either side


@dataclass(frozen=True, slots=True)
class Datagram:
    source: str
    sport: int
    payload: bytes
    kind: str  # the mutation class, or "ledger"


@dataclass(frozen=True, slots=True)
class Grant:
    """What an accepted event says: who, which address was opened, what."""

    client: str
    address: str
    service: str


@dataclass(frozen=True, slots=True)
class Knock:
    """A ledger entry: sent once, to be accepted."""

    datagram: Datagram
    grant: Grant
    otp_step: int | None = None


@dataclass
class Fuzzer:
    """Makes the ledger's knocks and the attacker's chunks."""

    cast: Cast
    rng: random.Random
    burn_quota: int = 2  # nonce-burning refusals per live client, kind and chunk
    sent_ledger: list[Knock] = field(default_factory=list)
    _turn: int = 0
    _otp_step: dict[str, int] = field(default_factory=dict)
    anywhere: tuple[str, ...] = ()  # random public addresses (forged sources), drawn once

    def __post_init__(self) -> None:
        found: set[str] = set()
        while len(found) < ANYWHERE:
            address = ipaddress.IPv4Address(self.rng.randint(1 << 24, (224 << 24) - 1))
            if address.is_global:
                found.add(str(address))
        self.anywhere = tuple(sorted(found))

    # ---- the ledger -----------------------------------------------------

    def ledger(self, now: float) -> list[Knock]:
        """One fresh knock per live client (a client with a code: once per
        code step), each from the next of its own addresses."""
        knocks = []
        for who in self.cast.live:
            code, step = "", None
            if who.otp_secret:
                step = int(now // OTP_STEP)
                if self._otp_step.get(who.name, -1) >= step:
                    continue
                self._otp_step[who.name] = step
                code = pyotp.TOTP(who.otp_secret).at(now)
            source = who.addresses[self._turn % len(who.addresses)]
            named = None
            if who.allow_other and self._turn % 2:  # every other one names an address
                named = who.addresses[(self._turn + 1) % len(who.addresses)]
            request = Request(int(now * 1000), Action.OPEN, who.service, LEDGER_DURATION,
                              None if named is None else ipaddress.ip_address(named), code)
            payload = self._seal(who, request)
            knocks.append(Knock(Datagram(source, self._sport(), payload, "ledger"),
                                Grant(who.name, named or source, who.service), step))
        self._turn += 1
        self.sent_ledger += knocks
        return knocks

    # ---- the attacker -----------------------------------------------------

    def chunk(self, now: float, count: int, replayable: Sequence[Knock],
              otp_used: Mapping[str, int]) -> tuple[list[Datagram], Counter[str]]:
        """`count` fuzz datagrams.  `replayable`: ledger knocks the server is
        known to have accepted; `otp_used`: client -> a code step the server
        is known to have used (its codes up to it are refused)."""
        job = _Chunk(self, now, list(replayable), dict(otp_used))
        kinds = self.rng.choices(KINDS, WEIGHTS, k=max(0, count - len(KINDS)))
        if count >= len(KINDS):  # every kind in every chunk, the rare ones too
            kinds += KINDS
            self.rng.shuffle(kinds)
        else:
            kinds = self.rng.choices(KINDS, WEIGHTS, k=count)
        made = [job.make(kind) for kind in kinds]
        return made, Counter(d.kind for d in made)

    # ---- helpers ------------------------------------------------------------

    def _seal(self, who: Client, request: Request, *, tag_step: int | None = None,
              server_id: bytes | None = None) -> bytes:
        step = request.timestamp_ms // (STEP_SECONDS * 1000) if tag_step is None else tag_step
        return seal(request, who.keys, server_id or self.cast.server_id,
                    tag=knock_tag(who.keys.tag_key, step), nonce=self.rng.randbytes(NONCE_SIZE))

    def _sport(self) -> int:
        return self.rng.randint(1024, 65535)


class _Chunk:
    """One chunk's material: fresh unsent knocks to mutate, and the quotas."""

    def __init__(self, fuzzer: Fuzzer, now: float, replayable: list[Knock],
                 otp_used: dict[str, int]) -> None:
        self.f, self.cast, self.rng, self.now = fuzzer, fuzzer.cast, fuzzer.rng, now
        self.replayable, self.otp_used = replayable, otp_used
        self.bases = [bytearray(self.knock(who)) for who in self.cast.live
                      for _ in range(BASES)]
        self.burns: Counter[tuple[str, str]] = Counter()
        trusted = [a for who in self.cast.live for a in who.addresses]
        self.sources = [self.cast.attacker, self.cast.same_link, tuple(trusted),
                        self.cast.off_path]

    def make(self, kind: str) -> Datagram:
        made = MAKERS[kind](self)
        if made is None:  # not possible now (no replayable knock yet, quota spent)
            return self.datagram(self.junk(), "junk")
        payload, source = made if isinstance(made, tuple) else (made, self.any_source())
        return self.datagram(payload, kind, source)

    def datagram(self, payload: bytes, kind: str, source: str | None = None) -> Datagram:
        return Datagram(source or self.any_source(), self.f._sport(), payload, kind)

    # sources
    def any_source(self) -> str:
        """The attacker's own, a forged neighbour, a client's trusted address
        (past the forged-packet limits: the deep checks), no route back, or
        anywhere."""
        pick = self.rng.randrange(5)
        return self.rng.choice(self.sources[pick] if pick < 4 else self.f.anywhere)

    # sealing
    def knock(self, who: Client, *, at: float | None = None, service: str | None = None,
              address: str | None = None, otp: str | None = None,
              tag_step: int | None = None, server_id: bytes | None = None) -> bytes:
        when = self.now if at is None else at
        code = otp if otp is not None else (pyotp.TOTP(who.otp_secret).at(when)
                                             if who.otp_secret else "")
        request = Request(int(when * 1000), Action.OPEN, service or who.service,
                          LEDGER_DURATION, None if address is None
                          else ipaddress.ip_address(address), code)
        return self.f._seal(who, request, tag_step=tag_step, server_id=server_id)

    def live(self, *, plain: bool = False) -> Client:
        """A live client; plain: one without a code and without allow_other_address."""
        choices = [c for c in self.cast.live if not plain or not (c.otp_secret or c.allow_other)]
        return self.rng.choice(choices)

    def burn(self, who: Client, kind: str) -> bool:
        """May one more nonce of `who` be burned for `kind` in this chunk?"""
        if self.burns[who.name, kind] >= self.f.burn_quota:
            return False
        self.burns[who.name, kind] += 1
        return True

    def base(self) -> bytearray:
        return bytearray(self.rng.choice(self.bases))

    def junk(self) -> bytes:
        return VERSION_BYTE + self.rng.randbytes(PACKET_SIZE - 1)


def _flip(region: str | None) -> Callable[[_Chunk], bytes]:
    """1..8 distinct bits of one region flipped (None: 2..16 anywhere; fewer
    when a position is drawn twice, never none)."""
    start, end = REGIONS[region] if region else (0, PACKET_SIZE)

    def make(job: _Chunk) -> bytes:
        packet = job.base()
        count = job.rng.randint(1, 8) if region else job.rng.randint(2, 16)
        randrange = job.rng.randrange
        for bit in {randrange(start * 8, end * 8) for _ in range(count)}:  # distinct: >= 1
            packet[bit >> 3] ^= 1 << (bit & 7)
        return bytes(packet)
    return make


def _random_bytes(job: _Chunk) -> bytes:
    size = job.rng.choice((0, 1, PACKET_SIZE - 1, PACKET_SIZE, PACKET_SIZE + 1,
                           job.rng.randint(0, 2 * PACKET_SIZE)))
    return job.rng.randbytes(size)


def _truncate(job: _Chunk) -> bytes:
    return bytes(job.base()[:-job.rng.randint(1, PACKET_SIZE)])


def _extend(job: _Chunk) -> bytes:
    return bytes(job.base()) + job.rng.randbytes(job.rng.randint(1, MAX_PAYLOAD - PACKET_SIZE))


def _forged_rest(job: _Chunk) -> bytes:
    """A live tag (a base's) with random bytes behind it."""
    return bytes(job.base()[:HEADER_SIZE]) + job.rng.randbytes(PACKET_SIZE - HEADER_SIZE)


def _stale(own_tag: bool, sign: int) -> Callable[[_Chunk], bytes]:
    """Sealed right, but its time is beyond the window (sign -1: past, +1:
    future), under its own step's tag or under today's live tag."""
    def make(job: _Chunk) -> bytes:
        beyond = job.cast.window + MARGIN + (job.rng.uniform(0, 600) if own_tag
                                             else job.rng.uniform(0, 15))
        at = job.now + sign * beyond
        return job.knock(job.live(), at=at, tag_step=None if own_tag else step_of(job.now))
    return make


def _step_mismatch(job: _Chunk) -> bytes:
    step = step_of(job.now) + job.rng.choice((-1, 1))
    return job.knock(job.live(), tag_step=step)


def _wrong_server_keys(job: _Chunk) -> bytes:
    """A live client's secret, keys and AAD of another server: unknown tag."""
    return job.knock(job.cast.other_server, server_id=job.cast.other_server_id)


def _wrong_server_aad(job: _Chunk) -> bytes:
    """Right keys and tag, another server's id in the AAD: the MAC passes,
    the decryption does not."""
    return job.knock(job.live(), server_id=job.cast.other_server_id)


def _malformed(job: _Chunk) -> bytes:
    """A body that does not parse (an unknown action, or padding that is
    not zero), sealed with the right keys."""
    who = job.live()
    body = bytearray(encode_body(Request(int(job.now * 1000), Action.OPEN, who.service, 10)))
    if job.rng.random() < 0.5:
        body[8] = job.rng.choice((0, 3, 255))  # the action byte
    else:
        body[-1 - job.rng.randrange(8)] = job.rng.randint(1, 255)  # the padding
    header = VERSION_BYTE + knock_tag(who.keys.tag_key, step_of(job.now))
    nonce = job.rng.randbytes(NONCE_SIZE)
    signed = header + nonce + aead.encrypt(bytes(body), aad(header[1:], job.cast.server_id),
                                           nonce, who.keys.cipher_key)
    return signed + hmac.digest(who.keys.mac_key, signed, "sha256")


def _rotated_out(job: _Chunk) -> bytes:
    return job.knock(job.cast.rotated_out)


def _revoked(job: _Chunk) -> bytes:
    return job.knock(job.cast.revoked)


def _expired(job: _Chunk) -> bytes:
    return job.knock(job.cast.expired)


def _forbidden_service(job: _Chunk) -> bytes | None:
    who = job.live()
    if not job.burn(who, "forbidden_service"):
        return None
    return job.knock(who, service=job.cast.forbidden_service)


def _other_address(job: _Chunk) -> tuple[bytes, str] | None:
    """A client without allow_other_address naming an address not its source."""
    who = job.live(plain=True)
    if not job.burn(who, "other_address"):
        return None
    source = job.any_source()
    named = job.rng.choice([a for a in job.cast.spare + job.cast.off_path if a != source])
    return job.knock(who, address=named), source


def _forged_source(job: _Chunk) -> tuple[bytes, str] | None:
    """A fresh valid knock, never sent by its client, from a forged source
    whose route back does not leave by the attacker's link."""
    who = job.live(plain=True)
    if not job.burn(who, "forged_source"):
        return None
    elsewhere = [a for c in job.cast.live if c is not who for a in c.addresses]
    source = job.rng.choice(job.cast.spare + job.cast.off_path + tuple(elsewhere))
    return job.knock(who), source


def _otp(kind: str) -> Callable[[_Chunk], bytes | None]:
    """A client with a code: none, a wrong one, or one already used."""
    def make(job: _Chunk) -> bytes | None:
        coded = [c for c in job.cast.live if c.otp_secret]
        if not coded:
            return None
        who = job.rng.choice(coded)
        totp = pyotp.TOTP(who.otp_secret)
        if kind == "missing":
            code = ""
        elif kind == "wrong":
            good = {totp.at(job.now + d * OTP_STEP) for d in (-2, -1, 0, 1, 2)}
            code = f"{job.rng.randrange(10**6):06d}"
            while code in good:
                code = f"{job.rng.randrange(10**6):06d}"
        else:
            used = job.otp_used.get(who.name)
            if used is None:
                return None
            code = totp.at(used * OTP_STEP)  # that step's code, used: refused
        return job.knock(who, otp=code) if job.burn(who, f"otp_{kind}") else None
    return make


def _replay(true_source: bool) -> Callable[[_Chunk], tuple[bytes, str] | None]:
    """A ledger knock the server accepted, again: from its own address or
    from anywhere else."""
    def make(job: _Chunk) -> tuple[bytes, str] | None:
        if not job.replayable:
            return None
        knock = job.rng.choice(job.replayable)
        source = knock.datagram.source if true_source else job.rng.choice(
            job.cast.attacker + job.cast.same_link + job.cast.off_path)
        return knock.datagram.payload, source
    return make


Maker = Callable[[_Chunk], bytes | tuple[bytes, str] | None]
MAKERS: dict[str, Maker] = {
    "random_bytes": _random_bytes,
    "junk": lambda job: job.junk(),
    **{f"flip_{region}": _flip(region) for region in REGIONS},
    "flip_anywhere": _flip(None),
    "truncated": _truncate,
    "extended": _extend,
    "live_tag_random_rest": _forged_rest,
    "stale_own_tag": _stale(True, -1),
    "stale_live_tag": _stale(False, -1),
    "future_own_tag": _stale(True, 1),
    "future_live_tag": _stale(False, 1),
    "step_mismatch": _step_mismatch,
    "wrong_server_keys": _wrong_server_keys,
    "wrong_server_aad": _wrong_server_aad,
    "malformed_body": _malformed,
    "rotated_out_key": _rotated_out,
    "revoked_client": _revoked,
    "expired_enrollment": _expired,
    "forbidden_service": _forbidden_service,
    "other_address": _other_address,
    "forged_source": _forged_source,
    "otp_missing": _otp("missing"),
    "otp_wrong": _otp("wrong"),
    "otp_used": _otp("used"),
    "replay_elsewhere": _replay(False),
    "replay_same_source": _replay(True),
}
# relative shares: mostly cheap mutations of unsent knocks; a small share of
# freshly sealed packets (14 us each to make); the quota caps the burning ones
SHARES: dict[str, float] = {
    "random_bytes": 6, "junk": 6, "flip_version": 3, "flip_tag": 6, "flip_nonce": 8,
    "flip_ciphertext": 10, "flip_mac": 10, "flip_anywhere": 8, "truncated": 6,
    "extended": 6, "live_tag_random_rest": 8, "stale_own_tag": 1, "stale_live_tag": 1,
    "future_own_tag": 1, "future_live_tag": 1, "step_mismatch": 1, "wrong_server_keys": 1,
    "wrong_server_aad": 1, "malformed_body": 1, "rotated_out_key": 1, "revoked_client": 1,
    "expired_enrollment": 1, "forbidden_service": 0.2, "other_address": 0.2,
    "forged_source": 0.2, "otp_missing": 0.2, "otp_wrong": 0.2, "otp_used": 0.2,
    "replay_elsewhere": 2, "replay_same_source": 2,
}
KINDS = list(MAKERS)
WEIGHTS = [SHARES[kind] for kind in KINDS]
