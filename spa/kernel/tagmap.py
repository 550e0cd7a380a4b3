"""TagMapFilter: the eBPF socket filter and the three maps it reads.

Invariants:
- The maps hold exactly `self.tags` (with FLAG_SHUT for the live shut
  tags), `self.nonces` and the (tag, source) pairs of the live shut tags,
  at most MAX_SHUT_SOURCES sources each; Python's copy and the kernel's
  agree after every call that returns (tests read the maps back).
- A change never drops a live tag: additions go in before removals, a shut
  tag's sources before its flag, and a new program replaces the old on the
  socket atomically (SO_ATTACH_BPF), the old closed only after.
- The tag map has room for at least twice the tags (MIN_ENTRIES at least);
  an update that would not fit grows it: a new map of twice the size,
  filled from Python's copy, a new program, attached, then the old closed.
- Creating maps or loading a program needs CAP_BPF: `replace` without it
  changes the maps in place when the set fits, and a growth without it
  raises BpfError (the source falls back to the classic filter).
Nonces and shut pairs that do not fit their maps are left out (they pass
as if not blocked or not shut), as in the classic program.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from collections.abc import Container, Sequence

from spa.kernel.bpf import BpfError, HashMap, attach, load_program
from spa.kernel.ebpf import (
    ADDRESS_SIZE,
    FLAG_SHUT,
    NONCE_PREFIX,
    SHUT_KEY,
    TAG_SIZE,
    VALUE_SIZE,
    Maps,
    capture_program,
    encode,
    udp_program,
)
from spa.server.sources import MAX_SHUT_SOURCES, Shut

MIN_ENTRIES = 65536  # the tag map's least capacity: 1 MiB of buckets empty, 72 B per entry added
NONCE_LIMIT = 4096  # replayed nonces blocked at most (the classic program: ~800)
SHUT_LIMIT = 65536  # (shut tag, source) pairs at most: 4,096 tags x MAX_SHUT_SOURCES
# the small maps hold twice their limit: an in-place change adds before it removes
NONCE_ENTRIES, SHUT_ENTRIES = 2 * NONCE_LIMIT, 2 * SHUT_LIMIT
GROWTH = 2  # capacity = GROWTH x the tags when created or grown
_PLAIN, _SHUT = bytes(VALUE_SIZE), FLAG_SHUT.to_bytes(VALUE_SIZE, "little")
_DENIED = (errno.EPERM, errno.EACCES)


def source_key(tag: bytes, source: str) -> bytes | None:
    """(tag, 16-byte address) for the shut map, or None if `source` is not
    an address (it matches no packet)."""
    try:
        address = ipaddress.ip_address(source)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv4Address):
        address = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + address.packed)
    return tag + address.packed


class _Live(Container[bytes]):
    """Whether a tag is live after a change (without copying the set)."""

    def __init__(self, tags: Container[bytes], gone: Container[bytes],
                 coming: Container[bytes]) -> None:
        self.tags, self.gone, self.coming = tags, gone, coming

    def __contains__(self, tag: object) -> bool:
        return tag in self.coming or (tag in self.tags and tag not in self.gone)


def shut_pairs(tags: Container[bytes], shut: Shut | None) -> set[bytes]:
    """The shut map's keys for the live tags (`tags`) among `shut`'s, whole
    tags at a time in the order given while they fit in SHUT_LIMIT (the
    rest pass as if not shut)."""
    live = tags
    pairs: set[bytes] = set()
    for tag, sources in (shut or {}).items():
        if tag in live:
            keys = {k for s in sources[:MAX_SHUT_SOURCES] if (k := source_key(tag, s))}
            if len(pairs) + len(keys) > SHUT_LIMIT:
                break
            pairs |= keys
    return pairs


def fit_nonces(nonces: Sequence[bytes]) -> set[bytes]:
    """The first NONCE_LIMIT nonce prefixes (8 bytes each)."""
    return {n[:NONCE_PREFIX] for n in nonces[:NONCE_LIMIT] if len(n) >= NONCE_PREFIX}


class TagMapFilter:
    """The maps and the program for one socket.  `port` None: udp mode
    (the program for a bound UDP socket), else capture mode on `port`."""

    def __init__(self, sock: socket.socket, port: int | None) -> None:
        self._sock, self._port = sock, port
        self._maps: tuple[HashMap, HashMap, HashMap] | None = None
        self._prog = -1
        self.tags: dict[bytes, bool] = {}  # live tag -> shut
        self.nonces: set[bytes] = set()
        self.pairs: set[bytes] = set()  # the shut map's keys
        self.shut_tags: set[bytes] = set()  # the tags flagged FLAG_SHUT
        self.grown = 0  # times the tag map was grown

    @property
    def kind(self) -> str:
        return "ebpf map"

    @property
    def capacity(self) -> int:
        return self._maps[0].max_entries if self._maps else 0

    def reserve(self, tags: int) -> None:
        """Maps with room for `tags` tags (GROWTH x, MIN_ENTRIES at least)
        and their program, attached, while this process may still create
        them (before the privilege drop: afterwards `replace` and `update`
        change them in place).  The program drops every knock until the
        first `replace`.  Raises BpfError (or OSError from the attach)."""
        self._rebuild(max(MIN_ENTRIES, GROWTH * tags), {}, set(), set())

    def replace(self, tags: Sequence[bytes], nonces: Sequence[bytes] = (),
                shut: Shut | None = None) -> None:
        """The whole set: new maps and program, attached atomically; without
        CAP_BPF (EPERM) and maps with room, the maps changed in place.
        Raises BpfError (or OSError from the attach)."""
        wanted = dict.fromkeys(tags, False)
        pairs = shut_pairs(wanted, shut)
        for key in pairs:
            wanted[key[:TAG_SIZE]] = True
        try:
            self._rebuild(max(MIN_ENTRIES, GROWTH * len(wanted)), wanted, fit_nonces(nonces),
                          pairs)
        except BpfError as exc:
            new = [t for t in wanted if t not in self.tags]
            if (exc.errno not in _DENIED or self._maps is None
                    or len(self.tags) + len(new) > self.capacity):
                raise
            self._change(new, {t for t in self.tags if t not in wanted}, fit_nonces(nonces),
                         pairs)

    def update(self, added: Sequence[bytes], removed: Sequence[bytes],
               nonces: Sequence[bytes] = (), shut: Shut | None = None) -> None:
        """Add and remove tags (batches; the cost is the change's, not the
        set's); `nonces` and `shut` are the whole current lists.  Grows the
        tag map when it would overflow.  Raises BpfError (EPERM: a growth
        without CAP_BPF)."""
        coming = set(added)  # (a dict of 10^5 held the GIL 8 ms; a set, 3)
        gone = {t for t in removed if t in self.tags and t not in coming}
        new = [t for t in coming if t not in self.tags]
        peak = len(self.tags) + len(new)  # additions go in before removals
        if peak > self.capacity:
            self._grow(peak)
        self._change(new, gone, fit_nonces(nonces), shut_pairs(_Live(self.tags, gone, coming),
                                                               shut))

    def _grow(self, peak: int) -> None:
        assert self._maps is not None
        size = self.capacity
        while size < GROWTH * peak:
            size *= GROWTH
        fresh = HashMap(TAG_SIZE, VALUE_SIZE, size, "spa_tags")
        try:
            _fill(fresh, self.tags)
            prog = self._load(Maps(fresh.fd, self._maps[1].fd, self._maps[2].fd))
        except BaseException:
            fresh.close()
            raise
        old = self._maps[0]
        self._maps = (fresh, self._maps[1], self._maps[2])
        self._swap(prog)
        old.close()
        self.grown += 1

    def _rebuild(self, size: int, wanted: dict[bytes, bool], nonces: set[bytes],
                 pairs: set[bytes]) -> None:
        made: list[HashMap] = []
        try:
            made.append(HashMap(TAG_SIZE, VALUE_SIZE, size, "spa_tags"))
            made.append(HashMap(NONCE_PREFIX, VALUE_SIZE, NONCE_ENTRIES, "spa_nonces"))
            made.append(HashMap(SHUT_KEY, VALUE_SIZE, SHUT_ENTRIES, "spa_shut"))
            made[1].update_batch(list(nonces), [_PLAIN] * len(nonces))
            made[2].update_batch(list(pairs), [_PLAIN] * len(pairs))
            _fill(made[0], wanted)
            prog = self._load(Maps(made[0].fd, made[1].fd, made[2].fd))
        except BaseException:
            for m in made:
                m.close()
            raise
        old = self._maps
        self._maps = (made[0], made[1], made[2])
        self._swap(prog)
        for m in old or ():
            m.close()
        self.tags, self.nonces, self.pairs = wanted, set(nonces), set(pairs)
        self.shut_tags = {p[:TAG_SIZE] for p in pairs}

    def _change(self, new: list[bytes], gone: set[bytes], nonces: set[bytes],
                pairs: set[bytes]) -> None:
        """In place, in an order that never drops a live tag: `new` tags in,
        the shut ones' sources before their flag, then `gone` out."""
        assert self._maps is not None
        tag_map, nonce_map, shut_map = self._maps
        flagged = {p[:TAG_SIZE] for p in pairs}
        # (no sort, no one-piece copy of a step's tags: each such C call held
        # the GIL 8-31 ms at 10^5 tags, a stall of the receive thread)
        shut_map.update_batch(list(pairs - self.pairs), [_PLAIN] * len(pairs - self.pairs))
        flips = [t for t in flagged ^ self.shut_tags if t not in gone]
        # a new tag goes in with its flag; a kept one whose flag flips, again
        writes = new + [t for t in flips if t in self.tags]
        tag_map.update_batch(writes, [_SHUT if t in flagged else _PLAIN for t in writes])
        tag_map.delete_batch(list(gone))
        shut_map.delete_batch(list(self.pairs - pairs))
        for t in gone:
            del self.tags[t]
        self.tags.update((t, t in flagged) for t in writes)
        self.pairs, self.shut_tags = pairs, flagged
        nonce_map.update_batch(list(nonces - self.nonces), [_PLAIN] * len(nonces - self.nonces))
        nonce_map.delete_batch(list(self.nonces - nonces))
        self.nonces = nonces

    def _load(self, maps: Maps) -> int:
        program = udp_program(maps) if self._port is None else capture_program(self._port, maps)
        return load_program(encode(program), "spa_knock")

    def _swap(self, prog: int) -> None:
        try:
            attach(self._sock, prog)
        except OSError:
            _close_fd(prog)
            raise
        _close_fd(self._prog)
        self._prog = prog

    def map_keys(self) -> tuple[set[bytes], set[bytes], set[bytes]]:
        """What the kernel's maps hold (tags, nonces, shut pairs)."""
        assert self._maps is not None
        return tuple(set(m.all_keys()) for m in self._maps)  # type: ignore[return-value]

    def shut_flags(self) -> dict[bytes, bool]:
        assert self._maps is not None
        return {t: self._maps[0].lookup(t) == _SHUT for t in self._maps[0].all_keys()}

    def memlock(self) -> int:
        """Kernel memory charged for the three maps (bytes)."""
        return sum(m.memlock() for m in self._maps or ())

    def close(self) -> None:
        """Close the maps and program fds (an attached program stays on the
        socket until replaced or the socket closes)."""
        for m in self._maps or ():
            m.close()
        self._maps = None
        _close_fd(self._prog)
        self._prog = -1


def _fill(tag_map: HashMap, tags: dict[bytes, bool]) -> None:
    keys = list(tags)
    tag_map.update_batch(keys, [_SHUT if tags[t] else _PLAIN for t in keys])


def _close_fd(fd: int) -> None:
    if fd >= 0:
        os.close(fd)


assert ADDRESS_SIZE + TAG_SIZE == SHUT_KEY
