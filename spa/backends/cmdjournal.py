"""The command backend's journal: every grant it may have added to the
other firewall, kept on disk so a restart (after a crash too) still
removes what it added (docs/backends.md, "What the daemon keeps").

Invariants:
- A grant is written here *before* its allow command runs, and leaves only
  after its remove command succeeded: whatever the crash, a grant that may
  be on the other firewall is in the journal (one that is not there after
  all costs one remove that finds nothing).
- The file lives in the state directory (or where [command] journal says),
  reached without following a link (spa.server.safefs), replaced
  atomically, 0600.  It is the gate keeper's: it runs as the config file's
  owner, who must be able to write there (the systemd unit's layout: both
  spa); root does not write in a directory another user owns, and says so
  in one line.
- A row is (address, service, until, protocol, port): the protocol and
  port let a start remove the grants of a service the config no longer
  has.  A row without them (an older journal) is still read.
- What it reads is checked: the file is the gate keeper's user's (root's
  when it runs as root) and group and others may not write it (its rows
  run `remove` commands, a dropped service's with any protocol and port);
  a row that is not (address, service, until) is skipped, and so is one
  whose address `cmdspec.checked_address` refuses (a scoped IPv6 address
  could carry any text into an argv), whose service is no valid service
  name (it reaches the log and argv) or whose end is no finite number.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

from spa.backends.base import Held
from spa.backends.cmdspec import checked_address
from spa.core.policy import Service
from spa.core.wire import is_valid_service_name
from spa.server.errors import LocalError
from spa.server.safefs import open_dir, refuse_foreign_dir, user_name

JOURNAL = "command-grants.json"


class Journal:
    def __init__(self, directory: Path, name: str = JOURNAL) -> None:
        """The file `name` in `directory` (the state directory, or the
        directory of [command] journal)."""
        self.path = directory / name
        self._state_dir, self._name = directory, name

    def load_with_ports(self) -> tuple[Held, dict[str, Service]]:
        """What the file holds, and the protocol and port of each service its
        rows name (as a Service; a row of an older journal names none).
        Raises LocalError."""
        try:
            with open_dir(self._state_dir) as directory:
                fd = directory.open(self._name, os.O_RDONLY)
                with open(fd, "rb") as handle:
                    info = os.fstat(handle.fileno())
                    raw = handle.read()
        except FileNotFoundError:
            return {}, {}
        except LocalError as exc:  # a link, a FIFO, a second name
            raise LocalError(f"the command journal: {exc}") from None
        except OSError as exc:
            raise LocalError(f"cannot read the command journal {self.path}: {exc}") from None
        if info.st_uid != os.geteuid():
            raise LocalError(f"the command journal {self.path} belongs to "
                             f"{user_name(info.st_uid)}, not to the gate keeper's user "
                             f"{user_name(os.geteuid())} who writes it: its rows run remove "
                             "commands; check who put it there, then move it away")
        if info.st_mode & 0o022:
            raise LocalError(f"the command journal {self.path} is a file group or others may "
                             "write (spa writes it 0600): its rows run remove commands; check "
                             "who changed it, then chmod 600 it or move it away")
        try:
            rows = json.loads(raw)["grants"]
        except (ValueError, KeyError, TypeError, RecursionError):  # (nested too deep)
            raise LocalError(f"the command journal {self.path} is not one spa wrote: move it "
                             "away (its grants may then stay on the other firewall)") from None
        found: Held = {}
        ports: dict[str, Service] = {}
        for row in rows if isinstance(rows, list) else []:
            try:
                address, service, until, *where = row
                if not isinstance(service, str) or not is_valid_service_name(service):
                    continue  # (the name reaches the log and a command's argv)
                if isinstance(until, bool) or not isinstance(until, int | float) or not (
                        math.isfinite(until)):
                    continue
                found[(checked_address(address), service)] = float(until)
            except (ValueError, TypeError):
                continue
            if service not in ports and len(where) == 2:
                with contextlib.suppress(ValueError, TypeError):
                    protocol, port = where
                    if isinstance(port, int) and not isinstance(port, bool):
                        ports[service] = Service(service, str(protocol), port, 1, 1)
        return found, ports

    def load(self) -> Held:
        """What the file holds (nothing if there is none).  Raises LocalError."""
        return self.load_with_ports()[0]

    def save(self, held: Held, services: Mapping[str, Service] | None = None) -> None:
        """Replace the file with `held`, each row with its service's protocol
        and port when `services` names it.  Raises LocalError."""
        known = services or {}
        rows = sorted([str(address), name, until,
                       *((known[name].protocol, known[name].port) if name in known else ())]
                      for (address, name), until in held.items())
        data = json.dumps({"grants": rows}, separators=(",", ":")).encode()
        try:
            with open_dir(self._state_dir) as directory:
                refuse_foreign_dir(directory)
                directory.replace(self._name, data)
        except OSError as exc:
            raise LocalError(
                f"cannot write the command journal {self.path}: {exc}; the gate keeper runs as "
                "the config file's owner: give the config and the state directory one owner "
                "(the systemd unit runs both as spa), or set [command] journal to a file in "
                "a directory the config's owner owns") from None
