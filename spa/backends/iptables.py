"""The iptables backend, through python-iptables (legacy tables).

Invariants (STYLE principle 6; docs/install.md):
- Everything lives in our own chain `SPA` (an instance's: `SPA_NAME`,
  spa/backends/names.py) in the filter table (IPv4 and IPv6), jumped to from
  INPUT by one rule we insert once; no other rule is touched.  `start` is
  idempotent.
- The chain: established/related accepted (never a TCP SYN: conntrack
  passes one that matches a stale entry as established); one ACCEPT rule per grant, its
  expiry in a comment (`spa:SERVICE:UNIX_TIME`); a DROP per protected port at
  the end.  A renewal inserts the new rule before deleting the old one.
- iptables rules cannot expire by themselves: the daemon removes them at
  expiry, and `start` removes at once those whose time passed while it was
  down.  `status` and the docs say so (nftables is the default for this).
- A start refuses, in one line and before any change, a port that another
  spa instance's chain (`SPA`, `SPA_NAME`) drops (docs/install.md, "Several
  instances on one host").
- python-iptables writes the legacy tables.  If the host's active `iptables`
  is the nf_tables variant, our rules would be invisible to the admin's tools,
  so `create` refuses to start, with one line that says so.
- Dropped attempts are counted per (source, port) as nftables does it, in two
  ipsets with counters (spa_drops_v4/v6, an instance's spa_drops_v4_NAME;
  hash:ip,port, entries time out DROPS_TIMEOUT after they were made): per
  port, a DROP with a set match (the match counts), then a SET that adds a
  source not yet in the set (its counter starts at 1), then a plain DROP, so a
  full set (or a missing ipset) never lets a packet through.  Not `--add-set
  --exist` first: re-adding resets an element's counters (measured: five SYNs
  counted as 2).  The sets are made with the `ipset` program at start and read
  with it every few seconds (never per packet).  Without ipset, drops are not
  counted and the log says how to fix it.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from spa.backends.base import Backend, Change, Held, apply_each, reconcile
from spa.backends.names import DEFAULT_NAMES, Names, instance_of_chain
from spa.core.policy import Service
from spa.core.wire import IPAddress
from spa.server.errors import LocalError

COMMENT_PREFIX = "spa:"
DROPS_TIMEOUT = 600  # seconds an idle (source, port) drop counter is kept (as nftables)
DROPS_SIZE = 8192  # drop counters per address family at most (each reading lists them
# all: 65,536 took the gate keeper 1.1 s, a stall of every grant behind it)
GRANT_ENDING = 1.5  # seconds: a grant this close to its end may be on its way out


def parse_ipset_xml(text: str) -> dict[tuple[str, int], int]:
    """(source, port) -> packets, from `ipset list NAME -o xml` of a
    hash:ip,port set with counters.  Raises ValueError if it is not that."""
    found: dict[tuple[str, int], int] = {}
    try:
        root = ET.fromstring(text)  # noqa: S314 (our own ipset's output, not remote input)
    except ET.ParseError as exc:
        raise ValueError(f"not ipset XML: {exc}") from None
    for member in root.iter("member"):
        elem, packets = member.findtext("elem"), member.findtext("packets")
        if elem is None or packets is None:
            continue
        address, _, proto_port = elem.rpartition(",")
        port = proto_port.rpartition(":")[2]
        if address and port.isdigit():
            key = (str(ipaddress.ip_address(address)), int(port))
            found[key] = found.get(key, 0) + int(packets)
    return found


def run_ipset(*args: str) -> subprocess.CompletedProcess[str]:
    """The ipset program (start and the drop readings only).  Raises OSError."""
    path = shutil.which("ipset") or "/usr/sbin/ipset"
    return subprocess.run([path, *args], capture_output=True, text=True, timeout=10,  # noqa: S603
                          check=False)


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


def _signature(rule: Any) -> tuple[object, ...]:
    """A rule as python-iptables reads it: addresses, protocol, interfaces,
    each match and the target with their parameters."""
    matches = tuple((m.name, tuple(sorted((k, tuple(v)) for k, v in
                                          m.get_all_parameters().items())))
                    for m in rule.matches)
    target = rule.target
    return (rule.src, rule.dst, rule.protocol, rule.in_interface, rule.out_interface, matches,
            target.name if target is not None else None,
            tuple(sorted((k, tuple(v)) for k, v in target.get_all_parameters().items()))
            if target is not None else ())


def shared_port(services: Mapping[str, Service], chains: Mapping[str, Sequence[Any]]
                ) -> tuple[tuple[str, int, str], str] | None:
    """((protocol, port, service), chain) for the first port of `services`
    that a DROP rule of one of `chains` (name -> its rules, as
    python-iptables reads them) names, or None."""
    ours = {(s.protocol, s.port): s.name for s in services.values()}
    for name, rules in sorted(chains.items()):
        for rule in rules:
            if rule.target is None or rule.target.name != "DROP":
                continue
            for match in rule.matches:
                for port in match.get_all_parameters().get("dport", []):
                    key = (str(match.name), int(port)) if str(port).isdigit() else None
                    if key in ours:
                        return (key[0], key[1], ours[key]), name
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

    def __init__(self, iptc: Any, *, flush_on_stop: bool = False,
                 ipset: Callable[..., subprocess.CompletedProcess[str]] | None = run_ipset,
                 log: Callable[[str], None] = print, names: Names = DEFAULT_NAMES) -> None:
        """`names`: the instance's chain and ipsets."""
        self._iptc = iptc
        self.names = names
        self._chain = names.chain
        self._drop_sets = {version: names.drop_set(version) for version in (4, 6)}
        self.flush_on_stop = flush_on_stop
        self._services: dict[str, Service] = {}
        self._ipset = ipset
        self._log = log
        self._counting = False  # the drop sets exist and the rules use them
        self._installed: tuple[tuple[object, ...], ...] = ()  # `_shape` right after start

    @classmethod
    def create(cls, *, flush_on_stop: bool = False, log: Callable[[str], None] = print,
               names: Names = DEFAULT_NAMES) -> Backend:
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
        return cls(iptc, flush_on_stop=flush_on_stop, log=log, names=names)

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

    def _count_rule(self, version: int, service: Service) -> Any:
        """-j SET --add-set spa_drops_vN src,dst --timeout DROPS_TIMEOUT"""
        rule = self._port_rule(version, service, "SET")
        rule.target.add_set = [self._drop_sets[version], "src,dst"]
        rule.target.timeout = str(DROPS_TIMEOUT)
        return rule

    def _counted_drop_rule(self, version: int, service: Service) -> Any:
        """-m set --match-set spa_drops_vN src,dst -j DROP (the match counts)"""
        rule = self._port_rule(version, service, "DROP")
        match = rule.create_match("set")
        match.match_set = [self._drop_sets[version], "src,dst"]
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
        """Raises LocalError, also (before anything changes) when another
        spa instance's chain drops a port of `services`."""
        for version in (4, 6):
            self._run(f"read the chains of the other spa instances (IPv{version})",
                      lambda v=version: self._refuse_shared_ports(services, v))
        self._services = dict(services)
        self._counting = self._make_drop_sets()
        for version in (4, 6):
            self._run(f"install the {self._chain} chain", lambda v=version: self._install(v, now))
        self._installed = self._run(f"read the {self._chain} chain", self._shape)

    def _refuse_shared_ports(self, services: Mapping[str, Service], version: int) -> None:
        """As the nftables backend: a packet passes every chain jumped to from
        INPUT, so two instances gating one port drop each other's grants."""
        chains = {chain.name: chain for chain in self._table(version).chains
                  if chain.name != self._chain and instance_of_chain(chain.name) is not None}
        shared = shared_port(services, {name: chain.rules for name, chain in chains.items()})
        if shared is not None:
            (protocol, port, service), chain_name = shared
            raise LocalError(
                f"port {protocol}/{port} ({service}) is gated by another spa instance too "
                f"(iptables chain {chain_name}): each would drop the other's grants; give each "
                f"instance its own ports, or if that instance is gone for good: iptables -D "
                f"INPUT -j {chain_name}; iptables -F {chain_name}; iptables -X {chain_name} "
                "(and ip6tables)")

    def _make_drop_sets(self) -> bool:
        """The two counting ipsets (kept if they exist).  False, with a log
        line, when they cannot be made: drops are then not counted."""
        if self._ipset is None:
            return False
        for version, name in self._drop_sets.items():
            try:
                done = self._ipset("create", name, "hash:ip,port", "family",
                                   "inet" if version == 4 else "inet6", "timeout",
                                   str(DROPS_TIMEOUT), "counters", "maxelem", str(DROPS_SIZE),
                                   "-exist")
            except (OSError, subprocess.SubprocessError) as exc:
                self._log(f"warning dropped attempts are not counted (no ipset program: "
                          f"{exc}); install it: apt-get install ipset")
                return False
            if done.returncode != 0:
                self._log(f"warning dropped attempts are not counted: ipset create {name}: "
                          f"{done.stderr.strip()}")
                return False
        return True

    def drops(self) -> dict[tuple[str, int], int]:
        """(source, port) -> packets dropped, from the counting ipsets."""
        if not self._counting or self._ipset is None:
            return {}
        found: dict[tuple[str, int], int] = {}
        for name in self._drop_sets.values():
            try:
                done = self._ipset("list", name, "-o", "xml")
                if done.returncode != 0:
                    raise ValueError(done.stderr.strip())
                found.update(parse_ipset_xml(done.stdout))
            except (OSError, subprocess.SubprocessError, ValueError) as exc:
                raise LocalError(f"cannot read the drop counters ({name}): {exc}") from None
        return found

    def _install(self, version: int, now: float) -> None:
        iptc = self._iptc
        table = self._table(version)
        table.autocommit = False
        if not table.is_chain(self._chain):
            table.create_chain(self._chain)
        chain = iptc.Chain(table, self._chain)
        keep = []  # the live grants, made anew: rule objects read before a flush are
        for rule in chain.rules:  # not valid after it (a commit with 12 of them failed)
            found = self._comment_of(rule)
            if found is not None and found[0] in self._services and found[1] > now:
                address = ipaddress.ip_address(rule.src.split("/")[0])
                keep.append(self._grant_rule(address, self._services[found[0]], found[1]))
        chain.flush()
        for rule in self._established_rules(version):
            chain.append_rule(rule)
        for rule in keep:
            chain.append_rule(rule)
        for service in self._services.values():
            if self._counting:
                chain.append_rule(self._counted_drop_rule(version, service))
                chain.append_rule(self._count_rule(version, service))
            chain.append_rule(self._port_rule(version, service, "DROP"))
        inbound = iptc.Chain(table, "INPUT")
        if not any(rule.target.name == self._chain for rule in inbound.rules):
            jump = self._rule(version)
            jump.create_target(self._chain)
            inbound.insert_rule(jump)
        table.commit()
        table.autocommit = True

    def _established_rules(self, version: int) -> list[Any]:
        """Established and related traffic accepted, as two rules: any
        protocol but tcp (`! -p tcp`), and tcp but a SYN (`! --syn`).  A SYN
        opens a new connection whatever conntrack says: it passes one that
        matches an entry it still holds as established as established, and
        a stale session's port would open anew (docs/threat-model.md)."""
        rules = []
        for protocol in ("!tcp", "tcp"):
            rule = self._rule(version)
            rule.protocol = protocol
            if protocol == "tcp":
                rule.create_match("tcp").syn = "!1"
            rule.create_match("conntrack").ctstate = "ESTABLISHED,RELATED"
            rule.create_target("ACCEPT")
            rules.append(rule)
        return rules

    @staticmethod
    def _comment_of(rule: Any) -> tuple[str, float] | None:
        for match in rule.matches:
            if match.name == "comment":
                return parse_comment(match.comment or "")
        return None

    def _grant_rules(self, table: Any, address: IPAddress, service: str) -> list[Any]:
        chain = self._iptc.Chain(table, self._chain)
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
            chain = self._iptc.Chain(table, self._chain)
            chain.insert_rule(self._grant_rule(address, service, until), position=1)
            for rule in old:
                chain.delete_rule(rule)
        self._run("add a grant", act)

    def remove(self, address: IPAddress, service: Service) -> None:
        def act() -> None:
            table = self._table(address.version)
            chain = self._iptc.Chain(table, self._chain)
            for rule in self._grant_rules(table, address, service.name):
                chain.delete_rule(rule)
        self._run("remove a grant", act)

    def apply(self, changes: Sequence[Change], *, now: float) -> None:
        apply_each(self, changes, now=now)

    def held(self, *, now: float) -> Held:
        held: Held = {}
        for version in (4, 6):
            table = self._table(version)
            if not table.is_chain(self._chain):
                continue
            for rule in self._iptc.Chain(table, self._chain).rules:
                owner = self._comment_of(rule)
                if owner is not None and owner[0] in self._services:
                    address = ipaddress.ip_address(rule.src.split("/")[0])
                    held[(address, owner[0])] = owner[1]
        return held

    # ---- keeping the gate --------------------------------------------------

    def _shape(self) -> tuple[tuple[object, ...], ...]:
        """Our chains as python-iptables reads them, grants left out: what an
        untouched install keeps (the jump from INPUT, the fixed rules)."""
        found: list[tuple[object, ...]] = []
        for version in (4, 6):
            table = self._table(version)
            if not table.is_chain(self._chain):
                found.append((version, "no chain"))
                continue
            jumps = sum(1 for rule in self._iptc.Chain(table, "INPUT").rules
                        if rule.target.name == self._chain)
            rules = [_signature(rule) for rule in self._iptc.Chain(table, self._chain).rules
                     if self._comment_of(rule) is None]
            found.append((version, jumps, tuple(rules)))
        return tuple(found)

    def repair(self, wanted: Held, *, now: float, grants: bool = True) -> str | None:
        """If another program removed or altered our chains or grants, put
        them back with exactly `wanted` and say what was wrong; else None
        (`grants` is not used: every check reads everything, there being no
        notification to report element changes).
        iptables sends no notification: the daemon polls (spa.server.guard).
        Raises LocalError."""
        problem: str | None = self._run(f"read the {self._chain} chain",
                                        lambda: self._diagnose(wanted, now))
        if problem is None:
            return None
        self.start(self._services, now=now)
        reconcile(self, {key: until for key, until in wanted.items() if until > now},
                  self._services, now=now)
        self._installed = self._shape()
        return problem

    def _diagnose(self, wanted: Held, now: float) -> str | None:
        shape = self._shape()
        if shape != self._installed:
            for version, item in zip((4, 6), shape, strict=True):
                name = "IPv4" if version == 4 else "IPv6"
                if item[1] == "no chain":
                    return f"chain {self._chain} ({name}) was removed by another program"
                if item[1] == 0:
                    return (f"the jump from INPUT to chain {self._chain} ({name}) was removed by "
                            "another program")
            return f"the rules of chain {self._chain} were altered by another program"
        held = self.held(now=now)
        live = {key for key, until in wanted.items() if until - now > GRANT_ENDING}
        if (live - held.keys() or held.keys() - wanted.keys()
                or any(abs(held[key] - wanted[key]) > 0.01 for key in live & held.keys())):
            return f"the grants in chain {self._chain} were changed by another program"
        return None

    def stop(self) -> None:
        if not self.flush_on_stop:
            return
        for (address, name) in self.held(now=0):
            self.remove(address, self._services[name])
