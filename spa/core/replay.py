"""Bounded replay cache: (client, nonce) seen within the acceptance window.

Invariants (docs/protocol.md, "Replay protection"; docs/threat-model.md):
- A (client, nonce) pair recorded at time t is remembered until t + 2 *
  window inclusive.  A packet is only accepted while its timestamp is within
  +-window of the arrival time, so by the time an entry is forgotten the
  packet that made it is refused `stale` anyway.
- Membership is O(1) (a set); expiry is a heap ordered by expiry time
  (O(log n) per new entry, C-level heapq), so a clock that was set back
  never makes old entries block the expiry of new ones.
- A clock that jumps forward and then back can forget entries early: that
  is a documented limit (docs/threat-model.md, "Clocks").
- Hard caps, fail closed: a live entry is never evicted to make room.  When a
  client holds `per_client_cap` live entries, or the cache holds `cap`, new
  packets are refused `replay_cache_full` until entries expire.  Only
  authenticated packets reach the cache, so only an enrolled client can fill
  it, and the per-client cap keeps one client from locking out the others.
- `dump`/`load` round-trip the live entries through a strict binary format
  (no pickle), so a restart within the window does not reopen the door.
  `on_add` lets the caller journal each new entry as it is made
  (`entry_bytes` is its record format; `load` accepts a journal after a dump).
"""

from __future__ import annotations

import enum
import heapq
import struct
from collections.abc import Callable

from spa.core.errors import FormatError

DEFAULT_CAP = 1_000_000  # live entries in all (about 150 MB at worst)
DEFAULT_PER_CLIENT_CAP = 1_024  # live entries per client (34 packets/s for 60 s)
_MAGIC = b"SPARPL1\n"
_HEADER = struct.Struct(">dI")  # window seconds, entry count
_ENTRY = struct.Struct(">dB")  # expiry (Unix seconds), client name length
_NONCE_SIZE = 24


class Check(enum.Enum):
    FRESH = "fresh"
    REPLAY = "replay"
    FULL = "full"


class ReplayCache:
    __slots__ = ("_cap", "_heap", "_per_client", "_per_client_cap", "_seen", "on_add", "window")

    def __init__(
        self,
        window: float,
        *,
        cap: int = DEFAULT_CAP,
        per_client_cap: int = DEFAULT_PER_CLIENT_CAP,
        on_add: Callable[[float, str, bytes], None] | None = None,
    ) -> None:
        if window <= 0 or cap < 1 or per_client_cap < 1:
            raise ValueError("window and caps must be positive")
        self.window = window
        self._cap = cap
        self._per_client_cap = per_client_cap
        self._seen: set[tuple[str, bytes]] = set()
        self._heap: list[tuple[float, str, bytes]] = []
        self._per_client: dict[str, int] = {}
        self.on_add = on_add

    def __len__(self) -> int:
        return len(self._seen)

    def seen(self, client: str, nonce: bytes) -> bool:
        """Whether this nonce is recorded (a set lookup: the verifier asks
        before any cryptography).  An entry past its expiry but not yet
        dropped still counts: its packet is stale by then anyway."""
        return (client, nonce) in self._seen

    def check_and_add(self, client: str, nonce: bytes, now: float) -> Check:
        """Record a nonce if it is new; say whether it was, or why not."""
        heap = self._heap
        if heap and heap[0][0] < now:
            self.expire(now)
        key = (client, nonce)
        if key in self._seen:
            return Check.REPLAY
        count = self._per_client.get(client, 0)
        if count >= self._per_client_cap or len(self._seen) >= self._cap:
            return Check.FULL
        expiry = now + 2 * self.window
        self._seen.add(key)
        heapq.heappush(self._heap, (expiry, client, nonce))
        self._per_client[client] = count + 1
        if self.on_add is not None:
            self.on_add(expiry, client, nonce)
        return Check.FRESH

    def expire(self, now: float) -> None:
        """Forget entries whose packets can no longer pass the time check."""
        heap = self._heap
        while heap and heap[0][0] < now:
            _, client, nonce = heapq.heappop(heap)
            self._seen.discard((client, nonce))
            left = self._per_client[client] - 1
            if left:
                self._per_client[client] = left
            else:
                del self._per_client[client]

    def set_window(self, window: float) -> None:
        """Change the window (a config change).  A wider window extends the
        live entries by the difference, so none expires before its packet is
        stale under the new window; a narrower one keeps them as they are."""
        if window <= 0:
            raise ValueError("window must be positive")
        if window > self.window:
            extra = 2 * (window - self.window)
            self._heap = [(e + extra, c, n) for e, c, n in self._heap]  # order kept
        self.window = window

    def dump(self) -> bytes:
        """Serialize the live entries."""
        parts = [_MAGIC, _HEADER.pack(self.window, len(self._heap))]
        parts += [entry_bytes(expiry, client, nonce) for expiry, client, nonce in self._heap]
        return b"".join(parts)

    @classmethod
    def load(
        cls,
        data: bytes,
        now: float,
        *,
        cap: int = DEFAULT_CAP,
        per_client_cap: int = DEFAULT_PER_CLIENT_CAP,
        journal: bytes = b"",
        window: float | None = None,
    ) -> ReplayCache:
        """Rebuild a cache from `dump` output (plus journal records written
        after it), dropping entries expired by `now`.  With `window` (the
        window the server runs with now), a wider window extends every saved
        entry by the difference before anything is dropped.

        Entries are kept even beyond the caps (refusing more is the safe side).
        A journal's last record may be cut short by a crash: it is ignored.
        Raises FormatError if the data is not a cache this version wrote.
        """
        if not data.startswith(_MAGIC):
            raise FormatError("replay cache file has an unknown format")
        try:
            saved_window, count = _HEADER.unpack_from(data, len(_MAGIC))
            cache = cls(saved_window, cap=cap, per_client_cap=per_client_cap)
            pos = len(_MAGIC) + _HEADER.size
            entries = []
            for _ in range(count):
                expiry, size = _ENTRY.unpack_from(data, pos)
                pos += _ENTRY.size
                client = data[pos : pos + size].decode("utf-8")
                nonce = data[pos + size : pos + size + _NONCE_SIZE]
                pos += size + _NONCE_SIZE
                if len(nonce) != _NONCE_SIZE:
                    raise FormatError("replay cache file is truncated")
                entries.append((expiry, client, nonce))
        except (struct.error, UnicodeDecodeError, ValueError) as exc:
            raise FormatError("replay cache file is damaged") from exc
        if pos != len(data):
            raise FormatError("replay cache file has trailing bytes")
        entries += _journal_entries(journal)
        entries.sort(key=lambda entry: entry[0])  # a sorted list is a heap
        if window is not None:
            extra = 2 * (window - cache.window) if window > cache.window else 0.0
            entries = [(expiry + extra, client, nonce) for expiry, client, nonce in entries]
            cache.window = window
        for expiry, client, nonce in entries:
            if expiry >= now and (client, nonce) not in cache._seen:
                cache._seen.add((client, nonce))
                cache._heap.append((expiry, client, nonce))
                cache._per_client[client] = cache._per_client.get(client, 0) + 1
        return cache


def entry_bytes(expiry: float, client: str, nonce: bytes) -> bytes:
    """One entry's record, as in a dump and in a journal."""
    name = client.encode("utf-8")
    return _ENTRY.pack(expiry, len(name)) + name + nonce


def _journal_entries(journal: bytes) -> list[tuple[float, str, bytes]]:
    entries = []
    pos = 0
    while pos + _ENTRY.size <= len(journal):
        expiry, size = _ENTRY.unpack_from(journal, pos)
        end = pos + _ENTRY.size + size + _NONCE_SIZE
        if end > len(journal):
            break  # a record cut short by a crash
        try:
            client = journal[pos + _ENTRY.size : pos + _ENTRY.size + size].decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError("replay journal is damaged") from None
        entries.append((expiry, client, journal[end - _NONCE_SIZE : end]))
        pos = end
    return entries
