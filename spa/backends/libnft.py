"""Run nftables JSON commands: in process through libnftables, or through
the `nft` program when the library is missing.

Invariants (STYLE principle 6):
- Commands are data (JSON documents built by the caller), never shell text.
- One library context per runner; the caller serializes calls (the daemon
  holds its lease lock around every backend call).
- A failure raises LocalError with nftables' own first error line.
- libnftables prints nothing on our stderr: before 1.1 it wrote "Operation
  not permitted (you must be root)" to C's stderr by itself, outside its
  error buffer; while a command runs, C's `stderr` is a memory stream of
  ours (`CStderr`) and what it caught goes into the one error line.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import shutil
import subprocess
import threading
from collections.abc import Iterator
from typing import Any, Protocol

from spa.server.errors import LocalError

NFT_CTX_DEFAULT = 0
NFT_CTX_OUTPUT_JSON = 1 << 4
NFT_CTX_OUTPUT_TERSE = 1 << 11  # text listings without set elements
LIBRARY = "libnftables.so.1"

Document = dict[str, Any]


class NftRunner(Protocol):
    name: str
    owns_tables: bool  # its tables can be `flags owner`: one socket for its whole life

    def run(self, document: Document, *, terse: bool = False) -> Document:
        """Run one JSON document (one atomic transaction); return the output
        (`terse`: listings without set elements)."""

    def run_text(self, command: str) -> None:
        """Run one command in nft's own syntax (for what the JSON cannot say)."""

    def list_text(self, command: str) -> str:
        """Run a `list` command; return nft's text output (not JSON)."""


def _error(text: str) -> LocalError:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    first = lines[0] if lines else "unknown error"
    if "Operation not permitted" in text:
        return LocalError("nftables: operation not permitted; run spa-server as root "
                          "(or with CAP_NET_ADMIN)")
    return LocalError(f"nftables refused a command: {first}")


def _parse(text: str) -> Document:
    text = text.strip()
    if not text:
        return {}
    try:
        parsed: Document = json.loads(text)
    except json.JSONDecodeError:
        raise LocalError(f"nftables printed something that is not JSON: {text[:80]}") from None
    return parsed


_SWAP = threading.Lock()  # one swap of C's stderr at a time, process-wide


class CStderr:
    """C's `stderr` (the libc variable the library's fprintf reads) pointed
    at a memory stream of ours for the length of a `with self.caught()`.
    Python's own stderr (a file descriptor) is not touched: only C code that
    prints with stdio in that time writes here (another thread's C prints in
    that time would be caught too).  Catches never overlap (_SWAP), so the
    real stream is always the one put back."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None)
        libc.open_memstream.restype = ctypes.c_void_p
        libc.open_memstream.argtypes = [ctypes.POINTER(ctypes.c_void_p),
                                        ctypes.POINTER(ctypes.c_size_t)]
        libc.fflush.argtypes = [ctypes.c_void_p]
        libc.fseek.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_int]
        libc.fclose.argtypes = [ctypes.c_void_p]
        self._libc = libc
        self._stderr = ctypes.c_void_p.in_dll(libc, "stderr")
        self._buffer = ctypes.c_void_p()
        self._size = ctypes.c_size_t()
        self._stream = libc.open_memstream(ctypes.byref(self._buffer), ctypes.byref(self._size))
        if not self._stream:
            raise OSError("open_memstream failed")
        self.text = ""  # what the last `caught` caught

    @contextlib.contextmanager
    def caught(self) -> Iterator[None]:
        """Catch what C code prints to stderr meanwhile, into `text`."""
        with _SWAP:
            real = self._stderr.value
            self._stderr.value = self._stream
            try:
                yield
            finally:
                self._stderr.value = real
                self._libc.fflush(self._stream)
                size = self._size.value
                self.text = (ctypes.string_at(self._buffer.value, size).decode(errors="replace")
                             if size and self._buffer.value else "")
                if size:
                    self._libc.fseek(self._stream, 0, 0)  # SEEK_SET: empty at the next flush

    def close(self) -> None:
        if self._stream:
            self._libc.fclose(self._stream)
            self._stream = None


def _c_stderr() -> CStderr | None:
    """None where libc has no `stderr` variable or memory streams (not glibc)."""
    try:
        return CStderr()
    except (OSError, ValueError, AttributeError):
        return None


class LibNft:
    """libnftables through ctypes (about 60 times faster per call than `nft`)."""

    name = "libnftables"
    owns_tables = True  # one context, one netlink socket, for the daemon's life

    def __init__(self, library: str = LIBRARY) -> None:
        lib = ctypes.CDLL(library)
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        ctx = lib.nft_ctx_new(NFT_CTX_DEFAULT)
        if not ctx:
            raise LocalError("libnftables could not create a context")
        lib.nft_ctx_output_set_flags(ctx, NFT_CTX_OUTPUT_JSON)
        lib.nft_ctx_buffer_output(ctx)
        lib.nft_ctx_buffer_error(ctx)
        self._lib = lib
        self._ctx = ctx
        self._stderr = _c_stderr()

    def _run(self, command: bytes) -> tuple[int, str]:
        """Run one command: its status, and what libnftables printed on
        stderr by itself (caught, never shown)."""
        if self._stderr is None:
            return self._lib.nft_run_cmd_from_buffer(self._ctx, command), ""
        with self._stderr.caught():
            rc = self._lib.nft_run_cmd_from_buffer(self._ctx, command)
        return rc, self._stderr.text

    def _errors(self, printed: str) -> str:
        buffered = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode()
        return "\n".join(text for text in (printed.strip(), buffered.strip()) if text)

    def run(self, document: Document, *, terse: bool = False) -> Document:
        if terse:
            self._lib.nft_ctx_output_set_flags(self._ctx,
                                               NFT_CTX_OUTPUT_JSON | NFT_CTX_OUTPUT_TERSE)
        try:
            rc, printed = self._run(json.dumps(document).encode())
            output = (self._lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode()
        finally:
            if terse:
                self._lib.nft_ctx_output_set_flags(self._ctx, NFT_CTX_OUTPUT_JSON)
        if rc != 0:
            raise _error(self._errors(printed) or output)
        return _parse(output)

    def run_text(self, command: str) -> None:
        self.list_text(command)

    def list_text(self, command: str) -> str:
        self._lib.nft_ctx_output_set_flags(self._ctx, NFT_CTX_OUTPUT_TERSE)
        try:
            rc, printed = self._run(command.encode())
            output = (self._lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode()
            if rc != 0:
                raise _error(self._errors(printed))
            return output
        finally:
            self._lib.nft_ctx_output_set_flags(self._ctx, NFT_CTX_OUTPUT_JSON)

    def close(self) -> None:
        if self._ctx:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None
        if self._stderr is not None:
            self._stderr.close()


class NftProgram:
    """The `nft` program, one process per call (the fallback)."""

    name = "nft"
    owns_tables = False  # a process per call: a table it owned would go with it

    def __init__(self, program: str = "nft") -> None:
        path = shutil.which(program)
        if path is None:
            raise LocalError("neither libnftables nor the nft program is installed; "
                             "install the nftables package (apt-get install nftables)")
        self._argv = [path, "-j", "-f", "-"]

    def run(self, document: Document, *, terse: bool = False) -> Document:
        argv = [*self._argv[:1], "-t", *self._argv[1:]] if terse else self._argv
        done = subprocess.run(argv, input=json.dumps(document), capture_output=True,  # noqa: S603 (argv list, no shell)
                              text=True, timeout=30, check=False)
        if done.returncode != 0:
            raise _error(done.stderr or done.stdout)
        return _parse(done.stdout)

    def run_text(self, command: str) -> None:
        self.list_text(command)

    def list_text(self, command: str) -> str:
        done = subprocess.run([self._argv[0], "-t", command], capture_output=True, text=True,  # noqa: S603
                              timeout=30, check=False)
        if done.returncode != 0:
            raise _error(done.stderr or done.stdout)
        return done.stdout


def default_runner() -> NftRunner:
    """libnftables if it loads, else the nft program.  Raises LocalError."""
    try:
        return LibNft(ctypes.util.find_library("nftables") or LIBRARY)
    except OSError:
        return NftProgram()


class FakeNft:
    """Records documents; answers `list` with what its sets would hold."""

    name = "fake"

    def __init__(self, *, owns_tables: bool = False) -> None:
        self.owns_tables = owns_tables
        self.texts: list[str] = []
        self.tables_text = ""  # what `list tables` prints
        self.documents: list[Document] = []
        self.listing: Document = {"nftables": []}
        self.refuse_next: list[str] = []  # errors to raise, one per coming run

    def run(self, document: Document, *, terse: bool = False) -> Document:
        self.documents.append(document)
        if self.refuse_next:
            raise _error(self.refuse_next.pop(0))
        if any("list" in command for command in document["nftables"]):
            return self.listing
        return {}

    def run_text(self, command: str) -> None:
        self.texts.append(command)

    def list_text(self, command: str) -> str:
        self.texts.append(command)
        return self.tables_text


