"""The dashboard's login: password hash, lock-out, CSRF tokens (no I/O but
the password file's read and write; time is an argument).

- The password is stored as an Argon2id hash (libsodium's crypto_pwhash_str
  through PyNaCl; the string carries its own salt and cost), in the state
  directory, 0600, checked on load like every secret file, and never reached
  through a link (spa.server.safefs).  Root sets it only in a state
  directory root owns; where the service user owns it, that user sets it
  (sudo -u spa spa-server dashboard-password).
- Sessions are cookies signed with a random key kept beside the hash; setting
  a new password makes a new key, so every open session ends.
- Lock-out: after MAX_FAILURES wrong passwords in a row, logins are refused
  without checking anything for LOCK_SECONDS, doubling with each further
  failure up to LOCK_MAX.  It is global, not per source: the dashboard sits
  behind an ssh tunnel, where every request comes from loopback.  A locked-out
  admin still has the command line.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from pathlib import Path

import nacl.exceptions
import nacl.pwhash

from spa.server.errors import LocalError
from spa.server.safefs import open_dir, refuse_foreign_dir
from spa.server.secretfile import read_secret_file

PASSWORD_FILE = "dashboard.password"  # noqa: S105 (a file name) Argon2id hash string, then the cookie key (hex)
MIN_PASSWORD = 12
MAX_PASSWORD = 1024
MAX_FAILURES = 5
LOCK_SECONDS = 30.0
LOCK_MAX = 900.0
# libsodium's "moderate" cost: 256 MiB and 3 passes, about a second here.  An
# admin logs in rarely; a stolen hash costs an attacker as much per guess.
OPSLIMIT = nacl.pwhash.argon2id.OPSLIMIT_MODERATE
MEMLIMIT = nacl.pwhash.argon2id.MEMLIMIT_MODERATE


@dataclass(frozen=True, slots=True)
class Credentials:
    hash: bytes = b""  # b"$argon2id$v=19$m=...": never logged, never sent
    key: bytes = b""  # signs session cookies

    @property
    def fingerprint(self) -> str:
        """Changes with the password: kept in each session so a new password
        ends old sessions even if the key file were restored."""
        return hashlib.sha256(self.hash).hexdigest()[:16]

    def check(self, password: str) -> bool:
        try:
            return bool(nacl.pwhash.verify(self.hash, password.encode()))
        except nacl.exceptions.InvalidkeyError:
            return False


def check_new_password(password: str) -> None:
    """Raises LocalError (never quoting the password)."""
    if len(password) < MIN_PASSWORD:
        raise LocalError(f"the password is too short: use at least {MIN_PASSWORD} characters "
                         "(a passphrase of four or more words is easy to type)")
    if len(password) > MAX_PASSWORD:
        raise LocalError(f"the password is longer than {MAX_PASSWORD} characters")


def make_credentials(password: str, *, opslimit: int = OPSLIMIT,
                     memlimit: int = MEMLIMIT) -> Credentials:
    check_new_password(password)
    hashed = nacl.pwhash.argon2id.str(password.encode(), opslimit=opslimit, memlimit=memlimit)
    return Credentials(hashed, os.urandom(32))


def save(state_dir: Path, credentials: Credentials) -> Path:
    """Write the hash and the cookie key, 0600, as the state directory's
    owner (root in a directory another user owns is refused: that user runs
    it, and the dashboard, running as that user, can read the file).
    Raises LocalError."""
    path = state_dir / PASSWORD_FILE
    try:
        with open_dir(state_dir, create=True) as directory:
            refuse_foreign_dir(directory)
            directory.replace(PASSWORD_FILE, credentials.hash + b"\n"
                              + credentials.key.hex().encode() + b"\n")
    except PermissionError:
        raise LocalError(f"cannot write {path}: permission denied (run as root?)") from None
    except OSError as exc:
        raise LocalError(f"cannot write {path}: {exc.strerror}") from None
    return path


def load(state_dir: Path) -> Credentials:
    """Raises LocalError: not set, unsafe permissions, or damaged."""
    path = state_dir / PASSWORD_FILE
    try:
        raw = read_secret_file(path)
    except FileNotFoundError:
        raise LocalError("no dashboard password is set; set one with: spa-server "
                         "dashboard-password") from None
    except PermissionError:
        raise LocalError(f"cannot read {path}: permission denied (run as root?)") from None
    lines = raw.split(b"\n")
    try:
        key = bytes.fromhex(lines[1].decode("ascii"))
    except (IndexError, ValueError, UnicodeDecodeError):
        key = b""
    if not lines[0].startswith(b"$argon2id$") or len(key) != 32:
        raise LocalError(f"{path} is damaged; set the password again with: spa-server "
                         "dashboard-password")
    return Credentials(lines[0], key)


class LoginLimiter:
    """Consecutive failures -> a lock-out that doubles, up to LOCK_MAX."""

    def __init__(self) -> None:
        self.failures = 0
        self.locked_until = 0.0

    def wait(self, now: float) -> float:
        """Seconds until a login may be tried (0: now)."""
        return max(0.0, self.locked_until - now)

    def failed(self, now: float) -> None:
        self.failures += 1
        if self.failures >= MAX_FAILURES:
            extra = self.failures - MAX_FAILURES
            self.locked_until = now + min(LOCK_MAX, LOCK_SECONDS * 2 ** min(extra, 16))

    def succeeded(self) -> None:
        self.failures = 0
        self.locked_until = 0.0


def new_csrf_token() -> str:
    return os.urandom(24).hex()


def same_token(expected: object, given: object) -> bool:
    """Constant time; False unless both are non-empty strings."""
    if not isinstance(expected, str) or not isinstance(given, str) or not expected:
        return False
    return hmac.compare_digest(expected.encode(), given.encode())
