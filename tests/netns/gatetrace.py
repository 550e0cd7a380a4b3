"""Evidence of what the gate did while a test probed it, for the test's
failure message, each line stamped with the wall clock: every nftables
commit in the server's namespace and the trace of every packet of the
attacker's to tcp/22 through every chain it met (`nft monitor`, with a
table of ours that sets nftrace), the tables each time they changed (polled
every 5 ms: a hold table going with its owner is no commit), and every
SYN-ACK the server sent to the attacker (tcpdump on the attacker's link: a
handshake the attacker completed shows there, whatever its own socket said).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.netns.conftest import ATT4, SRV_ATT4, World

HERE = Path(__file__).resolve().parent
TRACE_TABLE = "probetrace"  # ours, in the server's namespace: not a name spa gives a table


class GateTrace:
    def __init__(self, world: World, directory: Path) -> None:
        self.world = world
        self.closed = False
        self.monitor_file = directory / "nft-monitor.txt"
        self.capture_file = directory / "syn-acks.txt"
        # every packet of the attacker's to tcp/22 is traced through every
        # chain it meets (`nft monitor` prints the traces with the commits):
        # which verdict let it in
        world.srv.run("nft", f"add table inet {TRACE_TABLE}; add chain inet {TRACE_TABLE} "
                      "pre { type filter hook prerouting priority -350; }; "
                      f"add rule inet {TRACE_TABLE} pre ip saddr {ATT4} tcp dport 22 "
                      "meta nftrace set 1")
        self.monitor = world.srv.popen(
            [sys.executable, str(HERE / "stamp_lines.py"), "nft", "monitor"],
            stdout=self.monitor_file.open("w"), stderr=subprocess.STDOUT)
        self.tables_file = directory / "tables.txt"
        self.tables = world.srv.popen([sys.executable, str(HERE / "tables_poll.py"), "0.005"],
                                      stdout=self.tables_file.open("w"),
                                      stderr=subprocess.STDOUT)
        link = world.srv_links["att"]
        self.capture = world.srv.popen(
            ["tcpdump", "-i", link, "-nn", "-tt", "-l", "-p",
             f"tcp and src host {SRV_ATT4} and src port 22 and dst host {ATT4} "
             "and tcp[tcpflags] & (tcp-syn|tcp-ack) == (tcp-syn|tcp-ack)"],
            stdout=self.capture_file.open("w"), stderr=subprocess.PIPE)
        assert self.capture.stderr is not None
        for line in self.capture.stderr:  # "verbose output suppressed", then this
            if "listening on" in line:
                break
        time.sleep(0.3)  # nft monitor joins the notification group

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.world.srv.run("nft", "delete", "table", "inet", TRACE_TABLE, check=False)
        for proc in (self.monitor, self.capture, self.tables):
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def syn_acks(self) -> list[str]:
        """The SYN-ACKs the server sent to the attacker (wall clock first)."""
        self.close()
        return [line for line in self.capture_file.read_text().splitlines() if " > " in line]

    def around(self, probes: dict[str, Any], seconds: float = 1.0) -> str:
        """For a failure message: the SYN-ACKs since the probes began, the
        commits within `seconds` of each of them and of each opened probe,
        and the trace of every packet of those connections (the whole trace
        stays in its file)."""
        self.close()
        acks = [line for line in self.syn_acks() if float(line.split()[0]) >= probes["start"]]
        moments = [probes["start"] + at for at in probes.get("opened", [])]
        moments += [float(line.split()[0]) for line in acks]
        lines = self.monitor_file.read_text().splitlines()
        commits = [line for line in lines if line.split()[1:2] != ["trace"] and any(
            abs(float(line.split()[0]) - moment) <= seconds for moment in moments)]
        ports = {f"sport {port} " for port in probes.get("ports", [])}
        ports |= {f"sport {line.split()[4].rsplit('.', 1)[1].rstrip(':')} " for line in acks}
        ids = {line.split()[3] for line in lines
               if line.split()[1:2] == ["trace"] and any(port in line for port in ports)}
        traced = [line for line in lines
                  if line.split()[1:2] == ["trace"] and line.split()[3] in ids]
        tables = [line for line in self.tables_file.read_text().splitlines()
                  if line.split()[1:2] == ["tables:"]]
        return "\n".join([f"openings at {sorted(moments)}; SYN-ACKs since the probes began:",
                          *acks, f"the tables over the test ({self.tables_file}):", *tables,
                          f"commits then ({self.monitor_file}):", *commits,
                          "their packets through every chain:", *traced])
