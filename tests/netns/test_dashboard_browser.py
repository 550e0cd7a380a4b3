"""The dashboard in a real browser: Debian's chromium driven by selenium
(chromium-driver; no browser download), against the real server with
nftables in namespaces and the real `spa-server dashboard` on loopback.

Set SPA_SCREENSHOTS=DIR to keep the screenshots (docs/img holds the ones
docs/operations.md shows); they are always taken and checked to be images.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.harness import free_port
from tests.integration.procs import command
from tests.netns.conftest import ATT4, CLI4, SRV4, SRV_ATT4, Spa
from tests.netns.test_ssh_e2e import enroll_alice

PASSWORD = "a long dashboard passphrase"
CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"

pytestmark = pytest.mark.netns


@pytest.fixture
def browser() -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert os.path.exists(CHROMIUM) and os.path.exists(DRIVER), (
        "install Debian's chromium and chromium-driver (scripts/setup.sh --test does)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def dashboard(spa: Spa, tmp_path: Path) -> Iterator[str]:
    """`spa-server dashboard-password --stdin`, then `spa-server dashboard` on
    127.0.0.1 (root namespace: it only reads and writes the server's files)."""
    config = str(spa.config)
    done = subprocess.run([*command("spa-server"), "--config", config, "dashboard-password",
                           "--stdin"], input=PASSWORD + "\n", capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert PASSWORD not in done.stdout + done.stderr
    port = free_port(socket.SOCK_STREAM, "127.0.0.1")
    log = (tmp_path / "dashboard.log").open("w+")
    proc = subprocess.Popen([*command("spa-server"), "--config", config, "dashboard",
                             "--listen", f"127.0.0.1:{port}"],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.monotonic() + 20
        while "dashboard on http://127.0.0.1" not in Path(log.name).read_text():
            assert proc.poll() is None, Path(log.name).read_text()
            assert time.monotonic() < deadline, Path(log.name).read_text()
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        text = Path(log.name).read_text()
        log.close()
        assert PASSWORD not in text


def shot(driver: object, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    assert driver.save_screenshot(str(path))  # type: ignore[attr-defined]
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    keep = os.environ.get("SPA_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / path.name)


def test_login_see_a_real_knock_appear_count_down_and_revoke(
        spa: Spa, dashboard: str, browser: object, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    driver: WebDriver = browser  # type: ignore[assignment]
    wait = WebDriverWait(driver, 15)
    world = spa.world
    spa.start()
    enroll_alice(spa)

    # 1. Signed out: every page leads to the login; a wrong password is refused.
    driver.get(dashboard + "/")
    wait.until(ec.url_to_be(dashboard + "/login"))
    shot(driver, tmp_path, "dashboard-login")
    driver.find_element(By.ID, "password").send_keys("not the password")
    driver.find_element(By.ID, "sign-in").click()
    assert "Wrong password" in wait.until(
        ec.visibility_of_element_located((By.ID, "error"))).text
    driver.find_element(By.ID, "password").send_keys(PASSWORD)
    driver.find_element(By.ID, "sign-in").click()
    wait.until(ec.url_to_be(dashboard + "/"))
    assert driver.find_element(By.ID, "no-leases").is_displayed()
    assert driver.find_element(By.ID, "count-leases").text == "0"

    # 2. Something to show: an attacker tries ssh and https (dropped, a scan);
    #    bob, revoked, knocks (refused).
    bob = spa.enroll("bob", SRV4, "ssh")
    assert spa.client(world.cli, "bob", "enroll", bob, "--name", "srv").returncode == 0
    spa.admin("revoke", "bob")
    probe = ("import socket,sys\nfor port in (22, 443, 22, 443):\n"
             "    try: socket.create_connection((sys.argv[1], port), timeout=0.3)\n"
             "    except OSError: pass\n")
    world.att.run(sys.executable, "-c", probe, SRV_ATT4)
    assert spa.wait_for(f"scan src={ATT4} service=ssh,https", timeout=15), spa.lines
    assert spa.client(world.cli, "bob", "open", "ssh", "srv", "--timeout", "1").returncode != 0
    assert spa.wait_for("refused reason=revoked client=bob"), spa.lines

    # 3. A real knock from the client's namespace: the lease appears without a
    #    reload (the page polls /api/leases) and its countdown runs.
    done = spa.client(world.cli, "alice", "open", "ssh", "srv", "--duration", "300")
    assert done.returncode == 0, done.stdout + done.stderr
    row = wait.until(ec.presence_of_element_located(
        (By.XPATH, f"//table[@id='leases']/tbody/tr[td[1]='{CLI4}']")))
    cells = [td.text for td in row.find_elements(By.TAG_NAME, "td")]
    assert cells[1:3] == ["ssh", "alice"]
    first = cells[3]
    assert first.startswith(("4 min", "5 min")), first
    countdown = (By.XPATH, f"//table[@id='leases']/tbody/tr[td[1]='{CLI4}']/td[4]")
    # it ticks within 2.2 s
    WebDriverWait(driver, 2.2, poll_frequency=0.1).until(
        lambda d: d.find_element(*countdown).text != first, "the countdown ticks")
    assert not driver.find_element(By.ID, "no-leases").is_displayed()
    driver.refresh()  # the rest of the page (counts, last seen, graph) on a fresh load
    assert driver.find_element(By.ID, "count-accepted").text == "1"
    assert driver.find_element(By.ID, "count-scans").text == "1"
    assert int(driver.find_element(By.ID, "count-refused").text) >= 1
    assert driver.find_element(By.CSS_SELECTOR, "#client-bob .state").text == "revoked"
    alice = driver.find_element(By.ID, "client-alice")
    assert "from " + CLI4 in alice.text and "active" in alice.text
    graph = driver.find_element(By.ID, "graph")
    assert driver.execute_script("return arguments[0].naturalWidth", graph) == 760
    shot(driver, tmp_path, "dashboard-overview")

    # 4. The activity table, filtered by client.
    driver.get(dashboard + "/activity")
    everything = {tr.find_elements(By.TAG_NAME, "td")[1].text
                  for tr in driver.find_elements(By.CSS_SELECTOR, "#activity tbody tr")}
    assert {"accepted", "lease_start", "refused", "dropped", "scan"} <= everything
    shot(driver, tmp_path, "dashboard-activity")
    Select(driver.find_element(By.ID, "filter-client")).select_by_visible_text("alice")
    driver.find_element(By.CSS_SELECTOR, "#filters button").click()
    wait.until(ec.url_contains("client=alice"))
    outcomes = [tr.find_elements(By.TAG_NAME, "td")[1].text
                for tr in driver.find_elements(By.CSS_SELECTOR, "#activity tbody tr")]
    assert outcomes == ["accepted"]  # lease rows belong to an address, not a client

    # 4b. The clients page, filtered by state in the browser's own form, and
    #     a client's page through its details link.
    driver.get(dashboard + "/clients")
    Select(driver.find_element(By.ID, "filter-state")).select_by_visible_text("revoked")
    driver.find_element(By.CSS_SELECTOR, "#client-filters button").click()
    wait.until(ec.url_contains("state=revoked"))
    rows = driver.find_elements(By.CSS_SELECTOR, "table.clients tbody tr")
    assert [row.get_attribute("id") for row in rows] == ["client-bob"]
    assert driver.find_element(By.ID, "matching").text == "1 client match"
    driver.get(dashboard + "/clients?match=ali")
    driver.find_element(By.CSS_SELECTOR, "#client-alice a.details").click()
    wait.until(ec.url_to_be(dashboard + "/clients/alice"))
    assert driver.find_element(By.CSS_SELECTOR, "#client-alice .state").text == "active"

    # 5. Revoke with close: the server refuses alice and closes her lease.
    driver.get(dashboard + "/")
    driver.find_element(
        By.XPATH, "//tr[@id='client-alice']//button[text()='Revoke and close leases']").click()
    assert "alice is revoked" in wait.until(
        ec.visibility_of_element_located((By.ID, "flash"))).text
    assert driver.find_element(By.CSS_SELECTOR, "#client-alice .state").text == "revoked"
    wait.until(ec.visibility_of_element_located((By.ID, "no-leases")))
    assert spa.elements() == []
    def drops() -> int:
        return sum(1 for line in list(spa.lines) if line.startswith(f"dropped src={CLI4} "))

    before = drops()
    refused = spa.client(world.cli, "alice", "open", "ssh", "srv", "--timeout", "4")
    assert refused.returncode != 0
    assert spa.wait_for(f"refused reason=revoked client=alice src={CLI4}")
    # while it waited, the client probed ssh: dropped attempts, not a scan (it knocked)
    deadline = time.monotonic() + 15
    while drops() == before:  # the next reading of the drop counters (every 5 s)
        assert time.monotonic() < deadline, spa.lines
        time.sleep(0.1)
    assert not [line for line in spa.lines if line.startswith(f"scan src={CLI4}")], spa.lines

    # 6. The page ran under its Content-Security-Policy without a violation.
    logs = driver.get_log("browser")  # type: ignore[attr-defined]  # chromium only
    assert not [entry for entry in logs if "Content Security Policy" in entry["message"]], logs

    # 7. Signing out ends the session.
    driver.find_element(By.CSS_SELECTOR, "form.logout button").click()
    wait.until(ec.url_to_be(dashboard + "/login"))
    driver.get(dashboard + "/activity")
    wait.until(ec.url_to_be(dashboard + "/login"))
