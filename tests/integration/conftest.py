"""Fixtures for tests on the two-host test bed (real systemd, D-Bus, journald, stunnel)."""

from __future__ import annotations

import os
from typing import Iterator

import pytest

from tests.testbed import Testbed

pytestmark = pytest.mark.testbed


def pytest_collection_modifyitems(items):
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.testbed)


@pytest.fixture(scope="session")
def bed() -> Iterator[Testbed]:
    if os.geteuid() != 0:
        pytest.fail("the test bed needs root: run `make test` as root")
    tb = Testbed()
    tb.up()
    try:
        yield tb
    finally:
        tb.down()


@pytest.fixture
def s1(bed: Testbed):
    return bed["server1"]


@pytest.fixture
def s2(bed: Testbed):
    return bed["server2"]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed and "bed" in item.fixturenames:
        # The journals of both hosts are the first thing to read on a failure.
        tb = item.funcargs.get("bed") or Testbed()
        for host in tb.hosts.values():
            report.sections.append(
                (f"journal of {host.name} (last 60 lines)", host.journal("-n", "60")))


# --------------------------------------------------------------------------
# helpers shared by the integration tests

HOSTTOOL = "/run/testbed/src/tests/integration/hosttool.py"
KEY_DIR = "/var/lib/scistream/keys"
STATE_DIR = "/var/lib/scistream/endpoints"


def tool(host, *args: str, **kw):
    return host.run(["python3", HOSTTOOL, *args], **kw)


def dbus(host, method: str, sig: str, body: list, *, user=None,
         path: str = "/org/scistream/Tunnel1",
         iface: str = "org.scistream.Tunnel1.Manager") -> dict:
    """A raw D-Bus call inside ``host``; {"reply": [...]} or {"error": name, "message": m}."""
    import json

    out = host.run(["python3", HOSTTOOL, "dbus", method, sig, json.dumps(body),
                    "--path", path, "--iface", iface], user=user, check=False)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def residue(host) -> list:
    """Everything an endpoint could leave on a host: units, keys, state, listening ports."""
    found = []
    units = host.run(["systemctl", "list-units", "--all", "--no-legend", "--plain",
                      "scistream-*.service"], check=False).stdout.split()
    found += [u for u in units if u.startswith("scistream-")]
    for d in (KEY_DIR, STATE_DIR):
        ls = host.run(["ls", "-A", d], check=False).stdout.split()
        found += [f"{d}/{f}" for f in ls]
    ss = host.run(["ss", "-Htln"], check=False).stdout
    for line in ss.splitlines():
        local = line.split()[3]
        port = int(local.rsplit(":", 1)[1])
        if 5100 <= port <= 5200:
            found.append(f"listening {local}")
    return found


class Apps:
    """Application processes (echo servers, sinks, iperf3) run as units of a host."""

    def __init__(self) -> None:
        self.started = []

    def start(self, host, name: str, *cmd: str) -> None:
        host.run(["systemd-run", f"--unit={name}", "--collect", "--quiet", "-p",
                  "Restart=no", *cmd])
        self.started.append((host, name))
        # Wait until it listens (the command's port is the first int arg).
        port = next((a for a in cmd if a.isdigit()), None)
        if port:
            host.run(["sh", "-c", f"for i in $(seq 200); do ss -Htln 'sport = :{port}' | "
                                  f"grep -q . && exit 0; sleep 0.05; done; exit 1"])

    def stop_all(self) -> None:
        for host, name in self.started:
            host.run(["systemctl", "stop", name], check=False)
        self.started.clear()


@pytest.fixture
def apps(bed):
    a = Apps()
    yield a
    a.stop_all()


@pytest.fixture
def clean(bed):
    """Start from, and leave, hosts without endpoints."""
    for host in bed.hosts.values():
        host.ctl("release", "--all")
    yield bed
    for host in bed.hosts.values():
        host.ctl("release", "--all")


def wait_listening(host, port: int, ip: str = "", tries: int = 200) -> None:
    """Wait until something listens on [ip:]port inside ``host``; TestbedError if never."""
    sel = f"src {ip}:{port}" if ip else f"sport = :{port}"
    host.run(["sh", "-c", f"for i in $(seq {tries}); do ss -Htln '{sel}' | grep -q . && exit 0; "
                          f"sleep 0.05; done; echo 'nothing listens on {ip}:{port}' >&2; exit 1"])


class SignalWatch:
    """scistreamd's D-Bus signals below a path, seen by a subscriber inside ``host``.

    The subscription is in place when the constructor returns, so whatever the
    caller does next cannot slip past it. ``events()`` waits for the watcher to
    end (``until`` seen, or its timeout) and returns the signals as dicts.
    """

    def __init__(self, host, path_namespace: str, until: str = "", timeout: float = 30) -> None:
        import subprocess

        cmd = ["python3", HOSTTOOL, "watch", path_namespace, "--timeout", str(timeout)]
        if until:
            cmd += ["--until", until]
        self.proc = subprocess.Popen(host.nsenter() + cmd, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        first = self.proc.stdout.readline().strip()
        if first != "READY":
            self.proc.kill()
            raise AssertionError(f"signal watcher did not start: {first!r} "
                                 f"{self.proc.stderr.read()}")
        self.timed_out = False

    def events(self, timeout: float = 60) -> list:
        import json

        out, _err = self.proc.communicate(timeout=timeout)
        lines = out.splitlines()
        self.timed_out = "TIMEOUT" in lines
        return [json.loads(x) for x in lines if x.startswith("{")]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()
