"""Which other firewall would drop what spa's table lets in (pure: no I/O).

`spa-server check` hands `check` the parsed `nft -j list ruleset`; this module reads it and
never runs anything.  Background: an accept in our base chain (table inet spa, hook input,
priority -10) ends only that chain; every other base chain on the hook still sees the packet,
and a drop or reject there is final.

Invariants:
- For each target and IP version, every other base chain of type filter on hook input (tables
  ip/ip6/inet, our own table skipped) is walked (`hostcheck_eval`) with the packet spa lets
  through: a new connection from a remote address, carrying `mark` for a service (our gate set
  it; no other bits) but not for the knock port (in udp mode nothing gates it; it must reach
  the socket).  A chain that may run before ours (priority not above ours) sees no mark, and
  its fix accepts the port instead.
- Each walk gives one Finding: PASSES, DROPS (every way out drops) or MAY_DROP (an undecided
  match stands between the packet and a verdict; the matches are listed).  Undecided is never
  reported as passing.  A DROPS or MAY_DROP finding carries the exact line that lets our
  packets through: nft for a native table, iptables/ip6tables for an iptables-nft one, plus a
  hint for ufw and firewalld, whose own tools rewrite their rules.
- For a service, a nat base chain on hook prerouting that DNATs its port gives a FORWARDED
  finding: such connections are forwarded, never delivered to hook input, so only a
  forward-hook chain in our table can gate them (`gated_in_forward`).
- A gateway service's target (`host`: spa/backends/nftgateway.py) is walked through every
  other base chain of type filter on hook forward instead, in its destination's IP version
  only: the host's own forward chains decide what it forwards, and one that drops the grant
  gets the same finding and fix as on hook input.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from spa.backends import hostcheck_eval as ev

MARK = 0x10000000  # the bit our chain sets on a granted new connection
IPTABLES_TABLES = {"filter", "nat", "mangle", "raw", "security"}


@dataclass(frozen=True, slots=True)
class Target:
    protocol: str  # "tcp" or "udp"
    port: int
    label: str  # "ssh", "knock port"
    knock: bool = False  # the knock port: not gated by our table, so it carries no mark
    host: str = ""  # a gateway service's internal host (walked on hook forward)

    @classmethod
    def knock_port(cls, port: int) -> Target:
        return cls("udp", port, "knock port", knock=True)

    @property
    def hook(self) -> str:
        return "forward" if self.host else "input"

    @property
    def versions(self) -> tuple[int, ...]:
        if not self.host or not _literal(self.host):
            return (4, 6)  # a service of this host, or a gateway's host by name: both
        return (6,) if ":" in self.host else (4,)

    def __str__(self) -> str:
        to = f" to {self.host}" if self.host else ""
        return f"{self.label} ({self.protocol}/{self.port}{to})"


def _literal(host: str) -> bool:
    """Whether a gateway's host is an address (not a DNS name)."""
    return ":" in host or host.replace(".", "").isdigit()


class Outcome(Enum):
    PASSES = "passes"
    DROPS = "drops"
    MAY_DROP = "may_drop"
    FORWARDED = "forwarded"


@dataclass(frozen=True, slots=True)
class Finding:
    target: Target
    version: int  # 4 or 6
    outcome: Outcome
    chain: ev.ChainKey  # the base chain: (family, table, name)
    where: str  # "policy drop", or "rule 5 of ufw-not-local, handle 71: drop"
    unknown: tuple[str, ...] = ()  # MAY_DROP, FORWARDED: the undecided matches
    fix: str | None = None  # DROPS, MAY_DROP: the line to add
    hint: str | None = None
    destination: str | None = None  # FORWARDED: "172.17.0.2:80" (None: not in the JSON)
    gated_in_forward: bool | None = None  # FORWARDED: our table gates the port in forward


OWN_TABLES = (("inet", "spa"), ("inet", "spa_hold"))  # ours: the gate and its owned hold


def check(ruleset: Mapping[str, Any], targets: Sequence[Target], *,
          own_tables: tuple[tuple[str, str], ...] = OWN_TABLES,
          mark: int = MARK) -> list[Finding]:
    """Findings per target, IP version and other base chain, in priority order
    (`own_tables`: skipped; the first is the gate whose priority counts).

    Raises ValueError if `ruleset` is not the document of `nft -j list ruleset`."""
    index = ev.index(ruleset)
    own = [key for key in ev.base_chains(index, "input", "filter", 4)
           if key[:2] == own_tables[0]]
    own_prio = ev.priority(index, own[0]) if own else -10
    findings: list[Finding] = []
    for target in targets:
        for version in target.versions:
            findings += _input(index, target, version, own_tables, own_prio, mark)
            if not target.knock and not target.host:
                findings += _forwarded(index, target, version, own_tables)
    return findings


def _input(index: ev.Ruleset, target: Target, version: int,
           own_tables: tuple[tuple[str, str], ...], own_prio: int, mark: int) -> list[Finding]:
    findings = []
    for key in ev.base_chains(index, target.hook, "filter", version):
        if key[:2] in own_tables:
            continue
        before_us = ev.priority(index, key) <= own_prio  # equal: the order is not defined
        carries = 0 if target.knock or before_us else mark
        ends = ev.walk(index, key, ev.Packet(version, target.protocol, target.port, carries))
        drops = [end for end in ends if end.kind is ev.EndKind.DROP]
        if not drops:
            findings.append(Finding(target, version, Outcome.PASSES, key, ends[0].where))
            continue
        certain = len(drops) == len(ends)
        unknown = () if certain else tuple(dict.fromkeys(u for end in ends for u in end.unknown))
        fix, hint = _fix(index, key, target, version, mark, before_us, own_prio)
        findings.append(Finding(target, version, Outcome.DROPS if certain else Outcome.MAY_DROP,
                                key, drops[0].where, unknown, fix, hint))
    return findings


def _forwarded(index: ev.Ruleset, target: Target, version: int,
               own_tables: tuple[tuple[str, str], ...]) -> list[Finding]:
    gated = any(ev.mentions(index, key, target.port)
                for key in ev.base_chains(index, "forward", "filter", version)
                if key[:2] == own_tables[0])
    findings = []
    for key in ev.base_chains(index, "prerouting", "nat", version):
        if key[:2] in own_tables:
            continue
        ends = ev.walk(index, key, ev.Packet(version, target.protocol, target.port, 0))
        dnats = [end for end in ends if end.kind is ev.EndKind.DNAT]
        if dnats:
            unknown = tuple(dict.fromkeys(u for end in ends for u in end.unknown))
            findings.append(Finding(
                target, version, Outcome.FORWARDED, key, dnats[0].where,
                () if len(dnats) == len(ends) else unknown,
                destination=dnats[0].destination, gated_in_forward=gated))
    return findings


def is_iptables(index: ev.Ruleset, family: str, table: str) -> bool:
    """Whether iptables-nft made this table (its chains are edited with iptables)."""
    if family not in ("ip", "ip6"):
        return False
    chains = [spec for key, spec in index.chains.items() if key[:2] == (family, table)]
    uppercase = any(spec.get("hook") and spec["name"] == spec["hook"].upper() for spec in chains)
    xt = any("xt" in expr for (f, t, _), rules in index.rules.items() if (f, t) == (family, table)
             for rule in rules for expr in rule.get("expr", []))
    return (table in IPTABLES_TABLES and uppercase) or xt


def _fix(index: ev.Ruleset, key: ev.ChainKey, target: Target, version: int, mark: int,
         before_us: bool, own_prio: int) -> tuple[str, str | None]:
    family, table, chain = key
    by_port = target.knock or before_us
    if is_iptables(index, family, table):
        tool = "iptables" if family == "ip" else "ip6tables"
        where = "" if table == "filter" else f"-t {table} "
        what = (f"-p {target.protocol} --dport {target.port}" if by_port
                else f"-m mark --mark {mark:#x}/{mark:#x}")
        fix = f"{tool} {where}-I {chain} 1 {what} -j ACCEPT"
    else:
        what = (f"{target.protocol} dport {target.port}" if by_port
                else f"meta mark and {mark:#x} == {mark:#x}")
        fix = f"nft insert rule {family} {table} {chain} {what} accept"
    hints = [_ufw_hint(index, key, target, version, mark), _firewalld_hint(
        index, key, target, own_prio)]
    if before_us and not target.knock:
        hints.append(f"this chain (priority {ev.priority(index, key)}) may run before spa's "
                     f"({own_prio}) and so not see its mark; spa's own chain still drops "
                     "strangers")
    return fix, "; ".join(hint for hint in hints if hint) or None


def _ufw_hint(index: ev.Ruleset, key: ev.ChainKey, target: Target, version: int,
              mark: int) -> str | None:
    if not any(k[:2] == key[:2] and k[2].startswith(("ufw-", "ufw6-")) for k in index.chains):
        return None
    if target.knock:
        return f"with ufw, instead: `ufw allow {target.port}/{target.protocol}`"
    chain, path = (f"ufw-before-{target.hook}", "before.rules") if version == 4 else (
        f"ufw6-before-{target.hook}", "before6.rules")
    return (f"with ufw, instead add `-A {chain} -m mark --mark {mark:#x}/{mark:#x} -j ACCEPT` to "
            f"/etc/ufw/{path} (with the other {chain} rules), then `ufw reload`")


def _firewalld_hint(index: ev.Ruleset, key: ev.ChainKey, target: Target,
                    own_prio: int) -> str | None:
    if key[:2] != ("inet", "firewalld"):
        return None
    hint = (f"firewalld rewrites its table on reload; to keep it: `firewall-cmd --permanent "
            f"--add-port={target.port}/{target.protocol} && firewall-cmd --reload`")
    if target.knock:
        return hint
    return (f"{hint}; spa's table still drops strangers first: it runs at priority {own_prio}, "
            f"before firewalld's {ev.priority(index, key):+d}")


def render(findings: Sequence[Finding]) -> list[str]:
    """One line per problem an admin can act on (IPv4 and IPv6 merged where they agree), and
    one `ok` line per target that nothing drops or forwards."""
    lines: list[str] = []
    for target in dict.fromkeys(finding.target for finding in findings):
        problems = [f for f in findings if f.target == target and f.outcome is not Outcome.PASSES]
        merged: dict[tuple[Any, ...], list[int]] = {}
        for f in problems:
            merged.setdefault((f.outcome, f.chain, f.where, f.unknown, f.fix, f.hint,
                               f.destination, f.gated_in_forward), []).append(f.version)
        for f in problems:
            versions = merged.pop((f.outcome, f.chain, f.where, f.unknown, f.fix, f.hint,
                                   f.destination, f.gated_in_forward), None)
            if versions:
                lines.append(_line(f, ", ".join(f"IPv{v}" for v in versions)))
        if not problems:
            lines.append(f"{target}: ok, no other base chain on hook {target.hook} drops it")
    return lines


def _line(f: Finding, versions: str) -> str:
    family, table, chain = f.chain
    head = f"{f.target}, {versions}: table {family} {table} chain {chain}"
    undecided = f"; undecided: {', '.join(f.unknown)}" if f.unknown else ""
    if f.outcome is Outcome.FORWARDED:
        verb = "may DNAT it" if f.unknown else "DNATs it"
        to = f" to {f.destination}" if f.destination else (
            f" (to an address `iptables -t {table} -S` shows)" if family != "inet" else "")
        gate = "gated" if f.gated_in_forward else "not gated"
        return (f"{head} {verb}{to} ({f.where}{undecided}): such connections are forwarded, "
                f"not delivered locally, and {gate} by a forward chain in spa's table")
    verb = "drops it" if f.outcome is Outcome.DROPS else "may drop it"
    hint = f" ({f.hint})" if f.hint else ""
    return f"{head} ({f.where}{undecided}) {verb}: {f.fix}{hint}"
