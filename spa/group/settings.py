"""What a server's config says about its group (the `[group]` table).

Invariants (docs/groups.md):
- A value, parsed and checked by the config loader (spa/server/config.py);
  nothing here reads a file: the password file is read, and its mode
  checked (0600, the service user's), by the edge that opens the store.
- No group table, no group: `ServerConfig.group` is None and the server is
  the standalone one it always was (the default).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from spa.group.policy import DEFAULT_ON_STORE_DOWN, OnStoreDown

DEFAULT_TIMEOUT = 2.0  # seconds for one etcd call on one endpoint


@dataclass(frozen=True, slots=True)
class GroupSettings:
    """One member's view of its group: which group, who it is, how it reaches etcd."""

    name: str  # the group (spa.group.layout's group name rules)
    member: str  # this member's name in the group (layout's member name rules)
    endpoints: tuple[str, ...]  # https://host:2379, tried in this order
    ca_file: Path  # the etcd cluster's CA (verifies the etcd members)
    cert_file: Path  # this member's client certificate (no CN: docs/groups.md)
    key_file: Path  # its private key (0600)
    user: str  # this member's etcd user (RBAC: reads its group's prefix only)
    password_file: Path  # that user's password (0600), never in argv or a message
    on_store_down: OnStoreDown = DEFAULT_ON_STORE_DOWN
    timeout: float = DEFAULT_TIMEOUT
