"""Walk an nftables base chain with one symbolic packet (pure: no I/O).

Invariants:
- The input is the parsed document of `nft -j list ruleset`; nothing is read, run or changed.
- Every match is decided True, False or undecided (None) for the `Packet`: a new connection
  (ct state new, no NAT, no extension headers) from an arbitrary remote address on a
  non-loopback interface to a local address of this host.  Addresses, source ports, interface
  names other than "lo", connmarks and most `xt` matches are undecided; nothing undecided is
  ever reported as decided.  An undecided match forks the walk (matched, not matched).
- The walk follows the kernel: accept/drop/reject end the base chain, `jump` continues after
  a `return`, `goto` does not, verdict maps pick their entry, and falling off a base chain
  meets its policy (resolved by `walk`).  The result lists every way out, each with the
  undecided matches on its way.  Jumps nested deeper than MAX_DEPTH are undecided.
- `xt` matches (iptables-nft) carry no options in JSON: only `comment` (always true) and the
  rules ufw ships in before.rules/after.rules (`UFW_XT`, recognised by chain, shape and
  verdict) are read; any other `xt` match is undecided.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

MAX_DEPTH = 16  # the kernel refuses deeper jump stacks (NFT_JUMP_STACK_SIZE)
ChainKey = tuple[str, str, str]  # (family, table, chain)
Json = Any
Tri = bool | None  # None: undecided for the symbolic packet
Undecided = tuple[str, ...]  # summaries of the undecided matches on a path
Conts = list[tuple[int | None, Undecided]]  # (mark, undecided) of the paths that go on
Step = tuple[list["End"], Conts]  # a rule's terminal ends, and the paths past it

Alias = frozenset[int | str]  # one value under its names and numbers
L4: dict[str, Alias] = {"tcp": frozenset({"tcp", 6}), "udp": frozenset({"udp", 17})}
NFPROTO: dict[int, Alias] = {4: frozenset({"ipv4", 2}), 6: frozenset({"ipv6", 10})}
ETHERTYPE: dict[int, Alias] = {4: frozenset({"ip", 0x0800}), 6: frozenset({"ip6", 0x86DD})}
L4_HEADERS = {"tcp", "udp", "udplite", "sctp", "dccp", "icmp", "icmpv6", "igmp", "ah", "esp"}
NON_TERMINAL = {"counter", "log", "set", "notrack", "flow", "dup", "ct helper", "ct timeout"}
TERMINAL_UNKNOWN = {"queue", "synproxy", "tproxy", "fwd"}
XT_NON_TERMINAL = {"LOG", "NFLOG", "TCPMSS", "CT", "NOTRACK", "AUDIT", "CONNMARK"}
CMP: dict[str, Callable[[int, int], bool]] = {
    "<": operator.lt, ">": operator.gt, "<=": operator.le, ">=": operator.ge}
# (chain without its ufw-/ufw6- prefix, xt match, verdict) -> value, for rules that are only
# that xt match (plus counter/limit) and the verdict, as ufw 0.36 ships them.
UFW_XT: dict[tuple[str, str, str], bool] = {
    ("before-input", "conntrack", "accept"): False,  # --ctstate RELATED,ESTABLISHED
    ("before-input", "conntrack", "jump"): False,  # --ctstate INVALID -j ufw-logging-deny
    ("before-input", "conntrack", "drop"): False,  # --ctstate INVALID -j DROP
    ("before-input", "rt", "drop"): False,  # ufw6: -m rt --rt-type 0 (no routing header)
    ("logging-deny", "conntrack", "return"): False,  # --ctstate INVALID
    ("not-local", "addrtype", "return"): True,  # --dst-type LOCAL (then MULTICAST, BROADCAST)
    ("after-input", "addrtype", "jump"): False,  # --dst-type BROADCAST
}


class Special(Enum):
    """A field the packet has, but whose value is not one known set of aliases."""

    ABSENT = "absent"  # the header or key is not there: the match fails whatever the op
    NOT_LO = "not lo"  # an interface that is not loopback
    UNKNOWN = "unknown"


Field = Alias | Special


@dataclass(frozen=True, slots=True)
class Packet:
    version: int  # 4 or 6
    protocol: str  # "tcp" or "udp"
    port: int  # destination port
    mark: int | None  # meta mark as the chain sees it (None: undecided)


class EndKind(Enum):
    ACCEPT = "accept"
    DROP = "drop"  # drop or reject
    RETURN = "return"  # return, or the end of a chain (the policy, for a base chain)
    DNAT = "dnat"


@dataclass(frozen=True, slots=True)
class End:
    kind: EndKind
    where: str  # "policy drop", or "rule 3 of INPUT, handle 7: tcp dport 22 drop"
    unknown: Undecided = ()  # the undecided matches on the way
    destination: str | None = None  # a native dnat's "address:port"


@dataclass(frozen=True, slots=True)
class Ruleset:
    chains: Mapping[ChainKey, Mapping[str, Json]]
    rules: Mapping[ChainKey, Sequence[Mapping[str, Json]]]
    sets: Mapping[ChainKey, Mapping[str, Json]]  # named sets and maps, by (family, table, name)


def index(document: Mapping[str, Json]) -> Ruleset:
    """Raises ValueError if `document` is not the output of `nft -j list ruleset`."""
    items = document.get("nftables") if isinstance(document, Mapping) else None
    if not isinstance(items, list):
        raise ValueError("not an `nft -j list ruleset` document (no 'nftables' list)")
    chains: dict[ChainKey, Mapping[str, Json]] = {}
    rules: dict[ChainKey, list[Mapping[str, Json]]] = {}
    sets: dict[ChainKey, Mapping[str, Json]] = {}
    for item in items:
        for kind, spec in item.items() if isinstance(item, dict) else ():
            if kind == "chain":
                chains[(spec["family"], spec["table"], spec["name"])] = spec
            elif kind == "rule":
                rules.setdefault((spec["family"], spec["table"], spec["chain"]), []).append(spec)
            elif kind in ("set", "map"):
                sets[(spec["family"], spec["table"], spec["name"])] = spec
    return Ruleset(chains, rules, sets)


def base_chains(ruleset: Ruleset, hook: str, kind: str, version: int) -> list[ChainKey]:
    """Base chains on `hook` of type `kind` that see IPv`version` packets, by priority."""
    families = {"inet", "ip" if version == 4 else "ip6"}
    found = [key for key, spec in ruleset.chains.items()
             if spec.get("hook") == hook and spec.get("type") == kind and key[0] in families]
    return sorted(found, key=lambda key: (priority(ruleset, key), key))


def priority(ruleset: Ruleset, key: ChainKey) -> int:
    prio = ruleset.chains[key].get("prio", 0)
    return prio if isinstance(prio, int) else 0


def walk(ruleset: Ruleset, key: ChainKey, packet: Packet) -> tuple[End, ...]:
    """Every way `packet` can leave base chain `key` (a fall-through becomes its policy)."""
    policy = str(ruleset.chains[key].get("policy", "accept"))
    ends = []
    for end in _Walk(ruleset, key[0], key[1], packet).chain(key[2], packet.mark, 0):
        if end.kind is EndKind.RETURN:
            kind = EndKind.DROP if policy == "drop" else EndKind.ACCEPT
            end = End(kind, f"policy {policy}", end.unknown)
        ends.append(end)
    return _dedupe(ends)


def mentions(ruleset: Ruleset, key: ChainKey, port: int) -> bool:
    """Whether a rule of chain `key`, or of a chain it jumps to, matches `port` somewhere."""
    seen: set[str] = set()
    todo = [key[2]]
    while todo:
        name = todo.pop()
        seen.add(name)
        for rule in ruleset.rules.get((key[0], key[1], name), ()):
            for kind, arg in _items(rule.get("expr", [])):
                if kind == "match" and _member(frozenset({port}), arg.get("right"),
                                               ruleset, key[:2]) is True:
                    return True
                if kind in ("jump", "goto") and arg.get("target") not in seen:
                    todo.append(arg["target"])
    return False


class _Walk:
    """One base chain's walk; results of called chains memoised per (chain, mark)."""

    def __init__(self, ruleset: Ruleset, family: str, table: str, packet: Packet) -> None:
        self.ruleset, self.family, self.table, self.packet = ruleset, family, table, packet
        self.memo: dict[tuple[str, int | None], tuple[End, ...]] = {}

    def chain(self, name: str, mark: int | None, depth: int) -> tuple[End, ...]:
        if depth > MAX_DEPTH:  # not memoised: a shallower call may still decide
            return _undecided(f"chain {name}", "jumps nested too deep")
        if (name, mark) not in self.memo:
            self.memo[(name, mark)] = self._rules(name, mark, depth)
        return self.memo[(name, mark)]

    def _rules(self, name: str, mark: int | None, depth: int) -> tuple[End, ...]:
        states: dict[int | None, Undecided] = {mark: ()}  # mark -> undecided so far
        ends: list[End] = []
        rules = self.ruleset.rules.get((self.family, self.table, name), ())
        for position, rule in enumerate(rules, 1):
            where = f"rule {position} of {name}, handle {rule.get('handle')}: {summary(rule)}"
            following: dict[int | None, Undecided] = {}
            for state_mark, unknown in states.items():
                out, conts = self._rule(name, rule, where, state_mark, depth)
                ends += [_prefixed(end, unknown) for end in out]
                for next_mark, more in conts:
                    following[next_mark] = _union(following.get(next_mark, ()), unknown + more)
            states = following
        ends += [End(EndKind.RETURN, f"end of {name}", unknown) for unknown in states.values()]
        return _dedupe(ends)

    def _rule(self, chain: str, rule: Mapping[str, Json], where: str, mark: int | None,
              depth: int) -> Step:
        """The rule's terminal ends, and the (mark, undecided) states that go on past it."""
        conts: Conts = []
        unknown: Undecided = ()
        exprs = rule.get("expr", [])
        for kind, arg in _items(exprs):
            if kind in ("match", "xt", "limit") or kind not in _VERDICTS | NON_TERMINAL | {
                    "mangle", "vmap"}:
                decided = self._test(chain, exprs, kind, arg, mark)
                if decided is None:
                    unknown += (summary({"expr": [{kind: arg}]}),)
                    conts.append((mark, unknown))
                elif not decided:
                    return [], [*conts, (mark, unknown)]
                elif kind == "xt" and arg.get("type") == "target":
                    return self._xt_target(arg, where, mark, unknown, conts)
            elif kind == "mangle":
                mark = _mangled(arg, mark)
            elif kind == "vmap":
                return self._vmap(arg, where, mark, unknown, conts, depth)
            elif kind in _VERDICTS:
                out, more = self._verdict(kind, arg, where, mark, depth)
                return [_prefixed(end, unknown) for end in out], conts + [
                    (m, unknown + u) for m, u in more]
        return [], [*conts, (mark, unknown)]

    def _test(self, chain: str, exprs: Sequence[Json], kind: str, arg: Json,
              mark: int | None) -> Tri:
        if kind == "match":
            return _match(arg, self.packet, mark, self.ruleset, (self.family, self.table))
        if kind == "limit":
            return None if arg.get("inv") else True  # under the rate: passes
        if kind == "xt":
            return True if arg.get("type") == "target" else _xt_match(chain, exprs, arg)
        return None  # a statement we do not know (quota, ct count, ...): it may stop the rule

    def _verdict(self, kind: str, arg: Json, where: str, mark: int | None, depth: int,
                 ) -> Step:
        if kind == "accept" or kind in ("snat", "masquerade", "redirect"):
            return [End(EndKind.ACCEPT, where)], []
        if kind in ("drop", "reject"):
            return [End(EndKind.DROP, where)], []
        if kind == "return":
            return [End(EndKind.RETURN, where)], []
        if kind == "continue":
            return [], [(mark, ())]
        if kind == "dnat":
            return [End(EndKind.DNAT, where, destination=_destination(arg))], []
        if kind in ("jump", "goto"):
            called = self.chain(str(arg.get("target")), mark, depth + 1)
            if kind == "goto":
                return list(called), []
            returned = [end.unknown for end in called if end.kind is EndKind.RETURN]
            return [end for end in called if end.kind is not EndKind.RETURN], [
                (mark, unknown) for unknown in returned]
        return list(_undecided(where, f"{kind} (decided outside the ruleset)")), []

    def _xt_target(self, arg: Json, where: str, mark: int | None, unknown: Undecided,
                   conts: Conts,
                   ) -> Step:
        name = arg.get("name")
        if name in XT_NON_TERMINAL or name == "MARK":
            return [], [*conts, (None if name == "MARK" else mark, unknown)]
        if name == "REJECT":
            return [End(EndKind.DROP, where, unknown)], conts
        if name == "DNAT":
            return [End(EndKind.DNAT, where, unknown)], conts
        return [_prefixed(end, unknown) for end in _undecided(where, f"xt target {name}")], conts

    def _vmap(self, arg: Json, where: str, mark: int | None, unknown: Undecided,
              conts: Conts, depth: int,
              ) -> Step:
        field = _field(arg.get("key"), self.packet, mark)
        entries = _map_entries(arg.get("data"), self.ruleset, (self.family, self.table))
        if entries is None:
            return list(_undecided(where, "verdict map not readable")), conts
        ends: list[End] = []
        for key, verdict in entries:
            decided = _compare(field, "==", key, self.ruleset, (self.family, self.table))
            if decided is False:
                continue
            taken = unknown if decided else (*unknown, f"{summary({'expr': [arg['key']]})} "
                                                       f"== {_text(key)}")
            for kind, verdict_arg in _items([verdict]):
                out, more = self._verdict(kind, verdict_arg, where, mark, depth)
                ends += [_prefixed(end, taken) for end in out]
                conts += [(m, taken + u) for m, u in more]
            if decided:
                return ends, conts
        return ends, [*conts, (mark, unknown)]


_VERDICTS = {"accept", "drop", "reject", "return", "continue", "jump", "goto", "dnat", "snat",
             "masquerade", "redirect"} | TERMINAL_UNKNOWN


def _match(arg: Json, packet: Packet, mark: int | None, ruleset: Ruleset,
           table: tuple[str, str]) -> Tri:
    left, op, right = arg.get("left"), arg.get("op"), arg.get("right")
    flags = _tcp_flags(left, op, right, packet)
    if not isinstance(flags, Special):
        return flags
    return _compare(_field(left, packet, mark), op, right, ruleset, table)


def _compare(field: Field, op: str, right: Json, ruleset: Ruleset,
             table: tuple[str, str]) -> Tri:
    if field is Special.ABSENT:
        return False
    if field is Special.UNKNOWN:
        return None
    if op in CMP:
        values = [v for v in field if isinstance(v, int)] if isinstance(field, frozenset) else []
        return CMP[op](values[0], right) if values and isinstance(right, int) else None
    hit = _member(field, right, ruleset, table)
    if op in ("==", "in"):
        return hit
    return None if op != "!=" or hit is None else not hit


def _member(field: Field, right: Json, ruleset: Ruleset, table: tuple[str, str]) -> Tri:
    elements = _elements(right, ruleset, table)
    if elements is None:
        return None
    if field is Special.NOT_LO:
        return False if elements and all(e == "lo" for e in elements) else None
    if not isinstance(field, frozenset):
        return None
    return _any(_element_hit(field, element) for element in elements)


def _elements(right: Json, ruleset: Ruleset, table: tuple[str, str]) -> list[Json] | None:
    if isinstance(right, str) and right.startswith("@"):
        named = ruleset.sets.get((*table, right[1:]))
        return None if named is None or "map" in named else list(named.get("elem", []))
    if isinstance(right, int | str):
        return [right]
    if isinstance(right, list):
        return right
    if isinstance(right, dict) and "set" in right and isinstance(right["set"], list):
        return list(right["set"])
    if isinstance(right, dict) and "range" in right:
        return [right]
    return None


def _element_hit(field: frozenset[int | str], element: Json) -> Tri:
    if isinstance(element, int | str):
        return element in field
    if isinstance(element, dict) and "range" in element:
        low, high = element["range"]
        ints = [v for v in field if isinstance(v, int)]
        return any(low <= v <= high for v in ints) if ints else None
    if isinstance(element, dict) and "elem" in element:
        return _element_hit(field, element["elem"].get("val"))
    return None


def _any(values: Iterable[Tri]) -> Tri:
    seen = list(values)
    return True if True in seen else (None if None in seen else False)


def _field(left: Json, packet: Packet, mark: int | None) -> Field:
    for kind, arg in _items([left]):
        if kind == "payload":
            return _payload(arg, packet)
        if kind == "meta":
            return _meta(arg.get("key"), packet, mark)
        if kind == "ct":
            return _ct(arg, packet)
        if kind == "fib" and arg.get("result") == "type" and arg.get("flags") in (
                "daddr", ["daddr"]):
            return frozenset({"local"})
        if kind == "&" and arg[0] == {"meta": {"key": "mark"}} and isinstance(arg[1], int):
            return Special.UNKNOWN if mark is None else frozenset({mark & arg[1]})
    return Special.UNKNOWN


def _payload(arg: Json, packet: Packet) -> Field:
    protocol, field = arg.get("protocol"), arg.get("field")
    if protocol == "th":
        protocol = packet.protocol
    if protocol in L4_HEADERS:
        if protocol != packet.protocol:
            return Special.ABSENT
        return frozenset({packet.port}) if field == "dport" else Special.UNKNOWN
    if protocol in ("ip", "ip6"):
        if protocol != ("ip" if packet.version == 4 else "ip6"):
            return Special.ABSENT
        return L4[packet.protocol] if field in ("protocol", "nexthdr") else Special.UNKNOWN
    return Special.UNKNOWN


def _meta(key: str, packet: Packet, mark: int | None) -> Field:
    known: dict[str, Field] = {
        "l4proto": L4[packet.protocol], "nfproto": NFPROTO[packet.version],
        "protocol": ETHERTYPE[packet.version], "iif": Special.NOT_LO, "iifname": Special.NOT_LO,
        "oif": frozenset({0}), "oifname": frozenset({""}),  # no output device on input
        "pkttype": frozenset({"host", 0}),
        "mark": Special.UNKNOWN if mark is None else frozenset({mark})}
    return known.get(key, Special.UNKNOWN)


def _ct(arg: Json, packet: Packet) -> Field:
    key = arg.get("key")
    if key == "proto-dst" and arg.get("dir") in (None, "original"):
        return frozenset({packet.port})
    known: dict[str, Field] = {
        "state": frozenset({"new"}), "status": frozenset(),  # a new, un-NATed connection
        "direction": frozenset({"original"}), "l3proto": NFPROTO[packet.version],
        "protocol": L4[packet.protocol]}
    return known.get(key, Special.UNKNOWN)


def _tcp_flags(left: Json, op: str, right: Json, packet: Packet) -> bool | Special | None:
    """`tcp flags` on a new connection's first packet: exactly syn."""
    masked = isinstance(left, dict) and "&" in left
    header = left["&"][0] if masked else left
    if header != {"payload": {"protocol": "tcp", "field": "flags"}}:
        return Special.UNKNOWN
    if packet.protocol != "tcp":
        return False
    present = frozenset({"syn"}) & _flag_set(left["&"][1]) if masked else frozenset({"syn"})
    wanted = _flag_set(right)
    if op == "in" or (op == "==" and not masked and len(wanted) > 1):
        return bool(present & wanted)
    return {"==": present == wanted, "!=": present != wanted}.get(op)


def _flag_set(value: Json) -> frozenset[str]:
    if isinstance(value, list):
        return frozenset(map(str, value))
    return frozenset() if value in (0, None) else frozenset({str(value)})


def _xt_match(chain: str, exprs: Sequence[Json], arg: Json) -> Tri:
    name = arg.get("name")
    if name == "comment":
        return True
    prefix = next((p for p in ("ufw-", "ufw6-") if chain.startswith(p)), None)
    shape = [kind for kind, _ in _items(exprs) if kind not in ("counter", "limit")]
    if prefix is None or len(shape) != 2:
        return None
    return UFW_XT.get((chain[len(prefix):], str(name), shape[1]))


def _mangled(arg: Json, mark: int | None) -> int | None:
    """The mark after a `mangle` statement (unchanged unless it sets meta mark)."""
    if arg.get("key") != {"meta": {"key": "mark"}}:
        return mark
    value = arg.get("value")
    if isinstance(value, int):
        return value
    if isinstance(value, dict) and mark is not None:
        for op, fn in (("|", operator.or_), ("&", operator.and_), ("^", operator.xor)):
            pair = value.get(op)
            if pair and pair[0] == {"meta": {"key": "mark"}} and isinstance(pair[1], int):
                return int(fn(mark, pair[1]))
    return None


def _map_entries(data: Json, ruleset: Ruleset, table: tuple[str, str],
                 ) -> list[tuple[Json, Json]] | None:
    if isinstance(data, str) and data.startswith("@"):
        named = ruleset.sets.get((*table, data[1:]))
        data = {"set": named.get("elem", [])} if named and named.get("map") == "verdict" else None
    if isinstance(data, dict) and isinstance(data.get("set"), list):
        return [(entry[0], entry[1]) for entry in data["set"]]
    return None


def _destination(arg: Json) -> str | None:
    addr, port = arg.get("addr"), arg.get("port")
    if addr is None:
        return None if port is None else f":{port}"
    return f"{_text(addr)}:{port}" if port is not None else _text(addr)


def _undecided(where: str, why: str) -> tuple[End, ...]:
    return (End(EndKind.ACCEPT, where, (why,)), End(EndKind.DROP, where, (why,)))


def _prefixed(end: End, unknown: Undecided) -> End:
    return replace(end, unknown=_union(unknown, end.unknown)) if unknown else end


def _union(first: Undecided, second: Undecided) -> Undecided:
    return first + tuple(item for item in second if item not in first)


def _dedupe(ends: Iterable[End]) -> tuple[End, ...]:
    merged: dict[tuple[EndKind, str, str | None], End] = {}
    for end in ends:
        key = (end.kind, end.where, end.destination)
        merged[key] = _prefixed(end, merged[key].unknown) if key in merged else end
    return tuple(merged.values())


def _items(exprs: Json) -> list[tuple[str, Json]]:
    return [(k, v if v is not None else {}) for e in exprs if isinstance(e, dict)
            for k, v in e.items()]


def summary(rule: Mapping[str, Json]) -> str:
    """A rule in (roughly) nft's own words, without counters."""
    words = [_text(expr) for expr in rule.get("expr", []) if "counter" not in expr]
    return " ".join(word for word in words if word)


def _text(value: Json) -> str:
    if not isinstance(value, dict):
        return ",".join(map(_text, value)) if isinstance(value, list) else str(value)
    if len(value) != 1:
        return str(value)
    [(kind, arg)] = value.items()
    if kind == "match":
        masked = isinstance(arg["left"], dict) and "&" in arg["left"]
        op = "" if arg["op"] in ("==", "in") and not masked else f" {arg['op']}"
        return f"{_text(arg['left'])}{op} {(_hex if masked else _text)(arg['right'])}"
    if kind == "payload":
        return f"{arg.get('protocol', 'raw')} {arg.get('field', '')}".strip()
    if kind in ("meta", "ct"):
        key = arg["key"]
        return key if key in ("iif", "iifname", "oif", "oifname") else (
            f"{kind} {arg.get('dir', '')} {key}".replace("  ", " "))
    if kind == "fib":
        flags = arg.get("flags", [])
        return f"fib {' . '.join(flags if isinstance(flags, list) else [flags])} {arg['result']}"
    if kind in ("&", "|"):
        return f"{_text(arg[0])} {kind} {_hex(arg[1])}"
    if kind == "set":
        return "{ " + ", ".join(map(_text, arg)) + " }" if isinstance(arg, list) else "set"
    if kind == "range":
        return f"{arg[0]}-{arg[1]}"
    if kind == "prefix":
        return f"{arg['addr']}/{arg['len']}"
    if kind in ("jump", "goto"):
        return f"{kind} {arg['target']}"
    if kind == "xt":
        return f"xt {arg['type']} {arg['name']}"
    if kind == "reject" and arg:
        return f"reject with {arg.get('type', '')} {arg.get('expr', '')}".strip()
    if kind == "limit":
        return f"limit rate {'over ' if arg.get('inv') else ''}{arg['rate']}/{arg['per']}"
    if kind in ("dnat", "snat"):
        return f"{kind} to {_destination(arg)}"
    if kind == "vmap":
        return f"{_text(arg['key'])} vmap {_text(arg['data'])}"
    if kind == "mangle":
        return f"{_text(arg['key'])} set {_hex(arg['value'])}"
    return str(kind)


def _hex(value: Json) -> str:
    return hex(value) if isinstance(value, int) else _text(value)
