"""The demo's log listing names the packet behind each line (spa/demo.py):
no `accepted` line may read as the eavesdropper's."""

from __future__ import annotations

import pytest

from spa.demo import narrated

STORY = [  # the netns demo's lines: alice knocks twice, the second knock is copied
    "eBPF tag map reserved for 65536 tags",
    "started port=62201 backend=nftables mode=capture clients=1 leases=0",
    "accepted action=open client=alice src=10.200.0.2 service=ssh duration=30",
    "lease_start src=10.200.0.2 service=ssh duration=30",
    "accepted action=open client=alice src=10.200.0.2 service=ssh duration=30",
    "refused reason=replay client=alice src=10.200.0.2",
    "refused reason=bad_mac client=alice src=10.200.0.2",
    "accepted action=close client=alice src=10.200.0.2 service=ssh",
    "lease_end src=10.200.0.2 service=ssh",
]


def test_each_logged_packet_is_named_and_only_alices_are_accepted() -> None:
    shown = narrated(STORY)
    assert [line.split(":")[0] for line in shown] == [
        "alice's knock", "(the gate opens)", "alice's knock again", "the eavesdropper's copy",
        "its copy, one bit flipped", "alice's close", "(the gate closes)"]
    assert all(line.startswith("alice's") for line in shown if "accepted" in line)
    assert shown[3] == ("the eavesdropper's copy:   refused reason=replay client=alice "
                        "src=10.200.0.2")
    starts = {line.index(event) for line, event in zip(shown, STORY[2:], strict=True)}
    assert len(starts) == 1, "the events start in one column"


def test_lines_the_story_does_not_name_are_shown_unnamed_or_left_out() -> None:
    shown = narrated(["started port=1", "refused reason=expired client=bob src=192.0.2.1"])
    assert shown == ["refused reason=expired client=bob src=192.0.2.1"]
    assert narrated([]) == []


def test_a_stage_that_fails_to_come_up_is_one_line_and_leaves_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """sshd or the server not starting ends the demo with one line, exit 1,
    the namespaces torn down (was: a traceback)."""
    from spa import demo_netns

    torn_down = []

    def fail(self: demo_netns.NetnsDemo) -> None:
        raise RuntimeError("sshd did not start: no host key")

    monkeypatch.setattr(demo_netns.NetnsDemo, "setup", fail)
    monkeypatch.setattr(demo_netns.NetnsDemo, "teardown", lambda self: torn_down.append(1))
    said: list[str] = []
    assert demo_netns.run(said.append) == 1
    assert said == ["demo FAILED: sshd did not start: no host key"]
    assert torn_down == [1]
