"""fwknopd's own files, read as fwknopd reads them: access.conf and fwknopd.conf.

Facts from fwknop's source (server/access.c parse_access_file,
server/config_init.c parse_config_file, common/common.h, server/access.h):
- A line whose first character is '#', ';' or a line end is skipped; any
  other line is NAME, whitespace, VALUE: the value runs to the first ';' or
  line end, trailing whitespace dropped, and a ':' ending NAME is dropped
  (`SOURCE: ANY`).  A NAME with no VALUE stops fwknopd (access.conf).
- access.conf: each stanza begins with SOURCE; lines before the first are
  ignored; a NAME given twice in a stanza keeps the last VALUE (KEY and
  KEY_BASE64 fill one key, as do HMAC_KEY and HMAC_KEY_BASE64).
  `%include FILE` reads FILE's stanzas there (at most MAX_DEPTH files deep),
  `%include_folder DIR` every `*.conf` in DIR, `%include_keys FILE` (inside a
  stanza) only the key settings of FILE.  After an %include the including
  file's stanza goes on taking its own lines, as in fwknopd.  (A relative
  path is taken from the including file's directory here; fwknopd takes it
  from the directory it was started in.)
- fwknopd.conf: the same lines, NAME one of fwknopd's settings.

Invariants:
- Reading goes through a `Files` (the one I/O edge: `DiskFiles`, or a fake in
  the tests): this module opens nothing itself.
- A file that cannot be read, is not text, or has no SOURCE at all raises
  LocalError in one line naming the file (and the line) and the fix.
- No value of a setting that holds a key (SECRET_SETTINGS) ever reaches an
  error message: a line is named by its file and number, and a NAME is shown
  only when it looks like one (`shown_name`).
- Order is kept: stanzas in the order fwknopd builds them (a folder's files
  sorted by name: fwknopd takes readdir's order, which nothing fixes).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from spa.server.errors import LocalError

MAX_DEPTH = 3  # fwknop's MAX_DEPTH (server/access.h): files deep, the first counted
MAX_FILE = 4 << 20  # bytes read of one file at most (a real access.conf is a few KB)
DEFAULT_ACCESS = Path("/etc/fwknop/access.conf")
DEFAULT_CONF = Path("/etc/fwknop/fwknopd.conf")
# settings whose value is a key or a password: never shown
SECRET_SETTINGS = frozenset({"KEY", "KEY_BASE64", "HMAC_KEY", "HMAC_KEY_BASE64",
                             "GPG_DECRYPT_PW"})
# what %include_keys takes from its file (server/access.c include_keys_file)
KEY_SETTINGS = frozenset({"KEY", "KEY_BASE64", "HMAC_KEY", "HMAC_KEY_BASE64",
                          "GPG_DECRYPT_ID", "GPG_DECRYPT_PW", "GPG_ALLOW_NO_PW",
                          "GPG_REQUIRE_SIG", "GPG_DISABLE_SIG", "GPG_IGNORE_SIG_VERIFY_ERROR",
                          "GPG_REMOTE_ID", "GPG_FINGERPRINT_ID"})
# fwknopd.conf's settings (server/cmd_opts.h config_map, fwknop 2.6.x and later)
_CONF_NAMES = """
CONFIG_FILE OVERRIDE_CONFIG FIREWALL_TYPE PCAP_INTF PCAP_FILE ENABLE_PCAP_PROMISC PCAP_FILTER
PCAP_DISPATCH_COUNT PCAP_LOOP_SLEEP ENABLE_PCAP_ANY_DIRECTION EXIT_AT_INTF_DOWN MAX_SNIFF_BYTES
ENABLE_SPA_PACKET_AGING MAX_SPA_PACKET_AGE ENABLE_DIGEST_PERSISTENCE RULES_CHECK_THRESHOLD
CMD_EXEC_TIMEOUT BLACKLIST ENABLE_SPA_OVER_HTTP ALLOW_ANY_USER_AGENT ENABLE_TCP_SERVER
TCPSERV_PORT ENABLE_UDP_SERVER UDPSERV_PORT UDPSERV_SELECT_TIMEOUT ENABLE_NFQ_CAPTURE
NFQ_INTERFACE NFQ_PORT NFQ_TABLE NFQ_CHAIN NFQ_QUEUE_NUMBER NFQ_LOOP_SLEEP LOCALE
SYSLOG_IDENTITY SYSLOG_FACILITY ENABLE_EXTERNAL_CMDS EXTERNAL_CMD_OPEN EXTERNAL_CMD_CLOSE
EXTERNAL_CMD_ALARM ENABLE_EXT_CMD_PREFIX EXT_CMD_PREFIX ENABLE_X_FORWARDED_FOR
ENABLE_DESTINATION_RULE ENABLE_RULE_PREPEND ENABLE_NAT_DNS ENABLE_FIREWD_FORWARDING
ENABLE_FIREWD_LOCAL_NAT ENABLE_FIREWD_SNAT SNAT_TRANSLATE_IP ENABLE_FIREWD_OUTPUT
FLUSH_FIREWD_AT_INIT FLUSH_FIREWD_AT_EXIT FIREWD_INPUT_ACCESS FIREWD_OUTPUT_ACCESS
FIREWD_FORWARD_ACCESS FIREWD_DNAT_ACCESS FIREWD_SNAT_ACCESS FIREWD_MASQUERADE_ACCESS
ENABLE_FIREWD_COMMENT_CHECK ENABLE_IPT_FORWARDING ENABLE_IPT_LOCAL_NAT ENABLE_IPT_SNAT
ENABLE_IPT_OUTPUT FLUSH_IPT_AT_INIT FLUSH_IPT_AT_EXIT IPT_INPUT_ACCESS IPT_OUTPUT_ACCESS
IPT_FORWARD_ACCESS IPT_DNAT_ACCESS IPT_SNAT_ACCESS IPT_MASQUERADE_ACCESS
ENABLE_IPT_COMMENT_CHECK FLUSH_IPFW_AT_INIT FLUSH_IPFW_AT_EXIT IPFW_START_RULE_NUM
IPFW_MAX_RULES IPFW_ACTIVE_SET_NUM IPFW_EXPIRE_SET_NUM IPFW_EXPIRE_PURGE_INTERVAL
IPFW_ADD_CHECK_STATE PF_ANCHOR_NAME PF_EXPIRE_INTERVAL FWKNOP_RUN_DIR FWKNOP_CONF_DIR
ACCESS_FILE ACCESS_FOLDER FWKNOP_PID_FILE DIGEST_FILE DIGEST_DB_FILE GPG_HOME_DIR GPG_EXE
SUDO_EXE FIREWALL_EXE VERBOSE AFL_PKT_FILE FAULT_INJECTION_TAG"""
CONF_SETTINGS = frozenset(_CONF_NAMES.split())
_SKIPPED_FIRST = "#;\r\n\0"  # fwknop's IS_EMPTY_LINE: the first character alone decides
_NAME = re.compile(r"%?[A-Z][A-Z0-9_]{0,39}\Z")


class Files(Protocol):
    """What reading fwknopd's files needs (DiskFiles; a dict in the tests)."""

    def read(self, path: Path) -> bytes:
        """At most MAX_FILE + 1 bytes of `path`.  Raises OSError."""
        ...

    def list_dir(self, path: Path) -> list[str]:
        """The names in a directory.  Raises OSError."""
        ...


class DiskFiles:
    """The real files (followed through links, as fwknopd follows them)."""

    def read(self, path: Path) -> bytes:
        with open(path, "rb") as handle:
            return handle.read(MAX_FILE + 1)

    def list_dir(self, path: Path) -> list[str]:
        return os.listdir(path)


@dataclass(frozen=True, slots=True)
class Where:
    """A line of a file, for messages."""

    file: Path
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True, slots=True)
class Setting:
    name: str
    value: str = field(repr=False)
    where: Where


@dataclass(frozen=True, slots=True)
class Stanza:
    """One access.conf stanza: its SOURCE line and its settings in order."""

    where: Where  # the SOURCE line
    source: str
    settings: tuple[Setting, ...]
    root: bool  # in the file given (not an included one)

    def get(self, name: str) -> str | None:
        """The last value given for `name` (None: not set)."""
        found = None
        for setting in self.settings:
            if setting.name == name:
                found = setting.value
        return found

    def last(self, *names: str) -> Setting | None:
        """The last setting among `names` (KEY or KEY_BASE64: one key)."""
        found = None
        for setting in self.settings:
            if setting.name in names:
                found = setting
        return found

    def names(self) -> list[str]:
        return list(dict.fromkeys(s.name for s in self.settings))


@dataclass(frozen=True, slots=True)
class FwknopdConf:
    path: Path
    settings: dict[str, str]  # the last value of each
    found: bool  # False: no file (the default path missing): fwknopd's defaults


def shown_name(name: str, where: Where) -> str:
    """A setting's NAME for a message, or its line when the NAME does not look
    like one (a key pasted alone on a line must never be echoed)."""
    return name if _NAME.match(name) else f"the setting on line {where.line}"


def split_line(raw: str) -> tuple[str, str] | None:
    """(NAME, VALUE) of a line as fwknopd's sscanf("%s %[^;\\n\\r]") reads it;
    None for a line it skips; ("NAME", "") for a NAME with no VALUE."""
    if not raw or raw[0] in _SKIPPED_FIRST or not raw.strip():
        return None
    parts = raw.split(None, 1)
    name = parts[0]
    if ":" in name:
        name = name[:name.rindex(":")]
    value = re.split(r"[;\r\n]", parts[1], maxsplit=1)[0].rstrip() if len(parts) > 1 else ""
    return name, value


def _failed(exc: OSError, path: Path, what: str) -> LocalError:
    """One line for a file that could not be read."""
    if isinstance(exc, FileNotFoundError):
        option = {"access file": "--access", "config file": "--conf"}.get(what)
        fix = f"give the right one with {option}" if option else "fix the line that names it"
        return LocalError(f"{what} {path} does not exist; {fix}")
    if isinstance(exc, PermissionError):
        return LocalError(f"cannot read {what} {path}: permission denied (fwknopd keeps it "
                          "0600 root: run as root)")
    if isinstance(exc, IsADirectoryError):
        return LocalError(f"{what} {path} is a directory; give the file")
    return LocalError(f"cannot read {what} {path}: {exc.strerror or exc}")


def _decode(raw: bytes, path: Path, what: str) -> str:
    """A file's text, bytes kept one to one.  Raises LocalError."""
    if len(raw) > MAX_FILE:
        raise LocalError(f"{path} is over {MAX_FILE >> 20} MB: not an fwknopd {what}")
    if b"\0" in raw:
        raise LocalError(f"{path} is not a text file: not an fwknopd {what}")
    return raw.decode("latin-1")


def _text(files: Files, path: Path, what: str) -> str:
    """Raises LocalError."""
    try:
        raw = files.read(path)
    except OSError as exc:
        raise _failed(exc, path, what) from None
    return _decode(raw, path, what)


@dataclass(slots=True)
class _Building:
    where: Where
    source: str
    root: bool
    settings: list[Setting] = field(default_factory=list)

    def done(self) -> Stanza:
        return Stanza(self.where, self.source, tuple(self.settings), self.root)


def read_access(path: Path, files: Files) -> list[Stanza]:
    """Every stanza of an access.conf and the files it includes, in order.
    Raises LocalError (unreadable, not text, a NAME with no VALUE, includes
    too deep, no SOURCE at all)."""
    found: list[_Building] = []
    _read_access(path, files, found, depth=1, root=True)
    if not found:
        raise LocalError(f"{path} has no SOURCE line: not an fwknopd access.conf (each "
                         "stanza begins with SOURCE); give the right file with --access")
    return [stanza.done() for stanza in found]


def _relative(base: Path, value: str) -> Path:
    target = Path(value)
    return target if target.is_absolute() else base.parent / target


def _read_access(path: Path, files: Files, found: list[_Building], *, depth: int,
                 root: bool) -> None:
    current: _Building | None = None
    for number, raw in enumerate(_text(files, path, "access file").splitlines(), 1):
        where = Where(path, number)
        parsed = split_line(raw)
        if parsed is None:
            continue
        name, value = parsed
        if not value:
            raise LocalError(f"{where}: {shown_name(name, where)} has no value (fwknopd "
                             "refuses this file too); fix or remove the line")
        if name in ("%include", "%include_folder"):
            if depth >= MAX_DEPTH:
                raise LocalError(f"{where}: {name} more than {MAX_DEPTH} files deep (fwknopd "
                                 "refuses it too); include the file from higher up")
            target = _relative(path, value)
            for child in (_folder(target, files, where) if name == "%include_folder"
                          else [target]):
                _read_access(child, files, found, depth=depth + 1, root=False)
        elif name == "SOURCE":
            current = _Building(where, value, root)
            found.append(current)
        elif current is None:
            continue  # fwknopd ignores what comes before the first SOURCE
        elif name == "%include_keys":
            current.settings.extend(_keys_file(_relative(path, value), files))
        else:
            current.settings.append(Setting(name, value, where))


def _folder(path: Path, files: Files, where: Where) -> list[Path]:
    """The files %include_folder reads: names ending in .conf (fwknopd: whose
    last '.' starts '.conf'), sorted."""
    try:
        names = files.list_dir(path)
    except OSError as exc:
        raise LocalError(f"{where}: cannot read the folder {path}: "
                         f"{exc.strerror or exc}") from None
    return [path / name for name in sorted(names)
            if "." in name and name[name.rindex("."):].startswith(".conf")]


def _keys_file(path: Path, files: Files) -> list[Setting]:
    """The key settings of an %include_keys file (the rest is ignored)."""
    found = []
    for number, raw in enumerate(_text(files, path, "keys file").splitlines(), 1):
        parsed = split_line(raw)
        if parsed is not None and parsed[0] in KEY_SETTINGS and parsed[1]:
            found.append(Setting(parsed[0], parsed[1], Where(path, number)))
    return found


def read_conf(path: Path, files: Files, *, required: bool) -> FwknopdConf:
    """fwknopd.conf's settings.  Without `required`, a missing file reads as
    fwknopd's defaults (found False).  Raises LocalError (unreadable, not
    text, an access.conf's settings, no fwknopd setting in a file that sets
    things)."""
    try:
        raw = files.read(path)
    except OSError as exc:
        if isinstance(exc, FileNotFoundError) and not required:
            return FwknopdConf(path, {}, found=False)
        raise _failed(exc, path, "config file") from None
    text = _decode(raw, path, "config file")
    settings: dict[str, str] = {}
    others = 0
    for number, line in enumerate(text.splitlines(), 1):
        parsed = split_line(line)
        if parsed is None or not parsed[1]:
            continue  # fwknopd skips a NAME without VALUE here, with a warning
        name, value = parsed
        if name in ("SOURCE", "OPEN_PORTS", "KEY_BASE64", "HMAC_KEY_BASE64"):
            raise LocalError(f"{path}:{number}: {name} belongs in an access.conf: this is "
                             "not fwknopd.conf; give that with --conf (or --access for this)")
        if name in CONF_SETTINGS:
            settings[name] = value
        else:
            others += 1
    if others and not settings:
        raise LocalError(f"{path} sets nothing fwknopd.conf has: not an fwknopd.conf; give "
                         "the right file with --conf")
    return FwknopdConf(path, settings, found=True)

