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

    prefix = as_user(user) if user else []
    out = host.run(prefix + ["python3", HOSTTOOL, "dbus", method, sig, json.dumps(body),
                             "--path", path, "--iface", iface], check=False)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def residue(host) -> list:
    """Everything an endpoint could leave on a host: units, keys, state, listening ports."""
    found = []
    units = host.run(["systemctl", "list-units", "--all", "--no-legend", "--plain",
                      "scistream-*.service", "scistream-*.socket"], check=False).stdout.split()
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


def wait_until(predicate, timeout: float, what: str, interval: float = 0.1):
    """Poll ``predicate`` until it returns something truthy, and return that.

    ``timeout`` is a failure guard, not a claim about speed: when it runs out
    the AssertionError names ``what`` was awaited.
    """
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def endpoint_properties(host, uid: str, role: str):
    """All properties of endpoint (uid, role) from GetManagedObjects, or None if absent."""
    out = dbus(host, "GetManagedObjects", "", [], iface="org.freedesktop.DBus.ObjectManager")
    assert "reply" in out, out
    for path, ifaces in out["reply"][0].items():
        props = ifaces.get("org.scistream.Tunnel1.Endpoint")
        if props and props.get("Uid") == uid and props.get("Role") == role:
            return dict(props, Path=path)
    return None


def parse_request_output(stdout: str):
    """(uid, s2cs, role, listeners) from the guide's three lines; AssertionError otherwise."""
    import ast

    lines = stdout.splitlines()
    assert len(lines) == 3 and lines[0] == "uid; s2cs; access_token; role", stdout
    uid, s2cs, token, role = lines[1].split()
    assert token == "INVALID_TOKEN", stdout
    assert lines[2].startswith("Listeners: "), stdout
    listeners = ast.literal_eval(lines[2][len("Listeners: "):])
    assert isinstance(listeners, list), stdout
    return uid, s2cs, role, listeners


#: Primary group of the test users sstest-user (not in group scistream) and
#: sstest-member (in it), which the test bed adds to every host.
TEST_USERS_GROUP = "sstest"


def as_user(user: str) -> list:
    """Command prefix that runs what follows as ``user`` (its groups, no capabilities).

    Host.run(user=...) passes --regid=<user>, but the test users' primary
    group is ``sstest``, so setpriv refuses that; this prefix works.
    """
    return ["setpriv", f"--reuid={user}", f"--regid={TEST_USERS_GROUP}", "--init-groups",
            "--inh-caps=-all", "--"]


def run_as(host, user: str, cmd, **kw):
    """``host.run(cmd)`` as ``user``; check=False unless given."""
    kw.setdefault("check", False)
    return host.run(as_user(user) + list(cmd), **kw)


# --------------------------------------------------------------------------
# long-lived clients inside a host (test_hostile.py, test_load.py)

class LineTool:
    """A hosttool subcommand running inside ``host`` that speaks JSON lines.

    One process for many requests: hundreds of calls do not each pay for
    nsenter and a Python start-up. ``timeout`` only keeps a hung daemon from
    hanging the suite; no assertion depends on it.
    """

    def __init__(self, host, *args: str, timeout: float = 120, ready: bool = True) -> None:
        import queue
        import subprocess
        import tempfile
        import threading

        self.host = host
        self.timeout = timeout
        self._err = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(host.nsenter() + ["python3", HOSTTOOL, *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._err, text=True, bufsize=1)
        self._lines: queue.Queue = queue.Queue()

        def pump() -> None:
            for line in self.proc.stdout:
                self._lines.put(line.rstrip("\n"))
            self._lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        if ready:
            first = self.readline()
            assert first == "READY", f"{args[0]} did not start: {first!r} {self.stderr()}"

    def stderr(self) -> str:
        self._err.seek(0)
        return self._err.read()

    def readline(self, timeout: float | None = None) -> str:
        import queue

        try:
            line = self._lines.get(timeout=timeout or self.timeout)
        except queue.Empty:
            raise AssertionError(f"no answer from hosttool within {timeout or self.timeout:g}s "
                                 f"(guard); stderr: {self.stderr()[-2000:]}") from None
        if line is None:
            self._lines.put(None)
            raise AssertionError(f"hosttool ended (exit {self.proc.wait()}): "
                                 f"{self.stderr()[-2000:]}")
        return line

    def read(self, timeout: float | None = None):
        import json

        return json.loads(self.readline(timeout))

    def send(self, obj) -> None:
        import json

        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def ask(self, obj, timeout: float | None = None):
        self.send(obj)
        return self.read(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except Exception:
                self.proc.kill()
                self.proc.wait()
        self._err.close()


class DBusBatch(LineTool):
    """One system-bus connection inside ``host`` for many calls (hosttool dbusbatch)."""

    def __init__(self, host, timeout: float = 120) -> None:
        super().__init__(host, "dbusbatch", timeout=timeout)

    @staticmethod
    def request(method: str, sig: str = "", body=(), *, path: str = "/org/scistream/Tunnel1",
                iface: str = "org.scistream.Tunnel1.Manager") -> dict:
        return {"method": method, "sig": sig, "body": list(body), "path": path, "iface": iface}

    def call(self, method: str, sig: str = "", body=(), **kw) -> dict:
        """{"reply": [...]} or {"error": name, "message": text} (or {"client_error": ...})."""
        return self.ask(self.request(method, sig, body, **kw))

    def calls(self, requests: list) -> list:
        """The requests all at once (concurrently, one connection); answers in order."""
        return self.ask(requests)


def daemon_status(host) -> dict:
    """scistreamd's MainPID, NRestarts and ActiveState on ``host``."""
    out = host.run(["systemctl", "show", "scistreamd.service", "-p",
                    "MainPID,NRestarts,ActiveState,SubState"]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def restart_daemon(host) -> None:
    """Restart scistreamd on ``host`` (Type=notify: ready on return) and insist it runs,
    showing its journal if not."""
    host.run(["systemctl", "restart", "scistreamd"], timeout=120)
    state = host.run(["systemctl", "is-active", "scistreamd"], check=False).stdout.strip()
    assert state == "active", host.journal("-u", "scistreamd", "-n", "30")


def journal_cursor(host) -> str:
    host.run(["journalctl", "--sync"], check=False)
    out = host.run(["journalctl", "-n", "0", "--show-cursor", "--no-pager"], check=False).stdout
    for line in out.splitlines():
        if line.startswith("-- cursor: "):
            return line[len("-- cursor: "):]
    return ""


def journal_since(host, cursor: str, *match: str) -> str:
    """Journal lines (message text) after ``cursor``, optionally filtered."""
    host.run(["journalctl", "--sync"], check=False)
    args = ["journalctl", "--no-pager", "-o", "cat", *match]
    if cursor:
        args.append(f"--after-cursor={cursor}")
    return host.run(args, check=False).stdout


class DaemonWatch:
    """What must hold for scistreamd on ``host`` from now on: same process, no
    automatic restart, active, and no internal error or traceback in its journal."""

    def __init__(self, host) -> None:
        self.host = host
        self.before = daemon_status(host)
        assert self.before["ActiveState"] == "active", self.before
        self.cursor = journal_cursor(host)

    def check(self, journal: bool = True) -> None:
        now = daemon_status(self.host)
        assert now["ActiveState"] == "active", f"scistreamd is not active: {now}"
        assert (now["MainPID"], now["NRestarts"]) == (self.before["MainPID"],
                                                     self.before["NRestarts"]), (
            f"scistreamd on {self.host.name} died or was restarted: before {self.before}, "
            f"now {now}")
        if journal:
            text = journal_since(self.host, self.cursor, "-u", "scistreamd.service")
            bad = [x for x in text.splitlines()
                   if "Traceback" in x or "internal error in" in x or "ServiceError" in x]
            assert bad == [], (f"scistreamd on {self.host.name} logged internal errors:\n"
                               + text[-4000:])


def dbus_many(host, calls: list) -> list:
    """Raw D-Bus calls inside ``host`` on one connection, in order.

    ``calls`` are (method, sig, body[, path[, iface]]); each result is like
    ``dbus()``'s plus "endpoints_after": ListEndpoints right after that call.
    """
    import json

    full = [list(c) + ["/org/scistream/Tunnel1", "org.scistream.Tunnel1.Manager"][len(c) - 3:]
            for c in calls]
    out = host.run(["python3", HOSTTOOL, "dbus-many"], input=json.dumps(full), check=False)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


# Module-wide clients for the fuzz and load tests: both hosts emptied before
# and after the module, one long-lived D-Bus client process per host.
@pytest.fixture(scope="module")
def hosts(bed):
    s1, s2 = bed["server1"], bed["server2"]
    for h in (s1, s2):
        h.ctl("release", "--all")
    yield s1, s2
    for h in (s1, s2):
        h.ctl("release", "--all")


@pytest.fixture(scope="module")
def bus1(hosts):
    c = DBusBatch(hosts[0])
    yield c
    c.close()


@pytest.fixture(scope="module")
def bus2(hosts):
    c = DBusBatch(hosts[1])
    yield c
    c.close()


def claim_key(claimant, inbound_ip: str, uid: str, listeners=()) -> str:
    """Claim the key of inbound endpoint ``uid`` over the peer port from ``claimant``, as its
    daemon would (its own certificate and trust file); returns the key.

    Inbound listeners accept connections only from their claimant (IPAddressAllow= on the
    relay's socket unit; nobody before the claim), so a test client that talks to an inbound
    relay directly claims first, from the host it connects from.
    """
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from scistreamd.config import load_config\n"
        "from scistreamd.model import parse_hostport, parse_hostport_list\n"
        "from scistreamd.peerclient import PeerClient\n"
        "cfg = load_config(Path('/etc/scistream/scistreamd.toml'))\n"
        "client = PeerClient(trust_file=cfg.peer_trust_file, client_cert=cfg.peer_cert,\n"
        "                    client_key=cfg.peer_key, timeout=cfg.peer_timeout)\n"
        "info = client.claim(parse_hostport(sys.argv[1], 'peer'), sys.argv[2],\n"
        "    parse_hostport_list(sys.argv[3:], 'listeners', min_len=0))\n"
        "print(info.psk)\n")
    out = claimant.run(["env", "PYTHONPATH=/run/testbed/src", "python3", "-c", script,
                        f"{inbound_ip}:5000", uid, *listeners])
    return out.stdout.strip()
