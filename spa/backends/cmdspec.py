"""The command backend's templates: argv lists with placeholders, checked
when the config loads and filled with checked values (docs/backends.md;
docs/threat-model.md, "A command backend").

Invariants:
- A template is an argv list, never a shell string: argv[0] an absolute
  path with no placeholder, every argument one string.  The values go in
  as whole strings of one argument each, so no value can add an argument,
  and none reaches a shell unless the admin's own program passes it on.
- A placeholder is `{name}` with a name of SLOTS for that command; any other
  `{word}` is refused at load (a typo never runs as a literal).  Other
  braces (a JSON body) are left as they are.
- Values are checked before they are substituted: an address is one IP
  address in its canonical text (`checked_address`: no IPv6 scope, which
  Python accepts with any text after `%` -- quotes, spaces, `;` -- and no
  IPv4-mapped IPv6; the list command's output and the journal go through
  it too), a protocol tcp or udp, a port 1-65535,
  seconds a whole number of at least 1, a service a valid service name.
- A template whose program is a well-known shell given `-c` is refused
  at load: the values would be spliced into shell code.
- Pure: no I/O.  Raises ValueError (the config turns it into one line).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from spa.core.policy import Service
from spa.core.wire import IPAddress, is_valid_service_name

PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")
KEYED = ("address", "family", "protocol", "port", "service")  # what names one grant
SLOTS = {
    "allow": frozenset({*KEYED, "seconds", "until"}),
    "remove": frozenset(KEYED),
    "list": frozenset({"protocol", "port", "service"}),  # once per service
}
DEFAULT_TIMEOUT = 10.0  # seconds a command may run before its process group is killed
MAX_TIMEOUT = 300.0
DEFAULT_RETRIES = 3  # tries after the first that failed
MAX_RETRIES = 10
DEFAULT_BACKOFF = 1.0  # seconds before the first retry; doubled before each next one
MAX_ARGS = 64  # arguments in one template
MAX_ARG = 4096  # characters in one argument
SHELLS = frozenset({"sh", "bash", "dash", "zsh", "ksh", "mksh", "ash", "busybox", "fish",
                    "csh", "tcsh", "rbash"})  # a program of these with -c runs shell code


@dataclass(frozen=True, slots=True)
class CommandSpec:
    """[command] of the config: what runs, and how patiently."""
    allow: tuple[str, ...]
    remove: tuple[str, ...]
    list: tuple[str, ...] = ()  # empty: no list command (reconcile trusts the journal)
    timeout: float = DEFAULT_TIMEOUT
    retries: int = DEFAULT_RETRIES
    backoff: float = DEFAULT_BACKOFF
    journal: str = ""  # the journal file (absolute); "": command-grants.json in the state dir

    def programs(self) -> tuple[str, ...]:
        return tuple(argv[0] for argv in (self.allow, self.remove, self.list) if argv)


def check_template(kind: str, value: object) -> tuple[str, ...]:
    """A template as the config holds it.  Raises ValueError."""
    if isinstance(value, str):
        raise ValueError(f"{kind} must be a list of arguments, not one string (no shell runs "
                         f'it): e.g. {kind} = ["/usr/local/bin/router-{kind}", "{{address}}"]')
    if not isinstance(value, list) or not value or not all(isinstance(a, str) for a in value):
        raise ValueError(f"{kind} must be a non-empty list of strings")
    if len(value) > MAX_ARGS or any(len(arg) > MAX_ARG or "\0" in arg for arg in value):
        raise ValueError(f"{kind}: at most {MAX_ARGS} arguments of {MAX_ARG} characters, "
                         "no NUL")
    program = value[0]
    if not program.startswith("/") or PLACEHOLDER.search(program):
        raise ValueError(f"{kind}: the program must be an absolute path with no placeholder "
                         f"(got {program!r})")
    if runs_shell_code(value):
        raise ValueError(f"{kind}: {program} -c would run the values as shell code; name a "
                         "program (a script of yours) and pass the values as its arguments")
    for arg in value[1:]:
        for name in PLACEHOLDER.findall(arg):
            if name not in SLOTS[kind]:
                raise ValueError(f"{kind}: unknown placeholder {{{name}}}; {kind} may use "
                                 + ", ".join(f"{{{slot}}}" for slot in sorted(SLOTS[kind])))
    return tuple(value)


def runs_shell_code(argv: Sequence[str]) -> bool:
    """A well-known shell given -c (alone or among its options, before its
    first operand): its values would be spliced into shell code."""
    args = list(argv)
    while len(args) > 1 and args[0].rsplit("/", 1)[-1] in ("env", "busybox"):
        args = args[1:]  # env [NAME=value]... sh -c, busybox sh -c
        while len(args) > 1 and (args[0].startswith("-") or "=" in args[0]):
            args = args[1:]
    if args[0].rsplit("/", 1)[-1] not in SHELLS:
        return False
    for arg in args[1:]:
        if arg == "--" or not arg.startswith(("-", "+")):
            return False  # an operand (a script): what follows is its own
        if not arg.startswith("--") and "c" in arg[1:]:
            return True
    return False


def parse_spec(table: Mapping[str, object]) -> CommandSpec:
    """[command] as TOML gives it.  Raises ValueError."""
    unknown = sorted(set(table) - {"allow", "remove", "list", "timeout", "retries", "backoff",
                                   "journal"})
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r}")
    for needed in ("allow", "remove"):
        if needed not in table:
            raise ValueError(f"needs {needed} (an argv list)")
    timeout = table.get("timeout", DEFAULT_TIMEOUT)
    retries = table.get("retries", DEFAULT_RETRIES)
    backoff = table.get("backoff", DEFAULT_BACKOFF)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not (
            0 < timeout <= MAX_TIMEOUT):
        raise ValueError(f"timeout must be seconds, more than 0 and at most {MAX_TIMEOUT:.0f}")
    if isinstance(retries, bool) or not isinstance(retries, int) or not (
            0 <= retries <= MAX_RETRIES):
        raise ValueError(f"retries must be a whole number from 0 to {MAX_RETRIES}")
    if isinstance(backoff, bool) or not isinstance(backoff, int | float) or not (
            0 <= backoff <= 60):
        raise ValueError("backoff must be seconds from 0 to 60")
    journal = table.get("journal", "")
    if not isinstance(journal, str) or (journal and (
            not journal.startswith("/") or journal.endswith("/") or "\0" in journal)):
        raise ValueError("journal must be the absolute path of a file, e.g. "
                         '"/var/lib/spa-gate/command-grants.json"')
    listing = table.get("list")
    return CommandSpec(check_template("allow", table["allow"]),
                       check_template("remove", table["remove"]),
                       check_template("list", listing) if listing is not None else (),
                       float(timeout), retries, float(backoff), journal)


def values(address: IPAddress, service: Service, *, until: float | None = None,
           now: float | None = None) -> dict[str, str]:
    """The checked text of each placeholder for one grant.  Raises ValueError."""
    address = checked_address(address)
    if service.protocol not in ("tcp", "udp") or not 1 <= service.port <= 65535:
        raise ValueError(f"service {service.name}: not a tcp or udp port")
    if not is_valid_service_name(service.name):
        raise ValueError(f"service name {service.name!r} is not valid")
    found = {"address": str(address), "family": f"ipv{address.version}",
             "protocol": service.protocol, "port": str(service.port), "service": service.name}
    if until is not None and now is not None:
        found["seconds"] = str(max(1, round(until - now)))
        found["until"] = str(int(until))
    return found


def checked_address(value: object) -> IPAddress:
    """One host address in canonical text, as the templates may receive it:
    no IPv6 scope (`fe80::1%<any text>`, which Python accepts) and no
    IPv4-mapped IPv6.  The one check for values, the list command's output
    and the journal.  Raises ValueError."""
    address = ipaddress.ip_address(str(value))
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id is not None:
            raise ValueError("an IPv6 address with a scope (%...) is not a grant's address")
        if address.ipv4_mapped is not None:
            raise ValueError("an IPv4-mapped IPv6 address is not a grant's address")
    return address


def render(template: Sequence[str], filled: Mapping[str, str]) -> list[str]:
    """argv with each placeholder replaced by its value (a placeholder without
    a value: ValueError; check_template made that impossible for a loaded
    spec)."""
    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in filled:
            raise ValueError(f"no value for {{{name}}}")
        return filled[name]
    return [template[0], *(PLACEHOLDER.sub(one, arg) for arg in template[1:])]


def parse_listing(text: str) -> tuple[list[IPAddress], list[str]]:
    """The list command's output: one address per line (blank lines and
    lines starting with # skipped; a /32 or /128 is an address).  Returns
    the addresses and the lines that were none."""
    found: list[IPAddress] = []
    bad: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            network = ipaddress.ip_network(line, strict=True)
        except ValueError:
            bad.append(line[:80])
            continue
        try:
            if network.num_addresses != 1:
                raise ValueError("a network")
            found.append(checked_address(network.network_address))
        except ValueError:
            bad.append(line[:80])
    return found, bad
