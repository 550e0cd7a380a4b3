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
  an update that would not fit grows it: a new kit (spa.kernel.tagkit: the
  three maps, the tag map twice the size or more, and their program),
  filled from Python's copy, attached, then the old kit closed.
- Creating maps or loading a program needs CAP_BPF: `replace` without it
  changes the maps in place when the set fits.  A growth without it asks
  `hand` (the gate keeper, spa.server.mapgrant) for the kit, never for less
  than twice the room; without `hand`, or when it refuses or fails, it
  raises OSError (the source falls back to the classic filter), and after
  one refusal it never asks again.
Nonces and shut pairs that do not fit their maps are left out (they pass
as if not blocked or not shut), as in the classic program.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Callable, Container, Sequence

from spa.kernel import tagkit
from spa.kernel.bpf import BpfError, HashMap, attach
from spa.kernel.ebpf import ADDRESS_SIZE, FLAG_SHUT, NONCE_PREFIX, SHUT_KEY, TAG_SIZE, VALUE_SIZE
from spa.kernel.tagkit import NONCE_LIMIT, SHUT_LIMIT, Kit
from spa.server.errors import LocalError
from spa.server.sources import MAX_SHUT_SOURCES, Shut

MIN_ENTRIES = 65536  # the tag map's least capacity: 1 MiB of buckets empty, 72 B per entry added
GROWTH = 2  # capacity = GROWTH x the tags when created or grown
_PLAIN, _SHUT = bytes(VALUE_SIZE), FLAG_SHUT.to_bytes(VALUE_SIZE, "little")
# how this process makes a kit itself (a test or benchmark puts the dropped daemon's EPERM here)
make_kit: Callable[[int | None, int], Kit] = tagkit.make
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


Hand = Callable[[int], Kit]  # a kit whose tag map has this many entries, made elsewhere


class NotHandedError(OSError):
    """A growth without CAP_BPF that the process which may make maps (the
    gate keeper) refused or failed (says why)."""


class TagMapFilter:
    """The maps and the program for one socket.  `port` None: udp mode
    (the program for a bound UDP socket), else capture mode on `port`.
    `hand`: where a growth without CAP_BPF gets its kit (None: nowhere)."""

    def __init__(self, sock: socket.socket, port: int | None) -> None:
        self._sock, self._port = sock, port
        self._kit: Kit | None = None
        self.hand: Hand | None = None
        self.refused: NotHandedError | None = None  # what `hand` said, once
        self.tags: dict[bytes, bool] = {}  # live tag -> shut
        self.nonces: set[bytes] = set()
        self.pairs: set[bytes] = set()  # the shut map's keys
        self.shut_tags: set[bytes] = set()  # the tags flagged FLAG_SHUT
        self.grown = 0  # times the tag map was grown
        self.handed = 0  # of them, with a kit made elsewhere (`hand`)

    @property
    def kind(self) -> str:
        return "ebpf map"

    @property
    def capacity(self) -> int:
        return self._kit.tags.max_entries if self._kit else 0

    def reserve(self, tags: int) -> None:
        """Maps with room for `tags` tags (GROWTH x, MIN_ENTRIES at least)
        and their program, attached, while this process may still create
        them (before the privilege drop: afterwards `replace` and `update`
        change them in place).  The program drops every knock until the
        first `replace`.  Raises BpfError (or OSError from the attach)."""
        self._rebuild(make_kit(self._port, max(MIN_ENTRIES, GROWTH * tags)), {}, set(), set())

    def replace(self, tags: Sequence[bytes], nonces: Sequence[bytes] = (),
                shut: Shut | None = None) -> None:
        """The whole set: a new kit, attached atomically; without CAP_BPF
        (EPERM) the maps changed in place when the set fits, else a kit from
        `hand` (a growth).  Raises OSError (BpfError, NotHandedError, the attach)."""
        wanted = dict.fromkeys(tags, False)
        pairs = shut_pairs(wanted, shut)
        for key in pairs:
            wanted[key[:TAG_SIZE]] = True
        fitted, grows = fit_nonces(nonces), False
        try:
            kit = make_kit(self._port, max(MIN_ENTRIES, GROWTH * len(wanted)))
        except BpfError as exc:
            if exc.errno not in _DENIED or self._kit is None:
                raise
            new = [t for t in wanted if t not in self.tags]
            peak = len(self.tags) + len(new)  # in place, additions go in before removals
            if peak <= self.capacity:
                self._change(new, {t for t in self.tags if t not in wanted}, fitted, pairs)
                return
            kit, grows = self._handed(peak, exc), True
        self._rebuild(kit, wanted, fitted, pairs)
        self.grown += grows

    def update(self, added: Sequence[bytes], removed: Sequence[bytes],
               nonces: Sequence[bytes] = (), shut: Shut | None = None) -> None:
        """Add and remove tags (batches; the cost is the change's, not the
        set's); `nonces` and `shut` are the whole current lists.  Grows the
        tag map when it would overflow.  Raises OSError (a growth without
        CAP_BPF that `hand` did not make: NotHandedError, or EPERM without it)."""
        coming = set(added)  # (a dict of 10^5 held the GIL 8 ms; a set, 3)
        gone = {t for t in removed if t in self.tags and t not in coming}
        new = [t for t in coming if t not in self.tags]
        peak = len(self.tags) + len(new)  # additions go in before removals
        if peak > self.capacity:
            self._grow(peak)
        self._change(new, gone, fit_nonces(nonces), shut_pairs(_Live(self.tags, gone, coming),
                                                               shut))

    def grown_size(self, peak: int) -> int:
        """The tag map's entries for `peak` tags: the room doubled (GROWTH)
        until it holds GROWTH x `peak`; from MIN_ENTRIES if none."""
        size = max(self.capacity, MIN_ENTRIES)
        while size < GROWTH * peak:
            size *= GROWTH
        return size

    def _grow(self, peak: int) -> None:
        assert self._kit is not None
        try:
            kit = make_kit(self._port, self.grown_size(peak))
        except BpfError as exc:
            if exc.errno not in _DENIED:
                raise
            kit = self._handed(peak, exc)
        self._rebuild(kit, self.tags, self.nonces, self.pairs)
        self.grown += 1

    def make_room(self, coming: int) -> bool:
        """Room for `coming` more tags than it holds: a growth now if they
        would not fit (for a caller that must not grow later: the receive
        thread).  True if it grew.  Raises as `update`."""
        peak = len(self.tags) + coming
        if peak <= self.capacity:
            return False
        self._grow(peak)
        return True

    def _handed(self, peak: int, denied: BpfError) -> Kit:
        """A kit for `peak` (more than the room) from `hand`.  Raises
        `denied` without one, NotHandedError when it refuses or fails, and
        then again at once for every later growth (`hand` is asked once)."""
        if self.hand is None:
            raise denied
        if self.refused is not None:
            raise self.refused
        size = self.grown_size(peak)
        try:
            kit = self.hand(size)
        except (OSError, LocalError) as exc:
            self.refused = NotHandedError(f"no tag map of {size} entries from the gate "
                                          f"keeper: {exc}")
            raise self.refused from None
        self.handed += 1
        return kit

    def _rebuild(self, kit: Kit, wanted: dict[bytes, bool], nonces: set[bytes],
                 pairs: set[bytes]) -> None:
        """Fill `kit` with the whole set, attach its program, close the old
        kit (the old program runs until the new one does)."""
        try:
            kit.nonces.update_batch(list(nonces), [_PLAIN] * len(nonces))
            kit.shut.update_batch(list(pairs), [_PLAIN] * len(pairs))
            _fill(kit.tags, wanted)
            attach(self._sock, kit.prog)
        except BaseException:
            kit.close()
            raise
        old, self._kit = self._kit, kit
        if old is not None:
            old.close()
        self.tags, self.nonces, self.pairs = wanted, set(nonces), set(pairs)
        self.shut_tags = {p[:TAG_SIZE] for p in pairs}

    def _change(self, new: list[bytes], gone: set[bytes], nonces: set[bytes],
                pairs: set[bytes]) -> None:
        """In place, in an order that never drops a live tag: `new` tags in,
        the shut ones' sources before their flag, then `gone` out."""
        assert self._kit is not None
        tag_map, nonce_map, shut_map = self._kit.tags, self._kit.nonces, self._kit.shut
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

    def _maps(self) -> tuple[HashMap, HashMap, HashMap]:
        assert self._kit is not None
        return self._kit.tags, self._kit.nonces, self._kit.shut

    def map_keys(self) -> tuple[set[bytes], set[bytes], set[bytes]]:
        """What the kernel's maps hold (tags, nonces, shut pairs)."""
        return tuple(set(m.all_keys()) for m in self._maps())  # type: ignore[return-value]

    def shut_flags(self) -> dict[bytes, bool]:
        tag_map = self._maps()[0]
        return {t: tag_map.lookup(t) == _SHUT for t in tag_map.all_keys()}

    def memlock(self) -> int:
        """Kernel memory charged for the three maps (bytes)."""
        return sum(m.memlock() for m in self._maps()) if self._kit else 0

    def close(self) -> None:
        """Close the maps and program fds (an attached program stays on the
        socket until replaced or the socket closes)."""
        if self._kit is not None:
            self._kit.close()
        self._kit = None


def _fill(tag_map: HashMap, tags: dict[bytes, bool]) -> None:
    keys = list(tags)
    tag_map.update_batch(keys, [_SHUT if tags[t] else _PLAIN for t in keys])


assert ADDRESS_SIZE + TAG_SIZE == SHUT_KEY
