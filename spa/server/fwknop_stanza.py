"""One fwknopd access.conf stanza, judged: what a compat client can carry over.

Facts from fwknop's source (server/access.c, common/fko_util.c,
server/fwknopd_common.h): a stanza needs a key (KEY or KEY_BASE64, or
GnuPG's); HMAC_DIGEST_TYPE defaults to SHA256 when there is an HMAC key,
ENCRYPTION_MODE to CBC; FW_ACCESS_TIMEOUT to 30 s and MAX_FW_TIMEOUT to 300 s
(0 means the default, at most 2<<22), MAX_FW_TIMEOUT wins over a longer
FW_ACCESS_TIMEOUT; without OPEN_PORTS a client may open any port it names,
RESTRICT_PORTS takes ports away; SOURCE is ANY or IPv4 addresses and
networks (`/bits` or a dotted mask, host bits masked away); Y/N settings are
true when the value starts with Y or y; ACCESS_EXPIRE is MM/DD/YYYY.

Invariants (docs/operations.md, "Moving off fwknopd"):
- Pure: the stanza and the time in, a `Judged` out.
- A stanza is carried over only when what it makes here can do no more than
  under fwknopd, except for what fwknop's packets cannot prove anyway
  (REQUIRE_USERNAME) or what the client itself controls (REQUIRE_SOURCE_ADDRESS):
  those are dropped and said.  A limit we cannot keep (ACCESS_EXPIRE,
  DESTINATION) or a kind of access we never give (GnuPG, no HMAC, another
  digest or mode, SNAT, FORWARD_ALL, command cycles) keeps the stanza out,
  with a reason each and what to do.  FORCE_NAT becomes a gateway service
  where it maps exactly (spa.server.fwknop_nat), else keeps it out too.
- No reason or note quotes a key's value (spa.server.fwknopd_files
  SECRET_SETTINGS); keys are named by their setting.
"""

from __future__ import annotations

import base64
import binascii
import calendar
import ipaddress
import re
import time
from dataclasses import dataclass, field

from spa.core.errors import FormatError
from spa.core.fwknop import FwknopKeys
from spa.core.sources import canonical_sources
from spa.server.fwknop_nat import NO_FORWARDING, Forwarding, NatTarget, judge_nat
from spa.server.fwknopd_files import Stanza, shown_name

DEFAULT_TIMEOUT = 30  # fwknopd's DEF_FW_ACCESS_TIMEOUT
DEFAULT_MAX_TIMEOUT = 300  # DEF_MAX_FW_TIMEOUT
MOST_TIMEOUT = 2 << 22  # RCHK_MAX_FW_TIMEOUT: fwknopd refuses more
PLACEHOLDER = "__changeme__"  # what the shipped access.conf holds (any case)
NAT_SETTINGS = ("FORCE_NAT", "FORCE_SNAT", "FORCE_MASQUERADE", "FORWARD_ALL", "DISABLE_DNAT")
CMD_SETTINGS = ("ENABLE_CMD_EXEC", "ENABLE_CMD_SUDO_EXEC")
KNOWN_SETTINGS = frozenset({
    "SOURCE", "DESTINATION", "OPEN_PORTS", "RESTRICT_PORTS", "KEY", "KEY_BASE64",
    "HMAC_KEY", "HMAC_KEY_BASE64", "HMAC_DIGEST_TYPE", "FW_ACCESS_TIMEOUT", "MAX_FW_TIMEOUT",
    "ENCRYPTION_MODE", "ENABLE_CMD_EXEC", "ENABLE_CMD_SUDO_EXEC", "CMD_EXEC_USER",
    "CMD_EXEC_GROUP", "CMD_SUDO_EXEC_USER", "CMD_SUDO_EXEC_GROUP", "CMD_CYCLE_OPEN",
    "CMD_CYCLE_CLOSE", "CMD_CYCLE_TIMER", "REQUIRE_USERNAME", "REQUIRE_SOURCE_ADDRESS",
    "REQUIRE_SOURCE", "ACCESS_EXPIRE", "ACCESS_EXPIRE_EPOCH", *NAT_SETTINGS})
_PORT = re.compile(r"(tcp|udp)/([0-9]{1,5})\Z", re.IGNORECASE)
_DATE = re.compile(r"\s*(\d{1,2})/(\d{1,2})/(\d{1,4})")  # sscanf("%2d/%2d/%4d"), loosely
_B64 = re.compile(r"[A-Za-z0-9+/]+=*\Z")
ENROLL_ANEW = "spa-server enroll NAME --fwknop (new keys) or without --fwknop (spa1://)"


@dataclass(frozen=True, slots=True)
class Judged:
    stanza: Stanza
    reasons: tuple[str, ...]  # why it is not carried over (empty: it is)
    notes: tuple[str, ...]  # what is dropped or read differently
    keys: FwknopKeys | None = field(default=None, repr=False)
    sources: tuple[str, ...] = ()  # canonical networks (empty: anywhere)
    ports: tuple[tuple[str, int], ...] = ()  # ("tcp", 22), ... in order
    timeouts: tuple[int, int] = (DEFAULT_TIMEOUT, DEFAULT_MAX_TIMEOUT)  # (default, max)
    username: str = ""  # REQUIRE_USERNAME (names the client)
    nat: NatTarget | None = None  # FORCE_NAT: the gateway service (ports: its one port)


def is_yes(value: str | None) -> bool:
    return bool(value) and str(value)[:1] in "Yy"


def judge(stanza: Stanza, *, now: float, forwarding: Forwarding = NO_FORWARDING) -> Judged:
    """Everything a stanza says, checked; every reason found, not the first.
    `forwarding`: fwknopd.conf's forwarding facts and our backend (FORCE_NAT)."""
    reasons: list[str] = []
    notes: list[str] = []
    keys = _keys(stanza, reasons, notes)
    sources = _sources(stanza, reasons, notes)
    ports = _ports(stanza, reasons)
    timeouts = _timeouts(stanza, reasons)
    _kinds(stanza, reasons, notes)
    nat = judge_nat(stanza, ports, forwarding, reasons, notes)
    _limits(stanza, reasons, notes, now)
    for name in stanza.names():
        if name not in KNOWN_SETTINGS and not name.startswith("GPG_"):
            setting = stanza.last(name)
            assert setting is not None
            notes.append(f"unknown setting {shown_name(name, setting.where)}: ignored "
                         "(fwknopd ignores it too)")
    return Judged(stanza, tuple(reasons), tuple(notes), None if reasons else keys, sources,
                  ports, timeouts, (stanza.get("REQUIRE_USERNAME") or "").split(",")[0].strip(),
                  nat)


def _key(stanza: Stanza, clear: str, coded: str, reasons: list[str], *,
         missing: str) -> bytes | None:
    """One key from NAME (in clear) or NAME_BASE64, the last given; None
    with a reason when it cannot be used."""
    setting = stanza.last(clear, coded)
    if setting is None:
        if missing:
            reasons.append(missing)
        return None
    if setting.value.lower() == PLACEHOLDER:
        return None  # said by _keys, once for both keys
    if setting.name == clear:
        reasons.append(f"{clear} is a passphrase in clear, not {coded}: write {coded} with "
                       f"the output of `printf %s 'THE-{clear}' | base64 -w0` in its place "
                       "(the same bytes: the client keeps working), then run again; better, "
                       f"new keys: {ENROLL_ANEW}")
        return None
    raw = _unb64(setting.value)
    if not raw:
        reasons.append(f"{coded} at {setting.where} is not base64 (fwknopd refuses it too)")
        return None
    return raw


def _unb64(text: str) -> bytes:
    """Standard base64, '=' optional (b"": not base64)."""
    bare = text.rstrip("=")
    if not _B64.match(text) or len(bare) % 4 == 1:
        return b""
    try:
        return base64.b64decode(bare + "=" * (-len(bare) % 4), validate=True)
    except (binascii.Error, ValueError):
        return b""


def _keys(stanza: Stanza, reasons: list[str], notes: list[str]) -> FwknopKeys | None:
    gpg = [n for n in stanza.names() if n.startswith("GPG_")]
    rijndael = _key(stanza, "KEY", "KEY_BASE64", reasons, missing="" if gpg else (
        "no key (KEY_BASE64): fwknopd refuses it too"))
    if gpg and stanza.last("KEY", "KEY_BASE64") is None:
        reasons.append(f"GnuPG only ({', '.join(gpg)}): the compat listener takes Rijndael "
                       f"packets only (GnuPG ones are refused gpg_mode); enroll the user "
                       f"anew: {ENROLL_ANEW}")
    elif gpg:
        notes.append(f"GnuPG ({', '.join(gpg)}): its GnuPG packets are refused gpg_mode; its "
                     "Rijndael ones (KEY_BASE64) are served")
    hmac = _key(stanza, "HMAC_KEY", "HMAC_KEY_BASE64", reasons, missing=(
        "no HMAC key (HMAC_KEY_BASE64): its packets carry no HMAC, and the compat listener "
        "takes only packets with an HMAC-SHA256 (others are refused no_hmac); give it keys "
        f"made by fwknop --key-gen on both sides, or {ENROLL_ANEW}"))
    unset = [found.name for found in (stanza.last("KEY", "KEY_BASE64"),
                                      stanza.last("HMAC_KEY", "HMAC_KEY_BASE64"))
             if found is not None and found.value.lower() == PLACEHOLDER]
    if unset:
        reasons.insert(0, f"{' and '.join(unset)}: still fwknop's placeholder __CHANGEME__ (the "
                       f"file as installed), no client here; enroll one with {ENROLL_ANEW}")
    if rijndael is None or hmac is None:
        return None
    if rijndael == hmac:
        reasons.append("its KEY_BASE64 and HMAC_KEY_BASE64 are the same key (fwknopd refuses "
                       "that too)")
        return None
    try:
        return FwknopKeys(rijndael, hmac)
    except ValueError as exc:
        reasons.append(f"{exc}: KEY_BASE64 decodes to {len(rijndael)} bytes, "
                       f"HMAC_KEY_BASE64 to {len(hmac)} (fwknop --key-gen makes 32 and 64)")
        return None


def _sources(stanza: Stanza, reasons: list[str], notes: list[str]) -> tuple[str, ...]:
    """SOURCE as networks, read as fwknopd reads them (host bits masked away)."""
    items = [item.strip() for item in stanza.source.split(",")]
    if any(item.upper() == "ANY" for item in items):
        return ()
    networks = []
    for item in items:
        try:
            network = ipaddress.ip_network(item, strict=False)
        except ValueError:
            reasons.append(f"SOURCE {item!r} is not an address or a network (fwknopd refuses "
                           "it too)")
            return ()
        if ipaddress.ip_address(item.partition("/")[0]) != network.network_address:
            notes.append(f"SOURCE {item} read as {network}, as fwknopd reads it")
        networks.append(str(network))
    try:
        return canonical_sources(networks)
    except FormatError as exc:
        reasons.append(f"SOURCE: {exc}")
        return ()


def _port_list(text: str, what: str, reasons: list[str]) -> list[tuple[str, int]]:
    found = []
    for item in (part.strip() for part in text.split(",")):
        match = _PORT.match(item)
        if match is None or not 1 <= int(match.group(2)) <= 65535:
            reasons.append(f"{what} {item!r}: not tcp/PORT or udp/PORT with PORT 1-65535")
            return []
        found.append((match.group(1).lower(), int(match.group(2))))
    return list(dict.fromkeys(found))


def _ports(stanza: Stanza, reasons: list[str]) -> tuple[tuple[str, int], ...]:
    """OPEN_PORTS less RESTRICT_PORTS."""
    text = stanza.get("OPEN_PORTS")
    if not text:
        reasons.append("no OPEN_PORTS: fwknopd let this client open any port it named; here "
                       "a client opens named services only: add OPEN_PORTS (e.g. tcp/22) to "
                       "the stanza and run again")
        return ()
    ports = _port_list(text, "OPEN_PORTS", reasons)
    restricted = _port_list(stanza.get("RESTRICT_PORTS") or "", "RESTRICT_PORTS", reasons
                            ) if stanza.get("RESTRICT_PORTS") else []
    kept = tuple(port for port in ports if port not in restricted)
    if ports and not kept:
        reasons.append("RESTRICT_PORTS takes away every port of OPEN_PORTS: nothing to open")
    return kept


def _timeouts(stanza: Stanza, reasons: list[str]) -> tuple[int, int]:
    found = []
    for name, default in (("FW_ACCESS_TIMEOUT", DEFAULT_TIMEOUT),
                          ("MAX_FW_TIMEOUT", DEFAULT_MAX_TIMEOUT)):
        text = (stanza.get(name) or "0").strip()
        if not text.isdigit() or int(text) > MOST_TIMEOUT:
            reasons.append(f"{name} {text!r}: not a number of seconds 0-{MOST_TIMEOUT} "
                           "(fwknopd refuses it too)")
            return DEFAULT_TIMEOUT, DEFAULT_MAX_TIMEOUT
        found.append(int(text) or default)
    return min(found), found[1]


def _kinds(stanza: Stanza, reasons: list[str], notes: list[str]) -> None:
    """The digest, the mode and commands: kinds of access we never give."""
    digest = stanza.get("HMAC_DIGEST_TYPE")
    if digest is not None and digest.lower() != "sha256":
        reasons.append(f"HMAC_DIGEST_TYPE {digest}: the compat listener takes HMAC-SHA256 "
                       "only (others are refused weak_hmac or other_hmac); the same keys work "
                       "with SHA256 on both sides (HMAC_DIGEST_TYPE SHA256 here and in the "
                       "client's .fwknoprc): change both, then run again")
    mode = stanza.get("ENCRYPTION_MODE")
    if mode is not None and mode.lower() != "cbc":
        why = ("fwknop's legacy IV mode is refused (legacy_iv): drop ENCRYPTION_MODE legacy "
               "here and in the client (-M legacy), then run again" if mode.lower() == "legacy"
               else "GnuPG's packets are refused (gpg_mode)" if mode.lower() == "asymmetric"
               else "only CBC, fwknop's default, is served")
        reasons.append(f"ENCRYPTION_MODE {mode}: {why}")
    if stanza.get("CMD_CYCLE_OPEN") is not None or stanza.get("CMD_CYCLE_CLOSE") is not None:
        reasons.append("CMD_CYCLE_OPEN: fwknopd runs a command for each knock instead of "
                       "opening a port; no command ever runs here")
    commands = [n for n in CMD_SETTINGS if is_yes(stanza.get(n))]
    if commands:
        notes.append(f"command execution ({', '.join(commands)}): dropped; a command "
                     "message is refused here (command_message), never run")


def _limits(stanza: Stanza, reasons: list[str], notes: list[str], now: float) -> None:
    """Limits on who, where and when."""
    username = stanza.get("REQUIRE_USERNAME")
    if username is not None:
        notes.append(f"REQUIRE_USERNAME {username}: dropped; fwknop's username field is not "
                     "authenticated as a user: it is whatever the sender puts there (fwknop "
                     "-U), sealed by the same keys, so it proves nothing the keys do not")
    if is_yes(stanza.get("REQUIRE_SOURCE_ADDRESS")) or is_yes(stanza.get("REQUIRE_SOURCE")):
        notes.append("REQUIRE_SOURCE_ADDRESS: not enforced; a packet naming an address (fwknop "
                     "-a or -R, as this client sends) opens only when it comes from that "
                     "address, but one naming none (fwknop -s) would open for its sender: keep "
                     "the client on -R or -a")
    destination = stanza.get("DESTINATION")
    if destination is not None and destination.strip().upper() not in ("ANY", "0.0.0.0/0"):
        reasons.append(f"DESTINATION {destination}: fwknopd took this client's packets only "
                       "sent to those addresses; a grant here holds for every address of this "
                       "host: delete the DESTINATION line to import it so, and run again")
    expires = _expiry(stanza, reasons)
    if expires is None:
        return
    day = _day(expires)
    if expires <= now:
        reasons.append(f"expired on {day} (ACCESS_EXPIRE): fwknopd refuses it already")
    else:
        reasons.append(f"ACCESS_EXPIRE {day}: a client here cannot end on a date (enroll "
                       "--expires bounds its first knock only); to import it without the "
                       "end, delete the line and run again, then on that day: spa-server "
                       "revoke NAME")


def _expiry(stanza: Stanza, reasons: list[str]) -> float | None:
    """ACCESS_EXPIRE (MM/DD/YYYY, read as UTC midnight) or ACCESS_EXPIRE_EPOCH."""
    setting = stanza.last("ACCESS_EXPIRE", "ACCESS_EXPIRE_EPOCH")
    if setting is None:
        return None
    if setting.name == "ACCESS_EXPIRE_EPOCH":
        if setting.value.strip().isdigit():
            return float(setting.value.strip())
    else:
        match = _DATE.match(setting.value)
        if match is not None:
            month, day, year = (int(part) for part in match.groups())
            year += 2000 if year < 100 else 0
            if 1 <= month <= 12 and 1 <= day <= 31:
                return float(calendar.timegm((year, month, day, 0, 0, 0)))
    reasons.append(f"{setting.name} {setting.value!r}: not a date fwknopd reads (MM/DD/YYYY, "
                   "or seconds for ACCESS_EXPIRE_EPOCH)")
    return None


def _day(when: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(when))
