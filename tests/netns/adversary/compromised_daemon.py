"""A compromised daemon, for the adversarial review of the privilege split
(issue 13, finding 6; docs/threat-model.md, "Privilege separation").

It does exactly what spa.server.runner.build does up to the point where the
real daemon would start serving: the state directory's lock, the capture
socket (opened as root, before the fork) and its eBPF tag map (so the gate
keeper keeps CAP_BPF and makes tag maps), a socketpair, a fork whose child
runs the real gate keeper (runner._gate_keeper: the real drop, the real
backend), then the real drop to the daemon (privsep.drop_to_daemon).  From
there on it is the attacker: a process with the daemon's credentials, its
capture socket and its end of the socketpair, speaking raw frames.

    python compromised_daemon.py CONFIG SCENARIO [ADDRESS]

prints `keeper PID`, then one `reply ...` line per answer, then `READY`, and
holds what it did until stdin closes (the test probes meanwhile).  Run only
inside a network namespace the caller made.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from spa.kernel.tagmap import MIN_ENTRIES
from spa.server import config as config_mod
from spa.server import frames, gatemsg, mapgrant, privsep, runner
from spa.server.capture import CaptureSource
from spa.server.state import StateDir


def say(*parts: object) -> None:
    print(*parts, flush=True)


def ask(sock: socket.socket, message: dict[str, Any] | bytes) -> Any:
    data = message if isinstance(message, bytes) else gatemsg.frame(message)
    sock.sendall(data)
    reply = frames.receive(sock)
    say("reply", json.dumps(reply))
    return reply


def allow(address: str, service: str, until: float) -> dict[str, Any]:
    return {"kind": "apply", "changes": [["allow", address, service, until]]}


def tag_map(mode: str, port: int, entries: int) -> dict[str, Any]:
    return {"kind": "tagmap", "mode": mode, "port": port, "entries": entries}


def main() -> None:
    config_path, scenario = Path(sys.argv[1]), sys.argv[2]
    target = sys.argv[3] if len(sys.argv) > 3 else "10.231.1.2"
    config = config_mod.load(config_path)
    state = StateDir(config.state_dir)
    if not privsep.owned_by_another(state.path):
        state.ensure()
    state.acquire(time.time())
    source = CaptureSource(config.listen_port, config.interface)  # as runner.make_source
    if scenario == "tag_maps":  # whoever starts the server may lower the most (mapgrant)
        os.environ[mapgrant.CAP_VARIABLE] = str(16 * MIN_ENTRIES)
    runner._reserve_kernel_map(config, source)  # as runner.build: the eBPF map, then the fork
    gate, _ = runner.split(config, state, source, room=source.map_room)  # the real fork, drop
    ours, pid = gate._sock, gate.pid
    assert pid is not None
    caps = privsep.capabilities()
    say("keeper", pid)
    say("daemon", os.getuid(), hex(caps.effective), hex(caps.bounding))
    ours.settimeout(60)
    services = sorted(config.services)
    ask(ours, {"kind": "start", "services": services})
    now = time.time()
    ssh = config.services["ssh"]
    keep: list[object] = [source]

    if scenario == "nothing":  # the control: the gate as the daemon installs it
        pass
    elif scenario == "honest":  # the control: a grant within the rules, then silence
        ask(ours, allow(target, "ssh", now + ssh.max_duration))
    elif scenario == "tag_maps":  # tag maps for another port or mode, absurd, then doubling
        room, port = source.map_room, config.listen_port
        for mode, asked, entries in (("capture", 22, 2 * room), ("udp", port, 2 * room),
                                     ("capture", port, 1 << 30), ("capture", port, room)):
            ask(ours, tag_map(mode, asked, entries))
        entries = 2 * room
        while True:  # every kit it gets, it keeps (the kernel memory it may hold)
            ours.sendall(gatemsg.frame(tag_map("capture", port, entries)))
            reply, fds = frames.receive_with_fds(ours, 8)
            keep.append(fds)
            say("reply", json.dumps(reply), "fds",
                *sorted(os.readlink(f"/proc/self/fd/{fd}") for fd in fds))
            if "ok" not in (reply or {}):
                break
            entries *= 2
        ask(ours, allow(target, "ssh", now + ssh.max_duration))  # it serves on
    elif scenario == "start_empty":  # install the gate for no service at all
        ask(ours, {"kind": "start", "services": []})
    elif scenario == "start_subset":  # keep https gated, drop ssh from the gate
        ask(ours, {"kind": "start", "services": ["https"]})
    elif scenario == "close_after_grant":  # a grant, then close our end (or exit)
        ask(ours, allow(target, "ssh", now + ssh.max_duration))
        ours.close()
    elif scenario.startswith("crash_"):  # a grant, then one frame the parser dies on
        ask(ours, allow(target, "ssh", now + ssh.max_duration))
        body = {
            "crash_kind_list": b'{"kind":[]}',
            "crash_kind_dict": b'{"kind":{}}',
            "crash_overflow": b'{"kind":"apply","changes":[["allow","10.0.0.1","ssh",1'
                              + b"0" * 400 + b"]]}",
            "crash_depth": b'{"kind":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        }[scenario]
        ours.sendall(len(body).to_bytes(4, "big") + body)
        try:
            say("reply", json.dumps(frames.receive(ours)))
        except OSError as exc:
            say("reply", "error", exc)
    elif scenario == "slowloris":  # a grant, then a frame that never quite ends
        ask(ours, allow(target, "ssh", now + ssh.max_duration))
        ours.sendall((1000).to_bytes(4, "big"))

        def dribble() -> None:
            for _ in range(999):
                ours.sendall(b" ")
                time.sleep(0.3)  # < spa.server.monitor.TURN: the stall counter never moves

        thread = threading.Thread(target=dribble, daemon=True)
        thread.start()
        keep.append(thread)
    elif scenario == "sigstop":  # a grant, then freeze the gate keeper
        ask(ours, allow(target, "ssh", now + ssh.max_duration))
        try:
            os.kill(pid, signal.SIGSTOP)
        except PermissionError:  # the daemon is never the gate keeper's user by hand
            say("refused", "sigstop")
        else:
            say("stopped", pid)
    elif scenario == "config_rewrite":  # the daemon's user owns the config: rewrite it
        try:
            text = re.sub(r"max_duration = \d+", "max_duration = 31536000",
                          config_path.read_text())
            text += ('\n[services.anything]\nprotocol = "tcp"\nport = 8080\n'
                     'default_duration = 30\nmax_duration = 31536000\n')
            config_path.write_text(text)
        except PermissionError:  # root's config: not the daemon's to read or write
            say("refused", "config")
        ask(ours, {"kind": "start", "services": [*services, "anything"]})
        year = time.time() + 31536000
        ask(ours, {"kind": "apply", "changes": [["allow", target, "ssh", year],
                                                 ["allow", target, "anything", year]]})
    elif scenario == "memory":  # one 64 MiB frame of empty lists
        prefix = b'{"kind":"apply","changes":['
        size = gatemsg.MAX_FRAME
        body = prefix + b"[]," * ((size - len(prefix) - 3) // 3) + b"0]}"
        started = time.monotonic()
        ask(ours, len(body).to_bytes(4, "big") + body)
        say("took", round(time.monotonic() - started, 1))
    elif scenario == "packet_socket":  # what the inherited capture socket can still do
        sock = source._sock
        ifname = sys.argv[4]
        index = socket.if_nametoindex(ifname)
        # promiscuous mode on any interface: PACKET_ADD_MEMBERSHIP, PACKET_MR_PROMISC
        mreq = struct.pack("iHH8s", index, 1, 0, b"")
        sock.setsockopt(263, 1, mreq)
        say("promisc", ifname)
        # a forged IPv4/UDP datagram from 10.231.9.9 (no such host) to the client
        payload = b"forged by the daemon"
        udp = struct.pack("!HHHH", 5353, 40000, 8 + len(payload), 0) + payload
        header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                             socket.inet_aton("10.231.9.9"), socket.inet_aton(target))
        checksum = sum(struct.unpack("!10H", header))
        checksum = (checksum & 0xFFFF) + (checksum >> 16)
        header = header[:10] + struct.pack("!H", ~checksum & 0xFFFF) + header[12:]
        mac = bytes.fromhex(sys.argv[5].replace(":", ""))
        for _ in range(5):
            sent = sock.sendto(header + udp, (ifname, 0x0800, 0, 0, mac))
            time.sleep(0.1)
        say("sent", sent)
    elif scenario == "root_files":  # uid 0 without a capability still owns root's files
        place = Path(sys.argv[4])

        def chmod_read() -> None:
            (place / "secret").chmod(0o600)
            (place / "secret").read_text()

        def stop_cont() -> None:
            os.kill(pid, signal.SIGSTOP)
            os.kill(pid, signal.SIGCONT)

        acts: tuple[tuple[str, Callable[[], object]], ...] = (
                ("write a root 0644 file", lambda: (place / "victim").write_text("daemon\n")),
                ("chmod and read a root 0400 file", chmod_read),
                ("create in a root 0755 directory",
                 lambda: (place / "rootdir" / "planted").write_text("daemon\n")),
                # opened for writing and closed, nothing written: the permission
                # check is at open (euid 0 gets the owner's bits, no capability)
                ("open kernel.core_pattern for writing (nothing written)",
                 lambda: os.close(os.open("/proc/sys/kernel/core_pattern", os.O_WRONLY))),
                ("kill -STOP a root process (the gate keeper)", stop_cont))
        for what, act in acts:
            try:
                act()
                say("did", what)
            except OSError as exc:
                say("refused", what, exc.strerror)
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    say("READY")
    sys.stdin.readline()
    say("exiting")


if __name__ == "__main__":
    main()
