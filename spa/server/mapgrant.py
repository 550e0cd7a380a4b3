"""What the gate keeper makes for the daemon's eBPF tag map filter after the
privilege drop (docs/threat-model.md, "Privilege separation").

The daemon holds no capability; a growth of its tag map past the room made
before the drop needs new maps and a new program, which need CAP_BPF.  The
gate keeper keeps CAP_BPF for this alone (spa.server.privsep, only when the
map filter runs) and makes them from its own code (spa.kernel.tagkit), never
from anything the daemon sends but three numbers (gatemsg.TagMap).

Invariants:
- A kit is made only for the gate keeper's own mode and knock port (its
  config), so its program filters nothing but the daemon's own socket's
  knocks.
- Each kit's tag map at least doubles the largest made so far (the room
  made before the drop, to start with) and holds at most `most` entries
  (gatemsg.MAX_TAG_MAP, or fewer: SPA_MAX_TAG_MAP); so at most
  log2(most / room) kits are made in the gate keeper's life, and the kernel
  memory they may take is bounded whatever the daemon asks.
- Anything else is refused whole (RefusedError) and nothing is made; a
  kernel that will not make the kit is a LocalError.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from spa.kernel.bpf import BpfError
from spa.kernel.tagkit import Kit
from spa.kernel.tagkit import make as make_kit
from spa.kernel.tagmap import GROWTH
from spa.server.errors import LocalError
from spa.server.gatemsg import MAX_TAG_MAP, RefusedError, TagMap

CAP_VARIABLE = "SPA_MAX_TAG_MAP"  # entries: lower the most a gate keeper makes

Make = Callable[[int | None, int], Kit]


def most_from(environ: Mapping[str, str]) -> int:
    """The most entries a tag map may have here: MAX_TAG_MAP, or less where
    SPA_MAX_TAG_MAP says so (set by whoever starts the server; the daemon
    cannot change the gate keeper's environment).  Raises LocalError for a
    value that is not a whole number."""
    text = environ.get(CAP_VARIABLE)
    if text is None:
        return MAX_TAG_MAP
    if not text.isdigit():
        raise LocalError(f"{CAP_VARIABLE}={text[:20]!r} is not a number of tag map entries")
    return min(int(text), MAX_TAG_MAP)


class MapGrants:
    """The gate keeper's side of gatemsg.TagMap."""

    def __init__(self, mode: str, port: int, room: int, *, most: int = MAX_TAG_MAP,
                 make: Make = make_kit) -> None:
        """`room`: the tag map's entries made before the drop."""
        self.mode, self.port = mode, port
        self.room, self.most = room, most
        self.made = 0
        self._make = make

    def grant(self, request: TagMap) -> Kit:
        """A new kit (the caller hands its descriptors over, then closes it).
        Raises RefusedError, LocalError."""
        if (request.mode, request.port) != (self.mode, self.port):
            raise RefusedError(f"tagmap: only for {self.mode} on port {self.port}, the "
                               "gate keeper's own")
        if request.entries < GROWTH * self.room:
            raise RefusedError(f"tagmap: {request.entries} entries do not double the room "
                               f"made ({self.room})")
        if request.entries > self.most:
            raise RefusedError(f"tagmap: {request.entries} entries are over the most "
                               f"({self.most})")
        port = None if self.mode == "udp" else self.port
        try:
            kit = self._make(port, request.entries)
        except BpfError as exc:
            raise LocalError(f"the gate keeper could not make a tag map of {request.entries} "
                             f"entries: {exc}") from None
        self.room = request.entries
        self.made += 1
        return kit
