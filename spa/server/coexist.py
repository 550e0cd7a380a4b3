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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from spa.backends.hostcheck import Outcome, Target, check, render
from spa.backends.libnft import NftRunner
from spa.backends.names import FAMILY
from spa.backends.nftables import safe_ruleset
from spa.core.policy import Service
from spa.server.config import ServerConfig
from spa.server.errors import LocalError


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
    found = [Target(s.protocol, s.port, s.name) for s in config.services.values()]
    if config.mode == "udp":
        found.append(Target.knock_port(config.listen_port))
    return found


def report(runner: NftRunner, config: ServerConfig) -> Report:
    """Raises LocalError when the ruleset cannot be read."""
    listing = safe_ruleset(runner)
    try:
        names = config.names
        findings = check(listing, targets_of(config),
                         own_tables=((FAMILY, names.table), (FAMILY, names.hold)))
    except ValueError as exc:
        raise LocalError(f"cannot read the ruleset: {exc}") from None
    problems = sum(1 for f in findings if f.outcome in (Outcome.DROPS, Outcome.MAY_DROP)
                   or (f.outcome is Outcome.FORWARDED and not f.gated_in_forward))
    return Report(tuple(render(findings)), problems)


def closed_ports(services: Mapping[str, Service] | Sequence[Service]) -> str:
    """The line `init`, `run` and `check` print: what the gate closes."""
    listed = services.values() if isinstance(services, Mapping) else services
    ports = ", ".join(f"{s.name} ({s.protocol}/{s.port})" for s in listed)
    return (f"closed to everyone from the first run, IPv4 and IPv6, except to clients whose "
            f"knock opens them: {ports}")
