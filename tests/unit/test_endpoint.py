"""`spa-server enroll --endpoint`: every spelling of a host an admin may type,
IPv6 bare or bracketed, into the URI the client gets (issue 15, part 3)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from spa.core.uri import parse
from spa.server import admin
from spa.server.errors import LocalError


@pytest.mark.parametrize(("endpoint", "host", "port"), [
    ("2001:db8::1", "2001:db8::1", 62201),
    ("[2001:db8::1]", "2001:db8::1", 62201),
    ("[2001:DB8:0::1]:4000", "2001:db8::1", 4000),
    (" fd10:210::1 ", "fd10:210::1", 62201),
    ("2001:db8::1:99", "2001:db8::1:99", 62201),  # a bare address takes no port: one address
    ("192.0.2.1", "192.0.2.1", 62201),
    ("192.0.2.1:7", "192.0.2.1", 7),
    ("Knock.Example.ORG:9", "knock.example.org", 9),
])
def test_endpoint_spellings(endpoint: str, host: str, port: int) -> None:
    assert admin.parse_endpoint(endpoint, 62201) == (host, port)


@pytest.mark.parametrize(("endpoint", "why"), [
    ("[example.org]", "brackets are for an IPv6 address"),
    ("[192.0.2.1]:9", "brackets are for an IPv6 address"),
    ("[2001:db8::1", "missing its ']'"),
    ("[2001:db8::1]:", "expected [IPv6]:PORT"),
    ("[2001:db8::1]x", "expected [IPv6]:PORT"),
    ("[2001:db8::1]:70000", "out of range"),
    ("fe80::1%eth0", "a zone (%...) names an interface"),
    ("[fe80::1%25eth0]", "a zone (%...) names an interface"),
    ("::ffff:192.0.2.1", "write the IPv4 address 192.0.2.1"),
    ("2001:db8::g", "not an IPv6 address"),
    ("192.0.2.1:x", "the port must be a number"),
    ("010.0.0.1", "malformed IP address"),
])
def test_endpoints_that_are_refused_say_why_in_one_line(endpoint: str, why: str) -> None:
    with pytest.raises(LocalError, match=re.escape(why)) as info:
        admin.parse_endpoint(endpoint, 62201)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("endpoint", ["2001:db8::1", "[2001:db8::1]", "[2001:db8::1]:62201"])
def test_enroll_with_an_ipv6_endpoint_gives_a_bracketed_uri(endpoint: str,
                                                             tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    admin.init(path, listen_port=62201, backend="memory", state_dir=tmp_path / "state",
               force=False)
    uri = admin.enroll(path, "alice", ["ssh"], endpoint)
    assert uri.startswith("spa1://[2001:db8::1]:62201/alice?")
    assert parse(uri).host == "2001:db8::1"
    rotated = admin.rotate(path, "alice", grace=0, now=2e9)
    assert rotated.startswith("spa1://[2001:db8::1]:62201/alice?"), "rotate keeps the endpoint"
