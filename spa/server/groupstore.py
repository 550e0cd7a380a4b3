"""The edge that opens a group's store: from the [group] table (and, for the
admin commands, an admin's etcd login) to a kv.KV on the etcd cluster.

Invariants (docs/groups.md, "Access"; docs/threat-model.md, "Secrets at rest"):
- The password file is read through a descriptor opened without following a
  link, checked by fstat: a regular file with one link, owned by this
  process's user (root may read any owner's), that group and others may
  neither read nor write.  The client key file gets the same checks.  The
  password is never put in a message, a log line or argv.
- Every failure is a LocalError of one line saying what to fix: a missing or
  unsafe file, the group library missing, etcd unreachable (naming the
  endpoints tried), a refused login or permission (naming the user and the
  prefix), a missing or damaged meta record, a server id that is not the
  group's.
- A group member's server id is its group's (the meta record); the config's
  [server] server_id must equal it (`check_server_id`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from spa.group.codec import RecordError
from spa.group.kv import KV, StoreError, StorePermissionError, StoreUnavailableError
from spa.group.layout import group_prefix, meta_key
from spa.group.records import GroupMeta, decode_meta
from spa.group.settings import GroupSettings
from spa.server.errors import ConfigError, LocalError
from spa.server.safefs import open_dir
from spa.server.secretfile import check_private

if TYPE_CHECKING:
    from spa.group.etcd import EtcdAccess
    from spa.server.config import ServerConfig

MAX_PASSWORD = 1024  # bytes of an etcd password file (one line)
GROUP_EXTRA_HINT = ("install the group extra: pip install 'spa[group]' (Debian: apt install "
                    "python3-etcd3gw)")


@dataclass(frozen=True, slots=True)
class Login:
    """An etcd user and its password (the admin's, or a member's)."""

    user: str
    password: str = field(repr=False)


def read_password(path: Path, what: str = "etcd password file") -> str:
    """The password a file holds (its first line), after the checks above.
    Raises LocalError."""
    data = _read_private(path, what)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise LocalError(f"{what} {path} is not UTF-8 text; write the password on one "
                         "line") from None
    lines = text.splitlines()
    password = lines[0] if lines else ""
    if not password or len(data) > MAX_PASSWORD or any(line.strip() for line in lines[1:]):
        raise LocalError(f"{what} {path}: write the password alone on one line (at most "
                         f"{MAX_PASSWORD} bytes)")
    return password


def _read_private(path: Path, what: str) -> bytes:
    """A secret file's bytes: no link, one link count, ours, 0600.  Raises LocalError."""
    try:
        with open_dir(path.parent) as directory:
            fd = directory.open(path.name, os.O_RDONLY, mine=True)
            with open(fd, "rb") as handle:
                check_private(path, os.fstat(handle.fileno()))
                return handle.read(MAX_PASSWORD * 64 + 1)
    except FileNotFoundError:
        raise LocalError(f"{what} {path} does not exist; create it (chmod 600) or fix the "
                         "path") from None
    except PermissionError:
        raise LocalError(f"cannot read {what} {path}: permission denied (run as root or as "
                         "its owner)") from None
    except LocalError:
        raise
    except OSError as exc:
        raise LocalError(f"cannot read {what} {path}: {exc.strerror}") from None


def _check_readable(path: Path, what: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        raise LocalError(f"{what} {path} does not exist; fix the path in [group] (or the "
                         "option)") from None
    except OSError as exc:
        raise LocalError(f"cannot read {what} {path}: {exc.strerror}") from None


def access(settings: GroupSettings, login: Login | None = None) -> EtcdAccess:
    """How to reach the group's etcd: the [group] table's endpoints and TLS
    files, as its member's user (read from its password file) or as `login`
    (an admin).  Raises LocalError."""
    try:
        from spa.group.etcd import EtcdAccess
    except ImportError:
        raise LocalError(f"a group needs the etcd3gw library: {GROUP_EXTRA_HINT}") from None
    _check_readable(settings.ca_file, "etcd CA file")
    _check_readable(settings.cert_file, "etcd client certificate")
    _read_private(settings.key_file, "etcd client key")
    if login is None:
        login = Login(settings.user, read_password(settings.password_file))
    return EtcdAccess(settings.endpoints, settings.ca_file, settings.cert_file,
                      settings.key_file, user=login.user, password=login.password,
                      timeout=settings.timeout)


def connect(settings: GroupSettings, login: Login | None = None) -> KV:
    """The group's store (see `access`).  The admin commands and the daemon
    call this one function, so a test can give them the fake instead.
    Raises LocalError."""
    checked = access(settings, login)  # first: says in one line when etcd3gw is missing
    from spa.group.etcd import EtcdStore

    return EtcdStore(checked)


def connect_one(settings: GroupSettings, endpoint: str, login: Login | None = None) -> KV:
    """The store through one endpoint only (group status asks each).
    Raises LocalError."""
    from dataclasses import replace

    checked = access(settings, login)
    from spa.group.etcd import EtcdStore

    return EtcdStore(replace(checked, endpoints=(endpoint,)))


def _one_line(text: str) -> str:
    return " ".join(text.split())


def describe_store_error(exc: StoreError, settings: GroupSettings, user: str) -> str:
    """One line for an operator: what etcd said, and what to check."""
    said = _one_line(str(exc))
    if isinstance(exc, StoreUnavailableError):
        return (f"{said}; check that etcd runs at {', '.join(settings.endpoints)} and has a "
                "quorum ([group] endpoints)")
    if isinstance(exc, StorePermissionError):
        return (f"{said}: etcd user {user!r} has no such right on "
                f"{group_prefix(settings.name)} (docs/install.md, \"A group on etcd\")")
    return said


@contextlib.contextmanager
def store_errors(settings: GroupSettings, user: str) -> Iterator[None]:
    """StoreError (and a bad record) as one LocalError line."""
    try:
        yield
    except StoreError as exc:
        raise LocalError(describe_store_error(exc, settings, user)) from None
    except RecordError as exc:
        raise LocalError(f"group {settings.name}: a record in etcd is damaged or of a newer "
                         f"version: {exc}") from None


def read_meta(kv: KV, settings: GroupSettings, user: str) -> GroupMeta:
    """The group's meta record.  Raises LocalError (none: the group does not
    exist; damaged; etcd unreachable or refusing)."""
    with store_errors(settings, user):
        item = kv.get(meta_key(settings.name).encode())
        if item is None:
            raise LocalError(f"group {settings.name} does not exist in etcd (no "
                             f"{meta_key(settings.name)}); create it with: spa-server group "
                             "init")
        meta = decode_meta(item.value)
    if meta.group != settings.name:
        raise LocalError(f"{meta_key(settings.name)} names group {meta.group!r}; it was "
                         "written by hand: write it again with spa-server group init")
    return meta


def check_server_id(config: ServerConfig, meta: GroupMeta) -> None:
    """Refuse a member whose [server] server_id is not its group's.
    Raises ConfigError."""
    if config.server_id != meta.server_id:
        raise ConfigError(f"{config.path}: [server] server_id is not group {meta.group}'s "
                          "(its meta record in etcd holds another); set it with: spa-server "
                          f"group join --group {meta.group} ... (or remove [group] to run "
                          "standalone)")
