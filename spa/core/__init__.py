"""The protocol core: pure functions and values, no I/O (STYLE principle 1).

Time and randomness are arguments.  Nothing in this package opens a socket or
a file, reads a clock or draws random bytes; tests/unit/test_core_purity.py
enforces that by reading every module's imports.
"""
