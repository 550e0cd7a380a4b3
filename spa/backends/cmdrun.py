"""Running one of the admin's commands: the command backend's I/O edge.

Invariants (docs/threat-model.md, "A command backend"):
- argv only (no shell), stdin from /dev/null, no descriptor of ours
  inherited, a fixed small environment (PATH, LANG), `/` as its working
  directory (not wherever spa-server was started): nothing of the daemon's
  environment or secrets reaches the program.
- The program runs in a session (process group) of its own; past its
  timeout the whole group is killed (SIGKILL): a hung program and the
  children it started in its group end with the try.  A child that
  leaves the group (setsid, a daemonising helper) escapes that kill and
  runs on; only the service's cgroup ends it, when the unit stops
  (systemd's default KillMode=control-group).  The try itself does not
  wait for it: past the timeout its pipes are closed, not read.
- A program runs only if no user but root and the gate keeper's own could
  change it: it, the file a link at its name leads to, and every directory
  above either are owned by one of them and not writable by every user (a
  sticky directory, /tmp, excepted: there others cannot replace a file
  they do not own) (`program_problem`, at the backend's start).  Group
  write is not judged (Debian's /usr/local is root:staff 2775 where the
  admin chooses so).
- Output is bounded: stdout and stderr together at most MAX_OUTPUT bytes
  are read; a program that prints more is killed (its group) then and
  there, and the try fails.  Only the first line is quoted in the log.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import selectors
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

MAX_OUTPUT = 1 << 20  # bytes of a program's output (stdout and stderr) read, at most; more: it
# is killed (60,000 IPv4 addresses a line each; a router's list is a few thousand lines)
CHUNK = 1 << 16  # bytes read at once
ENVIRONMENT = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "LANG": "C.UTF-8"}


@dataclass(frozen=True, slots=True)
class Outcome:
    code: int | None  # the exit status; None: it did not run or was killed at its timeout
    output: str = ""  # stdout
    problem: str = ""  # "" when it succeeded; else one line for the log

    @property
    def ok(self) -> bool:
        return not self.problem


Run = Callable[[Sequence[str], float], Outcome]


def program_problem(program: str) -> str:
    """Why the gate keeper will not run `program` (an absolute path), in
    words for one line; "" when nothing (see the invariants)."""
    if not os.access(program, os.X_OK):
        return "is missing or not executable by the gate keeper's user"
    me = os.geteuid()
    for path in dict.fromkeys((program, os.path.realpath(program))):
        for where in (path, *map(str, Path(path).parents)):
            try:
                found = os.lstat(where)
            except OSError as exc:
                return f"cannot be checked: {where}: {exc.strerror}"
            if stat.S_ISLNK(found.st_mode):
                continue  # a link's own mode means nothing; its directory and target count
            if found.st_uid not in (0, me):
                return (f"could be changed by {_name(found.st_uid)}, who owns {where}: make "
                        "root (or the gate keeper's user) own the program and the directories "
                        "above it")
            if found.st_mode & 0o002 and not (stat.S_ISDIR(found.st_mode)
                                              and found.st_mode & stat.S_ISVTX):
                return (f"could be changed by anyone: {where} is writable by every user "
                        f"(chmod o-w {where})")
    return ""


def _name(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def run_command(argv: Sequence[str], timeout: float) -> Outcome:
    """Run argv; kill its process group after `timeout` seconds, or once it
    has printed more than MAX_OUTPUT bytes."""
    try:
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL,  # noqa: S603 (argv, no shell)
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=ENVIRONMENT, close_fds=True, start_new_session=True,
                                cwd="/")
    except OSError as exc:
        return Outcome(None, problem=f"cannot run {argv[0]}: {exc.strerror or exc}")
    deadline = time.monotonic() + timeout
    try:
        out, err, stopped = _collect(proc.stdout, proc.stderr, deadline)
        if not stopped:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                stopped = "timeout"  # it closed its pipes but runs on
    finally:
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()  # a child that left the group and holds them gets EPIPE
    if stopped:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.kill()
        proc.wait()
        return Outcome(None, problem=f"timed out after {timeout:g} s (killed)"
                       if stopped == "timeout" else
                       f"printed more than {MAX_OUTPUT} bytes of output (killed)")
    text = out.decode("utf-8", "replace")
    if proc.returncode != 0:
        first = (err or out).decode("utf-8", "replace").strip().splitlines()
        said = f": {first[0][:200]}" if first else ""
        return Outcome(proc.returncode, text, f"exit status {proc.returncode}{said}")
    return Outcome(0, text)


def _collect(stdout: IO[bytes] | None, stderr: IO[bytes] | None, deadline: float
             ) -> tuple[bytes, bytes, str]:
    """stdout and stderr until both end; why it stopped before: "timeout"
    (the deadline passed) or "output" (more than MAX_OUTPUT bytes)."""
    if stdout is None or stderr is None:
        raise ValueError("both pipes are needed")
    out, err = stdout.fileno(), stderr.fileno()
    kept = {out: bytearray(), err: bytearray()}
    total = 0
    with selectors.DefaultSelector() as selector:
        for fd in kept:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                return bytes(kept[out]), b"", "timeout"
            for key, _ in selector.select(left):
                chunk = os.read(key.fd, CHUNK)
                if not chunk:
                    selector.unregister(key.fd)
                    continue
                total += len(chunk)
                if total > MAX_OUTPUT:
                    return bytes(kept[out]), b"", "output"
                kept[key.fd] += chunk
    return bytes(kept[out]), bytes(kept[err]), ""
