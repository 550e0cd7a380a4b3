"""The iptables backend, through python-iptables (legacy tables).

Invariants (STYLE principle 6; docs/install.md):
- Everything lives in our own chain `SPA` in the filter table (IPv4 and
  IPv6), jumped to from INPUT by one rule we insert once; no other rule is
  touched.  `start` is idempotent.
- The chain: established/related accepted; one ACCEPT rule per grant, its
  expiry in a comment (`spa:SERVICE:UNIX_TIME`); a DROP per protected port at
  the end.  A renewal inserts the new rule before deleting the old one.
- iptables rules cannot expire by themselves: the daemon removes them at
  expiry, and `start` removes at once those whose time passed while it was
  down.  `status` and the docs say so (nftables is the default for this).
- python-iptables writes the legacy tables.  If the host's active `iptables`
  is the nf_tables variant, our rules would be invisible to the admin's tools,
  so `create` refuses to start, with one line that says so.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

from spa.backends.base import Backend, Change, Held, apply_each
from spa.core.policy import Service
from spa.core.wire import IPAddress
from spa.server.errors import LocalError

CHAIN = "SPA"
COMMENT_PREFIX = "spa:"


def grant_comment(service: str, until: float) -> str:
    return f"{COMMENT_PREFIX}{service}:{until:.3f}"


def parse_comment(comment: str) -> tuple[str, float] | None:
    if not comment.startswith(COMMENT_PREFIX):
        return None
    service, _, until = comment[len(COMMENT_PREFIX):].rpartition(":")
    try:
        return service, float(until)
    except ValueError:
        return None


def active_variant(program: str = "iptables") -> str | None:
    """'legacy', 'nf_tables', or None when no iptables program is installed."""
    path = shutil.which(program)
    if path is None:
        return None
    done = subprocess.run([path, "-V"], capture_output=True, text=True, timeout=10,  # noqa: S603
                          check=False)
    return "nf_tables" if "nf_tables" in done.stdout else "legacy"


class IptablesBackend:
    name = "iptables"
    expires_by_itself = False

    def __init__(self, iptc: Any, *, flush_on_stop: bool = False) -> None:
        self._iptc = iptc
        self.flush_on_stop = flush_on_stop
        self._services: dict[str, Service] = {}

    @classmethod
    def create(cls, *, flush_on_stop: bool = False) -> Backend:
        """Raises LocalError if python-iptables is missing or the host's
        iptables is the nf_tables variant."""
        if active_variant() == "nf_tables":
            raise LocalError("this host's iptables is the nf_tables variant (iptables -V); "
                             "rules written by the iptables backend (legacy tables) would be "
                             "invisible to it: use --backend nftables")
        try:
            import iptc
        except ImportError:
            raise LocalError("the iptables backend needs python-iptables: "
                             "pip install python-iptables") from None
        except Exception as exc:  # iptc raises XTablesError when libxtables is missing
            raise LocalError(f"python-iptables cannot load libxtables: {exc}") from None
        return cls(iptc, flush_on_stop=flush_on_stop)

    # ---- tables and rules --------------------------------------------------

    def _table(self, version: int) -> Any:
        iptc = self._iptc
        table = iptc.Table(iptc.Table.FILTER) if version == 4 else iptc.Table6(
            iptc.Table6.FILTER)
        table.refresh()
        return table

    def _rule(self, version: int) -> Any:
        return self._iptc.Rule() if version == 4 else self._iptc.Rule6()

    def _port_rule(self, version: int, service: Service, target: str) -> Any:
        rule = self._rule(version)
        rule.protocol = service.protocol
        match = rule.create_match(service.protocol)
        match.dport = str(service.port)
        rule.create_target(target)
        return rule

    def _grant_rule(self, address: IPAddress, service: Service, until: float) -> Any:
        rule = self._port_rule(address.version, service, "ACCEPT")
        rule.src = f"{address}/{address.max_prefixlen}"
        comment = rule.create_match("comment")
        comment.comment = grant_comment(service.name, until)
        return rule

    def _run(self, what: str, action: Any) -> Any:
        try:
            return action()
        except self._iptc.IPTCError as exc:
            message = str(exc)
            if "Permission denied" in message or "not permitted" in message:
                raise LocalError("iptables: permission denied; run spa-server as root (or "
                                 "with CAP_NET_ADMIN)") from None
            raise LocalError(f"iptables refused to {what}: {message}") from None

    # ---- lifecycle ---------------------------------------------------------

    def start(self, services: Mapping[str, Service], *, now: float) -> None:
        self._services = dict(services)
        for version in (4, 6):
            self._run("install the SPA chain", lambda v=version: self._install(v, now))

    def _install(self, version: int, now: float) -> None:
        iptc = self._iptc
        table = self._table(version)
        table.autocommit = False
        if not table.is_chain(CHAIN):
            table.create_chain(CHAIN)
        chain = iptc.Chain(table, CHAIN)
        keep = []
        for rule in chain.rules:
            found = self._comment_of(rule)
            if found is not None and found[0] in self._services and found[1] > now:
                keep.append(rule)
        chain.flush()
        established = self._rule(version)
        match = established.create_match("conntrack")
        match.ctstate = "ESTABLISHED,RELATED"
        established.create_target("ACCEPT")
        chain.append_rule(established)
        for rule in keep:
            chain.append_rule(rule)
        for service in self._services.values():
            chain.append_rule(self._port_rule(version, service, "DROP"))
        inbound = iptc.Chain(table, "INPUT")
        if not any(rule.target.name == CHAIN for rule in inbound.rules):
            jump = self._rule(version)
            jump.create_target(CHAIN)
            inbound.insert_rule(jump)
        table.commit()
        table.autocommit = True

    @staticmethod
    def _comment_of(rule: Any) -> tuple[str, float] | None:
        for match in rule.matches:
            if match.name == "comment":
                return parse_comment(match.comment or "")
        return None

    def _grant_rules(self, table: Any, address: IPAddress, service: str) -> list[Any]:
        chain = self._iptc.Chain(table, CHAIN)
        found = []
        for rule in chain.rules:
            owner = self._comment_of(rule)
            if owner is not None and owner[0] == service and rule.src.split("/")[0] in (
                    str(address), address.exploded):
                found.append(rule)
        return found

    def allow(self, address: IPAddress, service: Service, until: float, *, now: float) -> None:
        def act() -> None:
            table = self._table(address.version)
            old = self._grant_rules(table, address, service.name)
            chain = self._iptc.Chain(table, CHAIN)
            chain.insert_rule(self._grant_rule(address, service, until), position=1)
            for rule in old:
                chain.delete_rule(rule)
        self._run("add a grant", act)

    def remove(self, address: IPAddress, service: Service) -> None:
        def act() -> None:
            table = self._table(address.version)
            chain = self._iptc.Chain(table, CHAIN)
            for rule in self._grant_rules(table, address, service.name):
                chain.delete_rule(rule)
        self._run("remove a grant", act)

    def apply(self, changes: Sequence[Change], *, now: float) -> None:
        apply_each(self, changes, now=now)

    def held(self, *, now: float) -> Held:
        held: Held = {}
        for version in (4, 6):
            table = self._table(version)
            if not table.is_chain(CHAIN):
                continue
            for rule in self._iptc.Chain(table, CHAIN).rules:
                owner = self._comment_of(rule)
                if owner is not None and owner[0] in self._services:
                    address = ipaddress.ip_address(rule.src.split("/")[0])
                    held[(address, owner[0])] = owner[1]
        return held

    def stop(self) -> None:
        if not self.flush_on_stop:
            return
        for (address, name) in self.held(now=0):
            self.remove(address, self._services[name])
