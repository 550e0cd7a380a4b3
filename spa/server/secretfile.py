"""Files that hold secrets: written 0600 atomically, refused when too open.

Invariants (docs/threat-model.md, "Secrets at rest"):
- A secret file is written to a temporary file created 0600 in the same
  directory, flushed, fsynced and renamed over the target: a reader sees the
  old or the new content, never half, and the content is never readable by
  group or others, not even for a moment.  An existing file's owner is kept
  (root editing the config of a service that runs as user `spa`).
- `read_secret_file` refuses a file that group or others may read or write,
  with a message that names the file and the `chmod` that fixes it.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

from spa.server.errors import LocalError


class UnsafePermissionsError(LocalError):
    pass


def check_private(path: Path) -> None:
    """Raise UnsafePermissionsError unless only the owner may read or write `path`."""
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UnsafePermissionsError(
            f"{path} holds secrets but is accessible to group or others "
            f"(mode {stat.S_IMODE(mode):04o}); fix it with: chmod 600 {path}"
        )


def read_secret_file(path: Path) -> bytes:
    """Read a secret file after checking its permissions.

    Raises FileNotFoundError, PermissionError, UnsafePermissionsError.
    """
    with open(path, "rb") as handle:
        mode = os.fstat(handle.fileno()).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            check_private(path)
        return handle.read()


def write_private(path: Path, data: bytes, *, mode: int = 0o600,
                  owner: tuple[int, int] | None = None) -> None:
    """Atomically replace `path` with `data`, created with `mode` (0600);
    with `owner` (uid, gid), owned by them from before it takes the name (no
    chown after the rename, which a symlink swapped in could redirect).

    Raises OSError (the caller turns it into a LocalError with context).
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        existing: os.stat_result | None = path.stat()
    except FileNotFoundError:
        existing = None
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        if owner is not None:
            os.fchown(fd, *owner)
        elif existing is not None and (existing.st_uid, existing.st_gid) != (
                os.geteuid(), os.getegid()):
            # keep the owner (e.g. the `spa` service user) when root edits the file
            with contextlib.suppress(PermissionError):
                os.fchown(fd, existing.st_uid, existing.st_gid)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
