"""Frames on the socketpair between the daemon and the gate keeper
(spa.server.gatemsg says what a frame is; docs/threat-model.md, "Privilege
separation").

Invariants:
- A frame is read whole or not at all: a peer that closes, or takes longer
  than STALL from a frame's first byte, reads as gone (None); a frame over
  MAX_FRAME is drained in pieces and refused, so the next frame starts where
  it ends.
- File descriptors travel only from the gate keeper to the daemon, with the
  first bytes of a reply (SCM_RIGHTS), and are received close-on-exec.  The
  gate keeper reads requests with plain `recv`: whatever descriptors a daemon
  might attach, the kernel closes them unread.
"""

from __future__ import annotations

import array
import os
import socket
import time
from collections.abc import Sequence
from typing import Any

from spa.server import gatemsg

STALL = 10.0  # seconds a begun frame may take to arrive
_INT = array.array("i").itemsize  # bytes of one descriptor in SCM_RIGHTS


def send(sock: socket.socket, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
    """One frame; `fds` go with its first bytes.  Raises OSError, RefusedError
    (too long)."""
    data = gatemsg.frame(message)
    if fds:
        sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                      array.array("i", fds))])
        data = data[sent:]
    sock.sendall(data)


def receive_message(sock: socket.socket, *, request: bool = True,
                    start: bytes = b"") -> dict[str, Any] | None:
    """One message, or None when the other end closed (or a frame stalled).
    `start`: the header's first bytes, read already.  Raises TimeoutError when
    nothing starts within the socket's timeout, RefusedError for a frame read
    whole that is not a message (an oversized one is read and dropped in
    pieces: the next frame starts where it ends)."""
    rest = _exactly(sock, gatemsg.HEADER - len(start), first=not start)
    if rest is None:
        return None
    header = start + rest
    length = int.from_bytes(header, "big")
    if length > gatemsg.MAX_FRAME:
        while length:
            piece = _exactly(sock, min(length, 1 << 20))
            if piece is None:
                return None
            length -= len(piece)
        gatemsg.frame_length(header)  # raises, now that the frame is behind us
    body = _exactly(sock, length)
    if body is None:
        return None
    return gatemsg.decode(body, request=request)


def receive(sock: socket.socket) -> dict[str, Any] | None:
    """The daemon's end reads replies the same way (they hold objects)."""
    return receive_message(sock, request=False)


def receive_with_fds(sock: socket.socket, most: int) -> tuple[dict[str, Any] | None, list[int]]:
    """A reply and the descriptors that came with it (at most `most`; more,
    and none are kept: the kernel closed those beyond, and a reply that
    carried them is not what was asked).  Raises as `receive_message`; on any
    failure the descriptors received are closed."""
    # (socket.recv_fds would drop the flags: descriptors inheritable until closed)
    first, ancillary, flags, _ = sock.recvmsg(gatemsg.HEADER, socket.CMSG_SPACE(most * _INT),
                                              socket.MSG_CMSG_CLOEXEC)
    fds = array.array("i")
    for level, kind, data in ancillary:
        if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
            fds.frombytes(data[:len(data) - len(data) % _INT])
    if flags & socket.MSG_CTRUNC:
        close_all(fds)
        fds = array.array("i")
    if not first:
        close_all(fds)
        return None, []
    try:
        reply = receive_message(sock, request=False, start=first)
    except BaseException:
        close_all(fds)
        raise
    if reply is None:
        close_all(fds)
        return None, []
    return reply, list(fds)


def close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        os.close(fd)


def _exactly(sock: socket.socket, size: int, *, first: bool = False) -> bytes | None:
    """`size` bytes, or None when the other end closed or took longer than
    STALL from the first byte (one byte at a time once never timed out)."""
    chunks: list[bytes] = []
    left, deadline = size, time.monotonic() + STALL
    while left:
        try:
            chunk = sock.recv(min(left, 1 << 20))
        except TimeoutError:
            if first and not chunks:
                raise
            chunk = None
        if chunk == b"":
            return None
        if chunk:
            chunks.append(chunk)
            left -= len(chunk)
        if left and time.monotonic() > deadline:
            return None  # a frame begun and never finished: treat the daemon as gone
    return b"".join(chunks)
