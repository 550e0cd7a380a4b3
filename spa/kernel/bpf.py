"""The bpf(2) system call through ctypes: hash maps, program load, attach.

Invariants:
- Every failure is a BpfError carrying the errno (and, for a program the
  verifier refused, the first lines of its log); nothing here logs.
- Batch updates and deletes fall back to one call per element where the
  kernel lacks them (EINVAL, ENOTSUPP, EOPNOTSUPP: before 5.6).
- Map updates, deletes and lookups, and what a map or program is, go
  through a file descriptor and need no capability (kernel 6.x); creating a
  map and loading a program need CAP_BPF (or CAP_SYS_ADMIN) where
  kernel.unprivileged_bpf_disabled is set.
- The ctypes `syscall` releases the GIL, and a batch goes in chunks of at
  most BATCH keys: no C call here holds the GIL long (joining 10^5 keys in
  one piece held it 9.5 ms, a stall of the receive thread at every step).
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import socket
import struct
from collections.abc import Iterator, Sequence
from typing import NamedTuple

SYSCALL_BPF = {"x86_64": 321, "aarch64": 280}  # __NR_bpf per architecture
# commands (linux/bpf.h, enum bpf_cmd)
MAP_CREATE, MAP_LOOKUP_ELEM, MAP_UPDATE_ELEM, MAP_DELETE_ELEM, MAP_GET_NEXT_KEY = 0, 1, 2, 3, 4
PROG_LOAD = 5
PROG_TEST_RUN = 10  # run a loaded program on given bytes (benchmarks, tests)
OBJ_GET_INFO_BY_FD = 15  # what a map or program fd is (no capability needed)
MAP_UPDATE_BATCH, MAP_DELETE_BATCH = 26, 27
MAP_TYPE_HASH = 1  # BPF_MAP_TYPE_HASH
PROG_TYPE_SOCKET_FILTER = 1  # BPF_PROG_TYPE_SOCKET_FILTER
F_NO_PREALLOC = 1  # BPF_F_NO_PREALLOC: entries allocated as they are added
SO_ATTACH_BPF = 50  # asm-generic/socket.h
ATTR_SIZE = 128  # bytes of union bpf_attr we pass (the kernel wants the tail zero)
LOG_SIZE = 1 << 20  # verifier log buffer on a failed load
LOG_LINES = 3  # lines of the verifier log kept in the error message
ENOTSUPP = 524  # the kernel's internal "not supported" (no errno name in Python)
_NO_BATCH = (errno.EINVAL, ENOTSUPP, errno.EOPNOTSUPP)
BATCH = 4096  # keys per batch call (a 32 KiB join: ~0.3 ms with the GIL held)

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_syscall.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint]


class BpfError(OSError):
    """A bpf(2) call failed: `errno` says why; `log` is the verifier's log
    for a refused program ("" otherwise)."""

    def __init__(self, code: int, what: str, log: str = "") -> None:
        super().__init__(code, f"{what}: {os.strerror(code)}")
        self.log = log


def _number() -> int:
    machine = platform.machine()
    if machine not in SYSCALL_BPF:
        raise BpfError(errno.ENOSYS, f"bpf(2) on {machine}")
    return SYSCALL_BPF[machine]


def _call(cmd: int, attr: ctypes.Array[ctypes.c_char], what: str) -> int:
    """bpf(cmd, attr); the result, or raises BpfError."""
    result = int(_syscall(_number(), cmd, ctypes.addressof(attr), ATTR_SIZE))
    if result < 0:
        raise BpfError(ctypes.get_errno(), what)
    return result


def _attr(fmt: str, *values: int | bytes) -> ctypes.Array[ctypes.c_char]:
    attr = ctypes.create_string_buffer(ATTR_SIZE)
    struct.pack_into(fmt, attr, 0, *values)
    return attr


def _address(buffer: ctypes.Array[ctypes.c_char] | None) -> int:
    return 0 if buffer is None else ctypes.addressof(buffer)


class MapInfo(NamedTuple):
    type: int
    key_size: int
    value_size: int
    max_entries: int


def _info(fd: int, size: int, what: str) -> bytes:
    """The first `size` bytes of a map's or program's info."""
    info = ctypes.create_string_buffer(size)
    _call(OBJ_GET_INFO_BY_FD, _attr("=IIQ", fd, size, ctypes.addressof(info)), what)
    return info.raw


def map_info(fd: int) -> MapInfo:
    """What the map behind `fd` is (struct bpf_map_info: type, id, key_size,
    value_size, max_entries).  Raises BpfError (EINVAL: not a map)."""
    kind, _, key_size, value_size, entries = struct.unpack("=5I", _info(fd, 20, "bpf map info"))
    return MapInfo(kind, key_size, value_size, entries)


def program_type(fd: int) -> int:
    """The type of the program behind `fd` (struct bpf_prog_info's first
    field).  Raises BpfError (EINVAL: not a program)."""
    kind: int = struct.unpack("=I", _info(fd, 4, "bpf program info"))[0]
    return kind


class HashMap:
    """A BPF_MAP_TYPE_HASH of fixed-size keys and values, owned by its fd."""

    def __init__(self, key_size: int, value_size: int, max_entries: int, name: str = "") -> None:
        """Raises BpfError (EPERM without CAP_BPF)."""
        attr = _attr("=IIIII", MAP_TYPE_HASH, key_size, value_size, max_entries, F_NO_PREALLOC)
        struct.pack_into("16s", attr, 28, name.encode()[:15])  # map_name, after numa_node
        self.fd = _call(MAP_CREATE, attr, "bpf map create")
        self.key_size, self.value_size, self.max_entries = key_size, value_size, max_entries

    @classmethod
    def adopt(cls, fd: int, key_size: int, value_size: int) -> HashMap:
        """The hash map behind `fd` (made by another process, handed over),
        owned from now on.  Raises BpfError (EINVAL) if it is not a hash map
        of these sizes; `fd` is then still the caller's."""
        info = map_info(fd)
        if (info.type, info.key_size, info.value_size) != (MAP_TYPE_HASH, key_size, value_size):
            raise BpfError(errno.EINVAL, f"handed map {info} is not a hash of {key_size}-byte "
                                         f"keys and {value_size}-byte values")
        found = cls.__new__(cls)
        found.fd, found.key_size, found.value_size = fd, key_size, value_size
        found.max_entries = info.max_entries
        return found

    def _elem(self, cmd: int, key: bytes, value: ctypes.Array[ctypes.c_char] | None,
              what: str) -> None:
        k = ctypes.create_string_buffer(key, self.key_size)
        _call(cmd, _attr("=IxxxxQQQ", self.fd, ctypes.addressof(k), _address(value), 0), what)

    def update(self, key: bytes, value: bytes) -> None:
        """Insert or overwrite.  Raises BpfError (E2BIG: the map is full)."""
        self._elem(MAP_UPDATE_ELEM, key, ctypes.create_string_buffer(value, self.value_size),
                   "bpf map update")

    def delete(self, key: bytes) -> None:
        """Raises BpfError (ENOENT: not there)."""
        self._elem(MAP_DELETE_ELEM, key, None, "bpf map delete")

    def lookup(self, key: bytes) -> bytes | None:
        value = ctypes.create_string_buffer(self.value_size)
        try:
            self._elem(MAP_LOOKUP_ELEM, key, value, "bpf map lookup")
        except BpfError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise
        return value.raw

    def all_keys(self) -> Iterator[bytes]:
        """Every key (GET_NEXT_KEY from none); a map changed meanwhile may
        repeat or skip keys."""
        k = ctypes.create_string_buffer(self.key_size)
        following = ctypes.create_string_buffer(self.key_size)
        first = True
        while True:
            attr = _attr("=IxxxxQQ", self.fd, 0 if first else ctypes.addressof(k),
                         ctypes.addressof(following))
            try:
                _call(MAP_GET_NEXT_KEY, attr, "bpf map next key")
            except BpfError as exc:
                if exc.errno == errno.ENOENT:
                    return
                raise
            yield following.raw
            ctypes.memmove(k, following, self.key_size)
            first = False

    def update_batch(self, keys: Sequence[bytes], values: Sequence[bytes]) -> None:
        """Insert or overwrite all (one call where the kernel has batches).
        Raises BpfError (E2BIG: the map is full; some may be in)."""
        if len(keys) != len(values):
            raise ValueError("as many values as keys")
        self._in_chunks(MAP_UPDATE_BATCH, keys, values, "bpf map update batch")

    def delete_batch(self, keys: Sequence[bytes]) -> None:
        """Delete all; every key must be there.  Raises BpfError (ENOENT)."""
        self._in_chunks(MAP_DELETE_BATCH, keys, None, "bpf map delete batch")

    def _in_chunks(self, cmd: int, keys: Sequence[bytes], values: Sequence[bytes] | None,
                   what: str) -> None:
        """`cmd` over BATCH keys at a time; one call per key where the kernel
        has no batches."""
        for at in range(0, len(keys), BATCH):
            chunk = keys[at:at + BATCH]
            vchunk = values[at:at + BATCH] if values is not None else None
            kbuf = ctypes.create_string_buffer(b"".join(chunk), len(chunk) * self.key_size)
            vbuf = (ctypes.create_string_buffer(b"".join(vchunk), len(chunk) * self.value_size)
                    if vchunk is not None else None)
            try:
                self._batch(cmd, kbuf, vbuf, len(chunk), what)
            except BpfError as exc:
                if exc.errno not in _NO_BATCH:
                    raise
                for index, key in enumerate(chunk):
                    if vchunk is None:
                        self.delete(key)
                    else:
                        self.update(key, vchunk[index])

    def _batch(self, cmd: int, keys: ctypes.Array[ctypes.c_char],
               values: ctypes.Array[ctypes.c_char] | None, count: int, what: str) -> None:
        # struct { in_batch, out_batch, keys, values; u32 count, map_fd; elem_flags, flags }
        attr = _attr("=QQQQIIQQ", 0, 0, ctypes.addressof(keys), _address(values), count,
                     self.fd, 0, 0)
        _call(cmd, attr, what)

    def memlock(self) -> int:
        """Kernel memory charged for the map now (bytes, /proc fdinfo)."""
        with open(f"/proc/self/fdinfo/{self.fd}") as info:
            for line in info:
                if line.startswith("memlock:"):
                    return int(line.split()[1])
        return 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def load_program(code: bytes, name: str = "") -> int:
    """Load a socket filter (BPF_PROG_TYPE_SOCKET_FILTER); its fd.  Raises
    BpfError: EPERM without CAP_BPF, EACCES/EINVAL when the verifier refuses
    (then with the log)."""
    insns = ctypes.create_string_buffer(code, len(code))
    license_ = ctypes.create_string_buffer(b"GPL")
    attempt = 0
    log: ctypes.Array[ctypes.c_char] | None = None
    while True:  # first without a log (cheap); on a refusal again, with it
        attr = _attr("=IIQQIIQ", PROG_TYPE_SOCKET_FILTER, len(code) // 8,
                     ctypes.addressof(insns), ctypes.addressof(license_),
                     1 if log is not None else 0, LOG_SIZE if log is not None else 0,
                     _address(log))
        struct.pack_into("16s", attr, 48, name.encode()[:15])
        try:
            return _call(PROG_LOAD, attr, "bpf program load")
        except BpfError as exc:
            if exc.errno in (errno.EPERM, errno.ENOSYS) or attempt:
                text = log.value.decode(errors="replace") if log is not None else ""
                lines = [line for line in text.splitlines() if line.strip()]
                raise BpfError(exc.errno or errno.EINVAL, "bpf program load",
                               " / ".join(lines[-LOG_LINES:])) from None
            attempt, log = 1, ctypes.create_string_buffer(LOG_SIZE)


def test_run(prog_fd: int, frame: bytes, repeat: int) -> tuple[int, int]:
    """BPF_PROG_TEST_RUN: run a socket filter `repeat` times on an Ethernet
    `frame` (the kernel strips the Ethernet header: the program sees the
    network header on).  (its return value, nanoseconds per run).  Raises
    BpfError."""
    data = ctypes.create_string_buffer(frame, len(frame))
    attr = _attr("=IIIIQQII", prog_fd, 0, len(frame), 0, ctypes.addressof(data), 0, repeat, 0)
    _call(PROG_TEST_RUN, attr, "bpf program test run")
    retval, duration = struct.unpack_from("=I", attr, 4)[0], struct.unpack_from("=I", attr, 36)[0]
    return retval, duration


def attach(sock: socket.socket, prog_fd: int) -> None:
    """Attach (or atomically replace: the old program keeps running until
    this one does) a socket filter.  Raises OSError."""
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_BPF, prog_fd)
