"""Which addresses a knock may name in its body (the `address` field).

Invariants (docs/protocol.md, "Addresses a knock may name"):
- The rule is these explicit prefix tables, not a library's properties: an
  implementation in another language applies the same lists, and an upgrade
  of Python's `ipaddress` (whose tables have changed between releases) moves
  nothing.
- An address is refused only when no remote client's packet can carry it as
  its source at this server: a firewall rule for it opens nothing for anyone,
  or for everyone.  IPv4: every address outside REFUSED_V4.  IPv6: only the
  unicast prefixes of ALLOWED_V6, each IPv4 address with one spelling (the
  IPv4-mapped and -compatible forms are refused: send the IPv4 address).
- NAT64's well-known prefix 64:ff9b::/96 (RFC 6052) is allowed: it is how an
  IPv4 client appears to an IPv6-only server behind a translator (RFC 6146,
  RFC 7755), where a knock without an address is already granted to such a
  source.  Its embedded IPv4 address must pass REFUSED_V4 (64:ff9b::7f00:1 is
  loopback behind a translator: refused).
- Every refusal has one `Rule`.  Pure: no I/O.
"""

from __future__ import annotations

import enum
import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Rule(enum.Enum):
    """Why an address can never be named: each is one row of the tables."""

    THIS_NETWORK = "in 0.0.0.0/8 ('this network'; 0.0.0.0 is 'any')"
    UNSPECIFIED = "the unspecified address (::, 'any')"
    LOOPBACK = "a loopback address"
    MULTICAST = "a multicast address"
    RESERVED = "in 240.0.0.0/4 (reserved, and the broadcast address)"
    IPV4_MAPPED = "IPv4-mapped; send the IPv4 address itself"
    IPV4_COMPATIBLE = "IPv4-compatible (deprecated); send the IPv4 address"
    NOT_UNICAST_V6 = ("outside the IPv6 prefixes a client can have (2000::/3, fc00::/7, "
                      "fe80::/10, fec0::/10, 64:ff9b::/96, 64:ff9b:1::/48)")
    NAT64_OF_REFUSED = "NAT64 (64:ff9b::/96) of an IPv4 address that is refused"

    def __str__(self) -> str:
        return self.value


# IPv4: refused prefixes; every other address may be named.
REFUSED_V4: tuple[tuple[ipaddress.IPv4Network, Rule], ...] = (
    (ipaddress.IPv4Network("0.0.0.0/8"), Rule.THIS_NETWORK),  # RFC 1122 3.2.1.3; 0.0.0.0 is "any"
    (ipaddress.IPv4Network("127.0.0.0/8"), Rule.LOOPBACK),  # RFC 1122: never on a wire
    (ipaddress.IPv4Network("224.0.0.0/4"), Rule.MULTICAST),  # RFC 5771: a group, never a source
    (ipaddress.IPv4Network("240.0.0.0/4"), Rule.RESERVED),  # RFC 1112; and 255.255.255.255
)

# IPv6: refused first, each with its own reason (the first row that holds the
# address: the IPv4 spellings, unspecified, loopback, multicast); then
# anything outside ALLOWED_V6.
REFUSED_V6: tuple[tuple[ipaddress.IPv6Network, Rule], ...] = (
    (ipaddress.IPv6Network("::ffff:0:0/96"), Rule.IPV4_MAPPED),  # RFC 4291 2.5.5.2
    (ipaddress.IPv6Network("::/128"), Rule.UNSPECIFIED),  # RFC 4291 2.5.2
    (ipaddress.IPv6Network("::1/128"), Rule.LOOPBACK),  # RFC 4291 2.5.3
    (ipaddress.IPv6Network("::/96"), Rule.IPV4_COMPATIBLE),  # RFC 4291 2.5.5.1
    (ipaddress.IPv6Network("ff00::/8"), Rule.MULTICAST),  # RFC 4291 2.7
)
NAT64_WKP = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052 2.1: IPv4 in the last 32 bits
ALLOWED_V6: tuple[ipaddress.IPv6Network, ...] = (
    ipaddress.IPv6Network("2000::/3"),  # global unicast (RFC 4291 2.4; 2001:db8::/32 included)
    ipaddress.IPv6Network("fc00::/7"),  # unique local (RFC 4193)
    ipaddress.IPv6Network("fe80::/10"),  # link-local (RFC 4291 2.5.6)
    ipaddress.IPv6Network("fec0::/10"),  # site-local: deprecated (RFC 3879), old networks route it
    NAT64_WKP,  # NAT64's well-known prefix, the embedded IPv4 address checked
    ipaddress.IPv6Network("64:ff9b:1::/48"),  # NAT64 local-use prefixes (RFC 8215)
)


def refusal(address: IPAddress) -> Rule | None:
    """The rule that refuses `address`, or None when a knock may name it."""
    if isinstance(address, ipaddress.IPv4Address):
        return next((rule for net, rule in REFUSED_V4 if address in net), None)
    if address.scope_id is not None:  # a zone is not part of an address on the wire
        address = ipaddress.IPv6Address(address.packed)
    found = next((rule for net, rule in REFUSED_V6 if address in net), None)
    if found is not None:
        return found
    if not any(address in net for net in ALLOWED_V6):
        return Rule.NOT_UNICAST_V6
    if address in NAT64_WKP and refusal(ipaddress.IPv4Address(address.packed[12:])):
        return Rule.NAT64_OF_REFUSED
    return None
