"""The enrollment URI: everything one client needs for one server.

    spa1://HOST[:PORT]/CLIENT?sid=SERVER_ID&key=SECRET&svc=NAME:PROTO:PORT[&svc=...][&otp=1]
        [&exp=UNIX_TIME]

Invariants (docs/protocol.md, "Enrollment URI": its ABNF, the rules beside it
and the odd cases decided; vectors in tests/vectors/uri_v1.json):
- `parse(render(e)) == e` for every valid enrollment, and `render` is canonical.
- Parsing is strict: a wrong scheme or version, a bad host or port, a bad
  client name, a missing, repeated or unknown parameter, a value of the wrong
  size or alphabet, each raise `FormatError` with one line saying which part
  is wrong.  No error message ever contains the secret.
- One spelling per value: no percent-encoding, no leading zeros (ports,
  `exp`, IPv4 octets), no empty values, `otp=1` only.  Reading normalizes the
  scheme and names to lower case and IPv6 to RFC 5952; parameters may come in
  any order.
- IPv6 hosts are written in brackets, without a zone, never IPv4-mapped.
  SERVER_ID (16 bytes) and SECRET (32 bytes) are unpadded base64url.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from dataclasses import dataclass

from spa.core.errors import FormatError
from spa.core.keys import MASTER_SECRET_SIZE, SERVER_ID_SIZE
from spa.core.wire import PROTOCOLS, is_valid_service_name

SCHEME = "spa1"
DEFAULT_PORT = 62201  # UDP knock port
_CLIENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}\Z")
_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"  # 0-255, no leading zero
_IPV4_RE = re.compile(rf"(?:{_OCTET}\.){{3}}{_OCTET}\Z")  # RFC 3986 IPv4address
_B64_RE = re.compile(r"[A-Za-z0-9_-]+\Z")


@dataclass(frozen=True, slots=True)
class ServiceRef:
    """A service as a client sees it: what to ask for and which port to try."""

    name: str
    protocol: str
    port: int


@dataclass(frozen=True, slots=True, repr=False)
class Enrollment:
    host: str  # DNS name or IP address, without brackets
    port: int
    server_id: bytes
    client: str
    secret: bytes
    services: tuple[ServiceRef, ...]
    otp: bool = False  # the server wants an authenticator code in each open knock
    expires: int | None = None  # a pending enrollment: its first knock due by (Unix time)

    def __repr__(self) -> str:
        return (
            f"Enrollment(host={self.host!r}, port={self.port}, client={self.client!r}, "
            f"services={[s.name for s in self.services]}, secret=<hidden>)"
        )


def is_valid_client_name(name: str) -> bool:
    """Letters, digits, '.', '_', '@', '-'; 1-64 chars; alphanumeric first."""
    return _CLIENT_RE.match(name) is not None


def check_host(host: str) -> str:
    """Validate a host (IP address or DNS name); return it normalized: an
    IPv6 address in RFC 5952's form, a name in lower case.  The grammar is
    docs/protocol.md's `host`: an IPv4 address in dotted decimal without
    leading zeros, an IPv6 address without a zone and not IPv4-mapped, or a
    DNS name of letters, digits and '-' whose last label is not numeric.

    Raises FormatError.
    """
    if ":" in host:
        return _ipv6_host(host)
    if _IPV4_RE.match(host):
        return host
    name = host
    if not name or len(name) > 253 or not all(_LABEL_RE.match(p) for p in name.split(".")):
        raise FormatError(f"host {host!r} is neither an IP address nor a DNS name")
    last = name.rsplit(".", 1)[-1]
    if last.isdigit() or last.lower().startswith("0x"):
        # 010.0.0.1, 0x7f.1, 2130706433: not IP literals, but resolvers read
        # them as (other) addresses; a DNS top-level label is never numeric
        raise FormatError(f"host {host!r} looks like a malformed IP address")
    return name.lower()


def _ipv6_host(text: str) -> str:
    if "%" in text:
        raise FormatError(f"host {text!r}: a zone (%...) names an interface of one machine; "
                          "give the address without it")
    try:
        address = ipaddress.IPv6Address(text)
    except ValueError:
        raise FormatError(f"{text!r} is not an IPv6 address") from None
    if address.ipv4_mapped is not None:
        raise FormatError(f"host {text!r} is an IPv4-mapped address: write the IPv4 address "
                          f"{address.ipv4_mapped}")
    return str(address)


def render(enrollment: Enrollment) -> str:
    """The canonical URI.  Raises FormatError if a field is invalid."""
    _check(enrollment)
    host = check_host(enrollment.host)
    if ":" in host:
        host = f"[{host}]"
    query = [("sid", _b64(enrollment.server_id)), ("key", _b64(enrollment.secret))]
    query += [("svc", f"{s.name}:{s.protocol}:{s.port}") for s in enrollment.services]
    if enrollment.otp:
        query.append(("otp", "1"))
    if enrollment.expires is not None:
        query.append(("exp", str(enrollment.expires)))
    text = "&".join(f"{k}={v}" for k, v in query)
    return f"{SCHEME}://{host}:{enrollment.port}/{enrollment.client}?{text}"


def parse(uri: str) -> Enrollment:
    """Parse an enrollment URI strictly.  Raises FormatError naming the bad part."""
    uri = uri.strip()
    scheme, sep, _ = uri.partition("://")
    if not sep:
        raise FormatError("not an enrollment URI: it must start with spa1://")
    if scheme.lower() != SCHEME:
        if re.fullmatch(r"spa\d+", scheme.lower()):
            raise FormatError(f"enrollment URI version {scheme!r} is not supported (need spa1)")
        raise FormatError(f"not an enrollment URI: scheme {scheme!r}, expected spa1")
    rest = uri.split("://", 1)[1]
    if "#" in rest:
        raise FormatError("enrollment URI must not have a #fragment")
    netloc, _, tail = rest.partition("/")
    path, _, query = tail.partition("?")
    if "@" in netloc:
        raise FormatError("enrollment URI must not carry a user name before the host")
    host, port = _host_port(netloc)
    if "%" in netloc + path:
        raise FormatError("enrollment URI must not percent-encode its host or client name")
    client = path
    if not is_valid_client_name(client):
        raise FormatError("client name in the URI path is missing or has bad characters")
    sid, key, services, otp, expires = _params(query)
    enrollment = Enrollment(
        host=host,
        port=port,
        server_id=_unb64(sid, SERVER_ID_SIZE, "server id (sid)"),
        client=client,
        secret=_unb64(key, MASTER_SECRET_SIZE, "secret (key)"),
        services=tuple(_service(v) for v in services),
        otp=otp,
        expires=expires,
    )
    _check(enrollment)
    return enrollment


def shell_cut(uri: str) -> str | None:
    """When `uri` reads as a shell cut it at its first '&' (an unquoted
    argument: the shell ran the command with the text before the '&' and
    took the rest for other commands), its head `spa1://HOST:PORT/CLIENT`
    to show in quotes; otherwise None.  Cut: a query of one parameter (no
    '&') while sid=, key= and svc= are all required."""
    head, sep, query = uri.strip().partition("?")
    if not sep or not query or "&" in query or not head.lower().startswith(SCHEME + "://"):
        return None
    if "'" in head or any(ch.isspace() for ch in head):
        head = f"{SCHEME}://HOST:PORT/NAME"
    return head


def _host_port(netloc: str) -> tuple[str, int]:
    if netloc.startswith("["):
        inside, sep, rest = netloc[1:].partition("]")
        if not sep:
            raise FormatError("IPv6 host is missing its closing ']'")
        if ":" not in inside:
            raise FormatError(f"{inside!r} in brackets is not an IPv6 address")
        host = _ipv6_host(inside)
    else:
        host, _, rest = netloc.partition(":")
        rest = ":" + rest if _ else ""
        if not host:
            raise FormatError("enrollment URI has no host")
        if ":" in rest[1:]:
            raise FormatError("IPv6 host must be written in brackets, e.g. [2001:db8::1]")
        host = check_host(host)
    if not rest:
        return host, DEFAULT_PORT
    if not rest.startswith(":") or not rest[1:].isdigit() or not rest[1:].isascii():
        raise FormatError("port after the host must be a number")
    if len(rest) > 2 and rest[1] == "0":
        raise FormatError("port after the host must not start with 0")
    port = int(rest[1:])
    if not 1 <= port <= 65535:
        raise FormatError(f"port {port} is out of range 1-65535")
    return host, port


def _params(query: str) -> tuple[str, str, list[str], bool, int | None]:
    """(sid, key, [svc, ...], otp, exp) from the query; sid and key once, svc
    at least once, otp (=1) and exp (a Unix time) at most once."""
    found: dict[str, list[str]] = {"sid": [], "key": [], "svc": [], "otp": [], "exp": []}
    for number, item in enumerate(query.split("&") if query else [], start=1):
        name, sep, value = item.partition("=")
        if name not in found:
            # never echo it: a mangled "key=..." would print the secret
            raise FormatError(f"parameter #{number} of the enrollment URI is not sid=, key=, "
                              "svc=, otp= or exp=")
        if not sep or not value:
            raise FormatError(f"parameter {name!r} has no value")
        if "%" in value:
            raise FormatError(f"parameter {name!r} must not be percent-encoded")
        found[name].append(value)
    for name in ("sid", "key"):
        if len(found[name]) != 1:
            what = "missing" if not found[name] else "repeated"
            raise FormatError(f"parameter {name!r} is {what} in enrollment URI")
    if not found["svc"]:
        raise FormatError("enrollment URI names no service (svc=NAME:PROTO:PORT)")
    if found["otp"] not in ([], ["1"]):
        raise FormatError("parameter 'otp' must be otp=1, once")
    exp = found["exp"]
    if exp and (len(exp) > 1 or not exp[0].isascii() or not exp[0].isdigit()
                or exp[0].startswith("0") or len(exp[0]) > 12):
        raise FormatError("parameter 'exp' must be a Unix time in seconds, once")
    return (found["sid"][0], found["key"][0], found["svc"], bool(found["otp"]),
            int(exp[0]) if exp else None)


def _service(value: str) -> ServiceRef:
    fields = value.split(":")
    if len(fields) != 3:
        raise FormatError(f"service {value!r} must be NAME:PROTO:PORT, e.g. ssh:tcp:22")
    name, protocol, port = fields
    if not is_valid_service_name(name):
        raise FormatError(f"service name {name!r}: use a-z, 0-9, '-', '_' (max 32)")
    if protocol not in PROTOCOLS:
        raise FormatError(f"service {name}: protocol {protocol!r} must be tcp or udp")
    if not (port.isascii() and port.isdigit() and not port.startswith("0")
            and int(port) <= 65535):
        raise FormatError(f"service {name}: port {port!r} must be 1-65535, without a leading 0")
    return ServiceRef(name, protocol, int(port))


def _check(enrollment: Enrollment) -> None:
    if not 1 <= enrollment.port <= 65535:
        raise FormatError(f"port {enrollment.port} is out of range 1-65535")
    if len(enrollment.server_id) != SERVER_ID_SIZE:
        raise FormatError(f"server id must be {SERVER_ID_SIZE} bytes")
    if len(enrollment.secret) != MASTER_SECRET_SIZE:
        raise FormatError(f"secret must be {MASTER_SECRET_SIZE} bytes")
    if not is_valid_client_name(enrollment.client):
        raise FormatError(f"client name {enrollment.client!r} has bad characters")
    names = [s.name for s in enrollment.services]
    if not names:
        raise FormatError("an enrollment needs at least one service")
    if len(set(names)) != len(names):
        raise FormatError("a service is named twice in the enrollment URI")
    for s in enrollment.services:
        _service(f"{s.name}:{s.protocol}:{s.port}")


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str, size: int, what: str) -> bytes:
    problem = f"{what} must be exactly {size} bytes in unpadded base64url"
    if not _B64_RE.match(text):
        raise FormatError(problem)
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise FormatError(problem) from None
    if len(raw) != size or _b64(raw) != text:
        raise FormatError(problem)
    return raw
