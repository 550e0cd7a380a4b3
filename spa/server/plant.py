"""Root never uses a state directory that another user could have made first.

Invariants (docs/threat-model.md, "Links the service user plants"; issue 16's
review, F2):
- Run as root, a command that uses the state directory (init, run, gate,
  the client store's commands) first checks who could have put it there:
  the nearest existing directory above it (its parent, or the ancestor the
  missing ones would be made in) is owned by a trusted user and writable by
  its owner alone (no group or other write bit, sticky or not: in a 1777
  directory like /tmp anyone can make the name first, and root would then
  read that user's leases and run the daemon as that user).
- An existing state directory is owned by a trusted user: root, the config
  file's owner, or a service user (privsep.SERVICE_USERS: `run` hands a
  directory root made to the first of them that exists).
- Anyone but root: nothing is checked (a user's try-out is that user's).
- A refusal is one LocalError line naming the directory, who could write
  it, and the fix; nothing has been written when it is raised.
"""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

from spa.server.errors import LocalError
from spa.server.privsep import SERVICE_USERS
from spa.server.safefs import user_name

OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH  # 0o022


def trusted_uids(config_owner: int) -> frozenset[int]:
    """Root, the config file's owner and the service users that exist."""
    found = {0, config_owner}
    for name in SERVICE_USERS:
        try:
            found.add(pwd.getpwnam(name).pw_uid)
        except KeyError:
            continue
    return frozenset(found)


def config_owner(config: Path) -> int:
    """The config file's owner (this process's user for one not made yet)."""
    try:
        return os.stat(config).st_uid
    except FileNotFoundError:
        return os.geteuid()


def refuse_planted_state_dir(state_dir: Path, *, config: Path) -> None:
    """As root: raise LocalError if `state_dir` (existing or about to be
    made) could have been made by a user other than root, the config's
    owner or a service user (see the invariants).  Anyone else: nothing."""
    if os.geteuid() != 0:
        return
    state_dir = state_dir.absolute()
    trusted = trusted_uids(config_owner(config))
    above = _nearest_existing(state_dir.parent)
    st = os.stat(above)  # (its own parents are followed, as safefs does)
    if st.st_uid not in trusted or st.st_mode & OTHERS_WRITE:
        writers = (f"mode {stat.S_IMODE(st.st_mode):04o}" if st.st_mode & OTHERS_WRITE
                   else f"owned by {user_name(st.st_uid)} (uid {st.st_uid})")
        raise LocalError(
            f"state directory {state_dir} would be in {above}, which other users may write "
            f"in ({writers}): any of them could make {state_dir.name} first, and root would "
            "trust it; set state_dir (or init --state-dir) to a directory under one only "
            f"root may write in, e.g. {Path('/var/lib/spa')}")
    try:
        found = os.stat(state_dir, follow_symlinks=False)
    except FileNotFoundError:
        return
    if found.st_uid not in trusted:
        who = user_name(found.st_uid)
        raise LocalError(
            f"state directory {state_dir} is owned by {who} (uid {found.st_uid}), neither "
            f"root, the config's owner nor a service user ({', '.join(SERVICE_USERS)}): "
            "root will not trust what another user may have put there; remove it, or "
            f"chown root: {state_dir} if its files are yours")


def _nearest_existing(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists."""
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path
