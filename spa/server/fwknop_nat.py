"""A stanza's forwarding (FORCE_NAT and the rest), judged against gateway mode.

Facts from fwknop's source (server/access.c, server/fw_util_iptables.c
process_spa_request, forward_access_rule, dnat_rule, snat_rule,
server/incoming_spa.c check_nat_access_types; fw_util_firewalld.c alike):
- FORCE_NAT "IP PORT" (read as sscanf "%15s %5u": an IPv4 address, a port
  up to 65535) NATs every access the stanza grants: the first proto/port the
  client names (OPEN_PORTS must allow it) is DNATed on fwknopd's host, for
  the knocking source only, to IP:PORT; a FORWARD rule accepts that source
  to PORT of that protocol (on any host the gateway forwards to); nothing
  opens on fwknopd's host itself.  fwknopd refuses the file unless
  fwknopd.conf has ENABLE_IPT_FORWARDING or ENABLE_IPT_LOCAL_NAT
  (ENABLE_FIREWD_* with firewalld).
- DISABLE_DNAT Y keeps the FORWARD rule only: the client reaches IP:PORT
  routed.
- FORCE_SNAT IP, FORCE_MASQUERADE Y, or fwknopd.conf's ENABLE_IPT_SNAT Y
  (ENABLE_FIREWD_SNAT) rewrite the forwarded connection's source: the
  internal host sees the gateway, not the client.
- FORWARD_ALL Y forwards every port and protocol from the client.

Invariants (docs/operations.md, "Moving off fwknopd"):
- Pure: the stanza, its ports and fwknopd.conf's facts in, a `NatTarget`
  or reasons out.
- FORCE_NAT becomes a gateway service (spa/backends/nftgateway.py) only
  where that service grants what fwknopd granted and no more: IP a routed
  IPv4 address, one proto/port left of OPEN_PORTS less RESTRICT_PORTS (the
  published port, `listen_port`; with DISABLE_DNAT that port is PORT and
  nothing is published), no SNAT of any kind (spa does none), no
  FORWARD_ALL, the nftables backend.  Anything else keeps the stanza out
  with a reason that says what to do.
- What differs and is narrower or the admin's is said in notes: the gate
  holds for IP:PORT only, and the published port is DNATed for every
  source (a stranger is dropped in the forward gate).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from spa.server.config import gateway_host_problem
from spa.server.fwknopd_files import Stanza

GATEWAY_BACKENDS = ("nftables", "memory")  # as spa.server.config refuses others
FORWARDING = (("ENABLE_IPT_FORWARDING", "ENABLE_IPT_LOCAL_NAT"),
              ("ENABLE_FIREWD_FORWARDING", "ENABLE_FIREWD_LOCAL_NAT"))
SNAT_SETTINGS = ("ENABLE_IPT_SNAT", "ENABLE_FIREWD_SNAT")
MAX_NAT_IP = 15  # sscanf's %15s
NO_SNAT = ("spa does no SNAT: the internal host would see the client's own address "
           "and must route its replies back through this host")


def _yes(value: str | None) -> bool:
    return bool(value) and str(value)[:1] in "Yy"


@dataclass(frozen=True, slots=True)
class Forwarding:
    """fwknopd.conf's forwarding facts and our backend."""

    enabled: bool = False  # fwknopd took FORCE_NAT (ENABLE_IPT_FORWARDING, ...)
    snat: str = ""  # the fwknopd.conf setting that source-NATs every NAT access
    backend: str = "nftables"

    @classmethod
    def of(cls, settings: Mapping[str, str], backend: str) -> Forwarding:
        enabled = any(_yes(settings.get(name)) for pair in FORWARDING for name in pair)
        snat = next((name for name in SNAT_SETTINGS if _yes(settings.get(name))), "")
        return cls(enabled, snat, backend)


NO_FORWARDING = Forwarding()  # fwknopd's defaults: no forwarding, no SNAT


@dataclass(frozen=True, slots=True)
class NatTarget:
    """What a FORCE_NAT stanza becomes: a gateway service's protocol, host, port."""

    protocol: str
    host: ipaddress.IPv4Address
    port: int
    listen_port: int  # the published port (0: DISABLE_DNAT, reached routed)

    def __str__(self) -> str:
        published = f", published on {self.listen_port}" if self.listen_port else ""
        return f"{self.protocol}/{self.port} of {self.host}{published}"


def judge_nat(stanza: Stanza, ports: tuple[tuple[str, int], ...], forwarding: Forwarding,
              reasons: list[str], notes: list[str]) -> NatTarget | None:
    """The gateway service a stanza's FORCE_NAT maps onto, None when it has
    none or it does not map (then reasons say why and what to do)."""
    before = len(reasons)
    snat = [name for name in ("FORCE_SNAT",) if stanza.get(name) is not None] + [
        name for name in ("FORCE_MASQUERADE",) if _yes(stanza.get(name))]
    if _yes(stanza.get("FORWARD_ALL")):
        reasons.append("FORWARD_ALL: fwknopd forwarded every port and protocol from the "
                       "client; a gateway service here opens one host:port: replace "
                       "FORWARD_ALL with FORCE_NAT IP PORT for that one, then run again")
    if snat:
        reasons.append(f"{' and '.join(snat)}: fwknopd rewrote the forwarded connection's "
                       f"source; {NO_SNAT}: if it does (its default route via this host), "
                       f"delete {' and '.join(snat)} and run again")
    force = stanza.get("FORCE_NAT")
    if force is None:
        if _yes(stanza.get("DISABLE_DNAT")):
            notes.append("DISABLE_DNAT: it only touched NAT requests (fwknop -N), and one is "
                         "served here only for a gateway service it names exactly")
        return None
    target = _force_nat(force, reasons)
    if not forwarding.enabled:
        reasons.append("FORCE_NAT without ENABLE_IPT_FORWARDING or ENABLE_IPT_LOCAL_NAT in "
                       "fwknopd.conf: fwknopd refuses this file too; give the fwknopd.conf "
                       "it ran with (--conf FILE), then run again")
    if forwarding.snat:
        reasons.append(f"FORCE_NAT with fwknopd.conf's {forwarding.snat} Y: fwknopd rewrote "
                       f"each forwarded connection's source; {NO_SNAT}: if it does, set "
                       f"{forwarding.snat} N in that file and run again")
    if forwarding.backend not in GATEWAY_BACKENDS:
        reasons.append(f"FORCE_NAT: a gateway service needs backend nftables ([server] "
                       f"backend is {forwarding.backend} here): switch to nftables "
                       "(docs/install.md, section 11), then run again")
    if target is None:
        return None
    listen = _published(stanza, target, ports, reasons)
    if len(reasons) > before or listen is None:
        return None
    host, port = target
    protocol = ports[0][0]
    notes.append(f"FORCE_NAT {host} {port}: a grant opens {protocol}/{port} of {host} "
                 f"only (fwknopd's FORWARD rule let the client reach port {port} of any "
                 "host this one forwards to)")
    if listen:
        notes.append(f"{protocol}/{listen} of this host is DNATed to {host}:{port} for "
                     "every source (fwknopd: the knocking source only) and a stranger's "
                     f"connection is dropped in the forward gate: nothing on this host "
                     f"can serve {protocol}/{listen}")
    return NatTarget(protocol, host, port, listen)


def _force_nat(value: str, reasons: list[str]) -> tuple[ipaddress.IPv4Address, int] | None:
    """FORCE_NAT's IP and PORT, as fwknopd reads them."""
    words = value.split()
    if len(words) < 2 or len(words[0]) > MAX_NAT_IP or not words[1].isdigit() or len(
            words[1]) > 5 or int(words[1]) > 65535:
        reasons.append(f"FORCE_NAT {value!r}: not IP PORT (fwknopd refuses it too)")
        return None
    try:
        host = ipaddress.IPv4Address(words[0])
    except ValueError:
        reasons.append(f"FORCE_NAT {value!r}: {words[0]} is not an IPv4 address (fwknopd "
                       "refuses it too)")
        return None
    port = int(words[1])
    problem = gateway_host_problem(host)
    if problem:
        reasons.append(f"FORCE_NAT {host} {port}: {host} {problem}")
    if not port:
        reasons.append(f"FORCE_NAT {host} 0: port 0 is no port; write the internal host's "
                       "port, then run again")
    return (host, port) if not problem and port else None


def _published(stanza: Stanza, target: tuple[ipaddress.IPv4Address, int],
               ports: tuple[tuple[str, int], ...], reasons: list[str]) -> int | None:
    """The port published for the target (0: none, DISABLE_DNAT), None
    with a reason when OPEN_PORTS does not name one port for it."""
    host, port = target
    if len(ports) != 1:
        if ports:
            named = ", ".join(f"{p}/{n}" for p, n in ports)
            reasons.append(f"FORCE_NAT with OPEN_PORTS {named}: fwknopd DNATed whichever the "
                           f"client named to {host}:{port}; a gateway service publishes one "
                           "port: keep in OPEN_PORTS the one the client's -A names, then run "
                           "again")
        return None  # no OPEN_PORTS: said by the ports' reasons
    protocol, access = ports[0]
    if not _yes(stanza.get("DISABLE_DNAT")):
        return access
    if access != port:
        reasons.append(f"FORCE_NAT {host} {port} with DISABLE_DNAT: the client reaches "
                       f"{host}:{port} routed, so it must knock for {protocol}/{port}, not "
                       f"{protocol}/{access}: set OPEN_PORTS {protocol}/{port} here and -A "
                       f"{protocol}/{port} in the client, then run again")
        return None
    return 0
