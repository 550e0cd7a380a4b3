"""Remove every firewall object spa made, whatever config made it: the
package's removal (debian/spa.prerm) and `spa-server gate --remove`.

Invariants (STYLE principle 6):
- Only what spa makes is touched: nftables tables of family inet named `spa`
  or `spa_*` (the gate, its owned hold table, an instance's `spa_NAME`) that
  hold our base chain `input`; iptables chains `SPA` or `SPA_*` in the legacy
  filter tables and the jumps to them; ipsets named `spa_*` (the drop
  counters).  `is_ours_*` below are the one place that says so: an instance
  naming scheme extends them, not the callers.
- Commands are data (JSON documents, argv lists), rendered by pure functions
  tested without root; the edges below only run them.
- Nothing is loaded that was not there: the legacy iptables tables are read
  only when the kernel has them (/proc/net/ip_tables_names), ipsets only when
  the ip_set module is in, so a host that never ran spa is left exactly as it
  was.
- One object that cannot go (a table a running daemon owns) does not stop
  the others; each failure is one line in the result.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from spa.backends.libnft import Document, NftRunner
from spa.backends.names import BASE_CHAIN as IPT_CHAIN
from spa.backends.names import BASE_TABLE as TABLE
from spa.backends.names import FAMILY
from spa.backends.nftrender import CHAIN as NFT_CHAIN
from spa.server.errors import LocalError

IPSET_PREFIX = "spa_"  # spa_drops_v4, spa_drops_v6, spa_drops_v4_NAME (spa/backends/names.py)
PROC = Path("/proc/net")
IP_SET_MODULE = Path("/sys/module/ip_set")

Run = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


@dataclass(slots=True)
class Removal:
    """What a teardown removed and what it could not (one line each)."""
    removed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


# ---- what is ours (pure) -----------------------------------------------------

def is_ours_table(family: str, name: str) -> bool:
    """An nftables table spa makes, by its name."""
    return family == FAMILY and (name == TABLE or name.startswith(TABLE + "_"))


def is_ours_chain(name: str) -> bool:
    """An iptables chain spa makes, by its name."""
    return name == IPT_CHAIN or name.startswith(IPT_CHAIN + "_")


def nft_tables(tables_text: str) -> list[tuple[str, str]]:
    """(family, name) of spa's tables in `nft list tables` output."""
    found = []
    for line in tables_text.splitlines():
        words = line.split()
        if len(words) >= 3 and words[0] == "table" and is_ours_table(words[1], words[2]):
            found.append((words[1], words[2]))
    return found


def holds_our_chain(table_text: str) -> bool:
    """Does `nft -t list table ...` show our base chain (hook input)?"""
    return f"chain {NFT_CHAIN} {{" in table_text and "hook input" in table_text


def render_nft_delete(family: str, name: str) -> Document:
    return {"nftables": [{"delete": {"table": {"family": family, "name": name}}}]}


def render_ipt_removal(rules: str) -> list[list[str]]:
    """iptables arguments that remove spa's chains, from `iptables -S` of the
    filter table: each jump to one of them deleted, then each chain flushed
    and deleted.  Raises ValueError on a line shlex cannot split."""
    chains: list[str] = []
    jumps: list[list[str]] = []
    for line in rules.splitlines():
        words = shlex.split(line)
        if len(words) >= 2 and words[0] == "-N" and is_ours_chain(words[1]):
            chains.append(words[1])
        elif (len(words) >= 2 and words[0] == "-A" and not is_ours_chain(words[1])
              and _target(words) is not None and is_ours_chain(str(_target(words)))):
            jumps.append(["-D", *words[1:]])
    commands = list(jumps)
    for chain in chains:
        commands += [["-F", chain], ["-X", chain]]
    return commands


def _target(words: Sequence[str]) -> str | None:
    for flag in ("-j", "--jump", "-g", "--goto"):
        if flag in words[:-1]:
            return words[words.index(flag) + 1]
    return None


def ipsets(names_text: str) -> list[str]:
    """spa's ipsets in `ipset list -n` output."""
    return [name for name in names_text.split() if name.startswith(IPSET_PREFIX)]


# ---- the edges -----------------------------------------------------------------

def _run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=30,  # noqa: S603 (argv list, no shell)
                          check=False)


def remove_nftables(runner: NftRunner, into: Removal) -> None:
    """Delete spa's nftables tables."""
    try:
        tables = nft_tables(runner.list_text("list tables"))
    except LocalError as exc:
        into.failed.append(str(exc))
        return
    for family, name in tables:
        try:
            if not holds_our_chain(runner.list_text(f"list table {family} {name}")):
                continue  # a table of that name that spa did not make
            runner.run(render_nft_delete(family, name))
        except LocalError as exc:
            into.failed.append(f"table {family} {name}: {exc} (does a spa-server still run? "
                               "stop it first)")
            continue
        into.removed.append(f"table {family} {name}")


def remove_iptables(into: Removal, *, run: Run = _run, proc: Path = PROC) -> None:
    """Delete spa's chains (and the jumps to them) from the legacy filter
    tables the kernel has."""
    for version, program, names in ((4, "iptables-legacy", "ip_tables_names"),
                                    (6, "ip6tables-legacy", "ip6_tables_names")):
        try:
            present = "filter" in (proc / names).read_text().split()
        except OSError:
            present = False
        path = shutil.which(program)
        if not present or path is None:
            continue
        listing = run([path, "-w", "-t", "filter", "-S"])
        if listing.returncode != 0:
            into.failed.append(f"{program} -S: {listing.stderr.strip()}")
            continue
        try:
            commands = render_ipt_removal(listing.stdout)
        except ValueError as exc:
            into.failed.append(f"{program} -S printed what cannot be read: {exc}")
            continue
        for args in commands:
            done = run([path, "-w", "-t", "filter", *args])
            if done.returncode != 0:
                into.failed.append(f"{program} {' '.join(args)}: {done.stderr.strip()}")
            elif args[0] == "-X":
                into.removed.append(f"iptables chain {args[1]} (IPv{version})")


def remove_ipsets(into: Removal, *, run: Run = _run, module: Path = IP_SET_MODULE) -> None:
    """Destroy spa's ipsets (after the rules that use them are gone)."""
    path = shutil.which("ipset")
    if path is None or not module.exists():
        return
    listing = run([path, "list", "-n"])
    if listing.returncode != 0:
        into.failed.append(f"ipset list: {listing.stderr.strip()}")
        return
    for name in ipsets(listing.stdout):
        done = run([path, "destroy", name])
        if done.returncode != 0:
            into.failed.append(f"ipset destroy {name}: {done.stderr.strip()}")
        else:
            into.removed.append(f"ipset {name}")


def remove_all(runner: NftRunner | None) -> Removal:
    """Every firewall object spa made, gone (those that could go)."""
    removal = Removal()
    if runner is not None:
        remove_nftables(runner, removal)
    remove_iptables(removal)
    remove_ipsets(removal)
    return removal
