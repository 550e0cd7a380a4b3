"""Notifications of nftables changes: the netlink group `nft monitor` reads.

Every committed nftables transaction, by any program, is announced to the
members of NFNLGRP_NFTABLES as one message per change (new or deleted table,
chain, rule, set, element) followed by a NEWGEN message that names the
process that committed it.  The daemon listens, so that when another program
removes or alters our table (`nft flush ruleset`, `systemctl restart
nftables`) it can put the gate back at once instead of at the next poll.

Invariants:
- `CommitParser.feed` is pure and never raises for any bytes: a message that
  does not add up ends the parse of that buffer (the caller then checks
  everything, as after lost messages).
- A `Commit` is the run of changes up to a NEWGEN message; changes seen
  before it are never reported twice.
- `NftWatch` only listens; it never sends a request.  Lost notifications (a
  full socket buffer: ENOBUFS) are reported as `None`, never hidden.
- Set elements that the kernel times out are not announced (measured on
  Linux 6.x): a grant ending on time wakes nobody.
"""

from __future__ import annotations

import errno
import select
import socket
import struct
from dataclasses import dataclass

NETLINK_NETFILTER = 12  # linux/netlink.h
NFNLGRP_NFTABLES = 7  # linux/netfilter/nfnetlink.h
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NFNL_SUBSYS_NFTABLES = 10
RECV_BUFFER = 1 << 20  # a flush of a large ruleset announces thousands of changes
RECV_SIZE = 1 << 16

# enum nf_tables_msg_types (linux/netfilter/nf_tables.h)
MSG_NAMES = {0: "table", 2: "table", 3: "chain", 5: "chain", 6: "rule", 8: "rule",
             9: "set", 11: "set", 12: "element", 14: "element", 18: "object", 20: "object"}
DELETES = {2, 5, 8, 11, 14, 20}
NFT_MSG_NEWGEN = 15
NFTA_TABLE = 1  # the table name is attribute 1 of table, chain, rule, set, elem and obj messages
NFTA_GEN_PROC_PID = 2

_NLMSG = struct.Struct("=IHHII")  # length, type, flags, seq, port id
_NFGEN = struct.Struct("=BBH")  # family, version, resource id
_NLA = struct.Struct("=HH")  # attribute length, type
FAMILIES = {1: "inet", 2: "ip", 3: "arp", 5: "netdev", 7: "bridge", 10: "ip6"}


@dataclass(frozen=True, slots=True)
class Change:
    what: str  # table, chain, rule, set, element, object
    deleted: bool
    family: str
    table: str


@dataclass(frozen=True, slots=True)
class Commit:
    """One committed transaction: its changes, and who committed it."""

    pid: int | None
    changes: tuple[Change, ...]

    def touches(self, family: str, table: str) -> bool:
        return any(c.family == family and c.table == table for c in self.changes)


def _attributes(data: bytes, start: int, end: int) -> dict[int, bytes]:
    found: dict[int, bytes] = {}
    while start + _NLA.size <= end:
        length, kind = _NLA.unpack_from(data, start)
        if length < _NLA.size or start + length > end:
            break
        found.setdefault(kind & 0x3FFF, data[start + _NLA.size:start + length])
        start += (length + 3) & ~3
    return found


class CommitParser:
    """Turns received netlink buffers into commits (state: the changes of
    a transaction whose NEWGEN has not arrived yet)."""

    def __init__(self) -> None:
        self._pending: list[Change] = []

    def feed(self, data: bytes) -> tuple[list[Commit], bool]:
        """(commits completed by this buffer, whether the buffer parsed whole)."""
        commits: list[Commit] = []
        offset = 0
        while offset + _NLMSG.size <= len(data):
            length, kind, _, _, _ = _NLMSG.unpack_from(data, offset)
            end = offset + length
            if length < _NLMSG.size + _NFGEN.size or end > len(data):
                return commits, False
            if kind >> 8 == NFNL_SUBSYS_NFTABLES:
                family = FAMILIES.get(data[offset + _NLMSG.size], "unknown")
                attrs = _attributes(data, offset + _NLMSG.size + _NFGEN.size, end)
                message = kind & 0xFF
                if message == NFT_MSG_NEWGEN:
                    pid = attrs.get(NFTA_GEN_PROC_PID)
                    commits.append(Commit(struct.unpack(">I", pid)[0] if pid and len(pid) == 4
                                          else None, tuple(self._pending)))
                    self._pending = []
                elif message in MSG_NAMES:
                    table = attrs.get(NFTA_TABLE, b"").split(b"\0", 1)[0]
                    self._pending.append(Change(MSG_NAMES[message], message in DELETES, family,
                                                table.decode("utf-8", "replace")))
            offset += (length + 3) & ~3
        return commits, offset == len(data)


class NftWatch:
    """A netlink socket in the nftables notification group.

    The constructor raises OSError when the kernel refuses (no CAP_NET_ADMIN,
    no nf_tables): the caller then relies on its polls.
    """

    def __init__(self) -> None:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                             NETLINK_NETFILTER)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECV_BUFFER)
            sock.bind((0, 0))
            sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self._sock = sock
        self._parser = CommitParser()

    def fileno(self) -> int:
        return self._sock.fileno()

    def wait(self, timeout: float) -> list[Commit] | None:
        """Commits announced within `timeout` seconds (every one queued, once
        one arrived); [] if none; None if notifications were lost."""
        ready, _, _ = select.select([self._sock], [], [], timeout)
        if not ready:
            return []
        commits: list[Commit] = []
        whole = True
        while True:
            try:
                data = self._sock.recv(RECV_SIZE)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self._parser = CommitParser()
                    whole = False
                    continue
                raise
            found, parsed = self._parser.feed(data)
            commits += found
            whole &= parsed
        return commits if whole else None

    def close(self) -> None:
        self._sock.close()
