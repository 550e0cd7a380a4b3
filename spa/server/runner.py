"""Build a Server from the config and the command line's overrides."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import NoReturn

from spa.backends.base import Backend, reconcile
from spa.backends.memory import MemoryBackend
from spa.backends.names import DEFAULT_NAMES, Names
from spa.core.knock import steps_for_window
from spa.core.leases import restore_saved
from spa.core.policy import max_durations, named_services
from spa.core.wire import IPAddress
from spa.group.kv import KV, StoreError
from spa.group.settings import GroupSettings
from spa.kernel.mapsource import MapFiltered
from spa.server import config as config_mod
from spa.server import monitor, privsep
from spa.server.config import ServerConfig
from spa.server.daemon import Server
from spa.server.errors import LocalError
from spa.server.gwroute import refuse_own_hosts
from spa.server.logline import log_to_stderr
from spa.server.mapgrant import MapGrants, most_from
from spa.server.monitor import GateKeeper
from spa.server.notify import Notifier
from spa.server.plant import refuse_planted_state_dir
from spa.server.remote import RemoteGate, RemoteGuard
from spa.server.routes import kernel_routes
from spa.server.sources import PacketSource, UdpSource
from spa.server.state import StateDir
from spa.store import transfer
from spa.store.clients import CLIENTS_DB, ClientStore


def make_backend(name: str, *, flush_on_stop: bool = False, hold: str = "auto",
                 names: Names = DEFAULT_NAMES, config: ServerConfig | None = None) -> Backend:
    """`names`: the instance's tables or chain (config.names); `config`: the
    command backend's [command] and state directory."""
    if name == "memory":
        return MemoryBackend()
    if name == "command":
        return _command_backend(config, flush_on_stop=flush_on_stop)
    if name == "nftables":
        from spa.backends.libnft import default_runner
        from spa.backends.nftables import NftablesBackend

        return NftablesBackend(default_runner(), flush_on_stop=flush_on_stop,
                               hold=None if hold == "auto" else hold == "on", names=names)
    if name == "iptables":
        from spa.backends.iptables import IptablesBackend

        return IptablesBackend.create(flush_on_stop=flush_on_stop, log=log_to_stderr,
                                      names=names)
    raise LocalError(f"unknown backend {name!r}; choose nftables, iptables, command or memory")


def _command_backend(config: ServerConfig | None, *, flush_on_stop: bool) -> Backend:
    from spa.backends.cmdjournal import Journal
    from spa.backends.command import CommandBackend

    if config is None or config.command is None:
        raise LocalError("the command backend needs a [command] table with allow and remove "
                         "in the config (docs/backends.md)")
    chosen = Path(config.command.journal) if config.command.journal else None
    journal = (Journal(chosen.parent, chosen.name) if chosen is not None
               else Journal(config.state_dir))
    return CommandBackend(config.command, journal, log=log_to_stderr,
                          flush_on_stop=flush_on_stop)


def make_source(mode: str, address: str, port: int, interface: str) -> PacketSource:
    if mode == "udp":
        return UdpSource(address, port)
    if mode == "capture":
        from spa.server.capture import CaptureSource

        return CaptureSource(port, interface)
    raise LocalError(f"unknown mode {mode!r}; choose capture or udp")


def build(path: Path, *, backend: str | None, mode: str | None,
          interface: str | None, separate: bool = True) -> Server:
    """The daemon, split in two (spa.server.privsep): this process parses
    and verifies with no capability; a child holds CAP_NET_ADMIN and is the
    only code that touches the firewall.  `separate` False (the loopback
    demo, memory backend only: it gates nothing) keeps one process.  Raises
    LocalError for any problem with the config or the machine."""
    config = config_mod.load(path)
    config = replace(config, backend=backend or config.backend, mode=mode or config.mode,
                     interface=interface if interface is not None else config.interface)
    check_unit_instance(config, os.environ)
    refuse_own_hosts(config.services, config.path)
    refuse_planted_state_dir(config.state_dir, config=config.path)
    state = StateDir(config.state_dir)
    if not privsep.owned_by_another(state.path):
        state.ensure()  # (one another user owns is made ready by the daemon, as that user)
    state.acquire(time.time())  # a second daemon stops here, before socket or firewall
    config = _migrate_clients(config)
    if config.backend not in BACKENDS:
        raise LocalError(f"unknown backend {config.backend!r}; choose nftables, iptables, "
                         "command or memory")
    source = make_source(config.mode, config.listen_address, config.listen_port,
                         config.interface)
    compat = (make_source(config.mode, config.listen_address, config.fwknop_port,
                          config.interface) if config.fwknop_port else None)
    notifier = Notifier.from_environment()
    group = _group_store(config)  # before the drop: its password file may be root's
    if not separate:
        if config.backend != "memory":
            raise LocalError("only the memory backend runs in one process")
        return _with_group(_with_compat(Server(
            config, backend=MemoryBackend(), source=source, clock=time.time,
            log=log_to_stderr, notifier=notifier, state=state), compat), group)
    notifier.connect()  # while it may: the daemon's user may not reach the socket
    reserved = _reserve_kernel_map(config, source)  # while it may: CAP_BPF goes at the drop
    room = source.map_room if isinstance(source, MapFiltered) else 0
    gate, user = split(config, state, source, room=room)
    if isinstance(source, MapFiltered) and room:  # a growth: the gate keeper makes its maps
        source.hand_maps(partial(gate.tag_map, config.mode, config.listen_port))
    server = Server(config, backend=gate, source=source, clock=time.time,
                    log=log_to_stderr, notifier=notifier, state=state,
                    routes=kernel_routes(), guard=RemoteGuard)
    gate.on_lost = server.stop_requested.set
    held = privsep.capabilities().permitted  # started without them (a user's try-out)
    kept = " and ".join(privsep.NAMES[cap] for cap in sorted(
        privsep.gate_keeper_capabilities(config.backend, bpf=room > 0)) if held >> cap & 1)
    if reserved:
        server.start_notes.append(reserved)
    kept = f"{kept} only" if kept else "no capability"
    server.start_notes.append(f"privileges: daemon pid {os.getpid()} as {user} with no "
                              f"capability; gate keeper pid {gate.pid} with {kept}")
    return _with_group(_with_compat(server, compat), group)


UNIT_INSTANCE = "SPA_INSTANCE"  # set by spa-server@NAME.service to its NAME


def check_unit_instance(config: ServerConfig, environ: Mapping[str, str]) -> None:
    """spa-server@NAME.service runs a config whose [server] instance is NAME:
    else two units would share (and fight over) one table.  Raises LocalError."""
    unit = environ.get(UNIT_INSTANCE)
    if unit is not None and unit != config.instance:
        raise LocalError(f"{config.path}: spa-server@{unit}.service runs it, but its "
                         f"[server] instance is {config.instance!r}: set instance = "
                         f"\"{unit}\" (each instance its own tables)")


def _with_compat(server: Server, source: PacketSource | None) -> Server:
    """The fwknop compat listener beside ours, when [server] fwknop_port is set."""
    if source is not None:
        from spa.server.compat import CompatListener

        server.companions.append(CompatListener(server, source))
    return server


def _group_store(config: ServerConfig) -> tuple[GroupSettings, KV] | None:
    """The [group] table's store (None: a standalone server), through the
    edge every group command uses (spa.server.groupstore: the password and key
    files checked, etcd3gw's absence said).  Raises LocalError."""
    settings = config.group
    if settings is None:
        return None
    from spa.server import groupstore

    try:
        return settings, groupstore.connect(settings)
    except LocalError as exc:
        raise LocalError(f"[group] in {config.path}: {exc}") from None
    except (StoreError, ValueError) as exc:
        raise LocalError(f"[group] in {config.path}: {exc}") from None


def _with_group(server: Server, group: tuple[GroupSettings, KV] | None) -> Server:
    """The server as a member of its group (spa.group.link), when [group] is set."""
    if group is not None:
        from spa.group.link import GroupLink

        GroupLink(server, group[1], group[0])
    return server


BACKENDS = ("nftables", "iptables", "command", "memory")


def _migrate_clients(config: ServerConfig) -> ServerConfig:
    """Before the drop (root may write server.toml): [clients] left in the
    file move into the client store, once (spa/store/transfer.py); the
    daemon then reads them from the store.  Where this process may not
    write the file, they stay and the daemon runs with them, said in one
    line."""
    if not config.clients:
        return config
    try:
        moved = transfer.migrate(config.path, config.state_dir, at=time.time())
    except LocalError as exc:
        log_to_stderr(f"warning clients stay in {config.path} until `spa-server clients` "
                      f"runs as root (it moves them into the client store): {exc}")
        return config
    log_to_stderr(f"migrated clients={moved} from {config.path} into the client store "
                  f"(the file as it was: {config.path}{transfer.BACKUP_SUFFIX})")
    return replace(config, clients={})


RESERVE_ROOM = 2  # the tag map is made for this many times today's clients' tags


def _reserve_kernel_map(config: ServerConfig, source: PacketSource) -> str:
    """Make the eBPF tag map before the drop, with room for RESERVE_ROOM x
    the tags of the clients in the store (every live step, plus the step
    sliced in ahead and the one sliced out behind): after the drop the
    daemon changes the map in place, and only a growth past that room (more
    than twice the clients enrolled without a restart) falls back to the
    classic filter, said in the log.  Returns the log line ("" if none)."""
    reserve = getattr(source, "reserve_map", None)
    if reserve is None:
        return ""
    try:
        with ClientStore.open_as_owner(config.state_dir, create=False) as store:
            clients = store.count()
    except LocalError:
        clients = 0  # no store yet: the least map
    per_client = 2 * steps_for_window(config.window) + 3
    note: str = reserve(RESERVE_ROOM * clients * per_client)
    return note


def split(config: ServerConfig, state: StateDir, source: PacketSource, *,
          room: int = 0) -> tuple[RemoteGate, str]:
    """Fork the gate keeper (it never returns), then drop this process to
    the daemon: no capability, never root.  `room`: the eBPF tag map's,
    made before (0: no map filter runs; else the gate keeper keeps CAP_BPF
    to make the maps of its growth).  Returns the daemon's end of the gate
    keeper and the user it now runs as.  Raises LocalError."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # the gate keeper: never returns
        ours.close()
        source.close()
        state.release_copy()  # the lock is the daemon's (a gate keeper may outlive it)
        _gate_keeper(config, theirs, room)
    theirs.close()
    gate = RemoteGate(ours, pid)
    try:
        who = privsep.daemon_user(state.path)
        privsep.hand_over(state.path, who)
        state.pin()  # before the drop: it may not search the directories above
        privsep.drop_to_daemon(who)
        if not os.access(state.path, os.W_OK | os.X_OK):  # SQLite opens by the full path
            raise LocalError(f"the daemon runs as {who.pw_name} and cannot reach {state.path}: "
                             "let it through the directories above (chmod o+x on each), or "
                             "set state_dir to a directory it can reach (/var/lib/spa)")
        state.ensure()
        state.lock_here_too(time.time())
    except LocalError:
        gate.close()
        raise
    return gate, who.pw_name


GATE_KEEPER_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def leave_signals_to_the_daemon() -> None:
    """The gate keeper's SIGTERM, SIGINT and SIGHUP do nothing: caught by a
    handler that does nothing, not ignored.  An ignored signal stays ignored
    across exec: the programs it runs (the command backend's) would inherit
    it, and neither their own `kill` or `timeout`, nor the unit's stop, could
    end them with it (a caught one is reset to the default at exec)."""
    for signum in GATE_KEEPER_SIGNALS:
        signal.signal(signum, _nothing)


def _nothing(signum: int, frame: object) -> None:
    """A signal the daemon acts on (see leave_signals_to_the_daemon)."""


def _gate_keeper(config: ServerConfig, sock: socket.socket, room: int = 0) -> NoReturn:
    """The child's life: drop to CAP_NET_ADMIN (and CAP_BPF with a `room`:
    the eBPF tag map's), make the backend, answer the daemon until it goes
    away.  Signals are the daemon's to act on (a SIGTERM to the group
    reaches both; this one stops when the daemon has)."""
    status = 1
    try:
        leave_signals_to_the_daemon()
        try:
            privsep.drop_to_gate_keeper(config.path, config.backend, bpf=room > 0)
            backend = make_backend(config.backend, flush_on_stop=config.flush_on_stop,
                                   hold=config.hold_table, names=config.names, config=config)
            maps = MapGrants(config.mode, config.listen_port, room,
                             most=most_from(os.environ)) if room else None
        except LocalError as exc:  # the daemon's first request says it, in one line
            monitor.serve_failure(sock, str(exc))
            status = 2
        else:
            keeper = GateKeeper(backend, config_path=config.path, services=config.services,
                                clock=time.time, log=log_to_stderr, maps=maps)
            if hasattr(backend, "record"):  # the command backend's failures reach the events
                backend.record = lambda event: keeper.events.append(event)
            monitor.serve(keeper, sock, threading.Event())
            status = 0
    except BaseException as exc:  # never a traceback from the privileged part
        log_to_stderr(f"error gate keeper failed: {type(exc).__name__}: {exc}")
    finally:
        os._exit(status)


def install_gate(path: Path, *, backend: str | None = None) -> str:
    """Install the firewall gate from the config and the saved leases, and
    leave (for boot, before the network: contrib/systemd/spa-gate.service).
    Atomic and idempotent: nothing is deleted first; the ports are closed
    from the moment it returns, with the live leases open.  When the daemon
    runs it keeps the gate itself, and nothing is done.  Returns a line for
    the admin.  Raises LocalError."""
    config = config_mod.load(path)
    check_unit_instance(config, os.environ)
    chosen = backend or config.backend
    if chosen == "memory":
        raise LocalError("the memory backend gates nothing; gate is for nftables or iptables")
    if chosen == "command":
        return ("the command backend keeps nothing in this host's firewall (its grants are on "
                "the firewall its commands drive, and the daemon reconciles them from its "
                "journal when it starts); nothing done")
    refuse_own_hosts(config.services, config.path)
    refuse_planted_state_dir(config.state_dir, config=config.path)
    state = StateDir(config.state_dir)
    if not privsep.owned_by_another(state.path):
        state.ensure()  # root only reads the leases of a state directory another user owns
    running = state.running_server()
    if running is not None:
        return (f"spa-server runs (pid {running.get('pid')}) and keeps the gate itself; "
                "nothing done")
    now = time.time()
    state.acquire(now)  # no daemon starts while the gate goes in
    try:
        gate = make_backend(chosen, names=config.names)
        gate.start(config.services, now=now)
        restored = restore_saved(state.load_leases(), clients=_known_clients(config),
                                 max_durations=max_durations(config.services), now=now,
                                 named=named_services(config.services))
        if restored.note():
            log_to_stderr(f"warning {restored.note()}")
        wanted: dict[tuple[IPAddress, str], float] = {}
        destinations: dict[tuple[IPAddress, str], IPAddress] = {}
        for lease in restored.kept:
            if lease.expires > now:
                key = (lease.address, lease.service)
                wanted[key] = max(lease.expires, wanted.get(key, 0.0))
                if lease.destination is not None:  # the one its grant resolved, not a new one
                    destinations.setdefault(key, lease.destination)
        reconcile(gate, wanted, config.services, now=now, destinations=destinations)
    finally:
        state.release()
    return f"gate installed ({chosen}), {len(wanted)} saved lease(s) kept open"


def _known_clients(config: ServerConfig) -> frozenset[str]:
    """The clients of the config and of the client store (none yet, or one
    that cannot be read: the config's alone, said in the log; the gate still
    goes in, and a client whose lease is not kept knocks again)."""
    names = set(config.clients)
    if os.path.lexists(config.state_dir / CLIENTS_DB):
        try:
            with ClientStore.open_as_owner(config.state_dir, create=False) as store:
                names.update(entry.name for entry in store.all())
        except LocalError as exc:
            log_to_stderr(f"warning saved leases: only the config's clients are known: {exc}")
    return frozenset(names)
