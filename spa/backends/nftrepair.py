"""Is our nftables table as we installed it?  And the one transaction that
puts it back.  Pure: listings in, findings and documents out.

Invariants (docs/threat-model.md, "The host firewall is reloaded"):
- `shape` is what `list table inet spa` says of our table minus what moves
  by itself (handles, set elements, counters): two listings of an untouched
  table have the same shape.  The backend keeps the shape it read right
  after installing, so the comparison is nftables' rendering against
  nftables' rendering, never against what we sent (which nft normalizes).
- `diagnose` names the first thing wrong: the table gone, our chain gone,
  chains, rules or sets altered, grants missing, extra, or with another
  timeout than the lease's (beyond the whole-second rounding), or a named
  published port's map elements not the twins of its grant elements.
- `render_repair` is one transaction: it deletes what is not ours or not
  as installed inside our table, installs the table as `render_start`
  does, and sets every grant set to exactly the live leases at their
  remaining time.  All or nothing: the gate is never half restored.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from spa.backends.base import Destinations, Held
from spa.backends.libnft import Document
from spa.backends.names import DEFAULT_NAMES, FAMILY, Names
from spa.backends.nftgateway import dst_set_name, named_services, published_named
from spa.backends.nftrender import (
    CHAIN,
    DROPS_SIZE,
    DROPS_TIMEOUT,
    Gated,
    parse_held,
    parse_published,
    render_elements,
    render_start,
    set_name,
)
from spa.core.policy import Service

EXPIRY_SLACK = 2.0  # seconds a grant's kernel expiry may differ from its lease (rounding, lag)
ENDING = 1.5  # a lease this close to its end may already be gone from the kernel
DROP_SETS = ("drops_v4", "drops_v6")

Shape = str  # a canonical JSON text


def _still(item: dict[str, Any]) -> dict[str, Any]:
    """An item of our table without what changes by itself: handles, a
    set's elements, counter values."""
    kind, spec = next(iter(item.items()))
    kept = {key: value for key, value in spec.items()
            if key != "handle" and not (kind in ("set", "map") and key == "elem")}
    return {kind: _zero_counters(kept)}


def _zero_counters(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: None if key == "counter" else _zero_counters(inner)
                for key, inner in value.items()}
    if isinstance(value, list):
        return [_zero_counters(inner) for inner in value]
    return value


def _ours(listing: Document, table: str) -> list[dict[str, Any]]:
    """The items of our table in a listing (sets, chains, rules)."""
    found = []
    for item in listing.get("nftables", []):
        if not isinstance(item, dict):
            continue
        for kind, spec in item.items():
            if (kind in ("set", "map", "chain", "rule", "flowtable", "counter", "quota")
                    and isinstance(spec, dict) and spec.get("table") == table
                    and spec.get("family") == FAMILY):
                found.append({kind: spec})
    return found


def has_table(listing: Document, *, names: Names = DEFAULT_NAMES) -> bool:
    return any(isinstance(item, dict) and isinstance(item.get("table"), dict)
               and item["table"].get("name") == names.table
               and item["table"].get("family") == FAMILY
               for item in listing.get("nftables", []))


def shape(listing: Document, *, names: Names = DEFAULT_NAMES) -> Shape:
    return json.dumps([_still(item) for item in _ours(listing, names.table)], sort_keys=True)


def _chains(listing: Document, table: str) -> set[str]:
    return {item["chain"]["name"] for item in _ours(listing, table) if "chain" in item}


def diagnose(listing: Document | None, installed: Shape, services: Mapping[str, Service],
             wanted: Held | None, now: float, *, names: Names = DEFAULT_NAMES) -> str | None:
    """What another program changed, or None if the table is as we left it.
    `listing` None: the table does not exist.  `wanted` None: the structure
    only (a terse listing, which has no set elements)."""
    table = names.table
    if listing is None or not has_table(listing, names=names):
        return f"table {FAMILY} {table} was removed by another program"
    if CHAIN not in _chains(listing, table):
        return f"chain {CHAIN} of table {FAMILY} {table} was removed by another program"
    if shape(listing, names=names) != installed:
        return (f"the chains, rules or sets of table {FAMILY} {table} were altered by another "
                "program")
    if wanted is None:
        return None
    dest: Destinations = {}
    held = parse_held(listing, services, now, names=names, destinations=dest)
    missing = sorted(f"{a} {s}" for (a, s), until in wanted.items()
                     if until - now > ENDING and (a, s) not in held)
    if missing:
        return (f"{len(missing)} grant(s) were removed from table {FAMILY} {table} by another "
                f"program ({', '.join(missing[:3])})")
    extra = sorted(f"{a} {s}" for (a, s) in held if (a, s) not in wanted)
    if extra:
        return (f"table {FAMILY} {table} holds {len(extra)} grant(s) spa did not make "
                f"({', '.join(extra[:3])})")
    moved = sorted(f"{a} {s}" for (a, s), until in held.items()
                   if (a, s) in wanted and abs(until - wanted[(a, s)]) > EXPIRY_SLACK)
    if moved:
        return (f"{len(moved)} grant(s) in table {FAMILY} {table} have another timeout than "
                f"their lease ({', '.join(moved[:3])})")
    return _published_problem(listing, services, held, dest, now, table, names)


def _published_problem(listing: Document, services: Mapping[str, Service], held: Held,
                       dest: Destinations, now: float, table: str, names: Names) -> str | None:
    """Whether the DNAT maps of named services' published ports hold exactly
    the twins of their grant elements (same source, destination, expiry)."""
    published = {name for name, service in services.items() if published_named(service)}
    if not published:
        return None
    mapped = parse_published(listing, services, now, names=names)
    wrong = sorted(f"{a} {s}" for (a, s), until in held.items()
                   if s in published and (a, s) in dest and until - now > ENDING and (
                       mapped.get((a, s), (None, 0.0))[0] != dest[(a, s)]
                       or abs(mapped[(a, s)][1] - until) > EXPIRY_SLACK))
    # an element about to end is not extra: its twin may have ended a moment sooner
    extra = sorted(f"{a} {s}" for (a, s), (_, until) in mapped.items()
                   if (a, s) not in held and until - now > ENDING)
    if wrong or extra:
        return (f"{len(wrong) + len(extra)} published-port mapping(s) in table {FAMILY} "
                f"{table} differ from their grants ({', '.join((wrong + extra)[:3])})")
    return None


def render_repair(listing: Document | None, services: Mapping[str, Service], wanted: Held,
                  now: float, *, names: Names = DEFAULT_NAMES,
                  destinations: Destinations | None = None,
                  gated: Gated | None = None) -> Document:
    """The one transaction that restores the table with exactly `wanted`."""
    where = {"family": FAMILY, "table": names.table}
    commands: list[dict[str, Any]] = []
    present = (_ours(listing, names.table)
               if listing is not None and has_table(listing, names=names) else [])
    expected = _expected_sets(services)
    # a drop set is kept (its counters with it) only while a rule of ours
    # updates it: only then is it known to be dynamic, which the update
    # rules need (nftables refuses them on a plain set, EINVAL, and its JSON
    # listing does not show the flag).  One our table got while it gated no
    # service, or that another program made, goes and is made again.
    updated = {name for item in present if "rule" in item
               for name in _updated_sets(item["rule"].get("expr"))}
    kept_drops = True
    chains = [item["chain"]["name"] for item in present if "chain" in item]
    # every chain emptied before any goes: a jump from one to another would
    # make the delete fail (EBUSY) and keep the gate from coming back
    commands += [{"flush": {"chain": {**where, "name": name}}} for name in chains]
    commands += [{"delete": {"chain": {**where, "name": name}}} for name in chains]
    for item in present:
        for kind in ("set", "map", "flowtable", "counter", "quota"):
            spec = item.get(kind)
            if spec is None or (kind == "set" and _same_set(spec, expected) and (
                    spec.get("name") not in DROP_SETS or spec.get("name") in updated)):
                continue
            kept_drops &= spec.get("name") not in DROP_SETS
            commands.append({"delete": {kind: {**where, "name": spec["name"]}}})
    set_names = {item["set"]["name"] for item in present if "set" in item}
    drops_present = kept_drops and all(name in set_names for name in DROP_SETS)
    commands += render_start(services, drop_sets=not drops_present, names=names)["nftables"]
    for service in services.values():
        for version in (4, 6):
            commands.append({"flush": {"set": {**where, "name": set_name(service.name,
                                                                         version)}}})
    commands += render_elements(wanted, services, now, names.table, destinations, gated)
    return {"nftables": commands}


SetKind = str | list[str]  # a set's type as nftables' JSON writes it


def _updated_sets(expr: object) -> set[str]:
    """The sets a rule's statements update or add to (`set update @name`)."""
    found: set[str] = set()
    for statement in expr if isinstance(expr, list) else []:
        spec = statement.get("set") if isinstance(statement, dict) else None
        if (isinstance(spec, dict) and spec.get("op") in ("add", "update")
                and isinstance(spec.get("set"), str)):
            found.add(spec["set"].lstrip("@"))
    return found


def render_replace(services: Mapping[str, Service], wanted: Held, now: float, *,
                   names: Names = DEFAULT_NAMES,
                   destinations: Destinations | None = None,
                   gated: Gated | None = None) -> Document:
    """Our table deleted and made again in one transaction, with exactly
    `wanted`: for what `render_repair` cannot take apart (flags, a knot of
    jumps).  The drop counters start again from zero."""
    table = {"family": FAMILY, "name": names.table}
    commands: list[dict[str, Any]] = [{"add": {"table": table}}, {"delete": {"table": table}}]
    commands += render_start(services, drop_sets=True, names=names)["nftables"]
    commands += render_elements(wanted, services, now, names.table, destinations, gated)
    return {"nftables": commands}


def _expected_sets(services: Mapping[str, Service]) -> dict[str, SetKind]:
    """set name -> type, for the sets we install (all with flags timeout
    but the named services' destination sets: `_UNTIMED`)."""
    found: dict[str, SetKind] = {}
    for service in services.values():
        for version, kind in ((4, "ipv4_addr"), (6, "ipv6_addr")):
            found[set_name(service.name, version)] = [kind, kind] if service.named else kind
    for service in named_services(services):
        found[dst_set_name(service.name, 4)] = "ipv4_addr"
        found[dst_set_name(service.name, 6)] = "ipv6_addr"
    found["drops_v4"] = ["ipv4_addr", "inet_service"]
    found["drops_v6"] = ["ipv6_addr", "inet_service"]
    return found


_SET_KEYS = {"family", "table", "name", "handle", "type", "flags", "elem"}
_DROP_EXTRA = {"timeout": DROPS_TIMEOUT, "size": DROPS_SIZE}


def _same_set(spec: dict[str, Any], expected: dict[str, SetKind]) -> bool:
    """Whether an existing set is exactly one we install: its type, its flags
    (a set the kernel made dynamic, as the drop rules do, still counts) and
    nothing else (a size, policy or statement of someone else's would stay
    otherwise: a grant set of size 1 locked every second user out)."""
    name = spec.get("name", "")
    kind = expected.get(name)
    flags = set(spec.get("flags", [])) - {"dynamic"}
    extra = _DROP_EXTRA if name in DROP_SETS else {}
    timed = not name.startswith("dst_")  # a named service's destinations have no timeout
    return (kind is not None and spec.get("type") == kind
            and flags == ({"timeout"} if timed else set())
            and set(spec) <= _SET_KEYS | set(extra)
            and all(spec.get(key) == value for key, value in extra.items()))
