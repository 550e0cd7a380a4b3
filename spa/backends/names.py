"""The kernel names one spa-server instance owns: its nftables tables, its
iptables chain and its ipsets.  Pure.

Invariants (docs/install.md, "Several instances on one host"):
- The default instance ("") has the names every install before instances
  had: tables `inet spa` and `inet spa_hold`, chain `SPA`, ipsets
  `spa_drops_v4` and `spa_drops_v6`.  An existing install keeps its gate.
- Instance NAME suffixes each: `spa_NAME`, `spa_hold_NAME`, `SPA_NAME`,
  `spa_drops_v4_NAME`.  NAME is 1-MAX_INSTANCE characters of [a-z0-9_-],
  starting with a letter or digit, and never starting with "hold" (instance
  "hold" would own `inet spa_hold`, the default instance's hold table), so
  no two instances share a name and every name fits its kernel's limit
  (iptables chains: 28 characters; ipset names: 31).
- The names travel as a value (`Names`) handed to the backends, never a
  global: two instances in one process (the tests) keep apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_INSTANCE = 16  # characters: "spa_drops_v4_" + 16 < 31 (ipset), "SPA_" + 16 < 28 (iptables)
_INSTANCE = re.compile(r"[a-z0-9][a-z0-9_-]*")
FAMILY = "inet"
BASE_TABLE, BASE_HOLD, BASE_CHAIN, BASE_DROPS = "spa", "spa_hold", "SPA", "spa_drops"


def instance_problem(instance: str) -> str | None:
    """Why `instance` is not a valid instance name, or None."""
    if instance == "":
        return None
    if len(instance) > MAX_INSTANCE:
        return f"is {len(instance)} characters long; at most {MAX_INSTANCE}"
    if not _INSTANCE.fullmatch(instance):
        return "may hold only a-z, 0-9, _ and -, and starts with a letter or digit"
    if instance.startswith("hold"):
        return "may not start with 'hold' (the hold tables' names)"
    return None


@dataclass(frozen=True, slots=True)
class Names:
    """One instance's kernel names (see the module's invariants)."""

    instance: str = ""

    def __post_init__(self) -> None:
        problem = instance_problem(self.instance)
        if problem is not None:
            raise ValueError(f"instance {self.instance!r} {problem}")

    def _suffixed(self, base: str) -> str:
        return f"{base}_{self.instance}" if self.instance else base

    @property
    def table(self) -> str:
        """The nftables table that outlives the daemon (`inet spa`)."""
        return self._suffixed(BASE_TABLE)

    @property
    def hold(self) -> str:
        """The nftables table the daemon owns (`inet spa_hold`)."""
        return self._suffixed(BASE_HOLD)

    @property
    def chain(self) -> str:
        """The iptables chain in the filter table (`SPA`)."""
        return self._suffixed(BASE_CHAIN)

    def drop_set(self, version: int) -> str:
        """The ipset counting dropped attempts of one IP version (`spa_drops_v4`)."""
        return self._suffixed(f"{BASE_DROPS}_v{version}")


DEFAULT_NAMES = Names()


def instance_of_table(name: str) -> str | None:
    """The instance whose gate table (not its hold table) `name` is, or None
    for a table that is no spa instance's gate."""
    return _suffix_instance(name, BASE_TABLE)


def instance_of_chain(name: str) -> str | None:
    """The instance whose iptables chain `name` is, or None."""
    return _suffix_instance(name, BASE_CHAIN)


def is_hold_table(name: str) -> bool:
    """Whether `name` may be some instance's hold table (an owned table:
    never listed in JSON, see spa/backends/nftables.py).  Loose on purpose:
    a table that only looks like one is not listed either.  What spa made,
    exactly: `is_instance_table`."""
    return name == BASE_HOLD or name.startswith(BASE_HOLD + "_")


def instance_of_hold(name: str) -> str | None:
    """The instance whose hold table `name` is, exactly, or None."""
    return _suffix_instance(name, BASE_HOLD)


def is_instance_table(name: str) -> bool:
    """Whether `name` is exactly the name of some instance's gate or hold
    table (`spa`, `spa_hold`, `spa_NAME`, `spa_hold_NAME`).  The one test by
    name of "a table spa makes": the removal (spa/backends/teardown.py, which
    also checks the table's shape) and the gate keeper (spa/server/guard.py)."""
    return instance_of_table(name) is not None or instance_of_hold(name) is not None


def instance_of_drop_set(name: str) -> str | None:
    """The instance whose drop-counting ipset `name` is, exactly, or None."""
    for version in (4, 6):
        instance = _suffix_instance(name, f"{BASE_DROPS}_v{version}")
        if instance is not None:
            return instance
    return None


def _suffix_instance(name: str, base: str) -> str | None:
    """"" for `base` itself, NAME for `base_NAME` with a valid NAME, else None."""
    if name == base:
        return ""
    if name.startswith(base + "_"):
        instance = name[len(base) + 1:]
        if instance and instance_problem(instance) is None:
            return instance
    return None
