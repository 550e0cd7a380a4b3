"""`spa-server demo` as root runs in namespaces with a real sshd and ssh;
without namespaces (not root) it says so and runs the loopback demo."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from spa.netns import sh
from tests.integration.procs import command, run_cli


def test_demo_in_namespaces_with_a_real_ssh_login() -> None:
    done = run_cli("spa-server", "demo", timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for expected in ("before the knock: ssh cannot connect", "logged in as root",
                     "s left, held by alice",
                     "alice's knock accepted (the original: it renews her lease)",
                     "the eavesdropper's copy refused: reason=replay",
                     "the copy with one bit flipped refused: reason=bad_mac",
                     "no knock accepted but alice's two",
                     "after the close: ssh cannot connect again", "demo passed"):
        assert expected in out, out
    assert "FAILED" not in out
    logged = out.split("each after the packet behind it:")[1].splitlines()
    accepted = [line for line in logged if "accepted action=" in line]
    assert len(accepted) == 3 and all(line.strip().startswith("alice's") for line in accepted), \
        "every accepted line is named as alice's own packet"
    assert any(line.strip().startswith("the eavesdropper's copy:") and
               "refused reason=replay" in line for line in logged), out
    # its own two, by name (other tests may make and remove theirs meanwhile)
    named = re.search(r": (spa-\w+-srv) and (spa-\w+-cli), removed at the end", out)
    assert named is not None, out
    left = sh("ip", "netns", "list").stdout.split()
    assert not set(named.groups()) & set(left), "the demo removed its namespaces"


@pytest.mark.usefixtures("checkout_reachable_by_others")
def test_demo_falls_back_to_loopback_without_namespaces() -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv")
    done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           *command("spa-server"), "demo"],
                          capture_output=True, text=True, timeout=120, check=False,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/tmp"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "network namespaces unavailable: needs root" in done.stdout
    assert "running the loopback demo instead" in done.stdout
    assert "demo passed" in done.stdout
