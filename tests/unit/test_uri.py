"""The enrollment URI: canonical rendering, strict parsing, no secret in errors."""

from __future__ import annotations

import base64

import pytest

from spa.core.errors import FormatError
from spa.core.uri import DEFAULT_PORT, Enrollment, ServiceRef, parse, render, shell_cut

SECRET = bytes(range(32))
SID = bytes(range(100, 116))
KEY_TEXT = base64.urlsafe_b64encode(SECRET).rstrip(b"=").decode()
SID_TEXT = base64.urlsafe_b64encode(SID).rstrip(b"=").decode()
SERVICES = (ServiceRef("ssh", "tcp", 22), ServiceRef("https", "tcp", 443))


def enrollment(host: str = "knock.example.org", port: int = 62201) -> Enrollment:
    return Enrollment(host, port, SID, "alice", SECRET, SERVICES)


def uri(host: str = "knock.example.org:62201", query: str | None = None,
        client: str = "alice", scheme: str = "spa1") -> str:
    q = query if query is not None else f"sid={SID_TEXT}&key={KEY_TEXT}&svc=ssh:tcp:22"
    return f"{scheme}://{host}/{client}?{q}"


@pytest.mark.parametrize("host", ["knock.example.org", "192.0.2.1", "2001:db8::1", "localhost"])
def test_round_trip(host: str) -> None:
    e = enrollment(host)
    text = render(e)
    assert text.startswith("spa1://")
    assert parse(text) == e
    assert render(parse(text)) == text


def test_ipv6_is_bracketed_and_the_secret_is_hidden_from_repr() -> None:
    text = render(enrollment("2001:DB8::1"))
    assert text.startswith("spa1://[2001:db8::1]:62201/alice?")
    assert KEY_TEXT not in repr(parse(text))
    assert "hidden" in repr(parse(text))


def test_port_defaults_and_host_case_folds() -> None:
    e = parse(uri(host="Knock.Example.ORG"))
    assert e.port == DEFAULT_PORT
    assert e.host == "knock.example.org"
    assert e.services == (ServiceRef("ssh", "tcp", 22),)
    assert parse(uri(host="[::1]:9")).port == 9


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "start with spa1://"),
        ("https://example.org/alice", "scheme"),
        (uri(scheme="spa2"), "version"),
        (uri(host=""), "no host"),
        (uri(host="bad_host!"), "neither an IP"),
        (uri(host="2001:db8::1"), "brackets"),
        (uri(host="[2001:db8::1"), "closing"),
        (uri(host="[nonsense]"), "not an IPv6"),
        (uri(host="h:0"), "out of range"),
        (uri(host="h:70000"), "out of range"),
        (uri(host="h:abc"), "number"),
        (uri(host="user@h"), "user name"),
        (uri(client=""), "client name"),
        (uri(client="-alice"), "client name"),
        (uri(client="al ice"), "client name"),
        (uri() + "#frag", "fragment"),
        (uri(query=f"key={KEY_TEXT}&svc=ssh:tcp:22"), "'sid' is missing"),
        (uri(query=f"sid={SID_TEXT}&svc=ssh:tcp:22"), "'key' is missing"),
        (uri(query=f"sid={SID_TEXT}&sid={SID_TEXT}&key={KEY_TEXT}&svc=ssh:tcp:22"), "repeated"),
        (uri(query=f"sid={SID_TEXT}&key={KEY_TEXT}"), "no service"),
        (uri(query=f"sid={SID_TEXT}&key={KEY_TEXT}&svc=ssh:tcp:22&x=1"),
         "is not sid=, key=, svc=, otp= or exp="),
        (uri(query=f"sid={SID_TEXT}&key=&svc=ssh:tcp:22"), "no value"),
        (uri(query=f"sid={SID_TEXT}&key={KEY_TEXT}&svc=ssh:22"), "NAME:PROTO:PORT"),
        (uri(query=f"sid={SID_TEXT}&key={KEY_TEXT}&svc=SSH:tcp:22"), "service name"),
        (uri(query=f"sid={SID_TEXT}&key={KEY_TEXT}&svc=ssh:sctp:22"), "tcp or udp"),
        (uri(query=f"sid={SID_TEXT}&key={KEY_TEXT}&svc=ssh:tcp:0"), "1-65535"),
        (uri(query=f"sid={SID_TEXT}&key={KEY_TEXT}&svc=ssh:tcp:22&svc=ssh:tcp:2222"), "twice"),
        (uri(query=f"sid={SID_TEXT}&key={KEY_TEXT[:-2]}&svc=ssh:tcp:22"), "32 bytes"),
        (uri(query=f"sid={SID_TEXT}A&key={KEY_TEXT}&svc=ssh:tcp:22"), "16 bytes"),
        (uri(query=f"sid={SID_TEXT}&key={KEY_TEXT}==&svc=ssh:tcp:22"), "32 bytes"),
        (uri(query=f"sid={SID_TEXT}&key={KEY_TEXT.replace('A', '+')}&svc=ssh:tcp:22"),
         "32 bytes"),
    ],
)
def test_malformed_uris_say_which_part_is_wrong(text: str, match: str) -> None:
    with pytest.raises(FormatError, match=match) as info:
        parse(text)
    message = str(info.value)
    assert "\n" not in message
    assert KEY_TEXT not in message
    assert KEY_TEXT[:20] not in message


def test_non_canonical_base64_is_refused() -> None:
    """The last character of a 32-byte value carries 2 spare bits: must be 0."""
    last = KEY_TEXT[-1]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    twin = alphabet[alphabet.index(last) + 1]
    with pytest.raises(FormatError, match="32 bytes"):
        parse(uri(query=f"sid={SID_TEXT}&key={KEY_TEXT[:-1]}{twin}&svc=ssh:tcp:22"))


def test_render_refuses_invalid_enrollments() -> None:
    with pytest.raises(FormatError, match="secret"):
        render(Enrollment("h", 1, SID, "alice", bytes(31), SERVICES))
    with pytest.raises(FormatError, match="at least one"):
        render(Enrollment("h", 1, SID, "alice", SECRET, ()))
    with pytest.raises(FormatError, match="neither"):
        render(Enrollment("bad host", 1, SID, "alice", SECRET, SERVICES))


@pytest.mark.parametrize("mangled", [f"key:{KEY_TEXT}", KEY_TEXT, f"kee={KEY_TEXT}"])
def test_a_mangled_key_parameter_is_not_echoed(mangled: str) -> None:
    """Review finding: an unknown parameter's name was quoted, secret and all."""
    with pytest.raises(FormatError) as info:
        parse(uri(query=f"sid={SID_TEXT}&{mangled}&svc=ssh:tcp:22"))
    assert KEY_TEXT[:8] not in str(info.value)


@pytest.mark.parametrize("host", ["010.0.0.1", "0x7f.1", "2130706433", "1.2.3.256",
                                  "example.999", "%61lice.org"])
def test_numeric_hosts_that_are_not_ip_literals_are_refused(host: str) -> None:
    """Review finding: resolvers read these as other addresses."""
    with pytest.raises(FormatError):
        parse(uri(host=host))


@pytest.mark.parametrize("text", [uri(client="%61lice"), uri(host="h:062201"),
                                  uri(query=f"sid={SID_TEXT}&key=%41{KEY_TEXT[1:]}"
                                            "&svc=ssh:tcp:22")])
def test_percent_encoding_and_leading_zeros_are_refused(text: str) -> None:
    with pytest.raises(FormatError):
        parse(text)


def test_the_otp_flag_round_trips_and_is_strict() -> None:
    from dataclasses import replace

    plain = enrollment()
    with_otp = replace(plain, otp=True)
    assert render(with_otp).endswith("&otp=1")
    assert parse(render(with_otp)) == with_otp
    assert parse(render(plain)).otp is False
    for bad in ("&otp=0", "&otp=1&otp=1", "&otp=yes"):
        with pytest.raises(FormatError, match="otp"):
            parse(render(plain) + bad)


def test_the_expiry_round_trips_and_is_strict() -> None:
    from dataclasses import replace

    pending = replace(enrollment(), expires=1_800_000_900)
    assert render(pending).endswith("&exp=1800000900")
    assert parse(render(pending)) == pending
    for bad in ("&exp=", "&exp=soon", "&exp=012", "&exp=1&exp=2", "&exp=-5"):
        with pytest.raises(FormatError):
            parse(render(enrollment()) + bad)


@pytest.mark.parametrize(("host", "match"), [
    ("[fe80::1%25eth0]", "zone"), ("[fe80::1%eth0]", "zone"),
    ("[::ffff:192.0.2.1]", "write the IPv4 address 192.0.2.1"),
    ("[example.org]", "not an IPv6 address"), ("[192.0.2.1]", "not an IPv6 address"),
    ("[]", "not an IPv6 address"), ("[2001:db8::1]:", "must be a number")])
def test_ipv6_hosts_take_no_zone_and_no_mapped_address(host: str, match: str) -> None:
    with pytest.raises(FormatError, match=match):
        parse(uri(host=host))


def test_an_ipv6_host_in_any_spelling_is_read_as_its_rfc_5952_form() -> None:
    for spelled in ("[2001:DB8:0:0::1]", "[2001:db8::0:1]", "[2001:0db8::1]"):
        assert parse(uri(host=spelled)).host == "2001:db8::1"
    assert render(enrollment("2001:0DB8:0::1")).startswith("spa1://[2001:db8::1]:62201/")


@pytest.mark.parametrize(("text", "head"), [
    ("spa1://h:62201/alice?sid=AAAA", "spa1://h:62201/alice"),
    ("  SPA1://[2001:db8::1]:9/bob?key=AAAA\n", "SPA1://[2001:db8::1]:9/bob"),
    ("spa1://h/alice?svc=ssh:tcp:22", "spa1://h/alice"),
    ("spa1://h/al'ice?sid=AAAA", "spa1://HOST:PORT/NAME"),
    ("spa1://h/alice?sid=AAAA&key=BBBB", None),
    ("spa1://h/alice", None),
    ("spa1://h/alice?", None),
    ("https://h/alice?sid=AAAA", None),
])
def test_shell_cut_names_a_uri_cut_at_its_first_ampersand(text: str, head: str | None) -> None:
    assert shell_cut(text) == head
