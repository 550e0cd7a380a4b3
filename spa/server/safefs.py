"""Files in the config and state directories, reached without following a link.

Invariants (docs/threat-model.md, "Links the service user plants"):
- A directory is opened with O_DIRECTORY|O_NOFOLLOW and checked by fstat;
  every file in it is then named relative to that descriptor with O_NOFOLLOW:
  a symbolic link at a file's name, or at the directory's own name, is
  refused, never followed.  (The directory's parents are followed: on a real
  install they are root's, /etc and /var/lib.)
- Every file opened is checked by fstat on its own descriptor: a regular
  file with one link (a FIFO, a device, a directory or a second name for a
  file spa did not put there is refused).  Opens never block: O_NONBLOCK
  keeps a FIFO planted at a name from stalling us (it means nothing for a
  regular file).
- `Directory.replace` writes a new file under an unguessable name
  (O_CREAT|O_EXCL|O_NOFOLLOW, with its final mode and owner from the start),
  fsyncs it and renames it over the name relative to the directory: the name
  then holds the old file or the new one, and a link that was at the name is
  replaced, its target untouched.
- `refuse_foreign_dir`: a root process writes only in directories root
  owns.  In a directory another user owns, that user may rename, replace and
  link any entry between two of root's system calls, so root does not write
  there at all.  Reading there stays allowed, under the checks above.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from spa.server.errors import LocalError

# every open in these directories: never through a link, never kept by a
# child process, never a controlling terminal, never blocking on a FIFO
_SAFE = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
_TEMP_TRIES = 8  # fresh random names tried for a replacement (64 bits each)
NEVER = "spa never follows links in its config or state directory"


class UnsafeFileError(LocalError):
    """A link, a hard link or something other than a regular file (or a
    directory) at a name spa uses."""


class ForeignDirectoryError(LocalError):
    """Root was asked to write in a directory another user owns."""


@dataclass(frozen=True, slots=True)
class Stamp:
    """One version of one file: which inode, and what a write changes."""
    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, found: os.stat_result) -> Stamp:
        return cls(found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns)


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"#{uid}"  # what sudo -u takes for a uid without a name


def check_file(where: Path, found: os.stat_result, *, owner: int | None = None) -> None:
    """Raise UnsafeFileError unless `found` (an fstat, or an lstat) is a
    regular file with one link (and, with `owner`, owned by that uid)."""
    if stat.S_ISLNK(found.st_mode):
        raise UnsafeFileError(f"cannot open {where}: it is a symbolic link ({NEVER}); "
                              "remove it")
    if stat.S_ISDIR(found.st_mode):
        raise UnsafeFileError(f"{where} is a directory, not a file; remove it or name "
                              "another file")
    if not stat.S_ISREG(found.st_mode):
        raise UnsafeFileError(f"{where} is not a regular file (a FIFO or a device); remove it")
    if found.st_nlink != 1:
        raise UnsafeFileError(f"{where} has {found.st_nlink} hard links ({NEVER}, nor reads "
                              "a file under a second name); remove this name")
    if owner is not None and found.st_uid != owner:
        raise UnsafeFileError(f"{where} belongs to {user_name(found.st_uid)}, not to "
                              f"{user_name(owner)} who writes it; remove it")


class Directory:
    """An open directory; files are named relative to it (see the invariants)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd
        self.stat = os.fstat(fd)

    def __enter__(self) -> Directory:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def lstat(self, name: str) -> os.stat_result | None:
        """What is at `name` (a link itself, not its target); None: nothing."""
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def open(self, name: str, flags: int, mode: int = 0o600, *, mine: bool = False) -> int:
        """os.open of `name` in this directory, checked (see `check_file`;
        `mine`: owned by this process's user, unless it is root).

        Raises FileNotFoundError, PermissionError, UnsafeFileError, OSError."""
        where = self.path / name
        try:
            fd = os.open(name, flags | _SAFE, mode, dir_fd=self.fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafeFileError(f"cannot open {where}: it is a symbolic link ({NEVER}); "
                                      "remove it") from None
            if exc.errno == errno.ENXIO:  # a FIFO without a reader, opened to write
                raise UnsafeFileError(f"{where} is not a regular file (a FIFO or a device); "
                                      "remove it") from None
            raise
        try:
            euid = os.geteuid()
            check_file(where, os.fstat(fd), owner=euid if mine and euid != 0 else None)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def read(self, name: str) -> tuple[bytes, os.stat_result]:
        """The whole file and its fstat.  Raises as `open`."""
        fd = self.open(name, os.O_RDONLY)
        with open(fd, "rb") as handle:
            return handle.read(), os.fstat(handle.fileno())

    def truncate(self, name: str) -> None:
        """Empty `name` if it is there (never through a link)."""
        try:
            fd = self.open(name, os.O_WRONLY, mine=True)
        except FileNotFoundError:
            return
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)

    def rename(self, old: str, new: str) -> None:
        """Rename within this directory (a link at either name is moved or
        replaced as a link, never followed).  Raises FileNotFoundError, OSError."""
        os.rename(old, new, src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def unlink(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self.fd)

    def replace(self, name: str, data: bytes, *, mode: int = 0o600,
                owner: tuple[int, int] | None = None) -> None:
        """Atomically put a new file with `data` at `name`, created `mode`
        and, with `owner` (uid, gid), owned by them before it takes the name;
        without, a regular file's owner at the name is kept when we may (root
        editing the config of a service that runs as `spa`).  Raises OSError."""
        if owner is None:
            existing = self.lstat(name)
            if (existing is not None and stat.S_ISREG(existing.st_mode)
                    and (existing.st_uid, existing.st_gid) != (os.geteuid(), os.getegid())):
                owner = (existing.st_uid, existing.st_gid)
        temp, fd = self._new_temp(name, mode)
        try:
            os.fchmod(fd, mode)
            if owner is not None:
                with contextlib.suppress(PermissionError):
                    os.fchown(fd, *owner)
            with open(fd, "wb", closefd=False) as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.close(fd)
            fd = -1
            self.rename(temp, name)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            self.unlink(temp)
            raise

    def _new_temp(self, name: str, mode: int) -> tuple[str, int]:
        for _ in range(_TEMP_TRIES):
            temp = f".{name}.{secrets.token_hex(8)}"
            try:
                return temp, os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _SAFE, mode,
                                     dir_fd=self.fd)
            except FileExistsError:
                continue
        raise UnsafeFileError(f"cannot write {self.path / name}: {_TEMP_TRIES} random "
                              "temporary names were all taken; something is filling "
                              f"{self.path}")


def open_dir(path: Path, *, create: bool = False) -> Directory:
    """Open the directory at `path` (never through a link at its own name);
    with `create`, make it first (0700, and its missing parents).

    Raises FileNotFoundError, PermissionError, UnsafeFileError, OSError."""
    if create:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _SAFE)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFileError(f"{path} is a symbolic link ({NEVER}); name the directory "
                                  "it points to instead") from None
        if exc.errno == errno.ENOTDIR:
            raise UnsafeFileError(f"{path} is not a directory") from None
        raise
    return Directory(path, fd)


def refuse_foreign_dir(directory: Directory) -> None:
    """Raise ForeignDirectoryError when this process is root and another
    user owns `directory` (see the invariants).  Every root process that
    writes in the config or the state directory calls this first."""
    uid = directory.stat.st_uid
    if os.geteuid() != 0 or uid == 0:
        return
    who = user_name(uid)
    raise ForeignDirectoryError(
        f"{directory.path} is owned by {who} (uid {uid}); root will not write in a directory "
        f"another user controls: run this as {who} (sudo -u {who} spa-server ...) or make "
        f"root own it (chown root: {directory.path})")
