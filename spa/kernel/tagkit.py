"""A kit: the eBPF map filter's kernel objects, made in one go (the tag,
nonce and shut maps, and the program that reads them, spa.kernel.ebpf).

Made where CAP_BPF is held: by TagMapFilter (spa.kernel.tagmap) before the
privilege drop, and after it by the gate keeper, which hands the kit's four
file descriptors to the daemon (spa.server.mapgrant; docs/threat-model.md,
"Privilege separation").

Invariants:
- `make` builds the program from this package's own code for the given
  port (None: udp mode) and the kit's own maps; nothing else is loaded.
- `adopt` takes four descriptors handed over only if they are what `make`
  makes: hash maps of the tag, nonce and shut key sizes and entries (the
  tag map's the size asked), a socket filter; otherwise it closes all four.
- A kit owns its descriptors: `close` closes each once.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass

from spa.kernel.bpf import PROG_TYPE_SOCKET_FILTER, BpfError, HashMap, load_program, program_type
from spa.kernel.ebpf import (
    NONCE_PREFIX,
    SHUT_KEY,
    TAG_SIZE,
    VALUE_SIZE,
    Maps,
    capture_program,
    encode,
    udp_program,
)

NONCE_LIMIT = 4096  # replayed nonces blocked at most (the classic program: ~800)
SHUT_LIMIT = 65536  # (shut tag, source) pairs at most: 4,096 tags x MAX_SHUT_SOURCES
# the small maps hold twice their limit: an in-place change adds before it removes
NONCE_ENTRIES, SHUT_ENTRIES = 2 * NONCE_LIMIT, 2 * SHUT_LIMIT
FDS = 4  # descriptors a kit hands over: the tag, nonce and shut maps, the program


@dataclass(slots=True)
class Kit:
    tags: HashMap
    nonces: HashMap
    shut: HashMap
    prog: int

    @property
    def fds(self) -> tuple[int, int, int, int]:
        """In the order `adopt` takes them."""
        return self.tags.fd, self.nonces.fd, self.shut.fd, self.prog

    def close(self) -> None:
        for m in (self.tags, self.nonces, self.shut):
            m.close()
        if self.prog >= 0:
            os.close(self.prog)
            self.prog = -1


def make(port: int | None, entries: int) -> Kit:
    """Three new maps (the tag map of `entries`) and the program for them:
    capture mode's on `port`, or udp mode's (None).  Raises BpfError (EPERM
    without CAP_BPF)."""
    made: list[HashMap] = []
    try:
        made.append(HashMap(TAG_SIZE, VALUE_SIZE, entries, "spa_tags"))
        made.append(HashMap(NONCE_PREFIX, VALUE_SIZE, NONCE_ENTRIES, "spa_nonces"))
        made.append(HashMap(SHUT_KEY, VALUE_SIZE, SHUT_ENTRIES, "spa_shut"))
        maps = Maps(made[0].fd, made[1].fd, made[2].fd)
        program = udp_program(maps) if port is None else capture_program(port, maps)
        prog = load_program(encode(program), "spa_knock")
    except BaseException:
        for m in made:
            m.close()
        raise
    return Kit(made[0], made[1], made[2], prog)


def adopt(fds: Sequence[int], entries: int) -> Kit:
    """The kit behind four descriptors handed over (tags, nonces, shut,
    program), owned from now on.  Raises BpfError (EINVAL) if they are not
    what `make` makes with a tag map of `entries`, after closing them all."""
    try:
        if len(fds) != FDS:
            raise BpfError(errno.EINVAL, f"{len(fds)} descriptors handed over, not {FDS}")
        tags = HashMap.adopt(fds[0], TAG_SIZE, VALUE_SIZE)
        nonces = HashMap.adopt(fds[1], NONCE_PREFIX, VALUE_SIZE)
        shut = HashMap.adopt(fds[2], SHUT_KEY, VALUE_SIZE)
        sizes = (tags.max_entries, nonces.max_entries, shut.max_entries)
        if sizes != (entries, NONCE_ENTRIES, SHUT_ENTRIES):
            raise BpfError(errno.EINVAL, f"handed maps of {sizes} entries, not "
                                         f"{(entries, NONCE_ENTRIES, SHUT_ENTRIES)}")
        if program_type(fds[3]) != PROG_TYPE_SOCKET_FILTER:
            raise BpfError(errno.EINVAL, "handed program is not a socket filter")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return Kit(tags, nonces, shut, fds[3])
