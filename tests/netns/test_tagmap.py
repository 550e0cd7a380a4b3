"""Issue 14: the eBPF tag map filter with 5,000 clients' tags (20,000, past
the classic program's ~811), on a real CaptureSource and UdpSource, in a
namespace of its own: knocks sent over its loopback from chosen IPv4 and
IPv6 sources (tests/netns/tagmap_probe.py) and what reached Python counted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from spa.netns import Namespace, Topology
from spa.server.sources import SHUT_SAMPLE

ROOT = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).resolve().parent / "tagmap_probe.py"
SENT = 2560  # knocks per shut check: SENT / SHUT_SAMPLE = 10 expected from elsewhere


@pytest.fixture(scope="module")
def alone() -> Iterator[Namespace]:
    topo = Topology()
    try:
        yield topo.ns("tagmap")
    finally:
        topo.cleanup()


def probe(ns: Namespace, mode: str, scenario: str, **env: str) -> dict[str, object]:
    argv = ns.argv(sys.executable, str(PROBE), mode, scenario)
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env}, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    result: dict[str, object] = json.loads(done.stdout.splitlines()[-1])
    return result


def assert_map_filter(out: dict[str, object]) -> None:
    assert out["kind"] == "ebpf map" and out["kernel_map"] is True, out["note"]
    assert (out["live"], out["live6"]) == (300, 300), "live tags pass, IPv4 and IPv6"
    assert (out["junk"], out["junk6"], out["short"]) == (0, 0, 0), "junk never wakes Python"
    assert (out["removed"], out["added"]) == (0, 1000), "removed tags drop, added ones pass"
    assert (out["nonce_blocked"], out["nonce_other"], out["nonce_after"]) == (0, 2, 1)
    assert (out["shut_known"], out["shut_known6"], out["unshut"]) == (SENT, SENT, SENT)
    for name in ("shut_other", "shut_other6", "shut2_other6"):
        sampled = out[name]
        assert isinstance(sampled, int) and 0 < sampled < 4 * SENT // SHUT_SAMPLE, (name, out)
    assert out["unshut_after"] == 100, "a tag no longer shut passes from anywhere"
    assert (out["replaced_old"], out["replaced_new"]) == (0, 300), out["replace_note"]


@pytest.mark.parametrize("mode", ["capture", "udp"])
def test_map_filter_holds_5000_clients(alone: Namespace, mode: str) -> None:
    out = probe(alone, mode, "all")
    assert_map_filter(out)
    assert out["every_live"] == 20000, "every one of the 20,000 live tags passes"
    assert out["grow_kind"] == "ebpf map" and "room for 262144" in str(out["grow_note"])
    assert (out["grown_live"], out["grown_junk"]) == (600, 0), "grown: the same filter"


@pytest.mark.parametrize("mode", ["capture", "udp"])
def test_map_filter_after_the_capability_drop(alone: Namespace, mode: str) -> None:
    """The daemon holds no capability after its start: updates within the
    map's room and an in-place replace still work; a growth (a new map
    needs CAP_BPF) without a gate keeper to make its maps falls back to the
    classic filter, never dropping a live tag."""
    out = probe(alone, mode, "dropped")
    assert out["caps_dropped"] is True
    assert_map_filter(out)
    assert "Operation not permitted" in str(out["grow_note"]), out["grow_note"]
    assert out["grow_kind"] == "port-only" and out["grown_live"] == 600


@pytest.mark.parametrize("mode", ["capture", "udp"])
def test_map_filter_grows_after_the_drop_with_a_gate_keepers_maps(alone: Namespace,
                                                                 mode: str) -> None:
    """The same dropped process, with a real gate keeper forked before the
    drop (CAP_BPF kept): the growth's maps and program come from it, and the
    grown filter is the same filter (live tags pass, junk drops)."""
    out = probe(alone, mode, "handed")
    assert out["caps_dropped"] is True
    assert_map_filter(out)
    assert out["grow_kind"] == "ebpf map", out["grow_note"]
    assert str(out["grow_note"]).endswith(
        "(room for 262144; grown, its maps made by the gate keeper)"), out["grow_note"]
    assert (out["grown_live"], out["grown_junk"]) == (600, 0), "grown: the same filter"


@pytest.mark.parametrize("mode", ["capture", "udp"])
def test_no_ebpf_falls_back_to_the_classic_filter(alone: Namespace, mode: str) -> None:
    out = probe(alone, mode, "classic", SPA_NO_EBPF="1")
    assert out["kernel_map"] is False and out["kind"] == "classic", out["note"]
    assert str(out["note"]).startswith("eBPF off (SPA_NO_EBPF=1); classic kernel filter on 800")
    assert (out["live"], out["live6"]) == (300, 300)
    assert (out["junk"], out["junk6"], out["short"]) == (0, 0, 0), "the classic program filters"
