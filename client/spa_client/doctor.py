"""`spa-client doctor HOST`: why does my knock not open the port?

The server never answers, so a client cannot ask it what went wrong.  The
doctor checks, in order, what it can see from here: the profile (present,
0600, readable), the server's name, this machine's clock (the most common
silent failure: a clock more than the window, 30 s, off makes every knock
stale), then sends a real knock and probes the port.  Each check is a
`Finding`; the checks take their I/O as arguments, so tests fake the clock
and the network.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from dataclasses import dataclass

from spa_client.profile import Profile, ProfileError, ProfileStore

STA_UNSYNC = 0x0040  # linux/timex.h: the kernel's clock is not synchronized
SKEW_LIMIT = 30.0  # seconds: the server's default window


@dataclass(frozen=True, slots=True)
class Finding:
    ok: bool | None  # None: could not tell
    what: str
    fix: str = ""


class _Timex(ctypes.Structure):
    _fields_ = [("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
                ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long),
                ("status", ctypes.c_int), ("pad", ctypes.c_byte * 200)]


def kernel_clock() -> tuple[bool, float] | None:
    """(synchronized, max error in seconds) from adjtimex(2) (read only), or
    None where the call is not available (not Linux)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        timex = _Timex()
        if libc.adjtimex(ctypes.byref(timex)) < 0:
            return None
    except (OSError, AttributeError):
        return None
    return (not timex.status & STA_UNSYNC, timex.maxerror / 1e6)


def check_profile(store: ProfileStore, host: str) -> tuple[Finding, Profile | None]:
    try:
        profile = store.find(host)
    except ProfileError as exc:
        return Finding(False, f"profile: {exc}", str(exc)), None
    e = profile.enrollment
    return Finding(True, f"profile {profile.name!r}: client {e.client} at {e.host}:{e.port} "
                   "(0600)"), profile


def check_expiry(profile: Profile, now: float) -> Finding | None:
    """For a pending enrollment (exp= in its URI): is there still time?"""
    expires = profile.enrollment.expires
    if expires is None:
        return None
    import time

    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(expires))
    if now < expires:
        return Finding(True, f"enrollment: pending, its first knock is due by {when}")
    return Finding(None, f"enrollment: its first knock was due by {when}; if this device had "
                   "not knocked by then, the server refuses it (enrollment_expired)",
                   "ask your admin for a new enrollment (spa-server rotate "
                   f"{profile.enrollment.client}) if knocks do not open")


def check_clock(probe: Callable[[], tuple[bool, float] | None]) -> Finding:
    state = probe()
    if state is None:
        return Finding(None, "clock: cannot tell whether this machine's clock is synchronized",
                       "make sure the clock is set automatically (NTP): the server refuses "
                       "knocks from a clock more than 30 s off, without a word")
    synced, max_error = state
    if not synced:
        # Not proof of a wrong clock (a VM may take its time from the host),
        # but nothing here vouches for it: the first suspect if the knock fails.
        return Finding(None, "clock: the kernel says this clock is not synchronized (no NTP)",
                       "turn on automatic time (timedatectl set-ntp true, or the phone's "
                       "'automatic date & time'): the server refuses knocks from a clock more "
                       "than 30 s off, and never says so")
    if max_error > SKEW_LIMIT:
        return Finding(False, f"clock: synchronized, but its error may be {max_error:.0f} s",
                       "wait for NTP to settle, or check the time source")
    return Finding(True, f"clock: synchronized (error at most {max_error:.3f} s)")


def diagnose(store: ProfileStore, host: str, *,
             resolve: Callable[[str, int], str],
             clock: Callable[[], tuple[bool, float] | None],
             knock: Callable[[Profile], tuple[bool, str]],
             now: float | None = None) -> list[Finding]:
    """Every check that applies, in order; stops where later ones cannot run."""
    import time

    finding, profile = check_profile(store, host)
    findings = [finding]
    if profile is None:
        return findings
    expiry = check_expiry(profile, time.time() if now is None else now)
    if expiry is not None:
        findings.append(expiry)
    e = profile.enrollment
    try:
        address = resolve(e.host, e.port)
        findings.append(Finding(True, f"name: {e.host} is {address}"))
    except Exception as exc:  # resolve raises KnockError; say it, whatever it is
        findings.append(Finding(False, f"name: {exc}",
                                f"check the server's name ({e.host}) or your DNS"))
        return findings
    findings.append(check_clock(clock))
    opened, detail = knock(profile)
    if opened:
        findings.append(Finding(True, f"knock: {detail}"))
    else:
        findings.append(Finding(False, f"knock: {detail}",
                                "if the clock is right: ask your admin whether the server runs, "
                                f"whether {e.client} is enrolled and not revoked, and whether "
                                f"UDP port {e.port} reaches it from your network"))
    return findings


def verdict(findings: list[Finding]) -> str:
    """One line: what to fix first, or that all is well.  A failed knock with
    a clock nothing vouches for blames the clock first."""
    clock = next((f for f in findings if f.what.startswith("clock:")), None)
    knocked = next((f for f in findings if f.what.startswith("knock:")), None)
    expiry = next((f for f in findings if f.what.startswith("enrollment:")), None)
    if knocked is not None and knocked.ok is False and expiry is not None and not expiry.ok:
        return f"fix: {expiry.fix}"
    if knocked is not None and knocked.ok is False and clock is not None and not clock.ok:
        return f"fix: the clock first: {clock.fix}; then, {knocked.fix}"
    for finding in findings:
        if finding.ok is False:
            return f"fix: {finding.fix}"
    if any(f.ok is None for f in findings):
        unknown = next(f for f in findings if f.ok is None)
        return f"all checks passed that could run; still: {unknown.fix}"
    return "all good: the knock opened the port"
