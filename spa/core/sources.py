"""Per-client source networks: where a client's knocks may come from.

Invariants (docs/protocol.md, "Verification order"; docs/threat-model.md,
"Stolen client device"):
- A network is written as an address or ADDRESS/PREFIX, IPv4 or IPv6, and
  parsed strictly: host bits set past the prefix, an IPv4-mapped IPv6
  network (a knock from one arrives as IPv4), a zone, or anything that is not
  a network is a FormatError of one line naming the value and the fix.
  Nothing is widened or narrowed silently; what is kept is the canonical text
  (`203.0.113.7` is kept as `203.0.113.7/32`, a netmask as its prefix).
- An empty list means anywhere.  Otherwise an address is allowed exactly
  when it lies in one of the networks; an IPv4 address never lies in an IPv6
  network, nor the other way round.  The caller gives the packet's source as
  `spa.core.verify.parse_source` makes it (IPv4-mapped as IPv4, no zone).
- A list the server cannot parse allows no source at all (NOWHERE): a list
  meant to narrow access never widens it.
- Pure: text and addresses in, values out.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from spa.core.errors import FormatError
from spa.core.wire import IPAddress

MAX_SOURCES = 64  # networks one client may list: the check walks them all, per knock
EXAMPLE = "e.g. 203.0.113.0/24 or 2001:db8::/48"
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"  # 0-255 as str() writes it
# the canonical text of an IPv4 network (str(IPv4Network)) and the shape of an IPv6 one's
_V4_NETWORK_RE = re.compile(rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}/(3[0-2]|[12]?[0-9])",
                            re.ASCII)
_V6_NETWORK_RE = re.compile(r"([0-9a-f:]{2,39})/(12[0-8]|1[01][0-9]|[1-9]?[0-9])", re.ASCII)
_ALL = (1 << 128) - 1


@dataclass(frozen=True, slots=True)
class SourceNetwork:
    """One network as the check needs it: three ints, not an ipaddress
    network (100,000 clients each with a network of its own: 14 MB against 54)."""

    version: int  # 4 or 6 (NOWHERE's is 0: no address has it)
    network: int  # its first address
    mask: int


NOWHERE = (SourceNetwork(0, 0, 0),)  # a list that allows no source


def parse_network(text: str) -> tuple[str, SourceNetwork]:
    """The canonical text of one network and its value.  Raises FormatError."""
    written = text.strip()
    if "%" in written:
        raise FormatError(f"{text!r} names a zone; write the network without it, {EXAMPLE}")
    try:
        network = ipaddress.ip_network(written, strict=False)
    except ValueError:
        raise FormatError(f"{text!r} is not a network; write an address or ADDRESS/PREFIX, "
                          f"{EXAMPLE}") from None
    address = ipaddress.ip_address(written.partition("/")[0])
    if address != network.network_address:
        raise FormatError(f"{text!r} has host bits set past /{network.prefixlen}; write "
                          f"{network} for the network or {address}/{address.max_prefixlen} "
                          "for that one address")
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED):
        mapped = ipaddress.IPv4Network((int(network.network_address) & 0xFFFFFFFF,
                                        network.prefixlen - 96))
        raise FormatError(f"{text!r} is IPv4-mapped, and a knock from there arrives as "
                          f"IPv4; write {mapped}")
    return str(network), SourceNetwork(network.version, int(network.network_address),
                                       int(network.netmask))


def canonical_network(text: str) -> SourceNetwork | None:
    """The network whose canonical text (parse_network's) `text` is; None
    when it is not one's.  A quick path for the texts a record holds (a
    member's start checks 10^5 clients' networks: parse_network took 14 us
    an IPv6 network, this 2-3 us), parse_network for the rest; the two agree
    (tests/property/test_sources_quick.py)."""
    network = _quick_network(text)
    if network is not None:
        return network
    try:
        canonical, network = parse_network(text)
    except FormatError:
        return None
    return network if canonical == text else None


def _quick_network(text: str) -> SourceNetwork | None:
    """The network of a canonical text this path is sure of; None for any
    other text (parse_network decides those)."""
    match = _V4_NETWORK_RE.fullmatch(text)
    if match is not None:
        a, b, c, d, prefix = (int(part) for part in match.groups())
        value, mask = a << 24 | b << 16 | c << 8 | d, 0xFFFFFFFF ^ (0xFFFFFFFF >> prefix)
        return SourceNetwork(4, value, mask) if value & mask == value else None
    match = _V6_NETWORK_RE.fullmatch(text)
    if match is None:
        return None
    written, prefix = match[1], int(match[2])
    head, double, tail = written.partition("::")
    hextets = head.split(":") if head else []
    right = tail.split(":") if tail else []
    missing = 8 - len(hextets) - len(right)
    if missing < (2 if double else 0) or (not double and missing):
        return None
    hextets += ["0"] * missing + right
    try:
        numbers = [int(hextet, 16) for hextet in hextets]
    except ValueError:
        return None
    value = 0
    for number in numbers:
        value = value << 16 | number
    mask = _ALL ^ (_ALL >> prefix)
    if (value & mask != value or value >> 32 == 0xFFFF or max(numbers) > 0xFFFF
            or _v6_text(numbers) != written):  # (mapped: parse_network says why not)
        return None
    return SourceNetwork(6, value, mask)


def _v6_text(numbers: list[int]) -> str:
    """RFC 5952's text of eight hextets as ipaddress writes it: lower-case
    hex without leading zeros, the longest run (the first of equals) of two
    or more zero hextets as '::'."""
    best_at, best_run, at, run = -1, 0, -1, 0
    for index, number in enumerate(numbers):
        if number:
            run = 0
            continue
        if not run:
            at = index
        run += 1
        if run > best_run:
            best_at, best_run = at, run
    texts = [f"{number:x}" for number in numbers]
    if best_run < 2:
        return ":".join(texts)
    return ":".join(texts[:best_at]) + "::" + ":".join(texts[best_at + best_run:])


def canonical_sources(texts: Iterable[str]) -> tuple[str, ...]:
    """Each network's canonical text, in the order given, each once.
    Raises FormatError (a bad network, more than MAX_SOURCES)."""
    found = tuple(dict.fromkeys(parse_network(text)[0] for text in texts))
    if len(found) > MAX_SOURCES:
        raise FormatError(f"{len(found)} source networks; at most {MAX_SOURCES} "
                          "(list wider networks)")
    return found


def source_networks(texts: Iterable[str]) -> tuple[SourceNetwork, ...]:
    """The values the check uses (empty: anywhere).  Raises FormatError."""
    return tuple(parse_network(text)[1] for text in canonical_sources(texts))


def allows(networks: tuple[SourceNetwork, ...], address: IPAddress) -> bool:
    """Whether a knock from `address` may pass (an empty tuple: from anywhere).
    A plain loop: any() over a generator took 1.6 us for ten networks, this
    0.5 us (and 0.16 against 0.43 for one)."""
    if not networks:
        return True
    value, version = int(address), address.version
    for network in networks:
        if network.version == version and value & network.mask == network.network:
            return True
    return False
