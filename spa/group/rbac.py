"""The etcd roles a group needs, as etcdctl argv lists (docs/groups.md, "Access").

Invariants:
- The admin's role may read and write the group's prefix; every member's
  role may read it and write only claims/, leases/ and activated/; each
  member has a role of its own for its one key members/<member>.  No role
  reaches another group: every prefix is layout's, ending in '/'.
- Users are made with `--interactive=true` (etcdctl asks for the password on
  its terminal or standard input): no password is ever in these argv lists.
- Pure: names in, argv lists out (layout checks every name).
"""

from __future__ import annotations

from collections.abc import Sequence

from spa.group import layout
from spa.group.layout import Kind

MEMBER_WRITES = (Kind.CLAIM, Kind.LEASE, Kind.ACTIVATED)  # what every member may write


def admin_role(group: str) -> str:
    return f"spa-{layout.check_group(group)}-admin"


def member_role(group: str) -> str:
    return f"spa-{layout.check_group(group)}-member"


def own_role(group: str, member: str) -> str:
    """The role for one member's own member key."""
    return f"spa-{layout.check_group(group)}-m-{layout.check_member(member)}"


def admin_user(group: str) -> str:
    return f"{layout.check_group(group)}-admin"


def member_user(group: str, member: str) -> str:
    return f"{layout.check_group(group)}-{layout.check_member(member)}"


def role_commands(group: str, members: Sequence[str] = ()) -> list[list[str]]:
    """etcdctl's arguments (after `etcdctl` and its connection options) that
    make the group's roles, its admin user, and each member's user and roles.
    Raises GroupNameError for a bad name."""
    prefix = layout.group_prefix(group)
    admin, member = admin_role(group), member_role(group)
    commands = [["role", "add", admin],
                ["role", "grant-permission", admin, "--prefix=true", "readwrite", prefix],
                ["role", "add", member],
                ["role", "grant-permission", member, "--prefix=true", "read", prefix]]
    commands += [["role", "grant-permission", member, "--prefix=true", "readwrite",
                  layout.kind_prefix(group, kind)] for kind in MEMBER_WRITES]
    commands += [["user", "add", admin_user(group), "--interactive=true"],
                 ["user", "grant-role", admin_user(group), admin]]
    for name in members:
        own, user = own_role(group, name), member_user(group, name)
        commands += [["role", "add", own],
                     ["role", "grant-permission", own, "readwrite",
                      layout.member_key(group, name)],
                     ["user", "add", user, "--interactive=true"],
                     ["user", "grant-role", user, member],
                     ["user", "grant-role", user, own]]
    return commands
