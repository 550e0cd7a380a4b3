"""The typed messages between the unprivileged daemon and the privileged gate
keeper (docs/threat-model.md, "Privilege separation").

The daemon that parses packets holds no capability; everything it wants of
the firewall it asks of the gate keeper in these messages, one request and
one reply at a time, over a socketpair.

Invariants:
- A frame is a 4-byte big-endian length and that many bytes of UTF-8 JSON
  (an object); nothing else is ever decoded (no pickle).  A frame longer than
  MAX_FRAME is refused before it is read.
- `parse_request` turns a frame into one of the request types below or raises
  RefusedError: an unknown kind, a missing or extra field, a wrong type, a
  malformed address (a network, a zone, an unspecified or multicast address),
  a service name that is not a plain name, a malformed destination (a
  named gateway service's lease's address, the change's last item when
  there is one), or a tag map of a mode, port or
  size out of range.  Whether the service exists and the time is allowed is
  the gate keeper's check against its own config (spa.server.monitor), and
  whether it makes that tag map is its own (spa.server.mapgrant), not this
  module's.
- Pure: no sockets here, only bytes in and values out (the edges frame them).
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from spa.core.leases import Allow, Remove
from spa.core.wire import IPAddress

MAX_FRAME = 16 * 1024 * 1024  # bytes: a `reconcile` of MAX_CHANGES grants fits (about 50 each)
HEADER = 4  # bytes of length before each frame
# changes in one request: a frame of nothing but empty lists costs the decoder
# about 60 bytes each, so this bounds the gate keeper's memory per request too
MAX_CHANGES = 250_000
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}\Z")  # a service name (spa.server.config)
# The most entries a tag map request may name: 16,777,216 tags' room, 256 MiB of the
# kernel's buckets empty (16 B each; 72 B more per entry filled).  The gate keeper may make
# fewer (spa.server.mapgrant).
MAX_TAG_MAP = 1 << 24
MODES = ("capture", "udp")  # the packet sources a tag map's program is for


class RefusedError(Exception):
    """A request the gate keeper will not carry out (says why)."""


@dataclass(frozen=True, slots=True)
class Start:
    """Install the gate for these services (the gate keeper's definitions)."""

    services: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Apply:
    changes: tuple[Allow | Remove, ...]


@dataclass(frozen=True, slots=True)
class Simple:
    """A request without arguments: held, drops, gate, check, fold, host,
    stamp and config (the config file's version and text, for the daemon,
    which may not read it itself), stop."""

    kind: str


@dataclass(frozen=True, slots=True)
class Reconcile:
    """Hold exactly these grants (at start, and after a failed change)."""

    grants: tuple[Allow, ...]


@dataclass(frozen=True, slots=True)
class TagMap:
    """A new kit for the eBPF tag map filter (spa.kernel.tagkit): three maps,
    the tag map of `entries`, and the gate keeper's own program for `mode`
    on `port`, handed back as file descriptors (spa.server.mapgrant)."""

    mode: str
    port: int
    entries: int


@dataclass(frozen=True, slots=True)
class Gated:
    """Drop a named gateway service's port on these addresses from now on,
    before any lease (what its host's name gives at start and reload)."""

    addresses: tuple[tuple[str, IPAddress], ...]  # (service name, address)


MAX_GATED = 1024  # (service, address) pairs in one `gated` request


Request = Start | Apply | Reconcile | Simple | TagMap | Gated
SIMPLE = frozenset({"held", "drops", "gate", "check", "fold", "host", "stamp", "config",
                    "stop"})


def frame(message: dict[str, Any]) -> bytes:
    """A message as one frame.  Raises RefusedError if it is too long."""
    body = json.dumps(message, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise RefusedError(f"message of {len(body)} bytes is over the {MAX_FRAME}-byte limit")
    return len(body).to_bytes(HEADER, "big") + body


def frame_length(header: bytes) -> int:
    """The body length a header announces.  Raises RefusedError over MAX_FRAME."""
    length = int.from_bytes(header, "big")
    if length > MAX_FRAME:
        raise RefusedError(f"frame of {length} bytes is over the {MAX_FRAME}-byte limit")
    return length


def decode(body: bytes, *, request: bool = True) -> dict[str, Any]:
    """A frame's body as a JSON object.  Raises RefusedError (for anything:
    deep nesting, numbers too large; and for a request, a body of more lists
    than a request holds, which would cost the decoder far more memory than
    its bytes: a request is one object of flat lists)."""
    if request and (body.count(b"[") > MAX_CHANGES + 2 or body.count(b"{") > 1):
        raise RefusedError("too many lists or objects for one request")
    try:
        message = json.loads(body.decode(), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise RefusedError(f"not a JSON message: {str(exc)[:80]}") from None
    if not isinstance(message, dict):
        raise RefusedError("a message is a JSON object")
    return message


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not a number here")


def encode_request(request: Request) -> dict[str, Any]:
    if isinstance(request, Start):
        return {"kind": "start", "services": list(request.services)}
    if isinstance(request, Apply):
        return {"kind": "apply", "changes": [_change_out(c) for c in request.changes]}
    if isinstance(request, Reconcile):
        return {"kind": "reconcile", "grants": [_change_out(g) for g in request.grants]}
    if isinstance(request, TagMap):
        return {"kind": "tagmap", "mode": request.mode, "port": request.port,
                "entries": request.entries}
    if isinstance(request, Gated):
        return {"kind": "gated", "addresses": [[name, str(address)]
                                               for name, address in request.addresses]}
    return {"kind": request.kind}


def parse_request(message: dict[str, Any]) -> Request:
    """Raises RefusedError for anything that is not exactly one known request."""
    kind = message.get("kind")
    if not isinstance(kind, str):
        raise RefusedError("a request's kind is a string")
    if kind in SIMPLE:
        _fields(message, {"kind"})
        return Simple(str(kind))
    if kind == "start":
        _fields(message, {"kind", "services"})
        names = message["services"]
        if not isinstance(names, list) or len(names) > 1024:
            raise RefusedError("start: services is a list of names")
        return Start(tuple(_service(name) for name in names))
    if kind == "apply":
        return Apply(_changes(message, "changes"))
    if kind == "reconcile":
        found = _changes(message, "grants")
        grants = tuple(grant for grant in found if isinstance(grant, Allow))
        if len(grants) != len(found):
            raise RefusedError("reconcile: every item is an allow")
        return Reconcile(grants)
    if kind == "tagmap":
        return _tag_map(message)
    if kind == "gated":
        _fields(message, {"kind", "addresses"})
        items = message["addresses"]
        if not isinstance(items, list) or len(items) > MAX_GATED or not all(
                isinstance(item, list) and len(item) == 2 for item in items):
            raise RefusedError(f"gated: addresses is a list of at most {MAX_GATED} "
                               "[service, address] pairs")
        return Gated(tuple((_service(name), parse_address(address)) for name, address in items))
    raise RefusedError(f"unknown request {str(kind)[:40]!r}")


def _tag_map(message: dict[str, Any]) -> TagMap:
    _fields(message, {"kind", "mode", "port", "entries"})
    mode = message["mode"]
    if not isinstance(mode, str) or mode not in MODES:
        raise RefusedError(f"tagmap: mode is one of {', '.join(MODES)}")
    return TagMap(mode, _integer(message["port"], 1, 65535, "tagmap: port"),
                  _integer(message["entries"], 1, MAX_TAG_MAP, "tagmap: entries"))


def _integer(value: object, least: int, most: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not least <= value <= most:
        raise RefusedError(f"{what} is a whole number from {least} to {most}")
    return value


def _changes(message: dict[str, Any], field: str) -> tuple[Allow | Remove, ...]:
    kind = message["kind"]
    _fields(message, {"kind", field})
    items = message[field]
    if not isinstance(items, list) or len(items) > MAX_CHANGES:
        raise RefusedError(f"{kind}: {field} is a list of at most {MAX_CHANGES}")
    return tuple(_change_in(item) for item in items)


def _fields(message: dict[str, Any], wanted: set[str]) -> None:
    if set(message) != wanted:
        raise RefusedError(f"{message.get('kind')}: fields must be {sorted(wanted)}")


def _change_out(change: Allow | Remove) -> list[Any]:
    dest = [] if change.destination is None else [str(change.destination)]
    if isinstance(change, Allow):
        return ["allow", str(change.address), change.service, change.until, *dest]
    return ["remove", str(change.address), change.service, *dest]


def _change_in(item: object) -> Allow | Remove:
    if not isinstance(item, list) or not item:
        raise RefusedError("a change is a list")
    if item[0] == "allow" and len(item) in (4, 5):
        until = item[3]
        if not isinstance(until, int | float) or isinstance(until, bool):
            raise RefusedError("allow: until is a number of seconds")
        try:
            seconds = float(until)
        except OverflowError:
            raise RefusedError("allow: until is out of range") from None
        if not math.isfinite(seconds):
            raise RefusedError("allow: until is a number of seconds")
        return Allow(parse_address(item[1]), _service(item[2]), seconds, _destination(item, 4))
    if item[0] == "remove" and len(item) in (3, 4):
        return Remove(parse_address(item[1]), _service(item[2]), _destination(item, 3))
    raise RefusedError(f"unknown change {str(item[0])[:20]!r}")


def _destination(item: list[Any], index: int) -> IPAddress | None:
    return parse_address(item[index]) if len(item) > index else None


def _service(name: object) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise RefusedError(f"not a service name: {str(name)[:40]!r}")
    return name


def parse_address(text: object) -> IPAddress:
    """One host address, IPv4 or IPv6, as text.  Raises RefusedError for anything
    else: a network, a zone, unspecified, multicast, or a mapped address."""
    if not isinstance(text, str) or len(text) > 45:
        raise RefusedError("an address is a string")
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise RefusedError(f"not an address: {text[:45]!r}") from None
    if address.is_unspecified or address.is_multicast:
        raise RefusedError(f"not a host address: {text}")
    if isinstance(address, ipaddress.IPv6Address) and (
            address.scope_id is not None or address.ipv4_mapped is not None):
        raise RefusedError(f"not a plain address: {text}")
    if isinstance(address, ipaddress.IPv4Address) and address == ipaddress.IPv4Address(
            "255.255.255.255"):
        raise RefusedError(f"not a host address: {text}")
    return address
