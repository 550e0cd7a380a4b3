"""Clients in and out of the store: the one-time migration from server.toml,
and export / import for configuration management.

Invariants (docs/operations.md, "Where clients live"):
- One format, two encodings: `{"clients": {NAME: {key: value}}}` as JSON or
  as TOML `[clients.NAME]` tables, with server.toml's keys; both are checked
  by the config's own client validation (one ConfigError line).
- The migration is keyed by name and ordered so that a crash anywhere loses
  nothing and moves nothing twice: (1) the original file is kept as
  `server.toml.pre-store` (0600; the first one is never overwritten),
  (2) the clients go into the store, a name already there keeps the store's
  entry (it is as new or newer), (3) server.toml is rewritten without them,
  only if it is still the file read in (1).  Re-running after a crash
  between (2) and (3) adds nothing and finishes (3).
- Import is idempotent: an entry equal to the store's writes nothing (no
  `changes` row); `prune` removes the names the file does not hold.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomlkit

from spa.server import config as config_mod
from spa.server.config import ClientEntry, ServerConfig
from spa.server.errors import ConfigError
from spa.store.clients import ClientStore

BACKUP_SUFFIX = ".pre-store"  # server.toml.pre-store: the file as it was before the migration
FORMATS = ("json", "toml")


@dataclass(frozen=True, slots=True)
class ImportResult:
    added: tuple[str, ...]
    updated: tuple[str, ...]
    removed: tuple[str, ...]


def migrate(path: Path, state_dir: Path, *, at: float) -> int:
    """Move server.toml's [clients] into the store (see the invariants);
    returns how many it found there (0: nothing to do).
    Raises ConfigError, LocalError."""
    with config_mod._editing(path) as edit:  # the config's lock: no edit runs meanwhile
        if not edit.config.clients:
            return 0
        backup = path.name + BACKUP_SUFFIX
        if edit.directory.lstat(backup) is None:
            # tomlkit gives back the bytes it parsed: the file as it is
            edit.directory.replace(backup, tomlkit.dumps(edit.doc).encode("utf-8"), mode=0o600)
        with ClientStore.open_as_owner(state_dir, create=True) as store:
            store.add_missing(edit.config.clients.values(), at=at)
        clients = edit.doc.get("clients")
        if clients is not None:
            del edit.doc["clients"]
        edit.doc.add("clients", tomlkit.table(is_super_table=True))
        edit.write()
        return len(edit.config.clients)


def entry_table(entry: ClientEntry) -> dict[str, Any]:
    """An entry as server.toml's keys (secrets in base64url)."""
    table: dict[str, Any] = {"secret": config_mod.b64encode(entry.secret),
                             "services": list(entry.services),
                             "allow_other_address": entry.allow_other_address,
                             "revoked": entry.revoked, "enrolled": entry.enrolled}
    for key in ("enroll_by", "otp_secret", "endpoint", "old_until"):
        if getattr(entry, key):
            table[key] = getattr(entry, key)
    if entry.close_leases:
        table["close_leases"] = True
    if entry.old_secret:
        table["old_secret"] = config_mod.b64encode(entry.old_secret)
    if entry.sources:
        table["sources"] = list(entry.sources)
    if entry.kind != config_mod.KIND_SPA:
        del table["secret"]
        table["kind"] = entry.kind
        table["fwknop_key"] = config_mod.b64encode(entry.fwknop_key)
        table["fwknop_hmac_key"] = config_mod.b64encode(entry.fwknop_hmac_key)
    return table


def render(entries: Iterable[ClientEntry], fmt: str) -> str:
    """The export file's text (it holds secrets: write it 0600).
    Raises ConfigError (an unknown format)."""
    data = {"clients": {entry.name: entry_table(entry) for entry in entries}}
    if fmt == "json":
        return json.dumps(data, indent=2, sort_keys=True) + "\n"
    if fmt == "toml":
        return tomlkit.dumps(data)
    raise ConfigError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")


def parse(where: Path, text: str, config: ServerConfig) -> dict[str, ClientEntry]:
    """An export file's clients, checked as server.toml's are (JSON if it
    starts with '{', else TOML).  Raises ConfigError."""
    try:
        data = json.loads(text) if text.lstrip().startswith("{") else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{where} is neither JSON nor TOML: {exc}") from None
    if not isinstance(data, dict) or set(data) - {"clients"}:
        raise ConfigError(f'{where}: expected {{"clients": {{NAME: {{...}}}}}} or '
                          "[clients.NAME] tables, as `spa-server clients export` writes")
    return config_mod._clients(where, data, config.services)


def import_entries(store: ClientStore, entries: Mapping[str, ClientEntry], *, prune: bool,
                   at: float) -> ImportResult:
    """Make the store hold `entries` (and, with `prune`, only them)."""
    added: list[str] = []
    updated: list[str] = []
    removed: list[str] = []
    for name, entry in sorted(entries.items()):
        before = store.get(name)
        if store.put(entry, at=at):
            (added if before is None else updated).append(name)
    if prune:
        for entry in list(store.all()):
            if entry.name not in entries and store.remove(entry.name, at=at):
                removed.append(entry.name)
    return ImportResult(tuple(added), tuple(updated), tuple(removed))
