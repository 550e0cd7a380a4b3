"""Remove every firewall object spa made, whatever config made it: the
package's removal (debian/spa.prerm) and `spa-server gate --remove`.

Invariants (STYLE principle 6):
- Only what spa makes is touched, by its exact name (spa/backends/names.py)
  and its shape: nftables tables of family inet named `spa`, `spa_hold`,
  `spa_NAME` or `spa_hold_NAME` (NAME a valid instance name) whose listing
  is what spa/backends/nftrender.py installs (`has_our_shape`: only the
  chains input and forward at our priority, only the sets svc_*_v4/v6 (and a
  named published port's maps pub_*_v4/v6) and,
  in a gate table, its drop sets drops_v4/v6; a hold table `flags owner`);
  iptables chains `SPA` or `SPA_NAME` in the legacy filter tables whose
  first rule is our established/related accept, and the jumps to them;
  ipsets named exactly `spa_drops_v4`/`_v6` (an instance's: `_NAME`).  An
  admin's `inet spa_web` with its own rules, chain `SPA_TRUSTED` or ipset
  `spa_allowlist` stays.  `is_ours_*` and `has_our_shape` below are the one
  place that says so.
- Commands are data (JSON documents, argv lists), rendered by pure functions
  tested without root; the edges below only run them.
- Nothing is loaded that was not there: the legacy iptables tables are read
  only when the kernel has them (/proc/net/ip_tables_names), ipsets only when
  the ip_set module is in, so a host that never ran spa is left exactly as it
  was.
- One object that cannot go (a table a running daemon owns) does not stop
  the others; each failure is one line in the result.
- Gone means gone: after the removal, `nft list tables` is read again
  (RECHECK_AFTER later) and a table of spa's still there (a spa-server whose
  unit was not stopped, policy-rc.d refusing, put it back) is a failure too,
  so the package's removal does not go ahead while spa still closes a port.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from spa.backends.libnft import Document, NftRunner
from spa.backends.names import (
    FAMILY,
    instance_of_chain,
    instance_of_drop_set,
    instance_of_table,
    is_instance_table,
)
from spa.backends.nftgateway import NAT_CHAIN
from spa.backends.nftrender import CHAIN as NFT_CHAIN
from spa.backends.nftrender import FORWARD, HOLD_PRIORITY, PRIORITY
from spa.server.errors import LocalError

PROC = Path("/proc/net")
RECHECK_AFTER = 0.5  # seconds: a running daemon's gate keeper restores a removed table in ms
IP_SET_MODULE = Path("/sys/module/ip_set")

Run = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


@dataclass(slots=True)
class Removal:
    """What a teardown removed and what it could not (one line each)."""
    removed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


# ---- what is ours (pure) -----------------------------------------------------

def is_ours_table(family: str, name: str) -> bool:
    """An nftables table spa makes, by its exact name (its shape: `has_our_shape`)."""
    return family == FAMILY and is_instance_table(name)


def is_ours_chain(name: str) -> bool:
    """An iptables chain spa makes, by its exact name (`SPA`, `SPA_NAME`)."""
    return instance_of_chain(name) is not None


def is_our_ipset(name: str) -> bool:
    """An ipset spa makes, by its exact name (`spa_drops_v4`, `spa_drops_v6_NAME`)."""
    return instance_of_drop_set(name) is not None


_OBJECT = re.compile(r"^\t(\w+) (\S+) \{$")  # `\tset svc_ssh_v4 {` in a table's listing
# nftrender.set_name, and a named gateway service's nftgateway.dst_set_name
_SERVICE_SET = re.compile(r"(svc|dst)_\S+_v[46]")
DROP_SETS = {"drops_v4", "drops_v6"}
_PUB_MAP = re.compile(r"pub_\S+_v[46]")  # nftgateway.pub_map_name: a named published port


def _hook_line(hook: str, priority: int) -> str:
    """How nft prints one of our base chains' hook (priority -10: `filter - 10`)."""
    return f"type filter hook {hook} priority filter - {-priority};"


_NAT_HOOK = "type nat hook prerouting priority dstnat; policy accept;"  # nftgateway.NAT_CHAIN


def has_our_shape(name: str, table_text: str) -> bool:
    """Does `nft -t list table inet NAME` show what spa installs there (see
    nftrender.render_start and render_hold)?  A gate table: chain input (and
    forward) at priority filter - 10, the sets svc_*_v4/v6 (and a named
    gateway service's dst_*_v4/v6) and both drop sets
    drops_v4/v6, nothing else; with a gateway's published port, chain published
    too (nat, prerouting at dstnat: nftgateway.py), and for a named one its
    maps pub_*_v4/v6.  A hold table: input and
    forward at filter - 9, only svc_* sets, `flags owner`.  A table an admin
    wrote that merely shares a name has other chains, sets, priorities or no
    drop sets."""
    objects = [match.groups() for match in map(_OBJECT.match, table_text.splitlines()) if match]
    chains = {object_name for kind, object_name in objects if kind == "chain"}
    sets = {object_name for kind, object_name in objects if kind == "set"}
    maps = {object_name for kind, object_name in objects if kind == "map"}
    gate = instance_of_table(name) is not None
    if not all(_PUB_MAP.fullmatch(map_name) for map_name in maps) or (maps and not gate):
        return False
    if {kind for kind, _ in objects} - {"chain", "set", "map"} or not (
            {NFT_CHAIN} <= chains <= {NFT_CHAIN, FORWARD, *([NAT_CHAIN] if gate else [])}):
        return False
    priority = PRIORITY if gate else HOLD_PRIORITY
    lines = {line.strip() for line in table_text.splitlines()}
    hooks = {f"{_hook_line(hook, priority)} policy accept;"
             for hook, chain in (("input", NFT_CHAIN), ("forward", FORWARD)) if chain in chains}
    if NAT_CHAIN in chains:
        hooks.add(_NAT_HOOK)
    if not hooks <= lines:
        return False
    services = {set_name for set_name in sets if _SERVICE_SET.fullmatch(set_name)}
    if gate:
        return sets - services == DROP_SETS
    return sets == services and "flags owner" in lines


def _is_our_first_rule(words: Sequence[str]) -> bool:
    """`-A SPA ! -p tcp -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT`,
    the first rule spa's iptables backend puts in its chain (before
    2026-12-06, the same without `! -p tcp`)."""
    if words[2:5] == ["!", "-p", "tcp"]:
        words = [*words[:2], *words[5:]]
    return (len(words) == 8 and words[2:5] == ["-m", "conntrack", "--ctstate"]
            and set(words[5].split(",")) == {"RELATED", "ESTABLISHED"}
            and words[6:] == ["-j", "ACCEPT"])


def nft_tables(tables_text: str) -> list[tuple[str, str]]:
    """(family, name) of spa's tables in `nft list tables` output."""
    found = []
    for line in tables_text.splitlines():
        words = line.split()
        if len(words) >= 3 and words[0] == "table" and is_ours_table(words[1], words[2]):
            found.append((words[1], words[2]))
    return found


def render_nft_delete(family: str, name: str) -> Document:
    return {"nftables": [{"delete": {"table": {"family": family, "name": name}}}]}


def render_ipt_removal(rules: str) -> list[list[str]]:
    """iptables arguments that remove spa's chains, from `iptables -S` of the
    filter table: each jump to one of them deleted, then each chain flushed
    and deleted.  Raises ValueError on a line shlex cannot split."""
    listed = [shlex.split(line) for line in rules.splitlines()]
    first: dict[str, list[str]] = {}
    for words in listed:
        if len(words) >= 2 and words[0] == "-A":
            first.setdefault(words[1], words)
    chains = [words[1] for words in listed
              if len(words) >= 2 and words[0] == "-N" and is_ours_chain(words[1])
              and _is_our_first_rule(first.get(words[1], []))]
    jumps = [["-D", *words[1:]] for words in listed
             if len(words) >= 2 and words[0] == "-A" and words[1] not in chains
             and _target(words) in chains]
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
    return [name for name in names_text.split() if is_our_ipset(name)]


# ---- the edges -----------------------------------------------------------------

def _run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=30,  # noqa: S603 (argv list, no shell)
                          check=False)


def our_nft_tables(runner: NftRunner) -> list[tuple[str, str]]:
    """spa's tables, by name and shape, that the kernel has.  Raises LocalError."""
    found = []
    for family, name in nft_tables(runner.list_text("list tables")):
        try:
            listing = runner.list_text(f"list table {family} {name}")
        except LocalError:
            continue  # gone since `list tables`
        if has_our_shape(name, listing):
            found.append((family, name))
    return found


def remove_nftables(runner: NftRunner, into: Removal) -> None:
    """Delete spa's nftables tables."""
    try:
        tables = our_nft_tables(runner)
    except LocalError as exc:
        into.failed.append(str(exc))
        return
    for family, name in tables:
        try:
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


def recheck_nftables(runner: NftRunner, into: Removal) -> None:
    """A failure line for each table of spa's the kernel still has that no
    failure line names yet (one a running daemon put back)."""
    try:
        left = our_nft_tables(runner)
    except LocalError:
        return  # said already, if it fails now it failed before
    for family, name in left:
        table = f"table {family} {name}"
        if not any(line.startswith(table + ":") for line in into.failed):
            into.failed.append(f"{table} is still there after its removal (a spa-server "
                               "still runs and put it back: stop it first)")


def remove_all(runner: NftRunner | None, *, recheck_after: float = RECHECK_AFTER,
               sleep: Callable[[float], None] = time.sleep) -> Removal:
    """Every firewall object spa made, gone (those that could go)."""
    removal = Removal()
    if runner is not None:
        remove_nftables(runner, removal)
    remove_iptables(removal)
    remove_ipsets(removal)
    if runner is not None and any(line.startswith("table ") for line in removal.removed):
        sleep(recheck_after)
        recheck_nftables(runner, removal)
    return removal
