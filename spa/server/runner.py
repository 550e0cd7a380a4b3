"""Build a Server from the config and the command line's overrides."""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

from spa.backends.base import Backend
from spa.backends.memory import MemoryBackend
from spa.server import config as config_mod
from spa.server.daemon import Server
from spa.server.errors import LocalError
from spa.server.notify import Notifier
from spa.server.sources import PacketSource, UdpSource
from spa.server.state import StateDir


def log_to_stderr(line: str) -> None:
    """One line per event, key=value; journald adds the time."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def make_backend(name: str, *, flush_on_stop: bool = False) -> Backend:
    if name == "memory":
        return MemoryBackend()
    if name == "nftables":
        from spa.backends.libnft import default_runner
        from spa.backends.nftables import NftablesBackend

        return NftablesBackend(default_runner(), flush_on_stop=flush_on_stop)
    if name == "iptables":
        from spa.backends.iptables import IptablesBackend

        return IptablesBackend.create(flush_on_stop=flush_on_stop, log=log_to_stderr)
    raise LocalError(f"unknown backend {name!r}; choose nftables, iptables or memory")


def make_source(mode: str, address: str, port: int, interface: str) -> PacketSource:
    if mode == "udp":
        return UdpSource(address, port)
    if mode == "capture":
        from spa.server.capture import CaptureSource

        return CaptureSource(port, interface)
    raise LocalError(f"unknown mode {mode!r}; choose capture or udp")


def build(path: Path, *, backend: str | None, mode: str | None,
          interface: str | None) -> Server:
    """Raises LocalError for any problem with the config or the machine."""
    config = config_mod.load(path)
    config = replace(config, backend=backend or config.backend, mode=mode or config.mode,
                     interface=interface if interface is not None else config.interface)
    state = StateDir(config.state_dir)
    state.ensure()
    state.acquire(time.time())  # a second daemon stops here, before socket or firewall
    chosen_backend = make_backend(config.backend, flush_on_stop=config.flush_on_stop)
    source = make_source(config.mode, config.listen_address, config.listen_port,
                         config.interface)
    return Server(config, backend=chosen_backend, source=source, clock=time.time,
                  log=log_to_stderr, notifier=Notifier.from_environment(), state=state)
