"""Privilege separation: one process that touches the firewall, one that
does everything else (docs/threat-model.md, "Privilege separation").

`spa-server run` starts as root, or (systemd) as the service user with
CAP_NET_ADMIN and CAP_NET_RAW.  It opens the packet socket, then forks:
- the child is the gate keeper (spa.server.monitor): CAP_NET_ADMIN only
  (and CAP_BPF while the eBPF map filter runs, to make the maps of its
  growth: spa.server.mapgrant; the programs it runs never get CAP_BPF),
  nothing else in any set, the bounding set cut to it where it can be,
  never dumpable (so no ptrace or /proc/PID/mem from the daemon), no new
  privileges, as the config file's owner;
- the parent is the daemon: no capability at all (root's too: the bounding
  set emptied and SECBIT_NOROOT set when it starts as root, so no exec can
  give them back), running as the owner of the state directory, no new
  privileges.  It parses packets, verifies, writes events, serves metrics,
  and asks the gate keeper for every firewall change.
Both keep the state directory's lock (the same open file).

Invariants:
- What each part holds is read back from the kernel after the drop
  (`capabilities`); a drop that did not take is a LocalError, never a
  daemon that runs with more than it should.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

from spa.server.errors import LocalError

CAP_SETGID, CAP_SETUID, CAP_SETPCAP = 6, 7, 8  # linux/capability.h
CAP_NET_ADMIN, CAP_NET_RAW, CAP_BPF = 12, 13, 39
NAMES = {CAP_NET_ADMIN: "CAP_NET_ADMIN", CAP_NET_RAW: "CAP_NET_RAW", CAP_BPF: "CAP_BPF"}
PR_SET_KEEPCAPS, PR_SET_DUMPABLE, PR_CAPBSET_DROP = 8, 4, 24  # linux/prctl.h
PR_SET_SECUREBITS, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 28, 38, 47
PR_CAP_AMBIENT_RAISE, PR_CAP_AMBIENT_CLEAR_ALL = 2, 4
SECBIT_NOROOT, SECBIT_NOROOT_LOCKED = 1 << 0, 1 << 1  # linux/securebits.h
_VERSION_3 = 0x20080522  # _LINUX_CAPABILITY_VERSION_3: two 32-bit words per set


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


@dataclass(frozen=True, slots=True)
class Capabilities:
    effective: int
    permitted: int
    inheritable: int
    bounding: int
    ambient: int


def capabilities(pid: int | str = "self") -> Capabilities:
    """What the kernel says a process holds (/proc/PID/status)."""
    found: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb"):
            found[key] = int(value.strip(), 16)
    return Capabilities(found["CapEff"], found["CapPrm"], found["CapInh"], found["CapBnd"],
                        found["CapAmb"])


def _prctl(option: int, arg: int = 0, arg3: int = 0) -> int:
    return int(_libc.prctl(option, ctypes.c_ulong(arg), ctypes.c_ulong(arg3),
                           ctypes.c_ulong(0), ctypes.c_ulong(0)))


def _capset(keep: int) -> None:
    """Effective, permitted and inheritable = `keep`.  Raises LocalError."""
    header = _Header(_VERSION_3, 0)
    low, high = keep & 0xFFFFFFFF, keep >> 32
    data = (_Data * 2)(_Data(low, low, low), _Data(high, high, high))
    if _libc.capset(ctypes.byref(header), data) != 0:
        error = ctypes.get_errno()
        raise LocalError(f"cannot drop capabilities: {os.strerror(error)}")


def _last_cap() -> int:
    try:
        return int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    except (OSError, ValueError):
        return 40


def drop(keep: frozenset[int], *, uid: int | None = None, gid: int | None = None,
         ambient: frozenset[int] | None = None) -> None:
    """Keep only `keep` (capability numbers), as `uid`/`gid` if given (and
    different); the programs it runs get `ambient` of them (all by default).
    Raises LocalError if the kernel does not end up there."""
    mask = sum(1 << cap for cap in keep)
    passed = keep if ambient is None else keep & ambient
    passed_mask = sum(1 << cap for cap in passed)
    have = capabilities()
    if have.effective >> CAP_SETPCAP & 1:
        for cap in range(_last_cap() + 1):  # the bounding set: what exec could ever give
            if cap not in keep:
                _prctl(PR_CAPBSET_DROP, cap)
        _prctl(PR_SET_SECUREBITS, SECBIT_NOROOT | SECBIT_NOROOT_LOCKED)  # uid 0 gives nothing
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    if uid is not None and gid is not None and (uid, gid) != (os.getuid(), os.getgid()):
        _prctl(PR_SET_KEEPCAPS, 1 if keep else 0)  # permitted survives the change of uid
        try:
            os.setgroups([gid])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
        except OSError as exc:
            raise LocalError(f"cannot become uid {uid}: {exc.strerror}") from None
    _capset(mask)
    for cap in passed:  # what the programs it runs need (ipset, nft), no more
        _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap)
    if _prctl(PR_SET_NO_NEW_PRIVS, 1) != 0:
        raise LocalError("cannot set no_new_privs")
    now = capabilities()
    if not (now.effective == now.permitted == now.inheritable == mask
            and now.ambient == passed_mask):
        raise LocalError(f"capabilities did not drop (effective {now.effective:#x}, "
                         f"permitted {now.permitted:#x}); not serving")


FIREWALLS = ("nftables", "iptables")  # the backends that need the kernel's permission


def gate_keeper_capabilities(backend: str, *, bpf: bool = False) -> frozenset[int]:
    """CAP_NET_ADMIN; the iptables backend also CAP_NET_RAW (libiptc talks
    to the kernel through a raw socket); with `bpf` (the eBPF map filter
    runs) CAP_BPF, for the maps of its growth (spa.server.mapgrant); the
    memory backend touches no firewall: none for it; nor does the command
    backend: its programs drive another firewall (a router's API, a cloud's
    CLI) with their own credentials, and run with no capability at all."""
    caps = ({CAP_NET_ADMIN, CAP_NET_RAW} if backend == "iptables"
            else set() if backend in ("memory", "command") else {CAP_NET_ADMIN})
    return frozenset(caps | ({CAP_BPF} if bpf else set()))


def drop_to_gate_keeper(config: Path, backend: str, *, bpf: bool = False) -> None:
    """The child: what its backend needs and nothing else (CAP_BPF too with
    `bpf`, never passed to the programs it runs), never dumpable; started as
    root, it runs as the config file's owner (so it can read the config
    again at a reload without any capability to read others' files)."""
    _prctl(PR_SET_DUMPABLE, 0)
    held = capabilities().permitted  # started without them (a user's demo): keep what it has
    keep = frozenset(cap for cap in gate_keeper_capabilities(backend, bpf=bpf)
                     if held >> cap & 1)
    missing = sorted(gate_keeper_capabilities(backend) - keep)
    if backend in FIREWALLS and missing:  # it could never install the gate: say so, once
        names = " and ".join(NAMES[cap] for cap in missing)
        raise LocalError(f"{backend}: operation not permitted (you must be root): run "
                         f"spa-server as root (or with {names}), or try it without a "
                         "firewall: --backend memory")
    ambient = gate_keeper_capabilities(backend)
    if os.geteuid() == 0:
        st = os.stat(config)
        drop(keep, uid=st.st_uid, gid=st.st_gid, ambient=ambient)
    else:
        drop(keep, ambient=ambient)
    _prctl(PR_SET_DUMPABLE, 0)  # a change of uid resets it


SERVICE_USERS = ("spa", "nobody")  # who the daemon runs as when root owns the state dir


def daemon_user(state_dir: Path) -> pwd.struct_passwd:
    """Who the daemon runs as: the state directory's owner; never root (uid 0
    without a capability still owns root's files: /etc/cron.d, the config):
    for a directory root owns, the first of SERVICE_USERS that exists.
    Raises LocalError."""
    st = os.stat(state_dir)
    if st.st_uid != 0:
        try:
            return pwd.getpwuid(st.st_uid)
        except KeyError:
            return pwd.struct_passwd((f"uid {st.st_uid}", "x", st.st_uid, st.st_gid, "", "/",
                                      "/usr/sbin/nologin"))
    for name in SERVICE_USERS:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise LocalError(f"no user to run the daemon as (root owns {state_dir}): create the "
                     "system user spa (systemd-sysusers contrib/systemd/spa.sysusers.conf), "
                     f"or chown {state_dir} to the user it should run as")


def drop_to_daemon(user: pwd.struct_passwd) -> None:
    """The parent: no capability, as `user` (daemon_user)."""
    drop(frozenset(), uid=user.pw_uid, gid=user.pw_gid)


def owned_by_another(directory: Path) -> bool:
    """Whether this process is root and another user owns `directory` (a
    missing one is not: root makes it, its own)."""
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        return False
    return os.geteuid() == 0 and st.st_uid != 0


def hand_over(state_dir: Path, user: pwd.struct_passwd) -> None:
    """Started as root on a state directory root owns, the daemon runs as
    `user`: give it the directory and the regular files in it, by
    descriptor, never following a link.  Only then: in a directory another
    user owns, that user could have moved any root file in (from anywhere it
    may write, on the same filesystem), so nothing there is ever chowned."""
    if os.geteuid() != 0 or user.pw_uid == 0:
        return
    try:
        dfd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise LocalError(f"cannot open {state_dir}: {exc.strerror}") from None
    try:
        if os.fstat(dfd).st_uid != 0:
            return
        for name in os.listdir(dfd):
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
                             | os.O_CLOEXEC, dir_fd=dfd)
            except OSError:
                continue  # a link, a socket, gone: not ours to hand over
            try:
                st = os.fstat(fd)
                if stat.S_ISREG(st.st_mode) and st.st_uid == 0 and st.st_nlink == 1:
                    os.fchown(fd, user.pw_uid, user.pw_gid)
            finally:
                os.close(fd)
        os.fchown(dfd, user.pw_uid, user.pw_gid)  # last: until here only root could add
    finally:
        os.close(dfd)
