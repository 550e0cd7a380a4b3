"""Does the host's own firewall let through what spa's gate lets in?

`spa-server check`, and the daemon at start, after each reload and after
another program changes the ruleset, read the live ruleset and hand it to
the pure analysis (spa/backends/hostcheck.py): per protected service, and
for the knock port in udp mode (in capture mode the knock is read before
the firewall), which other base chain would drop it, and the exact line to
add (docs/install.md, "Your firewall and spa").

Invariants:
- Read only: nothing here changes a rule; the ruleset is read table by table,
  never the hold table in JSON (`safe_ruleset`).
- The same targets and the same words for the command, the log and `status`.
- With a gateway service, IP forwarding off in its destination's version is
  one problem line (spa never changes the host's sysctl), and so is a host
  reached through a bridge whose frames skip the forward hook
  (spa/server/gwroute.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from spa.backends.hostcheck import Outcome, Target, check, render
from spa.backends.libnft import NftRunner
from spa.backends.names import FAMILY
from spa.backends.nftables import safe_ruleset
from spa.core.policy import Service
from spa.server.config import ServerConfig
from spa.server.errors import LocalError
from spa.server.gwroute import RouteOf, bridge_filtered, bridged_lines, kernel_route


@dataclass(frozen=True, slots=True)
class Report:
    lines: tuple[str, ...]  # one per problem, or one `ok` per target
    problems: int  # findings that drop, may drop, or forward ungated

    @property
    def summary(self) -> str:
        if not self.problems:
            return "ok: no other firewall drops what spa lets in"
        return (f"{self.problems} problem{'' if self.problems == 1 else 's'}: another firewall "
                "may drop what spa lets in (spa-server check shows the lines to add)")


def targets_of(config: ServerConfig) -> list[Target]:
    found = [Target(s.protocol, s.port, s.name, host=s.host_name or str(s.host or ""))
             for s in config.services.values()]
    if config.mode == "udp":
        found.append(Target.knock_port(config.listen_port))
    return found


FORWARDING = {4: "net.ipv4.ip_forward", 6: "net.ipv6.conf.all.forwarding"}


def forwarding_on(version: int) -> bool:
    """Whether this host forwards IPv4 or IPv6 (the sysctl, read from /proc/sys)."""
    path = Path("/proc/sys", *FORWARDING[version].split("."))
    try:
        return path.read_text().strip() != "0"
    except OSError:
        return False


def forwarding_lines(config: ServerConfig, on: Callable[[int], bool]) -> list[str]:
    """One line per IP version a gateway service needs and the host does not
    forward (a host by name needs one of the two: its answers decide)."""
    needed = {s.host.version for s in config.services.values() if s.host is not None}
    if any(s.named for s in config.services.values()) and not (on(4) or on(6)):
        needed |= {4, 6}
    return [f"IPv{version} forwarding is off ({FORWARDING[version]} = 0): gateway services "
            f"reach no internal host until it is on (sysctl -w {FORWARDING[version]}=1, and "
            "a file in /etc/sysctl.d/ to keep it)" for version in sorted(needed)
            if not on(version)]


def report(runner: NftRunner, config: ServerConfig,
           forwarding: Callable[[int], bool] = forwarding_on,
           route: RouteOf = kernel_route,
           bridge: Callable[[int], bool] = bridge_filtered) -> Report:
    """Raises LocalError when the ruleset (or the kernel's routes) cannot be read."""
    listing = safe_ruleset(runner)
    try:
        names = config.names
        findings = check(listing, targets_of(config),
                         own_tables=((FAMILY, names.table), (FAMILY, names.hold)))
    except ValueError as exc:
        raise LocalError(f"cannot read the ruleset: {exc}") from None
    problems = sum(1 for f in findings if f.outcome in (Outcome.DROPS, Outcome.MAY_DROP)
                   or (f.outcome is Outcome.FORWARDED and not f.gated_in_forward))
    off = forwarding_lines(config, forwarding) + bridged_lines(config.services, route, bridge)
    return Report(tuple(off + render(findings)), problems + len(off))


def _gated(service: Service) -> str:
    """A gateway service, as `closed_ports` names it: exactly what its forward
    gate holds (spa/backends/nftgateway.py), and what it does not."""
    published = f", published on {service.listen_port}" if service.listen_port else ""
    if service.named:
        return (f"{service.name}: {service.protocol}/{service.port} of {service.host_name}, "
                "resolved when a lease starts (gated on the addresses the name gives at start, "
                "reload and each lease, not on others, nor connections that do not pass "
                "through this host)" + (f", published on {service.listen_port} per lease "
                                        "(DNATed for a lease's own address only)"
                                        if service.listen_port else ""))
    return (f"{service.name}: {service.protocol}/{service.port} of {service.host} (its other "
            "addresses and ports are not gated, nor connections that do not pass through "
            f"this host){published}")


def closed_ports(services: Mapping[str, Service] | Sequence[Service]) -> str:
    """The line `init`, `run` and `check` print: what the gate closes.  A
    gateway service is gated only where it passes through this host, on its
    host's one address: its clause says so (docs/threat-model.md, "Gateway mode")."""
    listed = list(services.values() if isinstance(services, Mapping) else services)
    local = ", ".join(f"{s.name} ({s.protocol}/{s.port})" for s in listed if not s.gateway)
    through = "; ".join(_gated(s) for s in listed if s.gateway)
    parts = []
    if local or not through:
        parts.append("closed to everyone from the first run, IPv4 and IPv6, except to clients "
                     f"whose knock opens them: {local}")
    if through:
        parts.append("forwarded through this host only to clients whose knock opens them: "
                     + through)
    return "; ".join(parts)
