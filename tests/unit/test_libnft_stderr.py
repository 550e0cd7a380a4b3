"""libnftables' own prints on C's stderr are caught, never shown (spa/backends/libnft.py)."""

from __future__ import annotations

import ctypes

import pytest

from spa.backends.libnft import CStderr


def c_print(text: bytes) -> None:
    """What libnftables does: fprintf(stderr, ...), read from the variable now."""
    libc = ctypes.CDLL(None)
    libc.fputs.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
    libc.fflush.argtypes = [ctypes.c_void_p]
    stream = ctypes.c_void_p.in_dll(libc, "stderr").value
    libc.fputs(text, stream)
    libc.fflush(stream)


def test_what_c_code_prints_on_stderr_meanwhile_is_caught_and_not_shown(
        capfd: pytest.CaptureFixture[str]) -> None:
    catcher = CStderr()
    try:
        with catcher.caught():
            c_print(b"Operation not permitted (you must be root)\n")
        assert catcher.text == "Operation not permitted (you must be root)\n"
        with catcher.caught():
            c_print(b"second\n")
        assert catcher.text == "second\n", "each catch starts empty"
        with catcher.caught():
            pass
        assert catcher.text == ""
    finally:
        catcher.close()
    c_print(b"after\n")  # C's stderr is the real one again
    assert capfd.readouterr().err == "after\n"
