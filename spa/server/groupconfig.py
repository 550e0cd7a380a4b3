"""The config file's `[group]` table: which group this server is a member of,
and how it reaches the group's etcd cluster (docs/groups.md, "A member's
config").

    [group]
    name = "office"                      # the group (a-z, 0-9, '_', '-')
    member = "gw1"                       # this server in the group
    endpoints = ["https://10.0.0.1:2379", "https://10.0.0.2:2379"]
    ca_file = "/etc/spa/etcd/ca.crt"     # verifies the etcd members
    cert_file = "/etc/spa/etcd/member.crt"
    key_file = "/etc/spa/etcd/member.key"
    user = "office-gw1"                  # this member's etcd user (RBAC)
    password_file = "/etc/spa/etcd/password"   # 0600; never in the config itself
    on_store_down = "fail_closed"        # or "local_only" (LOCAL_ONLY_RISK)
    timeout = 2.0                        # seconds per etcd call and endpoint

Invariants:
- Pure: the table's values in, a GroupSettings or one ConfigError line out
  (what is wrong, and the line to write).  Nothing is read here: the files
  are opened by the edge that opens the store (spa/server/groupstore.py),
  which checks the password file (0600, the user's own, no link).
- A relative path is taken beside the config file (as [server] state_dir),
  so every command finds the same files wherever it runs.
- The group's server id is not here: it is the group's meta record's, and
  [server] server_id must equal it (`spa-server group join` writes it; every
  group command and the daemon refuse a mismatch, groupstore.check_server_id).
- A password never sits in the config: `password` is refused with the fix.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomlkit

from spa.core.errors import FormatError
from spa.core.uri import check_host
from spa.group.layout import GroupNameError, check_group, check_member
from spa.group.policy import LOCAL_ONLY_RISK, parse_on_store_down
from spa.group.settings import DEFAULT_TIMEOUT, GroupSettings
from spa.server.configvalue import describe, expect
from spa.server.errors import ConfigError

GROUP_KEYS = ("name", "member", "endpoints", "ca_file", "cert_file", "key_file", "user",
              "password_file", "on_store_down", "timeout")
_REQUIRED_EXAMPLES = {  # a line to show for a missing key
    "name": '"office"', "member": '"gw1"', "endpoints": '["https://10.0.0.1:2379"]',
    "ca_file": '"/etc/spa/etcd/ca.crt"', "cert_file": '"/etc/spa/etcd/member.crt"',
    "key_file": '"/etc/spa/etcd/member.key"', "user": '"office-gw1"',
    "password_file": '"/etc/spa/etcd/password"',
}
MIN_TIMEOUT, MAX_TIMEOUT = 0.1, 30.0  # seconds for one etcd call on one endpoint
MAX_ENDPOINTS = 16  # a cluster has 3, 5 or 7 members; more is a typo or a list gone wrong
ETCD_DEFAULT_PORT = 2379  # etcd's client port, when an endpoint names none
# an etcd user name as the admin commands create them: bounded, no spaces or quotes
_USER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}\Z")


def parse_group(path: Path, data: Mapping[str, Any],
                where: str | None = None) -> GroupSettings | None:
    """The [group] table of a parsed config file, or None when it has none;
    `where` starts each message instead of the file's name (options).
    Raises ConfigError."""
    if "group" not in data:
        return None
    where = where or f"{path}: [group]"
    table = data["group"]
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: group must be a table (got {describe(table)}): write "
                          "[group] on a line of its own and its keys below it")
    if "password" in table:
        raise ConfigError(f"{where} password: the config holds no etcd password; put it in "
                          "a file of its own (chmod 600) and write password_file = \"FILE\"")
    unknown = sorted(set(table) - set(GROUP_KEYS))
    if unknown:
        raise ConfigError(f"{where} has unknown key {unknown[0]!r} (known: "
                          f"{', '.join(GROUP_KEYS)})")
    for key, example in _REQUIRED_EXAMPLES.items():
        if key not in table:
            raise ConfigError(f"{where} needs {key}, e.g. {key} = {example} (spa-server "
                              "group join writes the whole table)")
    try:
        name = check_group(expect(where, "name", table["name"], str))
        member = check_member(expect(where, "member", table["member"], str))
    except GroupNameError as exc:
        raise ConfigError(f"{where} {exc}") from None
    try:
        on_store_down = parse_on_store_down(
            expect(where, "on_store_down", table.get("on_store_down", "fail_closed"), str))
    except ValueError as exc:
        raise ConfigError(f"{where} {exc}; {LOCAL_ONLY_RISK}") from None
    return GroupSettings(
        name=name, member=member,
        endpoints=parse_endpoints(where, expect(where, "endpoints", table["endpoints"], list)),
        ca_file=_file(path, where, table, "ca_file"),
        cert_file=_file(path, where, table, "cert_file"),
        key_file=_file(path, where, table, "key_file"),
        user=check_user(where, expect(where, "user", table["user"], str)),
        password_file=_file(path, where, table, "password_file"),
        on_store_down=on_store_down,
        timeout=check_timeout(where, expect(where, "timeout",
                                            table.get("timeout", DEFAULT_TIMEOUT),
                                            (int, float))))


def check_user(where: str, user: str) -> str:
    """An etcd user name: letters, digits, '.', '_', '@', '-', at most 64.
    Raises ConfigError."""
    if _USER_RE.match(user) is None:
        raise ConfigError(f"{where} user {user[:40]!r}: use letters, digits, '.', '_', '@' "
                          "and '-', alphanumeric first, at most 64 characters")
    return user


def check_timeout(where: str, timeout: float) -> float:
    """Seconds for one etcd call on one endpoint.  Raises ConfigError."""
    if not MIN_TIMEOUT <= timeout <= MAX_TIMEOUT:
        raise ConfigError(f"{where} timeout = {timeout}: give seconds between {MIN_TIMEOUT} "
                          f"and {MAX_TIMEOUT:g} (default {DEFAULT_TIMEOUT:g})")
    return float(timeout)


def parse_endpoints(where: str, texts: list[Any]) -> tuple[str, ...]:
    """etcd's client URLs, https://HOST[:PORT] each, canonical (a port
    always written, IPv6 in brackets).  Raises ConfigError."""
    if not texts:
        raise ConfigError(f"{where} endpoints is empty: list the etcd cluster's client URLs, "
                          'e.g. endpoints = ["https://10.0.0.1:2379", "https://10.0.0.2:2379"]')
    if len(texts) > MAX_ENDPOINTS:
        raise ConfigError(f"{where} endpoints: at most {MAX_ENDPOINTS} (an etcd cluster has "
                          "3, 5 or 7 members)")
    found: list[str] = []
    for text in texts:
        if not isinstance(text, str):
            raise ConfigError(f"{where} endpoints: give URLs as strings, e.g. "
                              '["https://10.0.0.1:2379"]')
        url = endpoint_url(where, text)
        if url in found:
            raise ConfigError(f"{where} endpoints lists {url} twice; give each member once")
        found.append(url)
    return tuple(found)


def endpoint_url(where: str, text: str) -> str:
    """One etcd client URL, canonical: https://HOST:PORT.  Raises ConfigError."""
    shown = text[:60]
    scheme, sep, rest = text.strip().partition("://")
    if not sep or scheme.lower() != "https":
        raise ConfigError(f"{where} endpoint {shown!r}: write https://HOST:PORT (the group "
                          "speaks TLS to etcd only), e.g. https://10.0.0.1:2379")
    rest = rest.removesuffix("/")
    if any(c in rest for c in "/?#@ "):
        raise ConfigError(f"{where} endpoint {shown!r}: only https://HOST:PORT, no path, "
                          "user or query")
    if rest.startswith("["):
        host, close, tail = rest[1:].partition("]")
        if not close or (tail and not tail.startswith(":")):
            raise ConfigError(f"{where} endpoint {shown!r}: write https://[IPv6]:PORT")
        port_text = tail[1:] if tail else str(ETCD_DEFAULT_PORT)
    elif rest.count(":") > 1:
        raise ConfigError(f"{where} endpoint {shown!r}: put an IPv6 address in brackets, "
                          "https://[2001:db8::1]:2379")
    else:
        host, _, port_text = rest.partition(":")
        port_text = port_text or str(ETCD_DEFAULT_PORT)
    if not (port_text.isascii() and port_text.isdigit() and 1 <= int(port_text) <= 65535):
        raise ConfigError(f"{where} endpoint {shown!r}: the port must be 1-65535")
    port = int(port_text)
    try:
        host = check_host(host)
    except FormatError as exc:
        raise ConfigError(f"{where} endpoint {shown!r}: {exc}") from None
    shown_host = f"[{host}]" if _is_v6(host) else host
    return f"https://{shown_host}:{port}"


def _is_v6(host: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address)
    except ValueError:
        return False


def _file(path: Path, where: str, table: Mapping[str, Any], key: str) -> Path:
    """A file the table names; relative: beside the config.  Raises ConfigError."""
    text: str = expect(where, key, table[key], str)
    if not text.strip() or "\0" in text:
        raise ConfigError(f"{where} {key} is empty: name the file, e.g. {key} = "
                          f"{_REQUIRED_EXAMPLES[key]}")
    file = Path(text)
    return file if file.is_absolute() else path.absolute().parent / file


def group_table(settings: GroupSettings) -> tomlkit.items.Table:
    """The [group] table `spa-server group join` writes, with a comment per key."""
    table = tomlkit.table()
    table.comment("a member of a group on etcd (docs/groups.md); [server] server_id is the "
                  "group's")
    notes = {
        "name": "the group: its keys live under /spa/groups/NAME/ in etcd",
        "member": "this server in the group",
        "endpoints": "etcd's client URLs (TLS), tried in this order",
        "ca_file": "the etcd cluster's CA",
        "cert_file": "this member's client certificate (no CN)",
        "key_file": "its key (0600)",
        "user": "this member's etcd user: reads the group, writes claims and leases",
        "password_file": "that user's password, one line (0600)",
        "timeout": "seconds per etcd call and endpoint",
    }
    values: dict[str, object] = {
        "name": settings.name, "member": settings.member, "endpoints": list(settings.endpoints),
        "ca_file": str(settings.ca_file), "cert_file": str(settings.cert_file),
        "key_file": str(settings.key_file), "user": settings.user,
        "password_file": str(settings.password_file),
        "on_store_down": settings.on_store_down.value, "timeout": settings.timeout,
    }
    for key, value in values.items():
        table.add(key, value)
        if key == "on_store_down":
            table[key].comment("fail_closed: no grant while etcd cannot be reached" if
                               value == "fail_closed" else "RISK: " + LOCAL_ONLY_RISK)
        else:
            table[key].comment(notes[key])
    return table
