"""Client profiles: one enrollment per server, stored 0600 in the config dir.

Invariants:
- A profile file holds a secret: written 0600 atomically in a 0700 directory,
  and refused on load when group or others may read it.
- Errors are one line (ProfileError) that never quotes the secret.
- A profile's default name is its server's host; an IPv6 literal, which no
  profile name can spell, is written with '-' for ':' and a leading '::' as
  '0::' (fd10:210::1 -> fd10-210--1, ::1 -> 0--1): one name per address,
  read back by turning '-' into ':'.
- Beside each profile, `NAME.opened` records when a knock of this profile last
  opened its port (no secret; also 0600; best effort: a failure to record never
  fails the knock).  Saving a different enrollment under the name, or
  forgetting it, removes the record: it speaks of one enrollment only.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path

from spa.core.errors import FormatError
from spa.core.uri import Enrollment, parse, render

ENV_DIR = "SPA_CLIENT_DIR"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}\Z")


class ProfileError(Exception):
    """A local problem with profiles; the message says how to fix it."""


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    enrollment: Enrollment


def default_name(host: str) -> str:
    """The profile name `enroll` picks for a server host (normalized, as an
    Enrollment holds it): the host itself, an IPv6 literal made safe."""
    if ":" not in host:
        return host
    return ("0" + host if host.startswith(":") else host).replace(":", "-")


def same_host(host: str, wanted: str) -> bool:
    """Whether an enrollment's host is `wanted` as a user typed it: any case,
    an IPv6 address in brackets or in any of its spellings."""
    text = wanted.strip().removeprefix("[").removesuffix("]")
    try:
        return host == str(ipaddress.ip_address(text))
    except ValueError:
        return host == text.lower()


def default_dir() -> Path:
    """$SPA_CLIENT_DIR, else the user's config directory (`user_dir`)."""
    env = os.environ.get(ENV_DIR)
    if env:
        return Path(env)
    return user_dir()


def user_dir() -> Path:
    """Where profiles live when nothing says otherwise (platformdirs: e.g.
    ~/.config/spa-client on Linux)."""
    import platformdirs

    return Path(platformdirs.user_config_dir("spa-client"))


class ProfileStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.profiles = directory / "profiles"

    def save(self, name: str, enrollment: Enrollment) -> Path:
        """Store (or replace the same enrollment).  Raises ProfileError."""
        if not _NAME_RE.match(name):
            raise ProfileError(f"profile name {name!r}: use letters, digits, '.', '_', '@', "
                               "'-' (start with a letter or digit)")
        path = self.profiles / f"{name}.toml"
        if path.exists():
            old = self.load(name)
            same = (old.enrollment.server_id == enrollment.server_id
                    and old.enrollment.client == enrollment.client)
            if not same:
                raise ProfileError(f"a profile named {name!r} exists for another enrollment; "
                                   "pick another with --name")
        text = f'# spa-client profile: holds a secret, keep it 0600\nuri = "{render(enrollment)}"\n'
        changed = not path.exists() or path.read_text() != text
        try:
            self.profiles.mkdir(parents=True, exist_ok=True, mode=0o700)
            import tempfile  # only when saving: keeps `open`'s start-up short

            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=self.profiles)
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
            os.replace(tmp, path)
        except OSError as exc:
            raise ProfileError(f"cannot write {path}: {exc.strerror}") from None
        if changed:
            self._forget_opened(name)
        return path

    def load(self, name: str) -> Profile:
        """Raises ProfileError (missing, unsafe permissions, damaged)."""
        path = self.profiles / f"{name}.toml"
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            raise ProfileError(f"no profile {name!r}; enroll first: spa-client enroll URI"
                               ) from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ProfileError(f"{path} holds a secret but group or others may read it; "
                               f"fix it with: chmod 600 {path}")
        try:
            data = tomllib.loads(path.read_text())
            return Profile(name, parse(str(data["uri"])))
        except (tomllib.TOMLDecodeError, KeyError, UnicodeDecodeError):
            raise ProfileError(f"{path} is damaged; enroll again") from None
        except FormatError as exc:
            raise ProfileError(f"{path}: {exc}; enroll again") from None

    def forget(self, host: str) -> Path:
        """Delete the profile `find(host)` names; returns its path.  Raises ProfileError."""
        profile = self.find(host)
        path = self.profiles / f"{profile.name}.toml"
        try:
            path.unlink()
        except OSError as exc:
            raise ProfileError(f"cannot remove {path}: {exc.strerror}") from None
        self._forget_opened(profile.name)
        return path

    def record_opened(self, name: str, when: float) -> bool:
        """Note that a knock of profile `name` opened its port at `when` (Unix
        time).  Cheap (no import, one small 0600 file replaced atomically) and
        best effort: False when it could not be written."""
        path = self.profiles / f"{name}.opened"
        tmp = self.profiles / f".{name}.opened.{os.getpid()}"
        text = ("# spa-client: when this profile last opened its port (no secret)\n"
                f"last_opened = {int(when)}\n")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as handle:
                os.fchmod(fd, 0o600)
                handle.write(text)
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            return False
        return True

    def last_opened(self, name: str) -> float | None:
        """When a knock of profile `name` last opened its port, if recorded."""
        try:
            data = tomllib.loads((self.profiles / f"{name}.opened").read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            return None
        when = data.get("last_opened")
        return float(when) if isinstance(when, int) and when > 0 else None

    def _forget_opened(self, name: str) -> None:
        try:
            (self.profiles / f"{name}.opened").unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise ProfileError(f"cannot remove {self.profiles / name}.opened: "
                               f"{exc.strerror}") from None

    def names(self) -> list[str]:
        if not self.profiles.is_dir():
            return []
        return sorted(p.stem for p in self.profiles.glob("*.toml"))

    def find(self, host: str) -> Profile:
        """The profile named `host`, else the one whose server is `host`."""
        if host in self.names():
            return self.load(host)
        matches = [p for p in (self.load(n) for n in self.names())
                   if same_host(p.enrollment.host, host)]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise ProfileError(f"several profiles are for {host}: "
                               f"{', '.join(p.name for p in matches)}; name one of them")
        known = ", ".join(self.names()) or "none yet"
        raise ProfileError(f"no profile for {host!r} (profiles: {known}); "
                           "enroll first: spa-client enroll URI")
