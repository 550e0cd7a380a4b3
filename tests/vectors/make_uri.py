"""Make tests/vectors/uri_v1.json: enrollment URIs a client must read (with
the fields it reads and the canonical form a server writes) and URIs it must
refuse (with the part that is wrong).  Frozen once made; the grammar is
docs/protocol.md's ABNF, and tests/unit/test_vectors.py checks every case
against spa.core.uri.

    .venv/bin/python -m tests.vectors.make_uri > tests/vectors/uri_v1.json
"""

from __future__ import annotations

import base64
import json
import sys
from typing import Any

from spa.core.errors import FormatError
from spa.core.uri import parse, render

SID = base64.urlsafe_b64encode(bytes.fromhex("5350412d746573742d7365727665722e")
                               ).rstrip(b"=").decode()
KEY = base64.urlsafe_b64encode(bytes.fromhex(
    "202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f")).rstrip(b"=").decode()
Q = f"sid={SID}&key={KEY}&svc=ssh:tcp:22"
BASE = "spa1://knock.example.org:62201/alice"

VALID: list[tuple[str, str]] = [
    (f"{BASE}?{Q}", "canonical: what spa-server enroll writes"),
    (f"spa1://knock.example.org/alice?{Q}", "no port: 62201"),
    (f"SPA1://Knock.Example.ORG:62201/alice?{Q}", "the scheme and a DNS name in any case"),
    (f"spa1://192.0.2.1:9/alice?{Q}", "an IPv4 host"),
    (f"spa1://[2001:DB8:0::1]:62201/alice?{Q}", "an IPv6 host in brackets, any spelling"),
    (f"spa1://[64:ff9b::192.0.2.1]/alice?{Q}", "an IPv6 host with a dotted tail"),
    (f"spa1://localhost:1/alice?{Q}", "a one-label name; port 1"),
    (f"spa1://h.example:65535/alice?{Q}", "port 65535"),
    (f"{BASE}?svc=ssh:tcp:22&key={KEY}&sid={SID}", "parameters in any order"),
    (f"{BASE}?{Q}&svc=dns:udp:53&svc=web_1:tcp:8443",
     "several services, kept in their order (the first is the default one)"),
    (f"{BASE}?{Q}&otp=1&exp=1800000900", "an authenticator code wanted, and a pending expiry"),
    (f"{BASE}?exp=1&{Q}", "exp=1 (no leading zero; any past time parses, the server judges)"),
    (f"{BASE}?{Q}&exp=999999999999", "exp with 12 digits, the most"),
    (f"spa1://knock.example.org/a.b_c@d-e?{Q}", "a client name with '.', '_', '@', '-'"),
    (f"spa1://knock.example.org/{'a' * 64}?{Q}", "a client name of 64 characters"),
    (f"spa1://{'a' * 63}.example/alice?{Q}", "a label of 63 characters"),
    (f"spa1://{'.'.join(['a' * 49] * 5)}.abc/alice?{Q}", "a name of 253 characters"),
    (f"spa1://xn--bcher-kva.example/alice?{Q}", "an internationalized name as its A-label"),
    (f"spa1://1.example.123abc/alice?{Q}", "a numeric label, the last one not all digits"),
    (f"  {BASE}?{Q}\n", "surrounding white space (a pasted line) is ignored"),
]

REFUSED: list[tuple[str, str, str]] = [
    # (uri, part, a fragment of our parser's message)
    (f"spa2://knock.example.org/alice?{Q}", "scheme", "not supported"),
    (f"https://knock.example.org/alice?{Q}", "scheme", "scheme"),
    (f"spa1:knock.example.org/alice?{Q}", "scheme", "start with spa1://"),
    (f"spa1:///alice?{Q}", "host", "no host"),
    (f"spa1://user@knock.example.org/alice?{Q}", "host", "user name"),
    (f"spa1://2001:db8::1/alice?{Q}", "host", "brackets"),
    (f"spa1://[2001:db8::1/alice?{Q}", "host", "closing"),
    (f"spa1://[192.0.2.1]/alice?{Q}", "host", "not an IPv6 address"),
    (f"spa1://[example.org]/alice?{Q}", "host", "not an IPv6 address"),
    (f"spa1://[fe80::1%25eth0]/alice?{Q}", "host", "zone"),
    (f"spa1://[::ffff:192.0.2.1]/alice?{Q}", "host", "IPv4-mapped"),
    (f"spa1://010.0.0.1/alice?{Q}", "host", "malformed IP address"),
    (f"spa1://1.2.3.256/alice?{Q}", "host", "malformed IP address"),
    (f"spa1://0x7f.1/alice?{Q}", "host", "malformed IP address"),
    (f"spa1://example.123/alice?{Q}", "host", "malformed IP address"),
    (f"spa1://bad_host.example/alice?{Q}", "host", "neither an IP"),
    (f"spa1://-a.example/alice?{Q}", "host", "neither an IP"),
    (f"spa1://a-.example/alice?{Q}", "host", "neither an IP"),
    (f"spa1://knock.example.org./alice?{Q}", "host", "neither an IP"),
    (f"spa1://a..example/alice?{Q}", "host", "neither an IP"),
    (f"spa1://{'a' * 64}.example/alice?{Q}", "host", "neither an IP"),
    (f"spa1://{'.'.join(['a' * 49] * 5)}.abcd/alice?{Q}", "host", "neither an IP"),
    (f"spa1://bücher.example/alice?{Q}", "host", "neither an IP"),
    (f"spa1://%61.example/alice?{Q}", "host", "neither an IP"),
    (f"spa1://knock.example.org:/alice?{Q}", "port", "must be a number"),
    (f"spa1://knock.example.org:0/alice?{Q}", "port", "out of range"),
    (f"spa1://knock.example.org:65536/alice?{Q}", "port", "out of range"),
    (f"spa1://knock.example.org:062201/alice?{Q}", "port", "must not start with 0"),
    (f"spa1://knock.example.org:+1/alice?{Q}", "port", "must be a number"),
    (f"spa1://knock.example.org/?{Q}", "client", "client name"),
    (f"spa1://knock.example.org/-alice?{Q}", "client", "client name"),
    (f"spa1://knock.example.org/.alice?{Q}", "client", "client name"),
    (f"spa1://knock.example.org/{'a' * 65}?{Q}", "client", "client name"),
    (f"spa1://knock.example.org/al/ice?{Q}", "client", "client name"),
    (f"spa1://knock.example.org/al+ice?{Q}", "client", "client name"),
    (f"spa1://knock.example.org/%61lice?{Q}", "client", "percent-encode"),
    (f"{BASE}?{Q}#frag", "fragment", "fragment"),
    (f"{BASE}", "sid", "'sid' is missing"),
    (f"{BASE}?key={KEY}&svc=ssh:tcp:22", "sid", "'sid' is missing"),
    (f"{BASE}?sid={SID}&svc=ssh:tcp:22", "key", "'key' is missing"),
    (f"{BASE}?{Q}&sid={SID}", "sid", "repeated"),
    (f"{BASE}?{Q}&key={KEY}", "key", "repeated"),
    (f"{BASE}?sid={SID}&key={KEY}", "svc", "no service"),
    (f"{BASE}?{Q}&x=1", "parameter", "is not sid=, key=, svc=, otp= or exp="),
    (f"{BASE}?SID={SID}&key={KEY}&svc=ssh:tcp:22", "parameter", "is not sid="),
    (f"{BASE}?{Q}&&otp=1", "parameter", "is not sid="),
    (f"{BASE}?{Q}&", "parameter", "is not sid="),
    (f"{BASE}?{Q}&otp", "otp", "no value"),
    (f"{BASE}?sid={SID}&key=&svc=ssh:tcp:22", "key", "no value"),
    (f"{BASE}?sid={SID}&key=%41{KEY[1:]}&svc=ssh:tcp:22", "key", "percent-encoded"),
    (f"{BASE}?sid={SID}&key={KEY[:-1]}&svc=ssh:tcp:22", "key", "32 bytes"),
    (f"{BASE}?sid={SID}&key={KEY}A&svc=ssh:tcp:22", "key", "32 bytes"),
    (f"{BASE}?sid={SID}&key={KEY}=&svc=ssh:tcp:22", "key", "32 bytes"),
    (f"{BASE}?sid={SID}&key={KEY[:-1]}9&svc=ssh:tcp:22", "key", "32 bytes"),
    (f"{BASE}?sid={SID}&key={KEY.replace('-', '+').replace('_', '/')}x&svc=ssh:tcp:22",
     "key", "32 bytes"),
    (f"{BASE}?sid={SID[:-1]}B&key={KEY}&svc=ssh:tcp:22", "sid", "16 bytes"),
    (f"{BASE}?sid={SID[:-2]}&key={KEY}&svc=ssh:tcp:22", "sid", "16 bytes"),
    (f"{BASE}?sid={SID}&key={KEY}&svc=ssh:22", "svc", "NAME:PROTO:PORT"),
    (f"{BASE}?sid={SID}&key={KEY}&svc=SSH:tcp:22", "svc", "service name"),
    (f"{BASE}?sid={SID}&key={KEY}&svc=ssh:TCP:22", "svc", "tcp or udp"),
    (f"{BASE}?sid={SID}&key={KEY}&svc=ssh:sctp:22", "svc", "tcp or udp"),
    (f"{BASE}?sid={SID}&key={KEY}&svc=ssh:tcp:0", "svc", "1-65535"),
    (f"{BASE}?sid={SID}&key={KEY}&svc=ssh:tcp:65536", "svc", "1-65535"),
    (f"{BASE}?sid={SID}&key={KEY}&svc=ssh:tcp:022", "svc", "1-65535"),
    (f"{BASE}?{Q}&svc=ssh:tcp:2222", "svc", "twice"),
    (f"{BASE}?{Q}&svc=ssh:tcp:22", "svc", "twice"),
    (f"{BASE}?{Q}&otp=0", "otp", "otp=1"),
    (f"{BASE}?{Q}&otp=true", "otp", "otp=1"),
    (f"{BASE}?{Q}&otp=1&otp=1", "otp", "otp=1"),
    (f"{BASE}?{Q}&exp=", "exp", "no value"),
    (f"{BASE}?{Q}&exp=0", "exp", "Unix time"),
    (f"{BASE}?{Q}&exp=012", "exp", "Unix time"),
    (f"{BASE}?{Q}&exp=-5", "exp", "Unix time"),
    (f"{BASE}?{Q}&exp=1.5", "exp", "Unix time"),
    (f"{BASE}?{Q}&exp=1000000000000", "exp", "Unix time"),
    (f"{BASE}?{Q}&exp=1&exp=2", "exp", "Unix time"),
]


def fields(uri: str) -> dict[str, Any]:
    e = parse(uri)
    return {"host": e.host, "port": e.port, "client": e.client,
            "server_id": e.server_id.hex(), "secret": e.secret.hex(),
            "services": [[s.name, s.protocol, s.port] for s in e.services],
            "otp": e.otp, "expires": e.expires, "canonical": render(e)}


def refused(uri: str, part: str, message: str) -> dict[str, str]:
    try:
        parse(uri)
    except FormatError as exc:
        if message not in str(exc):
            raise SystemExit(f"{uri!r}: {exc} (expected {message!r})") from None
        return {"uri": uri, "part": part, "message": message}
    raise SystemExit(f"{uri!r} parses")


def main() -> None:
    doc = {
        "comment": "Enrollment URIs (docs/protocol.md, 'Enrollment URI', its ABNF and odd "
                   "cases).  'valid': each reads as the fields given (server_id and secret "
                   "in hex), and 'canonical' is what a server writes for them.  'refused': "
                   "each must be refused; 'part' names what is wrong, 'message' is a "
                   "fragment of this implementation's one-line error.  Made by "
                   "tests/vectors/make_uri.py.",
        "valid": [{"uri": uri, "why": why, **fields(uri)} for uri, why in VALID],
        "refused": [refused(*row) for row in REFUSED],
    }
    sys.stdout.write(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
