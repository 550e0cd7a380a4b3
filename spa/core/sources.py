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
from collections.abc import Iterable
from dataclasses import dataclass

from spa.core.errors import FormatError
from spa.core.wire import IPAddress

MAX_SOURCES = 64  # networks one client may list: the check walks them all, per knock
EXAMPLE = "e.g. 203.0.113.0/24 or 2001:db8::/48"
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


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
