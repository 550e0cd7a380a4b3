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
- What it reads is checked: a line that is not (address, service, until)
  is skipped, and so is one whose address `cmdspec.checked_address`
  refuses (a scoped IPv6 address could carry any text into an argv).  A
  daemon that wrote the file could only add removes of addresses, which it
  may ask for anyway.
"""

from __future__ import annotations

import json
from pathlib import Path

from spa.backends.base import Held
from spa.backends.cmdspec import checked_address
from spa.server.errors import LocalError
from spa.server.safefs import open_dir, refuse_foreign_dir

JOURNAL = "command-grants.json"


class Journal:
    def __init__(self, directory: Path, name: str = JOURNAL) -> None:
        """The file `name` in `directory` (the state directory, or the
        directory of [command] journal)."""
        self.path = directory / name
        self._state_dir, self._name = directory, name

    def load(self) -> Held:
        """What the file holds (nothing if there is none).  Raises LocalError."""
        try:
            with open_dir(self._state_dir) as directory:
                raw, _ = directory.read(self._name)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise LocalError(f"cannot read the command journal {self.path}: {exc}") from None
        try:
            rows = json.loads(raw)["grants"]
        except (ValueError, KeyError, TypeError):
            raise LocalError(f"the command journal {self.path} is not one spa wrote: move it "
                             "away (its grants may then stay on the other firewall)") from None
        found: Held = {}
        for row in rows if isinstance(rows, list) else []:
            try:
                address, service, until = row
                found[(checked_address(address), str(service))] = float(until)
            except (ValueError, TypeError):
                continue
        return found

    def save(self, held: Held) -> None:
        """Replace the file with `held`.  Raises LocalError."""
        rows = sorted([str(address), service, until] for (address, service), until in held.items())
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
