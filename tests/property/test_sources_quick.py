"""spa.core.sources.canonical_network against parse_network: the quick path
a member's start takes for every client's source networks says a text is a
network's canonical text exactly when parse_network does, with the same
network (docs/scale.md, "A member's start")."""

from __future__ import annotations

import ipaddress

from hypothesis import example, given
from hypothesis import strategies as st

from spa.core import sources
from spa.core.errors import FormatError
from spa.core.sources import SourceNetwork, canonical_network, parse_network


def _expected(text: str) -> SourceNetwork | None:
    try:
        canonical, network = parse_network(text)
    except FormatError:
        return None
    return network if canonical == text else None


@st.composite
def network_texts(draw: st.DrawFn) -> str:
    """A network's canonical text, or one close to it: host bits set, upper
    case, leading zeros, a hextet's zeros written out or run together, an
    IPv4-mapped or -compatible address, a prefix out of range."""
    version = draw(st.sampled_from([4, 6]))
    bits = 32 if version == 4 else 128
    prefix = draw(st.integers(0, bits + 1))
    address: ipaddress.IPv4Address | ipaddress.IPv6Address = draw(
        st.ip_addresses(v=4) if version == 4 else st.ip_addresses(v=6).map(
            lambda a: ipaddress.IPv6Address(a.packed)))  # (no zone)
    if version == 6 and draw(st.booleans()):  # runs of zero hextets, mapped, compatible
        hextets = draw(st.lists(st.sampled_from([0, 0, 0, 1, 0xFFFF, 0xDB8]),
                                min_size=8, max_size=8))
        address = ipaddress.IPv6Address(int("".join(f"{h:04x}" for h in hextets), 16))
    if draw(st.booleans()) and prefix <= bits:  # the network's own address
        address = ipaddress.ip_network(f"{address}/{prefix}", strict=False).network_address
    text = f"{address}/{prefix}"
    how = draw(st.sampled_from(["canonical", "upper", "exploded", "zeros", "no prefix",
                                "prefix zero"]))
    if how == "upper":
        text = text.upper()
    elif how == "exploded" and version == 6:
        text = f"{address.exploded}/{prefix}"
    elif how == "zeros":
        text = text.replace(":", ":0", 1) if version == 6 else text.replace(".", ".0", 1)
    elif how == "no prefix":
        text = str(address)
    elif how == "prefix zero":
        text = text.replace("/", "/0")
    return text


@given(network_texts())
@example("::ffff:1.2.3.4/128")
@example("::ffff:102:304/128")
@example("::102:304/128")
@example("::/0")
@example("1:0:0:2::/64")
@example("1::2:0:0:0/128")
@example("1:0:0:2:0:0:0:0/128")
@example("1:2:3:4:5:6:7::/128")
@example("1:2:3:4:5:6::8/128")
@example("0.0.0.0/0")
@example("010.0.0.0/8")
@example("10.0.0.1/8")
def test_the_quick_network_check_agrees_with_parse_network(text: str) -> None:
    expected = _expected(text)
    assert canonical_network(text) == expected
    quick = sources._quick_network(text)
    assert quick is None or quick == expected  # (what it is sure of, it is right about)
    if expected is not None:
        assert quick is not None  # and every canonical text takes it


@given(st.text("0123456789abcdefABCDEF:./%x ", max_size=45))
def test_any_text_is_a_canonical_network_exactly_when_parse_network_says_so(text: str) -> None:
    assert canonical_network(text) == _expected(text)
