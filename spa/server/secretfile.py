"""Files that hold secrets: written 0600 atomically, refused when too open.

Invariants (docs/threat-model.md, "Secrets at rest" and "Links the service
user plants"):
- A secret file is written to a new file created 0600 under an unguessable
  name in the same directory, flushed, fsynced and renamed over the target
  (spa.server.safefs): a reader sees the old or the new content, never half,
  and the content is never readable by group or others, not even for a
  moment.  An existing file's owner is kept (root editing the config of a
  service that runs as user `spa`).  A link at the name is replaced, never
  followed.
- A secret file is read through a descriptor opened without following a link
  and checked by fstat: a regular file with one link, that group and others
  may neither read nor write (the message names the file and the `chmod`
  that fixes it).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from spa.server.errors import LocalError
from spa.server.safefs import Directory, open_dir


class UnsafePermissionsError(LocalError):
    pass


def check_private(path: Path, found: os.stat_result) -> None:
    """Raise UnsafePermissionsError unless only the owner may read or write
    the file `found` describes."""
    if found.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UnsafePermissionsError(
            f"{path} holds secrets but is accessible to group or others "
            f"(mode {stat.S_IMODE(found.st_mode):04o}); fix it with: chmod 600 {path}"
        )


def read_secret(directory: Directory, name: str) -> tuple[bytes, os.stat_result]:
    """A secret file in `directory` and its fstat, after the checks above.

    Raises FileNotFoundError, PermissionError, UnsafeFileError,
    UnsafePermissionsError."""
    data, found = directory.read(name)
    check_private(directory.path / name, found)
    return data, found


def read_secret_file(path: Path) -> bytes:
    """`read_secret` by path.  Raises as `read_secret`."""
    with open_dir(path.parent) as directory:
        return read_secret(directory, path.name)[0]


def write_private(path: Path, data: bytes, *, mode: int = 0o600,
                  owner: tuple[int, int] | None = None) -> None:
    """Atomically replace `path` with `data`, created with `mode` (0600);
    with `owner` (uid, gid), owned by them from before it takes the name (no
    chown after the rename, which a symlink swapped in could redirect).

    Raises OSError, UnsafeFileError (the caller adds context)."""
    with open_dir(path.parent, create=True) as directory:
        directory.replace(path.name, data, mode=mode, owner=owner)
