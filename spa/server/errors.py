"""Local errors: bad config, bad state, firewall or socket failure.

Invariant (STYLE principle 4): the message is one line for an operator that
says what is wrong and how to fix it, and never contains a secret.  The CLI
prints it without a traceback and exits with status 2.
"""

from __future__ import annotations


class LocalError(Exception):
    """Something on this machine is wrong; the message says what to do."""


class ConfigError(LocalError):
    """The configuration file is missing, unreadable, unsafe or invalid."""
