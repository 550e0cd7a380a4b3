"""Run nftables JSON commands: in process through libnftables, or through
the `nft` program when the library is missing.

Invariants (STYLE principle 6):
- Commands are data (JSON documents built by the caller), never shell text.
- One library context per runner; the caller serializes calls (the daemon
  holds its lease lock around every backend call).
- A failure raises LocalError with nftables' own first error line.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import shutil
import subprocess
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

    def run(self, document: Document, *, terse: bool = False) -> Document:
        if terse:
            self._lib.nft_ctx_output_set_flags(self._ctx,
                                               NFT_CTX_OUTPUT_JSON | NFT_CTX_OUTPUT_TERSE)
        try:
            rc = self._lib.nft_run_cmd_from_buffer(self._ctx, json.dumps(document).encode())
            output = (self._lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode()
        finally:
            if terse:
                self._lib.nft_ctx_output_set_flags(self._ctx, NFT_CTX_OUTPUT_JSON)
        if rc != 0:
            errors = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode()
            raise _error(errors or output)
        return _parse(output)

    def run_text(self, command: str) -> None:
        self.list_text(command)

    def list_text(self, command: str) -> str:
        self._lib.nft_ctx_output_set_flags(self._ctx, NFT_CTX_OUTPUT_TERSE)
        try:
            rc = self._lib.nft_run_cmd_from_buffer(self._ctx, command.encode())
            output = (self._lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode()
            if rc != 0:
                raise _error((self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode())
            return output
        finally:
            self._lib.nft_ctx_output_set_flags(self._ctx, NFT_CTX_OUTPUT_JSON)

    def close(self) -> None:
        if self._ctx:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None


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


