"""The ~/.ssh/config lines `spa-client ssh-config` prints.  Pure.

Invariants:
- The ProxyCommand runs in a new shell with none of this shell's settings:
  it names the profile directory (`--config-dir`, absolute) whenever it is
  not the one spa-client finds by itself, and the program by its absolute
  path whenever `spa-client` on PATH is not the program running.
- Every word is quoted for the shell that ssh runs the command with (the
  user's $SHELL: sh, bash, zsh, fish, csh...) and every `%` doubled (ssh
  expands %h, %p... first).  Only single quotes are used, around characters
  every one of those shells takes literally inside them: a path holding a
  quote, a backslash, `!` or `$` (fish reads \\' inside single quotes as a
  quote, csh expands ! and $ there; ssh's own parser rejects some) or a line
  break is refused, never written.
"""

from __future__ import annotations

import shlex
from pathlib import Path


class SshConfigError(ValueError):
    """A path that cannot stand in an ssh_config line."""


UNQUOTABLE = "'\"\\!$"  # not literal inside single quotes in every shell ssh may run


def quote(word: str) -> str:
    """`word` as one shell word in an ssh_config ProxyCommand.  Raises
    SshConfigError for a control character or a character of UNQUOTABLE."""
    if any(ord(char) < 32 or ord(char) == 127 for char in word):
        raise SshConfigError(f"{word!r} holds a control character, which ssh_config "
                             "cannot hold; move it to a path without one")
    odd = sorted({char for char in word if char in UNQUOTABLE})
    if odd:
        raise SshConfigError(f"{word!r} holds {' '.join(odd)}, which not every shell reads "
                             "literally in a ProxyCommand (ssh runs it with your $SHELL); "
                             "move it to a path without them")
    return shlex.quote(word).replace("%", "%%")


def proxy_command(program: str, config_dir: Path | None) -> str:
    """`ProxyCommand PROGRAM [--config-dir DIR] connect %h %p`; `config_dir`
    None: the directory spa-client finds by itself."""
    words = [quote(program)]
    if config_dir is not None:
        words += ["--config-dir", quote(str(config_dir.absolute()))]
    return " ".join([*words, "connect", "%h", "%p"])


def lines(host: str, program: str, config_dir: Path | None) -> list[str]:
    """The comment, Host and ProxyCommand lines for `host`."""
    return [f"# add to ~/.ssh/config: ssh {host} then knocks first",
            f"Host {host}",
            f"    ProxyCommand {proxy_command(program, config_dir)}"]
