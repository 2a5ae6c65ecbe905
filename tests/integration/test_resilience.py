"""Tunnels survive daemon restarts, crashes, reboots and stops (issue 5, items 1, 2, 3, 7).

Real daemons on the two-host test bed: server1 holds the inbound half of each
tunnel (its application listens there), server2 the outbound half (its client
connects there). Waits are "until the condition holds", with a generous
timeout only as a failure guard.

What survives what (the guarantees these tests check):

- ``systemctl restart scistreamd``, a crash of it (kill -9) or ``systemctl
  stop scistreamd``: relays are units of their own, so every tunnel keeps
  running and carrying data; the daemon re-adopts them on start from its
  persisted state and ``ListUnitsByPatterns``.
- a relay crash: systemd restarts it (Restart=on-failure), ``NRestarts``
  counts it; a relay that cannot start ends ``failed`` with a reason.
- a reboot (state kept, relay units gone): relays are recreated at start-up
  from the persisted, root-only key, so the peer's half keeps working.
- ``systemctl stop scistream.slice``: every relay stops; endpoints show
  ``failed`` until released, and stay so across daemon restarts.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Dict, List, Tuple

import pytest

from tests.integration.conftest import (
    HOSTTOOL,
    KEY_DIR,
    STATE_DIR,
    dbus,
    endpoint_properties,
    residue,
    tool,
    wait_until,
)

pytestmark = pytest.mark.testbed

MiB = 1 << 20
SERVICE = "scistreamd.service"
STUNNEL_BINDS = "/etc/scistream/conf.d/60-stunnel-binds.toml"

#: A paced sender that runs until told to stop, so a test controls how long
#: the transfer lasts instead of guessing: it sends random bytes at RATE
#: bytes/s to HOST:PORT, records the byte count in PROGRESS after every chunk,
#: stops once STOP exists and at least MIN bytes went out, then writes
#: "sha256 nbytes" to OUT.
SENDER = r"""
import hashlib, os, socket, sys, time
host, port, progress, stop, out, min_bytes, rate = sys.argv[1:8]
port, min_bytes, rate = int(port), int(min_bytes), float(rate)

def mark(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)

h = hashlib.sha256()
sent = 0
t0 = time.monotonic()
with socket.create_connection((host, port), timeout=120) as s:
    while sent < min_bytes or not os.path.exists(stop):
        data = os.urandom(1 << 20)
        s.sendall(data)
        h.update(data)
        sent += len(data)
        mark(progress, str(sent))
        ahead = sent / rate - (time.monotonic() - t0)
        if ahead > 0:
            time.sleep(ahead)
    s.shutdown(socket.SHUT_WR)
    while s.recv(65536):
        pass
mark(out, "%s %d\n" % (h.hexdigest(), sent))
"""

#: Binds HOST:PORT as soon as it is free (retrying), then writes BOUND and
#: holds the port: the "someone took the relay's port meanwhile" case.
GRABBER = r"""
import socket, sys, time
host, port, bound = sys.argv[1], int(sys.argv[2]), sys.argv[3]
while True:
    try:
        srv = socket.create_server((host, port))
        break
    except OSError:
        time.sleep(0.002)
open(bound, "w").close()
while True:
    time.sleep(3600)
"""


# --------------------------------------------------------------------------
# helpers

def ctl_json(host, *args: str):
    out = host.ctl(*args, "--json")
    assert out.returncode == 0, f"scistreamctl {' '.join(args)}: {out.stderr}"
    return json.loads(out.stdout)


def inbound(host, app_port: int, num_conn: int = 1) -> Dict:
    made = ctl_json(host, "inbound-request", "--remote_ip", host.ip, "--receiver_ports",
                    str(app_port), "--num_conn", str(num_conn))
    relay_unit(host, made["uid"], "inbound")  # remembered while the daemon knows it
    return made


def tunnel(s1, s2, app_port: int) -> Tuple[str, str, str]:
    """A tunnel to ``app_port`` on server1: (uid, server1 listener, server2 listener)."""
    req = inbound(s1, app_port)
    out = ctl_json(s2, "outbound-request", "--remote_ip", s1.ip,
                   "--server_cert=/etc/scistream/peer-ca.crt", req["uid"], *req["listeners"])
    relay_unit(s2, req["uid"], "outbound")
    return req["uid"], req["listeners"][0], out["listeners"][0]


def port_of(hostport: str) -> str:
    return hostport.rsplit(":", 1)[1]


def ask(s2, listener: str, text: str) -> str:
    """One request through the tunnel from server2's client side; the reply line."""
    host, port = listener.rsplit(":", 1)
    return tool(s2, "request", host, port, text, "--timeout", "20", check=False).stdout.strip()


def listed(host) -> List[Dict]:
    """`list --json` as it was before counters: what the endpoints are (uid, role, state,
    listeners), not what their relays are doing (bytes, memory, pid move)."""
    keep = ("uid", "role", "state", "listeners")
    return [{k: e[k] for k in keep} for e in ctl_json(host, "list")]


def unit_props(host, unit: str, *props: str) -> Dict[str, str]:
    out = host.run(["systemctl", "show", unit] + [f"--property={p}" for p in props],
                   check=False).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


#: (host, uid, role) -> relay unit, remembered: some tests ask again after the
#: daemon and its state file have forgotten the endpoint (orphans, roll-backs).
_UNITS: Dict[Tuple[str, str, str], str] = {}


def relay_unit(host, uid: str, role: str) -> str:
    """The relay unit of (uid, role): the endpoint's Unit property (the unit is
    named by an opaque relay id, never the uid)."""
    key = (host.name, uid, role)
    if key not in _UNITS:
        props = endpoint_properties(host, uid, role)
        assert props is not None, f"no {role} endpoint {uid} on {host.name}"
        _UNITS[key] = props["Unit"]
    return _UNITS[key]


def relay_socket(host, uid: str, role: str) -> str:
    """The socket unit holding the relay's listeners: the relay's name, suffix .socket."""
    return relay_unit(host, uid, role)[: -len(".service")] + ".socket"


def relay_pid(host, uid: str, role: str) -> int:
    return int(unit_props(host, relay_unit(host, uid, role), "MainPID")["MainPID"] or 0)


def listening(host, hostport: str) -> bool:
    ip, port = hostport.rsplit(":", 1)
    return bool(host.run(["ss", "-Htln", f"src {ip}:{port}"], check=False).stdout.strip())


def read(host, path: str) -> str:
    return host.run(["cat", path], check=False).stdout


def file_exists(host, path: str) -> bool:
    return host.run(["test", "-e", path], check=False).returncode == 0


def journal(host, unit: str = SERVICE) -> str:
    return host.run(["journalctl", "-u", unit, "--no-pager", "-o", "cat"], check=False).stdout


def state_file(uid: str, role: str) -> str:
    return f"{STATE_DIR}/{uid}-{role}.json"


def key_dir(host, uid: str, role: str) -> str:
    """The host's key directory of (uid, role): named by the relay id, like its unit."""
    relay_id = relay_unit(host, uid, role)[len(f"scistream-{role}-"):-len(".service")]
    return f"{KEY_DIR}/{relay_id}-{role}"


def psk_digest(host, uid: str, role: str) -> str:
    """sha256 of an endpoint's key file: compares keys without showing them."""
    raw = host.run(["cat", f"{key_dir(host, uid, role)}/psk"]).stdout
    return hashlib.sha256(raw.encode()).hexdigest()


def daemon_restarts(host) -> int:
    return int(unit_props(host, SERVICE, "NRestarts")["NRestarts"])


def daemon_active(host) -> bool:
    return unit_props(host, SERVICE, "ActiveState")["ActiveState"] == "active"


def endpoint_state(host, uid: str, role: str) -> str:
    props = endpoint_properties(host, uid, role)
    return props["State"] if props else "(no object)"


@pytest.fixture
def restore(clean):
    """Whatever a test stopped or broke, the next one starts with running daemons."""
    yield clean
    for host in clean.hosts.values():
        host.run(["systemctl", "stop", "storm", "release-all"], check=False)
        host.run(["systemctl", "reset-failed", SERVICE], check=False)
        host.run(["systemctl", "start", SERVICE], check=False)
        host.run(["rm", "-f", "/tmp/xfer.progress", "/tmp/xfer.stop", "/tmp/xfer.digest",
                  "/tmp/xfer.sink", "/tmp/grab.bound", "/tmp/storm.stop"], check=False)


# --------------------------------------------------------------------------
# 1. restart and upgrade without dropping data

def test_transfer_survives_daemon_restart_and_kill9(s1, s2, apps, restore):
    """A transfer keeps flowing, byte-identical, while server1's daemon is restarted
    and server2's is killed with SIGKILL (systemd restarts it: Restart=on-failure);
    afterwards both re-adopted the same endpoints, their objects are back and
    release leaves nothing behind."""
    uid, l1, l2 = tunnel(s1, s2, 5310)
    apps.start(s1, "xfer-sink", "python3", HOSTTOOL, "sink", "5310", "/tmp/xfer.sink")
    before = {h.name: listed(h) for h in (s1, s2)}
    relays = {"server1": relay_pid(s1, uid, "inbound"), "server2": relay_pid(s2, uid, "outbound")}
    assert all(relays.values()), relays

    # 200 MiB at least, paced at 32 MiB/s; it only ends once told to.
    apps.start(s2, "xfer-send", "python3", "-c", SENDER, "192.168.150.2", port_of(l2),
               "/tmp/xfer.progress", "/tmp/xfer.stop", "/tmp/xfer.digest",
               str(200 * MiB), str(32 * MiB))

    def progress() -> int:
        text = read(s2, "/tmp/xfer.progress").strip()
        return int(text) if text.isdigit() else 0

    wait_until(lambda: progress() >= 16 * MiB, 60, "the transfer to get going")
    assert unit_props(s2, "xfer-send", "ActiveState")["ActiveState"] == "active"

    s1.run(["systemctl", "restart", SERVICE])  # Type=notify: returns once ready again
    restarts = daemon_restarts(s2)
    old_pid = unit_props(s2, SERVICE, "MainPID")["MainPID"]
    s2.run(["kill", "-9", old_pid])
    wait_until(lambda: daemon_restarts(s2) > restarts and daemon_active(s2), 60,
               "systemd to restart the killed scistreamd on server2")
    assert unit_props(s2, SERVICE, "MainPID")["MainPID"] != old_pid

    # The sender cannot end before /tmp/xfer.stop exists: still running means the
    # one connection spanned both restarts. It must keep moving data afterwards.
    assert unit_props(s2, "xfer-send", "ActiveState")["ActiveState"] == "active"
    mark = progress()
    wait_until(lambda: progress() >= mark + 32 * MiB, 60, "data to flow after the restarts")
    s2.run(["touch", "/tmp/xfer.stop"])
    sent = wait_until(lambda: read(s2, "/tmp/xfer.digest").strip(), 120,
                      "the sender to finish")
    got = wait_until(lambda: read(s1, "/tmp/xfer.sink").strip(), 60, "the sink's digest")
    assert got == sent
    assert int(sent.split()[1]) >= 200 * MiB

    # Re-adopted: same endpoints, objects back, relays never touched.
    for host in (s1, s2):
        assert listed(host) == before[host.name]
    assert endpoint_properties(s1, uid, "inbound")["State"] == "active"
    assert endpoint_properties(s2, uid, "outbound")["State"] == "active"
    assert relays == {"server1": relay_pid(s1, uid, "inbound"),
                      "server2": relay_pid(s2, uid, "outbound")}

    for host in (s1, s2):
        assert host.ctl("release", uid).returncode == 0
    apps.stop_all()
    assert residue(s1) == [] and residue(s2) == []


# --------------------------------------------------------------------------
# 2. persisted state: atomic, and reconciled at start-up

def test_torn_and_corrupt_state_files_at_startup(s1, restore):
    """Decision: a ``.*.tmp`` file in the state directory is a write that never
    completed (the rename is the commit point), so it is deleted at start; a
    state file that does not parse is ignored, logged and left in place for
    the operator, and the daemon starts anyway with every valid endpoint."""
    good = inbound(s1, 5320)["uid"]
    corrupt = str(uuid.uuid4())
    good_keys = key_dir(s1, good, "inbound")
    assert s1.run(["stat", "-c", "%a %U:%G", STATE_DIR, state_file(good, "inbound"),
                   good_keys, f"{good_keys}/psk"]).stdout.split() \
        == ["700", "root:root", "600", "root:root", "750", "root:scistream-relay",
            "440", "root:scistream-relay"]

    s1.run(["systemctl", "stop", SERVICE])
    torn = [f"{STATE_DIR}/.{good}-inbound.json.tmp", f"{STATE_DIR}/.{corrupt}-outbound.json.tmp"]
    for path in torn:
        s1.run(["sh", "-c", f"printf '{{\"uid\": \"{good}\", \"ro' > {path}"])
    s1.run(["sh", "-c", f"printf 'not json {{' > {state_file(corrupt, 'inbound')}"])
    s1.run(["systemctl", "start", SERVICE])

    assert daemon_active(s1)
    for path in torn:
        assert not file_exists(s1, path), f"{path} was not removed"
    assert file_exists(s1, state_file(corrupt, "inbound"))
    assert f"ignoring corrupt state file {state_file(corrupt, 'inbound')}" in journal(s1)
    assert [(e["uid"], e["state"]) for e in listed(s1)] == [(good, "active")]
    assert endpoint_properties(s1, good, "inbound")["State"] == "active"

    s1.run(["rm", state_file(corrupt, "inbound")])
    assert s1.ctl("release", good).returncode == 0
    assert residue(s1) == []


@pytest.mark.parametrize("how", ["unit-stopped-while-down", "shutdown", "from-0.1.0-layout"])
def test_state_without_unit_is_recreated_from_persisted_key(s1, s2, apps, restore, how):
    """Decision: persisted state ``active`` with no relay unit (a reboot, or the
    unit stopped while the daemon was down) is recreated from the persisted,
    root-only key: same listeners, same key, so the peer's half that already
    holds the key keeps working without a new claim. ``shutdown`` stops the
    daemon and scistream.slice in one transaction, as a poweroff does: the
    daemon must not record its relays as failed on the way down.
    ``from-0.1.0-layout``: the key directory as 0.1.0 wrote it (root-only,
    config reading the key from /run/credentials) is brought to this layout."""
    apps.start(s1, "echo-reboot", "python3", HOSTTOOL, "echo", "5321", "--tag", "R:")
    uid, l1, l2 = tunnel(s1, s2, 5321)
    assert ask(s2, l2, "before") == "R:before"
    key = psk_digest(s1, uid, "inbound")
    before = listed(s1)

    d = key_dir(s1, uid, "inbound")
    if how == "shutdown":
        s1.run(["systemctl", "stop", SERVICE, "scistream.slice"])
    else:
        s1.run(["systemctl", "stop", SERVICE])
        # The relay is its service and the socket unit holding its listeners.
        s1.run(["systemctl", "stop", relay_socket(s1, uid, "inbound"),
                relay_unit(s1, uid, "inbound")])
    if how == "from-0.1.0-layout":
        unit = relay_unit(s1, uid, "inbound")
        s1.run(["sh", "-c", f"chown -R root:root {d} && chmod 0700 {d} && "
                            f"chmod 0600 {d}/psk {d}/stunnel.conf && "
                            "sed -i 's|^PSKsecrets = .*|PSKsecrets = "
                            f"/run/credentials/{unit}/psk|' {d}/stunnel.conf"])
    assert unit_props(s1, relay_unit(s1, uid, "inbound"), "ActiveState")["ActiveState"] \
        == "inactive"
    assert not listening(s1, l1)
    assert ask(s2, l2, "down") != "R:down"  # the tunnel really was broken

    s1.run(["systemctl", "start", SERVICE])
    assert unit_props(s1, relay_unit(s1, uid, "inbound"), "ActiveState")["ActiveState"] == "active"
    assert listening(s1, l1)
    assert listed(s1) == before
    assert psk_digest(s1, uid, "inbound") == key
    assert f"recreating relay {relay_unit(s1, uid, 'inbound')}" in journal(s1)
    assert ask(s2, l2, "after") == "R:after"
    assert s1.run(["stat", "-c", "%a %U:%G", d, f"{d}/psk"]).stdout.split() == [
        "750", "root:scistream-relay", "440", "root:scistream-relay"]
    assert "PSKsecrets = /run/scistream-relay/psk" in read(s1, f"{d}/stunnel.conf")

    for host in (s1, s2):
        assert host.ctl("release", uid).returncode == 0
    apps.stop_all()
    assert residue(s1) == [] and residue(s2) == []


def test_unit_without_state_is_an_orphan_and_removed(s1, s2, restore):
    """Decision: a relay unit (and key directory) with no state file is an orphan:
    nothing can release it through the API, so start-up stops the unit and
    removes its key. The peer's half then sees the tunnel gone and turns
    ``failed``."""
    uid, l1, _l2 = tunnel(s1, s2, 5322)
    s1.run(["systemctl", "stop", SERVICE])
    s1.run(["rm", state_file(uid, "inbound")])
    s1.run(["systemctl", "start", SERVICE])

    assert unit_props(s1, relay_unit(s1, uid, "inbound"), "ActiveState")["ActiveState"] \
        == "inactive"
    assert not file_exists(s1, key_dir(s1, uid, "inbound"))
    assert not listening(s1, l1)
    assert listed(s1) == []
    assert f"stopping orphan relay {relay_unit(s1, uid, 'inbound')}" in journal(s1)
    assert residue(s1) == []
    wait_until(lambda: endpoint_state(s2, uid, "outbound") == "failed", 60,
               "server2 to notice its peer dropped the tunnel")
    assert s2.ctl("release", uid).returncode == 0
    assert residue(s2) == []


@pytest.mark.parametrize("interrupted", ["starting", "releasing"])
def test_interrupted_request_is_rolled_back(s1, restore, interrupted):
    """Decision: state ``starting`` (or ``releasing``) means the daemon died before
    the request (or release) completed: no one got an answer, so start-up rolls
    it back — unit stopped, key and state removed, ports free."""
    req = inbound(s1, 5323)
    uid, l1 = req["uid"], req["listeners"][0]
    s1.run(["systemctl", "stop", SERVICE])
    edit = ("import json,sys; p=sys.argv[1]; d=json.load(open(p)); d['state']=sys.argv[2]; "
            "open(p,'w').write(json.dumps(d))")
    s1.run(["python3", "-c", edit, state_file(uid, "inbound"), interrupted])
    assert listening(s1, l1)  # the relay outlived the daemon
    s1.run(["systemctl", "start", SERVICE])

    assert unit_props(s1, relay_unit(s1, uid, "inbound"), "ActiveState")["ActiveState"] \
        == "inactive"
    assert not file_exists(s1, key_dir(s1, uid, "inbound"))
    assert not file_exists(s1, state_file(uid, "inbound"))
    assert not listening(s1, l1)
    assert listed(s1) == []
    assert f"rolling back interrupted {interrupted} of inbound {uid}" in journal(s1)
    assert residue(s1) == []
    # The port is free for the daemon too: the next request gets it.
    again = inbound(s1, 5323)
    assert again["listeners"] == [l1]
    assert s1.ctl("release", again["uid"]).returncode == 0


def consistency(host) -> List[str]:
    """What does not add up between endpoints, units, keys, state and ports; [] if all does.

    Every listed endpoint is active, with a running unit, a key, a state file
    and its listeners open; nothing else exists.
    """
    problems = []
    eps = listed(host)
    names = {f"{e['uid']}-{e['role']}" for e in eps}
    problems += [f"{e['uid']} is {e['state']}" for e in eps if e["state"] != "active"]
    units = host.run(["systemctl", "list-units", "--all", "--no-legend", "--plain",
                      "scistream-*.service"], check=False).stdout.split()
    running = host.run(["systemctl", "list-units", "--state=active", "--no-legend", "--plain",
                        "scistream-*.service"], check=False).stdout.split()
    want_units = {relay_unit(host, e["uid"], e["role"]) for e in eps}
    problems += [f"unit {u} without endpoint" for u in units
                 if u.startswith("scistream-") and u not in want_units]
    problems += [f"unit {u} not running" for u in want_units if u not in running]
    keys = set(host.run(["ls", "-A", KEY_DIR], check=False).stdout.split())
    states = set(host.run(["ls", "-A", STATE_DIR], check=False).stdout.split())
    want_keys = {key_dir(host, e["uid"], e["role"]).rsplit("/", 1)[1] for e in eps}
    if keys != want_keys:
        problems.append(f"key dirs {sorted(keys)} != endpoints' {sorted(want_keys)}")
    if states != {f"{n}.json" for n in names}:
        problems.append(f"state files {sorted(states)} != endpoints {sorted(names)}")
    open_ports = sorted(x for x in residue(host) if x.startswith("listening "))
    want_ports = sorted(f"listening {lst}" for e in eps for lst in e["listeners"])
    if open_ports != want_ports:
        problems.append(f"open ports {open_ports} != listeners {want_ports}")
    return problems


def kill9_daemon(host) -> None:
    """SIGKILL scistreamd and wait until systemd has restarted it."""
    # These tests crash the daemon far more often than a real host: keep the
    # unit's start rate limit out of what they measure (this zeroes NRestarts).
    host.run(["systemctl", "reset-failed", SERVICE], check=False)
    restarts = daemon_restarts(host)
    host.run(["kill", "-9", unit_props(host, SERVICE, "MainPID")["MainPID"]])
    wait_until(lambda: daemon_restarts(host) > restarts and daemon_active(host), 60,
               f"systemd to restart scistreamd on {host.name}")


#: Inbound requests back to back until /tmp/storm.stop exists (units do not
#: have the test bed's PATH, hence the full path of scistreamctl).
STORM = ("i=0; while [ ! -e /tmp/storm.stop ] && [ $i -lt 40 ]; do "
         "/run/testbed/bin/scistreamctl inbound-request --remote_ip 192.168.150.1 "
         "--receiver_ports 5350 --timeout 10 >/dev/null 2>&1; i=$((i+1)); done")


def test_crash_during_requests_and_releases_leaves_consistent_state(s1, restore):
    """The daemon is SIGKILLed while requests arrive back to back (at a different
    point each run), then while `release --all` runs: whatever instant the
    crash hit, the restarted daemon's endpoints, units, keys, state files and
    open ports match exactly — each write is atomic and start-up reconciles."""
    s1.run(["rm", "-f", "/tmp/storm.stop"])
    s1.run(["systemd-run", "--unit=storm", "--collect", "--quiet", "-p", "Restart=no",
            "sh", "-c", STORM])
    after = 2
    wait_until(lambda: len(listed(s1)) >= after, 60, f"{after} endpoints to exist")
    kill9_daemon(s1)
    # Let the storm go on against the restarted daemon, then stop it between requests.
    n = len(listed(s1))
    wait_until(lambda: len(listed(s1)) > n, 60, "requests to succeed after the restart")
    s1.run(["touch", "/tmp/storm.stop"])
    wait_until(lambda: unit_props(s1, "storm", "ActiveState")["ActiveState"] != "active", 60,
               "the request loop to end")
    assert consistency(s1) == []

    # An endpoint that was still `starting` when the kill landed is rolled back,
    # so only "at least as many as before the crash" holds.
    many = len(listed(s1))
    assert many >= after
    s1.run(["systemd-run", "--unit=release-all", "--collect", "--quiet", "-p", "Restart=no",
            "/run/testbed/bin/scistreamctl", "release", "--all"])
    wait_until(lambda: len(listed(s1)) < many, 60, "release --all to get going")
    kill9_daemon(s1)
    wait_until(lambda: unit_props(s1, "release-all", "ActiveState")["ActiveState"]
               != "active", 60, "the interrupted release --all to end")
    assert consistency(s1) == []
    assert s1.ctl("release", "--all").returncode == 0
    assert residue(s1) == []


# --------------------------------------------------------------------------
# 3. relay crashes

def test_killed_relay_is_restarted_and_counted(s1, s2, apps, restore):
    """kill -9 of a relay: systemd restarts it, Endpoint.NRestarts and
    `scistreamctl status` show it, and new connections work."""
    apps.start(s1, "echo-crash", "python3", HOSTTOOL, "echo", "5330", "--tag", "C:")
    uid, _l1, l2 = tunnel(s1, s2, 5330)
    assert ask(s2, l2, "one") == "C:one"
    assert endpoint_properties(s1, uid, "inbound")["NRestarts"] == 0

    pid = relay_pid(s1, uid, "inbound")
    s1.run(["kill", "-9", str(pid)])
    props = wait_until(lambda: (p := endpoint_properties(s1, uid, "inbound"))
                       and p["NRestarts"] >= 1 and p["State"] == "active" and p, 60,
                       "NRestarts to count the crash")
    assert props["StateDetail"] == ""
    new_pid = relay_pid(s1, uid, "inbound")
    assert new_pid not in (0, pid)
    status = s1.ctl("status", uid)
    assert status.returncode == 0
    assert "NRestarts:   1" in status.stdout and "State:       active" in status.stdout
    wait_until(lambda: ask(s2, l2, "two") == "C:two", 60, "a new connection through the tunnel")

    for host in (s1, s2):
        assert host.ctl("release", uid).returncode == 0
    apps.stop_all()
    assert residue(s1) == [] and residue(s2) == []


@pytest.fixture
def stunnel_binds(s1):
    """relay_socket_activation = false on server1: stunnel binds its own listeners (the
    fallback for a stunnel without systemd support), so a port is free while a relay restarts.
    With socket units nobody can take it (test_security_relay.py)."""
    s1.run(["sh", "-c", f"printf 'relay_socket_activation = false\\n' > {STUNNEL_BINDS}"])
    s1.run(["systemctl", "restart", SERVICE])
    try:
        yield s1
    finally:
        s1.run(["rm", "-f", STUNNEL_BINDS])
        s1.run(["systemctl", "restart", SERVICE])


def test_relay_that_cannot_start_ends_failed_with_reason(s1, apps, restore, stunnel_binds):
    """Without socket units (relay_socket_activation = false), a relay whose port was
    taken meanwhile fails on every restart until systemd's start limit: the endpoint
    turns ``failed`` with a reason in `scistreamctl status` (the port conflict is in
    `scistreamctl logs`); release then leaves nothing."""
    req = inbound(s1, 5331)
    uid, l1 = req["uid"], req["listeners"][0]
    ip, port = l1.rsplit(":", 1)
    # Waits for the port, so it takes it the moment the relay lets go of it.
    apps.start(s1, "grab-port", "python3", "-c", GRABBER, ip, port, "/tmp/grab.bound")

    def taken() -> bool:
        if file_exists(s1, "/tmp/grab.bound"):
            return True
        pid = relay_pid(s1, uid, "inbound")
        if pid and listening(s1, l1):
            # The relay (first start or a restart that won the race) holds the port.
            s1.run(["kill", "-9", str(pid)], check=False)
        return False

    wait_until(taken, 60, "the port to be taken from the relay", interval=0.2)
    props = wait_until(lambda: (p := endpoint_properties(s1, uid, "inbound"))
                       and p["State"] == "failed" and p, 120,
                       "the endpoint to fail after the start limit")
    assert "relay failed" in props["StateDetail"]
    assert props["NRestarts"] >= 1
    assert unit_props(s1, relay_unit(s1, uid, "inbound"), "ActiveState")["ActiveState"] == "failed"

    def status_shows_detail():
        # The relay's own last error is appended to the detail a moment after the
        # failure (it is read from the journal): compare reads taken together.
        p = endpoint_properties(s1, uid, "inbound")
        st = s1.ctl("status", uid)
        return f"StateDetail: {p['StateDetail']}" in st.stdout and st

    status = wait_until(status_shows_detail, 30, "status to show the endpoint's StateDetail")
    assert status.returncode == 0
    assert "State:       failed" in status.stdout
    logs = s1.ctl("logs", uid).stdout
    assert "Address already in use" in logs

    apps.stop_all()
    assert s1.ctl("release", uid).returncode == 0
    assert residue(s1) == []


# --------------------------------------------------------------------------
# 7. stop and remove

def test_stop_daemon_keeps_tunnels_then_readopts(s1, s2, apps, restore):
    """`systemctl stop scistreamd` leaves every relay running and carrying data
    (by design: relays are units of their own); starting it re-adopts them."""
    apps.start(s1, "echo-stop", "python3", HOSTTOOL, "echo", "5340", "--tag", "S:")
    uid, _l1, l2 = tunnel(s1, s2, 5340)
    before = {h.name: listed(h) for h in (s1, s2)}
    for host in (s1, s2):
        host.run(["systemctl", "stop", SERVICE])
    for host, role in ((s1, "inbound"), (s2, "outbound")):
        assert unit_props(host, SERVICE, "ActiveState")["ActiveState"] == "inactive"
        assert unit_props(host, relay_unit(host, uid, role), "ActiveState")["ActiveState"] \
            == "active"
    assert ask(s2, l2, "daemonless") == "S:daemonless"

    for host in (s1, s2):
        host.run(["systemctl", "start", SERVICE])
        assert listed(host) == before[host.name]
    assert endpoint_properties(s1, uid, "inbound")["State"] == "active"
    assert endpoint_properties(s2, uid, "outbound")["State"] == "active"
    assert ask(s2, l2, "again") == "S:again"


def test_relay_restarted_while_daemon_is_down_is_adopted_with_its_count(s1, s2, apps, restore):
    """Re-adoption takes each relay's state from one ListUnitsByPatterns and
    asks only NRestarts per relay: a crash the daemon did not see is counted."""
    apps.start(s1, "echo-down", "python3", HOSTTOOL, "echo", "5345", "--tag", "D:")
    uid, _l1, l2 = tunnel(s1, s2, 5345)
    unit = relay_unit(s1, uid, "inbound")
    s1.run(["systemctl", "stop", SERVICE])
    pid = relay_pid(s1, uid, "inbound")
    s1.run(["kill", "-9", str(pid)])
    wait_until(lambda: unit_props(s1, unit, "NRestarts", "ActiveState")
               == {"NRestarts": "1", "ActiveState": "active"}, 60, "systemd to restart the relay")
    s1.run(["systemctl", "start", SERVICE])
    props = endpoint_properties(s1, uid, "inbound")
    assert (props["State"], props["NRestarts"], props["StateDetail"]) == ("active", 1, "")
    wait_until(lambda: ask(s2, l2, "counted") == "D:counted", 60, "the restarted relay")


def test_stop_slice_stops_every_relay_then_release_all_cleans(s1, s2, apps, restore):
    """`systemctl stop scistream.slice` stops every relay of the host. Decision:
    the daemon marks each endpoint ``failed`` (the operator stopped it: no
    automatic restart, also not at the next daemon start) until released;
    new requests still work, and `scistreamctl release --all` leaves nothing."""
    apps.start(s1, "echo-slice", "python3", HOSTTOOL, "echo", "5341", "--tag", "L:")
    uid, _l1, l2 = tunnel(s1, s2, 5341)
    lone = inbound(s1, 5342)["uid"]
    assert ask(s2, l2, "up") == "L:up"

    s1.run(["systemctl", "stop", "scistream.slice"])
    for u in (uid, lone):
        assert unit_props(s1, relay_unit(s1, u, "inbound"), "ActiveState")["ActiveState"] \
            == "inactive"
        props = wait_until(lambda u=u: (p := endpoint_properties(s1, u, "inbound"))
                           and p["State"] == "failed" and p, 60,
                           f"endpoint {u} to be marked failed")
        assert "release it" in props["StateDetail"]
    assert ask(s2, l2, "down") != "L:down"
    assert unit_props(s2, relay_unit(s2, uid, "outbound"), "ActiveState")["ActiveState"] \
        == "active"  # only the stopped host's relays are affected

    s1.run(["systemctl", "restart", SERVICE])
    assert sorted((e["uid"], e["state"]) for e in listed(s1)) == sorted(
        [(uid, "failed"), (lone, "failed")])
    assert unit_props(s1, relay_unit(s1, uid, "inbound"), "ActiveState")["ActiveState"] \
        == "inactive"

    fresh = inbound(s1, 5343)["uid"]  # the slice starts again for a new relay
    assert endpoint_properties(s1, fresh, "inbound")["State"] == "active"

    out = s1.ctl("release", "--all")
    assert out.returncode == 0 and out.stdout == "Released 3 endpoints.\n"
    out = s2.ctl("release", "--all")
    assert out.returncode == 0 and out.stdout == "Released 1 endpoint.\n"
    apps.stop_all()
    assert residue(s1) == [] and residue(s2) == []
    for host in (s1, s2):
        assert listed(host) == []
        reply = dbus(host, "GetManagedObjects", "", [], iface="org.freedesktop.DBus.ObjectManager")
        assert reply == {"reply": [{}]}  # no endpoint object below the manager
