"""Importing fwknopd's clients: the plan (pure) and how it reads.

Invariants (docs/operations.md, "Moving off fwknopd"):
- Pure: stanzas, fwknopd.conf's settings, the config and what the store
  holds in; a plan out.  Nothing is read or written here.
- Idempotent by key: a stanza whose HMAC key an fwknop client in the store
  has is that client, already imported, whatever its name (the key is what
  names an fwknop client: the compat listener finds clients by it); it is
  left as it is.  A stanza whose name a client with other keys holds is not
  imported (a client moved to spa1:// keeps its name, and its old keys must
  not come back under another).  So a second run over the same files plans
  nothing.
- Names are derived from the stanza alone, in file order, so a run and the
  next agree: REQUIRE_USERNAME, else an included file's name, else
  "fwknop-" and SOURCE; made valid and unique with -2, -3, ...
- A stanza's ports map onto this host's service with that protocol and
  port, as the compat listener maps packets (the last by name wins); a port
  no service has gets a new one, `tcp-2222`, with the stanza's timeouts.  A
  port a gateway service publishes is no port of this host: the stanza is
  kept out.
- A FORCE_NAT stanza (spa.server.fwknop_nat) maps onto the gateway service
  that is exactly its target, or a new one, `nat-10-20-0-5-22`; never onto
  a second service for a destination one already gates, nor publishing a
  port another service is on (a reason each, and what to do).
- fwknop_port is set only when unset, not listen_port, and some stanza is
  served; at most MAX_CLIENTS fwknop clients in all (LocalError past it).
- Nothing here quotes a key.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from spa.core.fwknop_verify import MAX_CLIENTS
from spa.core.policy import Service
from spa.core.uri import is_valid_client_name
from spa.server.config import FWKNOP_PORT, KIND_FWKNOP, ClientEntry, ServerConfig, format_utc
from spa.server.errors import LocalError
from spa.server.fwknop_nat import Forwarding
from spa.server.fwknop_services import Port, Services
from spa.server.fwknop_stanza import Judged, is_yes, judge
from spa.server.fwknopd_files import FwknopdConf, Stanza

DEFAULT_PCAP_FILTER = "udp port 62201"  # fwknopd's DEF_PCAP_FILTER
DEFAULT_PACKET_AGE = 120  # fwknopd's DEF_MAX_SPA_PACKET_AGE
_NAME_CHARS = re.compile(r"[^A-Za-z0-9._@-]+")
_FILTER_PORT = re.compile(r"\bport\s+(\d{1,5})\b")


class Outcome(enum.Enum):
    NEW = "new"
    ALREADY = "already"
    SKIPPED = "skipped"


@dataclass(frozen=True, slots=True)
class Known:
    """What the store holds that the plan needs (the caller reads it)."""

    fwknop: tuple[ClientEntry, ...]  # every client of kind fwknop
    named: Mapping[str, ClientEntry]  # the store's clients under the stanzas' names


@dataclass(frozen=True, slots=True)
class StanzaPlan:
    judged: Judged
    name: str
    outcome: Outcome
    reasons: tuple[str, ...] = ()  # why not imported
    notes: tuple[str, ...] = ()
    services: tuple[tuple[Port, str, bool], ...] = ()  # (port, service, new service)
    entry: ClientEntry | None = field(default=None, repr=False)  # NEW: what the store gets


@dataclass(frozen=True, slots=True)
class ImportPlan:
    stanzas: tuple[StanzaPlan, ...]
    services: tuple[Service, ...]  # new ones
    fwknop_port: int  # to set under [server] (0: left as it is)
    port_line: str  # where the port comes from, or why it is not set
    notes: tuple[str, ...]  # fwknopd.conf's settings we do not carry

    @property
    def entries(self) -> list[ClientEntry]:
        return [p.entry for p in self.stanzas if p.entry is not None]

    @property
    def changes(self) -> bool:
        return bool(self.entries or self.services or self.fwknop_port)


def client_names(stanzas: Sequence[Stanza]) -> list[str]:
    """Each stanza's client name, in order, unique."""
    taken: set[str] = set()
    names = []
    for stanza in stanzas:
        base = _base_name(stanza)
        name, count = base, 1
        while name in taken:
            count += 1
            name = f"{base[:60]}-{count}"
        taken.add(name)
        names.append(name)
    return names


def _base_name(stanza: Stanza) -> str:
    username = (stanza.get("REQUIRE_USERNAME") or "").split(",")[0]
    for text in (username, "" if stanza.root else stanza.where.file.stem,
                 "fwknop-" + stanza.source.lower()):
        name = _NAME_CHARS.sub("-", text.strip()).strip("-._@")[:60]
        if name and is_valid_client_name(name):
            return name
    return "fwknop"


def plan(stanzas: Sequence[Stanza], conf: FwknopdConf, config: ServerConfig, known: Known,
         *, now: float) -> ImportPlan:
    """What importing the stanzas would do.  Raises LocalError (past MAX_CLIENTS)."""
    services = Services(config.services)
    by_key = {entry.fwknop_hmac_key: entry for entry in known.fwknop}
    first: dict[bytes, tuple[Judged, str]] = {}
    forwarding = Forwarding.of(conf.settings, config.backend)
    plans = []
    for stanza, name in zip(stanzas, client_names(stanzas), strict=True):
        judged = judge(stanza, now=now, forwarding=forwarding)
        plans.append(_one(judged, name, by_key, known.named, first, services, now))
    new = sum(p.outcome is Outcome.NEW for p in plans)
    if new and len(known.fwknop) + new > MAX_CLIENTS:
        raise LocalError(f"this import would make {len(known.fwknop) + new} fwknop clients; "
                         f"the compat listener serves at most {MAX_CLIENTS} (each junk packet "
                         "costs an HMAC per client): move some to spa1:// first (spa-server "
                         "clients shows how); nothing was changed")
    served = any(p.outcome is not Outcome.SKIPPED for p in plans)
    port, line = _port(conf, config) if served or config.fwknop_port else (
        0, "fwknop_port not set: no stanza to serve")
    return ImportPlan(tuple(plans), tuple(services.added), port, line,
                      conf_notes(conf, config.window))


def _one(judged: Judged, name: str, by_key: Mapping[bytes, ClientEntry],
         named: Mapping[str, ClientEntry], first: dict[bytes, tuple[Judged, str]],
         services: Services, now: float) -> StanzaPlan:
    if judged.reasons or judged.keys is None:
        return StanzaPlan(judged, name, Outcome.SKIPPED, judged.reasons, judged.notes)
    key = judged.keys.hmac
    if key in first:
        earlier, earlier_name = first[key]
        return StanzaPlan(judged, name, Outcome.SKIPPED, (
            f"the same HMAC key as the stanza at {earlier.stanza.where} ({earlier_name}): an "
            "fwknop packet names no client, its key does, so one client a key here; give "
            "this one keys of its own (fwknop --key-gen) or merge the two stanzas",),
            judged.notes)
    existing = by_key.get(key)
    if existing is not None:
        first[key] = (judged, existing.name)
        return StanzaPlan(judged, existing.name, Outcome.ALREADY, (),
                          (*judged.notes, *_differences(judged, existing, services)))
    taken = named.get(name)
    if taken is not None:
        first[key] = (judged, name)
        return StanzaPlan(judged, name, Outcome.SKIPPED, (
            f"the name {name} is taken by a client with other keys (kind {taken.kind}): a "
            "client moved to spa1:// keeps its name, and its old fwknop keys must not come "
            "back; if this is someone else, give the stanza its own file in an "
            "%include_folder (the file's name names the client)",), judged.notes)
    blocked = services.blocked(judged.ports, judged.nat)
    if blocked:
        return StanzaPlan(judged, name, Outcome.SKIPPED, (blocked,), judged.notes)
    first[key] = (judged, name)
    mapped = []
    notes = list(judged.notes)
    for port in judged.ports:
        got = services.gateway(judged.nat, judged.timeouts) if judged.nat else services.get(
            port, judged.timeouts)
        assert not isinstance(got, str)  # blocked() said so
        service, made = got
        mapped.append((port, service.name, made))
        notes.extend(_durations(port, service, judged.timeouts))
    entry = ClientEntry(name, b"", tuple(dict.fromkeys(s for _, s, _ in mapped)),
                        enrolled=format_utc(now), kind=KIND_FWKNOP,
                        fwknop_key=judged.keys.rijndael, fwknop_hmac_key=key,
                        sources=judged.sources)
    return StanzaPlan(judged, name, Outcome.NEW, (), tuple(notes), tuple(mapped), entry)


def _durations(port: Port, service: Service, timeouts: tuple[int, int]) -> list[str]:
    if (service.default_duration, service.max_duration) == timeouts:
        return []
    return [f"{port[0]}/{port[1]} opens {service.name} for {service.default_duration} s, at "
            f"most {service.max_duration} s (fwknopd: {timeouts[0]} s, at most "
            f"{timeouts[1]} s): durations belong to the service here ([services."
            f"{service.name}])"]


def _differences(judged: Judged, existing: ClientEntry, services: Services) -> list[str]:
    """How the store's client differs from the stanza now (left as it is)."""
    found = []
    assert judged.keys is not None
    if existing.fwknop_key != judged.keys.rijndael:
        found.append(f"its KEY_BASE64 is not {existing.name}'s: left as it is (revoke "
                     f"{existing.name} and run again to take this one)")
    wanted = [services.find_target(judged.nat)] if judged.nat else [
        services.find(port) for port in judged.ports]
    names = sorted({s.name for s in wanted if s is not None})
    if None in wanted or names != sorted(existing.services):
        found.append(f"{existing.name} opens {', '.join(existing.services)}, not what "
                     f"OPEN_PORTS says now: left as it is")
    if tuple(existing.sources) != judged.sources:
        found.append(f"{existing.name} knocks from {', '.join(existing.sources) or 'anywhere'}"
                     f", not what SOURCE says now: left as it is (spa-server clients set "
                     f"{existing.name} --from NET)")
    if existing.revoked:
        found.append(f"{existing.name} is revoked: left so")
    return found


def fwknopd_port(conf: FwknopdConf) -> tuple[int, str]:
    """(the UDP port fwknopd took packets on, 0 when it cannot be told; how
    it was found) from ENABLE_UDP_SERVER/UDPSERV_PORT, ENABLE_NFQ_CAPTURE/
    NFQ_PORT or PCAP_FILTER, in fwknopd's order, with its defaults."""
    settings = conf.settings
    for switch, key in (("ENABLE_UDP_SERVER", "UDPSERV_PORT"),
                        ("ENABLE_NFQ_CAPTURE", "NFQ_PORT")):
        if is_yes(settings.get(switch)):
            text = settings.get(key, str(FWKNOP_PORT))
            if text.isdigit() and 1 <= int(text) <= 65535:
                return int(text), f"fwknopd's {key} {text}"
            return 0, f"{key} {text!r} is not a port"
    text = settings.get("PCAP_FILTER", DEFAULT_PCAP_FILTER)
    ports = {int(p) for p in _FILTER_PORT.findall(text)}
    how = f"fwknopd's PCAP_FILTER '{text}'" + ("" if "PCAP_FILTER" in settings else
                                                ", its default")
    if len(ports) == 1 and "tcp" not in text.split() and 1 <= min(ports) <= 65535:
        return min(ports), how
    return 0, f"{how} names no one UDP port"


def _port(conf: FwknopdConf, config: ServerConfig) -> tuple[int, str]:
    """(the fwknop_port to set, 0: none; the line that says so)."""
    port, how = fwknopd_port(conf)
    if config.fwknop_port:
        if port and port != config.fwknop_port:
            return 0, (f"fwknop_port is {config.fwknop_port} here, not {port} ({how}): each "
                       f"fwknop client must send there (SPA_SERVER_PORT {config.fwknop_port} "
                       f"in .fwknoprc, fwknop -p {config.fwknop_port}), or set fwknop_port = "
                       f"{port} under [server]")
        return 0, f"fwknop_port is {config.fwknop_port} already: left as it is"
    if not port:
        return 0, (f"fwknop_port not set: {how}; set it under [server] in {config.path} to "
                   "the port fwknop clients send to")
    if port == config.listen_port:
        return 0, (f"fwknop_port not set: fwknopd's port {port} is listen_port here, and "
                   "fwknop's packets need a port of their own: set listen_port to another "
                   f"under [server] in {config.path} (e.g. {port + 1}; spa1:// URIs name it: "
                   "re-enroll their clients), then run this again to set fwknop_port = "
                   f"{port}")
    return port, f"fwknop_port = {port} under [server] ({how})"


def conf_notes(conf: FwknopdConf, window: float) -> tuple[str, ...]:
    """fwknopd.conf's settings that change what a client meets here."""
    settings = conf.settings
    notes = []
    if not conf.found:
        notes.append(f"no {conf.path}: fwknopd's defaults assumed")
    if settings.get("ENABLE_SPA_PACKET_AGING", "Y")[:1] in "Nn":
        notes.append(f"ENABLE_SPA_PACKET_AGING N: fwknopd took packets of any age; here one "
                     f"more than {window:g} s off is refused stale or future ([server] window)")
    else:
        age = settings.get("MAX_SPA_PACKET_AGE", str(DEFAULT_PACKET_AGE))
        if age != f"{window:g}":
            notes.append(f"MAX_SPA_PACKET_AGE {age}: here the window is {window:g} s either "
                         "way ([server] window, for both protocols): a client whose clock is "
                         "further off is refused stale or future")
    for switch, what in (("ENABLE_TCP_SERVER", "SPA over TCP"),
                         ("ENABLE_SPA_OVER_HTTP", "SPA over HTTP")):
        if is_yes(settings.get(switch)):
            notes.append(f"{switch}: {what} is not served here; clients send UDP (fwknop's "
                         "default)")
    forwarding = [k for k in ("ENABLE_IPT_FORWARDING", "ENABLE_FIREWD_FORWARDING")
                  if is_yes(settings.get(k))]
    if forwarding:
        notes.append(f"{forwarding[0]}: a client's NAT request (fwknop -N HOST:PORT) is "
                     "served only when HOST:PORT is a gateway service it may open, knocked "
                     "for on its published port (--nat-port); any other is refused "
                     "nat_message (fwknopd let a client name any destination)")
    if is_yes(settings.get("ENABLE_NAT_DNS")):
        notes.append("ENABLE_NAT_DNS: a NAT request naming a host by name is refused "
                     "nat_message; names are never resolved here (-N with the address)")
    if is_yes(settings.get("ENABLE_EXTERNAL_CMDS")):
        notes.append("ENABLE_EXTERNAL_CMDS: no command runs on a grant here")
    if settings.get("BLACKLIST"):
        notes.append(f"BLACKLIST {settings['BLACKLIST']}: not carried over; block those "
                     "sources in the host firewall")
    for key in ("ACCESS_FILE", "ACCESS_FOLDER"):
        if settings.get(key):
            notes.append(f"{key} {settings[key]}: fwknopd reads that; if it is not what "
                         "--access named, run again with --access set to it")
    return tuple(notes)


def render(plan: ImportPlan, *, dry_run: bool) -> list[str]:
    """The plan as lines for the admin: each stanza, then what changes."""
    lines = ["dry run: nothing is changed; this is what import-fwknop would do"
             ] if dry_run else []
    for one in plan.stanzas:
        lines.extend(_stanza_lines(one, dry_run))
    would = "would " if dry_run else ""
    for service in plan.services:
        what = f"{service.protocol}/{service.port}"
        if service.host is not None:
            what += f" of {service.host}" + (f", published on {service.listen_port}"
                                             if service.listen_port else ", reached routed")
        lines.append(f"service {service.name}: {would}add {what} "
                     f"({service.default_duration} s, at most {service.max_duration} s)")
    if plan.fwknop_port:
        lines.append(f"{'would set' if dry_run else 'set'} {plan.port_line}")
    else:
        lines.append(plan.port_line)
    lines.extend(f"fwknopd.conf: {note}" for note in plan.notes)
    return [*lines, *_summary(plan, dry_run)]


def _stanza_lines(one: StanzaPlan, dry_run: bool) -> list[str]:
    head = f"{one.judged.stanza.where} SOURCE {one.judged.stanza.source}"
    if one.outcome is Outcome.SKIPPED:
        lines = [f"{head}: not imported ({one.name}):"]
        lines.extend(f"  - {reason}" for reason in one.reasons)
    elif one.outcome is Outcome.ALREADY:
        lines = [f"{head}: already imported as {one.name} (the store holds its HMAC key): "
                 "unchanged"]
    else:
        opens = ", ".join(f"{p}/{n} as {s}{' (new service)' if made else ''}"
                          for (p, n), s, made in one.services)
        where = ", ".join(one.judged.sources) or "anywhere"
        lines = [f"{head}: {'would import' if dry_run else 'imported'} as {one.name}: "
                 f"opens {opens}; knocks from {where}"]
    if one.notes:
        lines.append("  not carried over or read differently:" if one.outcome is not
                     Outcome.SKIPPED else "  also:")
        lines.extend(f"  - {note}" for note in one.notes)
    return lines


def _summary(plan: ImportPlan, dry_run: bool) -> list[str]:
    def names(outcome: Outcome) -> list[str]:
        return [p.name for p in plan.stanzas if p.outcome is outcome]

    new, already, skipped = names(Outcome.NEW), names(Outcome.ALREADY), names(Outcome.SKIPPED)
    counts = (f"{len(new)} {'to import' if dry_run else 'imported'}"
              f"{': ' + ', '.join(new) if new else ''}; {len(already)} already imported"
              f"{': ' + ', '.join(already) if already else ''}; {len(skipped)} not imported")
    lines = [f"stanzas: {counts} (a stanza is matched to a client by its HMAC key)"]
    if not plan.changes:
        return [*lines, "nothing to change" + (": every stanza that can be is imported"
                                               if already else "")]
    if new:
        lines.append("each imported client opens only for the address its knock comes from "
                     "(fwknopd also granted an address a packet named: fwknop -a); its knocks "
                     "are marked legacy; it keeps its .fwknoprc (the same keys)")
    if any(service.gateway for service in plan.services):
        lines.append("gateway services forward through this host: keep net.ipv4.ip_forward=1 "
                     "(spa never sets it) and run `spa-server check` (docs/install.md, "
                     "section 11)")
    if plan.fwknop_port:
        lines.append(f"next: stop fwknopd, then restart spa-server (the compat listener starts "
                     f"with it, on {plan.fwknop_port}/udp)")
    lines.append("later, each moves to spa1:// with the one command `spa-server clients` "
                 "prints for it")
    return lines
