"""Running one of the admin's commands: the command backend's I/O edge.

Invariants (docs/threat-model.md, "A command backend"):
- argv only (no shell), stdin from /dev/null, no descriptor of ours
  inherited, a fixed small environment (PATH, LANG): nothing of the
  daemon's environment or secrets reaches the program.
- The program runs in a session (process group) of its own; past its
  timeout the whole group is killed (SIGKILL): a hung program and the
  children it started in its group end with the try.  A child that
  leaves the group (setsid, a daemonising helper) escapes that kill and
  runs on; only the service's cgroup ends it, when the unit stops
  (systemd's default KillMode=control-group).  The try itself does not
  wait for it: its pipes are read at most 1 s more.
- Output read is bounded (MAX_OUTPUT); only its first line is quoted in
  the log.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass

MAX_OUTPUT = 1 << 20  # bytes of a program's output kept (a list of a million addresses: 16 MB;
# a router's list is a few thousand lines)
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


def run_command(argv: Sequence[str], timeout: float) -> Outcome:
    """Run argv; kill its process group after `timeout` seconds."""
    try:
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL,  # noqa: S603 (argv, no shell)
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=ENVIRONMENT, close_fds=True, start_new_session=True)
    except OSError as exc:
        return Outcome(None, problem=f"cannot run {argv[0]}: {exc.strerror or exc}")
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=1)  # a child that left the group may hold the pipes
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        proc.wait()
        return Outcome(None, problem=f"timed out after {timeout:g} s (killed)")
    text = out[:MAX_OUTPUT].decode("utf-8", "replace")
    if proc.returncode != 0:
        first = (err or out).decode("utf-8", "replace").strip().splitlines()
        said = f": {first[0][:200]}" if first else ""
        return Outcome(proc.returncode, text, f"exit status {proc.returncode}{said}")
    return Outcome(0, text)
