"""The daemon's log lines on stderr: one line per event, key=value.

Invariants:
- Under journald (systemd connected stderr to the journal: JOURNAL_STREAM
  names stderr's device and inode, as the systemd.exec man page says) a line is the event
  alone: the journal stamps it.
- Anywhere else (a terminal, a pipe, a file) each line starts with its time,
  written as every time the programs print (spa.clitools.format_utc):
  `2026-12-06T00:14:18Z accepted client=alice ...`.
- Whether stderr is the journal is read once per process (it does not change
  under a running daemon).
"""

from __future__ import annotations

import functools
import os
import re
import sys
import time
from collections.abc import Mapping

from spa.clitools import format_utc

# the prefix a line carries outside journald (for readers that want the event alone)
TIME_PREFIX = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z ")


def stderr_is_journal(environ: Mapping[str, str], fd: int = 2) -> bool:
    """True when JOURNAL_STREAM ("DEV:INODE") names the file `fd` is, as
    the systemd.exec man page says to check it (a child whose stderr was redirected
    still inherits the variable, so the variable alone proves nothing)."""
    dev, sep, ino = environ.get("JOURNAL_STREAM", "").partition(":")
    if not (sep and dev.isdigit() and ino.isdigit()):
        return False
    try:
        found = os.fstat(fd)
    except OSError:
        return False
    return (found.st_dev, found.st_ino) == (int(dev), int(ino))


@functools.cache
def _journal() -> bool:
    return stderr_is_journal(os.environ)


def stamped(line: str, *, journal: bool, now: float) -> str:
    """`line` as it goes to stderr: as is for the journal, else after its time."""
    return line if journal else f"{format_utc(now)} {line}"


def event_of(line: str) -> str:
    """A logged line without the time in front, if it has one."""
    found = TIME_PREFIX.match(line)
    return line[found.end():] if found else line


def log_to_stderr(line: str) -> None:
    """One line per event, key=value (the time in front outside journald)."""
    sys.stderr.write(stamped(line, journal=_journal(), now=time.time()) + "\n")
    sys.stderr.flush()
