"""Frames on the socketpair between the daemon and the gate keeper
(spa.server.gatemsg says what a frame is; docs/threat-model.md, "Privilege
separation").

Invariants:
- A frame is read whole or not at all: a peer that closes, or takes longer
  than STALL from a frame's first byte, reads as gone (None); a frame over
  MAX_FRAME is drained in pieces and refused, so the next frame starts where
  it ends.
"""

from __future__ import annotations

import socket
import time
from typing import Any

from spa.server import gatemsg

STALL = 10.0  # seconds a begun frame may take to arrive


def send(sock: socket.socket, message: dict[str, Any]) -> None:
    """One frame.  Raises OSError, RefusedError (too long)."""
    sock.sendall(gatemsg.frame(message))


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
