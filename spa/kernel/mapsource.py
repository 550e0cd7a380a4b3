"""The sources' side of the eBPF tag map: `replace_tags`, `update_tags`,
`kernel_map` and `filter_kind` for CaptureSource and UdpSource.

Invariants:
- `replace_tags` runs the eBPF map filter where it can; where eBPF is not
  there (EPERM without CAP_BPF, ENOSYS, a verifier refusal, SPA_NO_EBPF=1)
  it falls back to the classic `set_tags` (which itself falls back to the
  port-only filter past its capacity), and `kernel_map` is False.
- `update_tags` needs the map filter (LocalError otherwise); a change it
  cannot make in the maps (a growth without CAP_BPF that the gate keeper
  did not hand over, `hand_maps`; kernel memory) falls back to the classic
  filter on the whole resulting set, never leaving a filter that drops a
  live tag, until the next start.
- Each returns one line for the log saying which filter runs, on how many
  tags.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING

from spa.server.errors import LocalError

if TYPE_CHECKING:  # (spa.server.sources imports this module)
    from spa.kernel.tagmap import Hand, TagMapFilter
    from spa.server.sources import Shut

NO_EBPF = "SPA_NO_EBPF"  # =1: never try eBPF (tests of the classic fallback)


class MapFiltered:
    """Mixed into a source that has `_sock`, `set_tags` and `_map_port`
    (None: udp mode's program, else capture mode's on that port)."""

    _sock: socket.socket
    _map_port: int | None
    _classic_kind: str = "port-only"
    _tagmap: TagMapFilter | None = None  # while the map filter runs

    def set_tags(self, tags: list[bytes] | None, nonces: Sequence[bytes] = (),
                 shut: Shut | None = None) -> str:
        raise NotImplementedError

    @property
    def kernel_map(self) -> bool:
        """Whether the eBPF map filter runs."""
        return self._tagmap is not None

    def filter_kind(self) -> str:
        """"ebpf map", "classic" or "port-only": what runs now."""
        return "ebpf map" if self._tagmap is not None else self._classic_kind

    @property
    def map_room(self) -> int:
        """Tags the eBPF tag map has room for (0: it does not run)."""
        return self._tagmap.capacity if self._tagmap is not None else 0

    def hand_maps(self, hand: Hand) -> bool:
        """From now on a growth of the running map filter that this process
        cannot make (no CAP_BPF) asks `hand` for the kit (spa.server.runner:
        the gate keeper).  False, and nothing asked ever, when no map filter
        runs (after a fallback it stays classic until the next start)."""
        if self._tagmap is None:
            return False
        self._tagmap.hand = hand
        return True

    def _classic(self, note: str) -> str:
        self._classic_kind = "port-only" if ("port-only" in note
                                             or "no kernel filter" in note) else "classic"
        return note

    def _drop_map(self) -> None:
        if self._tagmap is not None:
            self._tagmap.close()
        self._tagmap = None

    def reserve_map(self, tags: int) -> str:
        """Load the map filter with room for `tags` tags now, while this
        process holds CAP_BPF (spa.server.runner, before the drop): the
        daemon's `replace_tags` and `update_tags` then need no capability
        while the tags fit (GROWTH x room).  Returns a line for the log."""
        from spa.kernel.tagmap import TagMapFilter

        if os.environ.get(NO_EBPF) == "1" or self._tagmap is not None:
            return ""
        tagmap = TagMapFilter(self._sock, self._map_port)
        try:
            tagmap.reserve(tags)
        except OSError as exc:
            tagmap.close()
            return f"eBPF map filter not loaded before the drop ({exc})"
        self._tagmap = tagmap
        return f"eBPF tag map reserved for {tagmap.capacity} tags"

    def make_room(self, coming: int) -> str:
        """Room in the map filter for `coming` more tags now, growing it if
        they would not fit (spa.server.daemon, outside the receive thread,
        before a change it hands that thread; its delta then needs no
        growth).  Returns a line for the log, "" when nothing was needed.  A
        growth that cannot be made leaves the map as it is (every live tag
        in it): the change that does not fit then falls back to the classic
        filter, without asking the gate keeper again."""
        tagmap = self._tagmap
        if tagmap is None or coming <= 0:
            return ""
        grown = (tagmap.grown, tagmap.handed)
        try:
            if not tagmap.make_room(coming):
                return ""
        except OSError as exc:
            return (f"eBPF map filter cannot make room for {coming} more tags ({exc}); the "
                    "classic filter takes over at the change")
        return map_note(tagmap, grown)

    def replace_tags(self, tags: Sequence[bytes], nonces: Sequence[bytes] = (),
                     shut: Shut | None = None) -> str:
        """The whole set of live tags (a start, a reload, a clock jump).
        Returns a line for the log."""
        from spa.kernel.tagmap import TagMapFilter

        if os.environ.get(NO_EBPF) == "1":
            return self._fallback(tags, nonces, shut, f"eBPF off ({NO_EBPF}=1)")
        tagmap = self._tagmap
        fresh = tagmap is None
        if tagmap is None:
            tagmap = TagMapFilter(self._sock, self._map_port)
        grown = (tagmap.grown, tagmap.handed)
        try:
            tagmap.replace(tags, nonces, shut)
        except OSError as exc:
            if fresh:
                tagmap.close()
            return self._fallback(tags, nonces, shut, f"eBPF map filter not loaded ({exc})")
        self._tagmap = tagmap
        return map_note(tagmap, grown)

    def update_tags(self, added: Sequence[bytes], removed: Sequence[bytes],
                    nonces: Sequence[bytes] = (), shut: Shut | None = None) -> str:
        """Add and remove live tags; `nonces` and `shut` are the whole
        current lists.  Returns a line for the log.  Raises LocalError when
        the map filter does not run (call replace_tags first)."""
        tagmap = self._tagmap
        if tagmap is None:
            raise LocalError("update_tags without the eBPF map filter; call replace_tags "
                             "(and check kernel_map) first")
        grown = (tagmap.grown, tagmap.handed)
        try:
            tagmap.update(added, removed, nonces, shut)
        except OSError as exc:
            gone = set(removed)
            tags = [t for t in tagmap.tags if t not in gone]
            tags += [t for t in added if t not in tagmap.tags]
            return self._fallback(tags, nonces, shut,
                                  f"eBPF map filter cannot take the change ({exc})")
        return map_note(tagmap, grown)

    def _fallback(self, tags: Sequence[bytes], nonces: Sequence[bytes], shut: Shut | None,
                  reason: str) -> str:
        note = self.set_tags(list(tags), nonces, shut)  # set_tags drops the map
        return f"{reason}; classic {note}" if self._classic_kind == "classic" else (
            f"{reason}; {note}")


def map_note(tagmap: TagMapFilter, before: tuple[int, int] = (0, 0)) -> str:
    """The log line; `before`: (grown, handed) before the change, to say a
    growth and who made its map."""
    from spa.server.sources import filter_note

    shut: dict[bytes, list[str]] = {}
    for key in tagmap.pairs:
        shut.setdefault(key[:8], []).append(key[8:].hex())
    # (counted where they are: a copy of 4 x 10^5 tags for a log line held the
    # GIL 7 ms at every round of the rotation)
    note = filter_note(tagmap.tags, tagmap.nonces, shut)
    grew = ""
    if tagmap.grown > before[0]:
        grew = "; grown, its maps made by the gate keeper" if tagmap.handed > before[1] else (
            "; grown")
    return note.replace("kernel filter", "eBPF map filter", 1) + (
        f" (room for {tagmap.capacity}{grew})")
