"""Inbound endpoints on the real test bed (issue 3, item 8; and what items 1-7 promise).

Everything runs against the real daemon: systemd as PID 1 of each emulated
host, its system bus, journald and stunnel. Clients connect from server2
(192.168.150.2) to the relay on server1 (192.168.150.1), as a peer gateway
would. No mocks; no timed assertions (waits are bounded, and say so when
they give up).
"""

from __future__ import annotations

import json
import re
import secrets
import time
import uuid
from typing import Dict, List, Sequence, Tuple

import pytest

from scistreamd import ENDPOINT_IFACE, ENDPOINT_PATH_PREFIX, MANAGER_IFACE, __version__
from scistreamd.config import Config
from scistreamd.events import MSG_RELEASE, MSG_REQUEST
from scistreamd.interface import MANAGER
from tests.integration.conftest import (
    HOSTTOOL,
    KEY_DIR,
    STATE_DIR,
    SignalWatch,
    claim_key,
    dbus,
    dbus_many,
    residue,
    tool,
    wait_listening,
    wait_until,
)

S1_IP = "192.168.150.1"
S2_IP = "192.168.150.2"
SUITE = "TLS_AES_128_GCM_SHA256"
INBOUND_SIG = MANAGER.methods["InboundRequest"].in_sig
OUTBOUND_SIG = MANAGER.methods["OutboundRequest"].in_sig
ERR = "org.scistream.Tunnel1.Error."
INVALID = ERR + "InvalidArgument"
NOT_FOUND = ERR + "NotFound"
OM_IFACE = "org.freedesktop.DBus.ObjectManager"
PROPS_IFACE = "org.freedesktop.DBus.Properties"
DEFAULTS = Config()
RANGE_SIZE = DEFAULTS.port_range[1] - DEFAULTS.port_range[0] + 1
RELAY_UNIT_RE = re.compile(r"scistream-inbound-([0-9a-f]{16})\.service")
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


# --------------------------------------------------------------------------
# helpers

def inbound(host, ports: Sequence[int], num_conn: int = 1,
            remote_ip: str = S1_IP) -> Tuple[str, str, List[str]]:
    """InboundRequest over raw D-Bus; (uid, object path, listeners)."""
    out = dbus(host, "InboundRequest", INBOUND_SIG, [remote_ip, list(ports), num_conn, {}])
    assert "reply" in out, f"InboundRequest failed: {out}"
    uid, path, listeners = out["reply"]
    return uid, path, listeners


def unit_of(host, uid: str) -> str:
    """The relay unit of inbound endpoint ``uid``: its Unit property (the unit is
    named by an opaque relay id, never the uid)."""
    out = dbus(host, "Get", "ss", [ENDPOINT_IFACE, "Unit"],
               path=f"{ENDPOINT_PATH_PREFIX}/{_escape(uid)}_inbound", iface=PROPS_IFACE)
    assert "reply" in out, f"no inbound endpoint {uid} on {host.name}: {out}"
    unit = out["reply"][0]
    assert RELAY_UNIT_RE.fullmatch(unit), unit
    return unit


def key_dir_of(host, uid: str) -> str:
    """The host's key directory of inbound endpoint ``uid``: named by the relay id."""
    relay_id = RELAY_UNIT_RE.fullmatch(unit_of(host, uid)).group(1)
    return f"{KEY_DIR}/{relay_id}-inbound"


def show(host, unit: str, *props: str) -> Dict[str, str]:
    out = host.run(["systemctl", "show", unit, "-p", ",".join(props)]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def unit_dbus_property(host, unit: str, prop: str,
                       iface: str = "org.freedesktop.systemd1.Service"):
    """A property straight from systemd's D-Bus object (systemctl prints some as [unprintable])."""
    path = host.run(["busctl", "call", "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
                     "org.freedesktop.systemd1.Manager", "GetUnit", "s", unit]).stdout.split()[1]
    out = host.run(["busctl", "--json=short", "get-property", "org.freedesktop.systemd1",
                    path.strip('"'), iface, prop]).stdout
    return json.loads(out)["data"]


def main_pid(host, unit: str) -> int:
    pid = int(show(host, unit, "MainPID")["MainPID"])
    assert pid > 0, f"{unit} has no main process"
    return pid


def psk_of(host, uid: str) -> str:
    """The endpoint's key, read as root from its root-only file ("uid:hex")."""
    text = host.run(["cat", f"{key_dir_of(host, uid)}/psk"]).stdout
    ident, _, key = text.strip().partition(":")
    assert ident == uid, f"psk file identity {ident!r} is not the uid {uid}"
    return key


def claimed(s1, s2, uid: str) -> str:
    """The key of ``uid`` as a peer gateway gets it: claimed from server2 over the peer port.
    The relay then accepts connections from server2 (its claimant) and nobody else; the key
    is the one in the root-only file."""
    key = claim_key(s2, S1_IP, uid)
    assert key == psk_of(s1, uid)
    return key


def tls_client(client, listener: str, data: str, *tls_args: str):
    """openssl s_client on ``client`` to ``listener``; stdin piped; (stdout, stderr)."""
    # timeout(1) only keeps a broken relay from hanging the suite; no assertion uses it.
    proc = client.run(["timeout", "20", "openssl", "s_client", "-connect", listener,
                       *tls_args, "-quiet"], input=data, check=False)
    return proc.stdout, proc.stderr


def with_key(uid: str, key: str) -> List[str]:
    return ["-psk", key, "-psk_identity", uid, "-tls1_3", "-ciphersuites", SUITE]


def echo_app(apps, host, port: int, tag: str, ip: str = S1_IP) -> str:
    """A tagged line-echo application on ip:port; returns its connection count file."""
    name = f"echo-{port}-{secrets.token_hex(4)}"
    count_file = f"/tmp/{name}.count"
    apps.start(host, name, "python3", HOSTTOOL, "echo", str(port), "--tag", tag,
               "--count-file", count_file, "--host", ip)
    wait_listening(host, port, ip)
    return count_file


def connections(host, count_file: str) -> int:
    """How many connections the echo app accepted (0 if it never accepted one)."""
    out = host.run(["cat", count_file], check=False)
    return int(out.stdout) if out.returncode == 0 and out.stdout.strip() else 0


def endpoint_paths(host) -> List[str]:
    """Endpoint objects the daemon exports (from the bus's own view of the tree)."""
    out = host.run(["busctl", "tree", "--list", "org.scistream.Tunnel1"]).stdout.split()
    return [p for p in out if p.startswith(ENDPOINT_PATH_PREFIX + "/")]


def managed_objects(host) -> dict:
    out = dbus(host, "GetManagedObjects", "", [], iface=OM_IFACE)
    assert "reply" in out, out
    return out["reply"][0]


def journal(host, *match: str, need=lambda entries: True, what: str = "",
            tries: int = 100) -> List[dict]:
    """Journal entries (JSON) matching ``match``; waits (bounded) until ``need`` holds."""
    entries: List[dict] = []
    for _ in range(tries):
        host.run(["journalctl", "--sync"], check=False)
        out = host.run(["journalctl", "--no-pager", "-o", "json", *match]).stdout
        entries = [json.loads(x) for x in out.splitlines() if x.strip()]
        if need(entries):
            return entries
        time.sleep(0.05)
    pytest.fail(f"the journal never showed {what or match}; it has:\n"
                + "\n".join(f"{e.get('SYSLOG_IDENTIFIER')}: {e.get('MESSAGE')}" for e in entries))


def nothing_created(host) -> List[str]:
    return residue(host) + endpoint_paths(host)


@pytest.fixture
def empty_s1(s1):
    """server1 without endpoints before and (asserted) after a bad-input case."""
    if nothing_created(s1):
        s1.ctl("release", "--all")
    assert nothing_created(s1) == [], "could not empty server1 before the test"
    yield s1
    assert nothing_created(s1) == [], "a rejected request left something behind"


# --------------------------------------------------------------------------
# 1. the relay unit and its sandbox

def test_relay_unit_has_the_sandbox_properties(clean, s1):
    uid, _path, listeners = inbound(s1, [5300])
    unit = unit_of(s1, uid)
    p = show(s1, unit, "LoadState", "ActiveState", "Type", "Restart", "Slice", "DynamicUser",
             "NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices",
             "CapabilityBoundingSet", "AmbientCapabilities", "RestrictAddressFamilies",
             "MemoryMax", "TasksMax", "LogExtraFields", "PartOf", "BindsTo", "User",
             "ControlGroup", "Nice", "CPUSchedulingPolicy")
    assert (p["LoadState"], p["ActiveState"]) == ("loaded", "active"), p
    expected = {"Type": "exec", "Restart": "on-failure", "Slice": "scistream.slice",
                "DynamicUser": "yes", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
                "ProtectHome": "yes", "PrivateTmp": "yes", "PrivateDevices": "yes",
                "CapabilityBoundingSet": "", "AmbientCapabilities": "",
                "MemoryMax": str(DEFAULTS.relay_memory_max),
                "TasksMax": str(DEFAULTS.relay_tasks_max),
                # Scheduling from the config: Nice -5, SCHED_BATCH (3).
                "Nice": "-5", "CPUSchedulingPolicy": "3",
                # Relays outlive the daemon: nothing binds them to scistreamd.
                "PartOf": "", "BindsTo": ""}
    assert {k: p[k] for k in expected} == expected
    assert (DEFAULTS.relay_memory_max, DEFAULTS.relay_tasks_max) == (256 * 1024**2, 4096)
    assert set(p["RestrictAddressFamilies"].split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    # No uid in any world-readable property: the unit name, Description,
    # LogExtraFields and bind path carry the opaque relay id instead.
    assert p["LogExtraFields"].split() == ["SCISTREAM_ROLE=inbound"]
    assert p["ControlGroup"] == f"/scistream.slice/{unit}"
    # scistreamd's side of the dependency graph must not hold the relay either.
    daemon = show(s1, "scistreamd.service", "ConsistsOf", "BoundBy", "Requires", "Wants")
    assert not any(unit in v for v in daemon.values()), daemon

    # The key reaches the relay only as its own key directory, bind-mounted
    # read-only into its namespace (and readable through group scistream-relay).
    d = key_dir_of(s1, uid)
    assert uid not in d
    assert unit_dbus_property(s1, unit, "BindReadOnlyPaths") == [
        [d, "/run/scistream-relay", False, 0]]
    assert unit_dbus_property(s1, unit, "BindPaths") == []
    assert unit_dbus_property(s1, unit, "SupplementaryGroups") == ["scistream-relay"]
    for prop in ("LoadCredential", "SetCredential", "SetCredentialEncrypted"):
        assert unit_dbus_property(s1, unit, prop) == [], prop

    # What systemd applied to the process, not only what it says it will apply.
    pid = main_pid(s1, unit)
    status = dict(line.split(":", 1) for line in
                  s1.run(["cat", f"/proc/{pid}/status"]).stdout.splitlines() if ":" in line)
    uids = [int(x) for x in status["Uid"].split()]
    gids = [int(x) for x in status["Gid"].split()]
    assert all(x != 0 for x in uids + gids), f"relay runs with uid/gid {uids}/{gids}"
    assert s1.run(["id", "-u", p["User"]]).stdout.strip() == str(uids[0])
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[cap], 16) == 0, f"{cap} = {status[cap].strip()}"
    assert status["NoNewPrivs"].strip() == "1"
    # ... and the scheduler: nice -5, policy SCHED_BATCH.
    sched = s1.run(["ps", "-o", "ni=,cls=", "-p", str(pid)]).stdout.split()
    assert sched == ["-5", "B"], sched
    assert s1.run(["cat", f"/proc/{pid}/comm"]).stdout.strip().startswith("stunnel")
    # The listener belongs to that process.
    ss = s1.run(["ss", "-Htlnp", f"src {listeners[0]}"]).stdout
    assert f"pid={pid}," in ss, ss


def test_relay_key_never_leaves_its_root_only_files(clean, s1):
    uid, path, _ = inbound(s1, [5300])
    uid2, _, _ = inbound(s1, [5300])
    unit = unit_of(s1, uid)
    key = psk_of(s1, uid)
    assert re.fullmatch(r"[0-9a-f]{64}", key), "the key is not 256 random bits in hex"
    assert key != psk_of(s1, uid2), "two endpoints got the same key"
    assert uid.replace("-", "") not in key, "the key is derived from the uid"

    # On the host: the key directory is root's alone; below it, each
    # endpoint's directory is readable by group scistream-relay.
    d = key_dir_of(s1, uid)
    modes = s1.run(["stat", "-c", "%a %U %G %n", KEY_DIR, d, f"{d}/psk",
                    f"{d}/stunnel.conf"]).stdout.splitlines()
    assert modes == [f"700 root root {KEY_DIR}", f"750 root scistream-relay {d}",
                     f"440 root scistream-relay {d}/psk",
                     f"440 root scistream-relay {d}/stunnel.conf"]
    # The bind mount is the relay's own: the host's mount point stays empty
    # and the host's mount table holds no key directory.
    assert s1.run(["ls", "-A", "/run/scistream-relay"]).stdout == ""
    host_mounts = s1.run(["cat", "/proc/self/mountinfo"]).stdout
    for needle in ("/run/scistream-relay", "/run/credentials", d.rsplit("/", 1)[1]):
        assert needle not in host_mounts, f"{needle} is mounted on the host"

    # As the relay's own user (dynamic uid, group scistream-relay), in its own
    # namespace: its key is readable at /run/scistream-relay, no other key
    # is reachable, and on the host not even its own.
    pid = main_pid(s1, unit)
    ids = dict(line.split(":", 1) for line in
               s1.run(["cat", f"/proc/{pid}/status"]).stdout.splitlines() if ":" in line)
    relay_uid, relay_gid = ids["Uid"].split()[0], ids["Gid"].split()[0]
    groups = ids["Groups"].split()
    relay_group = s1.run(["getent", "group", "scistream-relay"]).stdout.split(":")[2]
    assert relay_group in groups, f"relay groups {groups}"
    as_relay = ["setpriv", f"--reuid={relay_uid}", f"--regid={relay_gid}",
                f"--groups={','.join(groups)}", "--"]
    in_relay = ["nsenter", "-t", str(pid), "-m", "--"] + as_relay

    def reads(cmd, path):
        return s1.run(cmd + ["cat", path], check=False)

    own = reads(in_relay, "/run/scistream-relay/psk")
    assert own.returncode == 0 and own.stdout.strip() == f"{uid}:{key}", own.stderr
    for path in (f"{key_dir_of(s1, uid2)}/psk", f"{d}/psk"):
        r = reads(in_relay, path)
        assert r.returncode != 0 and "Permission denied" in r.stderr, (path, r)
        r = reads(as_relay, path)
        assert r.returncode != 0 and "Permission denied" in r.stderr, (path, r)
    # The way into another relay's namespace, /proc/<pid>/root, is closed:
    # every relay has its own dynamic uid.
    other = reads(as_relay, f"/proc/{main_pid(s1, unit_of(s1, uid2))}/root/run/scistream-relay/psk")
    assert other.returncode != 0 and "Permission denied" in other.stderr, other
    assert s1.run(["cat", f"/proc/{main_pid(s1, unit_of(s1, uid2))}/root/run/scistream-relay/psk"]
                  ).stdout.strip() == f"{uid2}:{psk_of(s1, uid2)}", "root's view of it works"
    s1.run(["journalctl", "--sync"])
    places = {
        "systemctl show --all": s1.run(["systemctl", "show", "--all", unit]).stdout,
        "systemctl status": s1.run(["systemctl", "status", "--no-pager", "-l", unit],
                                   check=False).stdout,
        "systemctl cat": s1.run(["systemctl", "cat", unit]).stdout,
        "busctl introspect of the unit": s1.run(
            ["busctl", "introspect", "--no-pager", "org.freedesktop.systemd1",
             "/org/freedesktop/systemd1/unit/" + re.sub(
                 r"[^A-Za-z0-9]", lambda m: f"_{ord(m.group()):02x}", unit)]).stdout,
        "cmdline": s1.run(["cat", f"/proc/{pid}/cmdline"]).stdout,
        "environ": s1.run(["cat", f"/proc/{pid}/environ"]).stdout,
        "journal": s1.run(["journalctl", "--no-pager", "-o", "export"]).stdout,
        "state file": s1.run(["cat", f"{STATE_DIR}/{uid}-inbound.json"]).stdout,
        "stunnel.conf": s1.run(["cat", f"{d}/stunnel.conf"]).stdout,
        "D-Bus objects": json.dumps(managed_objects(s1)),
    }
    # The places are real: each of them does talk about this endpoint.
    assert unit in places["systemctl show --all"] and uid in places["journal"]
    assert "BindReadOnlyPaths" in places["busctl introspect of the unit"]
    assert "stunnel" in places["cmdline"]
    leaks = [where for where, text in places.items() if key in text or key.upper() in text]
    assert leaks == [], f"the key appears in: {leaks}"


def test_relay_sandbox_survives_daemon_reload(clean, s1):
    """A `systemctl daemon-reload` (any package install does one) re-reads transient units."""
    uid, _, _ = inbound(s1, [5300])
    unit = unit_of(s1, uid)
    props = ("Type", "Restart", "Slice", "DynamicUser", "NoNewPrivileges", "ProtectSystem",
             "ProtectHome", "PrivateTmp", "PrivateDevices", "CapabilityBoundingSet",
             "RestrictAddressFamilies", "MemoryMax", "TasksMax", "LogExtraFields",
             "RestrictNamespaces", "MemoryDenyWriteExecute", "ProtectKernelTunables",
             "ProtectControlGroups", "RestrictSUIDSGID", "LockPersonality", "UMask",
             "BindReadOnlyPaths", "SupplementaryGroups", "Nice", "CPUSchedulingPolicy")
    before = show(s1, unit, *props)
    assert before["RestrictNamespaces"] == "yes"
    s1.run(["systemctl", "daemon-reload"])
    after = show(s1, unit, *props)
    changed = {k: (before[k], after.get(k)) for k in props if before[k] != after.get(k)}
    assert changed == {}, (
        f"daemon-reload changed the relay's sandbox (before, after): {changed}. systemd 252 "
        "serialises RestrictNamespaces=<mask 0> into the transient unit file as an empty "
        "'RestrictNamespaces=', which a reload reads back as 'no restriction'; the next "
        "restart of the relay (Restart=on-failure, rearm) runs without it")


# --------------------------------------------------------------------------
# 2./3. who gets through the relay

def test_tls13_client_with_the_key_reaches_the_app(clean, s1, s2, apps):
    eth = echo_app(apps, s1, 5300, "ETH:", S1_IP)
    # Same port on another address of the host: proves the relay dials remote_ip exactly.
    lo = echo_app(apps, s1, 5300, "LO:", "127.0.0.1")
    uid, _, listeners = inbound(s1, [5300], remote_ip=S1_IP)
    assert listeners == [f"{S1_IP}:{DEFAULTS.port_range[0]}"]
    assert s1.run(["ss", "-Htln", f"src {listeners[0]}"]).stdout.strip(), "no listener"

    payload = secrets.token_hex(24 * 1024)  # 48 KiB line, several TLS records
    out, err = tls_client(s2, listeners[0], payload + "\n", *with_key(uid, claimed(s1, s2, uid)))
    assert out == f"ETH:{payload}\n", f"reply differs from what was sent: {out[:200]!r} {err}"
    assert (connections(s1, eth), connections(s1, lo)) == (1, 0)


def _no_key(uid: str, key: str) -> List[str]:
    return ["-tls1_3", "-ciphersuites", SUITE]


def _wrong_key(uid: str, key: str) -> List[str]:
    return with_key(uid, secrets.token_hex(32))


def _wrong_identity(uid: str, key: str) -> List[str]:
    return with_key(str(uuid.uuid4()), key)


def _tls12_with_key(uid: str, key: str) -> List[str]:
    return ["-tls1_2", "-psk", key, "-psk_identity", uid, "-cipher", "PSK:@SECLEVEL=0"]


def _tls12_anonymous(uid: str, key: str) -> List[str]:
    # SECLEVEL=0: otherwise OpenSSL refuses to even offer these suites.
    return ["-tls1_2", "-cipher", "aNULL:eNULL:PSK:@SECLEVEL=0"]


def _tls10_with_key(uid: str, key: str) -> List[str]:
    return ["-tls1", "-psk", key, "-psk_identity", uid, "-cipher", "PSK:@SECLEVEL=0"]


class TestClientsWithoutAValidTls13Key:
    """One relay and app for all cases (they are many); each case counts from where it starts."""

    @pytest.fixture(scope="class")
    def guarded(self, bed):
        from tests.integration.conftest import Apps

        s1 = bed["server1"]
        s1.ctl("release", "--all")
        apps = Apps()
        try:
            count = echo_app(apps, s1, 5300, "APP:")
            uid, _, (listener,) = inbound(s1, [5300])
            yield uid, listener, claimed(s1, bed["server2"], uid), count
        finally:
            apps.stop_all()
            s1.ctl("release", "--all")

    @pytest.mark.parametrize("client", [_no_key, _wrong_key, _wrong_identity, _tls12_with_key,
                                        _tls12_anonymous, _tls10_with_key, "plain-tcp"],
                             ids=lambda c: c if isinstance(c, str) else c.__name__.strip("_"))
    def test_gets_no_application_data(self, guarded, s1, s2, client):
        uid, listener, key, count = guarded
        before = connections(s1, count)
        line = "secret-request-" + secrets.token_hex(8)
        if client == "plain-tcp":
            host, port = listener.rsplit(":", 1)
            proc = tool(s2, "request", host, port, line, "--timeout", "10", check=False)
            out = proc.stdout
            assert out.strip() in ("EOF", "RESET"), f"plain TCP got an answer: {out!r}"
        else:
            out, err = tls_client(s2, listener, line + "\n", *client(uid, key))
            assert out == "", f"got application data: {out!r}"
            # The relay answered the hello with an alert: the attempt did reach it.
            assert "alert" in err.lower(), f"no TLS alert from the relay: {err}"
        assert "APP:" not in out and line not in out
        assert connections(s1, count) == before, "the application saw a connection"

        # Control: the same relay and app do work for a client that holds the key, and
        # the app then has seen exactly that one connection more (the app accepts in
        # order, so a connection let through above would be counted by now).
        good, err = tls_client(s2, listener, line + "\n", *with_key(uid, key))
        assert good == f"APP:{line}\n", err
        assert connections(s1, count) == before + 1, "the application saw the rejected client"


def test_num_conn_3_over_2_receivers_maps_round_robin(clean, s1, s2, apps):
    counts = [echo_app(apps, s1, 5300, "R0:"), echo_app(apps, s1, 5301, "R1:")]
    uid, _, listeners = inbound(s1, [5300, 5301], num_conn=3)
    low = DEFAULTS.port_range[0]
    assert listeners == [f"{S1_IP}:{p}" for p in (low, low + 1, low + 2)]
    key = claimed(s1, s2, uid)
    replies = []
    for i, listener in enumerate(listeners):
        out, err = tls_client(s2, listener, f"via-{i}\n", *with_key(uid, key))
        replies.append(out)
    assert replies == ["R0:via-0\n", "R1:via-1\n", "R0:via-2\n"]
    assert [connections(s1, c) for c in counts] == [2, 1]


# --------------------------------------------------------------------------
# 5. release

def test_release_leaves_nothing_and_the_port_can_be_reused(clean, s1, s2, apps):
    count = echo_app(apps, s1, 5300, "APP:")
    out = s1.ctl("inbound-request", "--remote_ip", S1_IP, "--receiver_ports", "5300", "--json",
                 check=True)
    made = json.loads(out.stdout)
    uid, path, (listener,) = made["uid"], made["endpoint"], made["listeners"]
    key = claimed(s1, s2, uid)
    key_dir = key_dir_of(s1, uid)
    # Traffic first: the relay's closed connections linger in TIME_WAIT on its port.
    assert tls_client(s2, listener, "one\n", *with_key(uid, key))[0] == "APP:one\n"
    introspect = ["busctl", "introspect", "--no-pager", "org.scistream.Tunnel1", path]
    assert ENDPOINT_IFACE in s1.run(introspect).stdout
    assert residue(s1) != []

    watch = SignalWatch(s1, path, until="member:InterfacesRemoved", timeout=10)
    try:
        rel = s1.ctl("release", uid)
        events = watch.events()
    finally:
        watch.close()
    assert (rel.returncode, rel.stdout, rel.stderr) == (0, f"Released {uid}.\n", "")

    assert residue(s1) == []
    assert endpoint_paths(s1) == []
    assert ENDPOINT_IFACE not in s1.run(introspect).stdout
    assert s1.run(["busctl", "get-property", "org.scistream.Tunnel1", path, ENDPOINT_IFACE,
                   "Uid"], check=False).returncode != 0
    assert dbus(s1, "ListEndpoints", "", []) == {"reply": [[]]}
    assert managed_objects(s1) == {}
    # Clients watching the ObjectManager learn of it: State releasing, then the removal.
    kinds = [(e["member"], e["body"][1].get("State") if e["member"] == "PropertiesChanged"
              else e["body"][1]) for e in events]
    assert ("PropertiesChanged", "releasing") in kinds, kinds
    assert kinds[-1] == ("InterfacesRemoved", [ENDPOINT_IFACE]), kinds
    # Its key is gone for good, and the old relay's port is no longer served.
    assert s1.run(["test", "-e", key_dir], check=False).returncode == 1
    assert tls_client(s2, listener, "two\n", *with_key(uid, key))[0] == ""

    # The same port again, for a working relay.
    uid2, _, listeners2 = inbound(s1, [5300])
    assert listeners2 == [listener]
    assert tls_client(s2, listener, "three\n", *with_key(uid2, claimed(s1, s2, uid2)))[0] == \
        "APP:three\n"
    assert connections(s1, count) == 2


def test_release_through_the_endpoint_object_and_upper_case_uid(clean, s1):
    uid, path, _ = inbound(s1, [5300])
    out = dbus(s1, "Release", "", [], path=path, iface=ENDPOINT_IFACE)
    assert out == {"reply": []}, out
    assert nothing_created(s1) == []

    # A uid is case-insensitive hex: the upper-case spelling names the same tunnel.
    uid, _, _ = inbound(s1, [5300])
    assert dbus(s1, "Release", "s", [uid.upper()]) == {"reply": []}
    assert nothing_created(s1) == []
    uid, _, _ = inbound(s1, [5300])
    rel = s1.ctl("release", uid.upper())
    assert (rel.returncode, rel.stdout) == (0, f"Released {uid}.\n"), rel.stderr
    assert nothing_created(s1) == []


# --------------------------------------------------------------------------
# 6. bad input: a named error, nothing created

U = "6f1c2a4e-9b7d-4c3a-8e5f-1a2b3c4d5e6f"  # well-formed, never an endpoint here
OK_LISTENER = f"{S2_IP}:5100"


def _inb(ip="192.168.150.1", ports=(5300,), n=1, opts=None):
    return ("InboundRequest", INBOUND_SIG, [ip, list(ports), n, opts or {}])


def _outb(uid=U, listeners=(OK_LISTENER,), ports=(), n=1, opts=None):
    return ("OutboundRequest", OUTBOUND_SIG, [uid, list(listeners), list(ports), n, opts or {}])


BAD_DBUS = {
    # remote_ip
    "ip-three-octets": (_inb("1.2.3"), INVALID),
    "ip-octet-256": (_inb("256.1.1.1"), INVALID),
    "ip-empty": (_inb(""), INVALID),
    "ip-5000-chars": (_inb("a" * 5000), INVALID),
    "ip-100k-digits": (_inb("1" * 100_000), INVALID),
    "ip-newline-injection": (_inb("1.2.3.4\nconnect = 6.6.6.6"), INVALID),
    "ip-equals": (_inb("1.2.3.4=5"), INVALID),
    "ip-unspecified-v4": (_inb("0.0.0.0"), INVALID),
    "ip-unspecified-v6": (_inb("::"), INVALID),
    "ip-multicast": (_inb("224.0.0.1"), INVALID),
    "ip-zone-id": (_inb("fe80::1%eth0"), INVALID),
    "ip-host-name": (_inb("localhost"), INVALID),
    "ip-leading-space": (_inb(" 192.168.150.1"), INVALID),
    "ip-leading-zero": (_inb("192.168.150.01"), INVALID),
    "ip-with-port": (_inb("192.168.150.1:5300"), INVALID),
    # receiver_ports (aq: 65536+ cannot be sent; see the CLI cases)
    "port-0": (_inb(ports=[0]), INVALID),
    "port-0-among-good": (_inb(ports=[5300, 0]), INVALID),
    "ports-empty": (_inb(ports=[]), INVALID),
    "ports-5000": (_inb(ports=[5300] * 5000), INVALID),
    # num_conn
    "num-conn-0": (_inb(n=0), INVALID),
    "num-conn-range-plus-1": (_inb(n=RANGE_SIZE + 1), INVALID),
    "num-conn-u32-max": (_inb(n=2**32 - 1), INVALID),
    # options
    "inbound-unknown-option": (_inb(opts={"x": ["s", "y"]}), INVALID),
    "inbound-option-injection": (_inb(opts={"connect": ["s", "6.6.6.6:22"]}), INVALID),
    "inbound-5000-options": (_inb(opts={f"k{i}": ["u", i] for i in range(5000)}), INVALID),
    # OutboundRequest: everything is checked before the peer is contacted
    "out-uid-x": (_outb(uid="x"), INVALID),
    "out-uid-empty": (_outb(uid=""), INVALID),
    "out-uid-newline": (_outb(uid=U + "\n"), INVALID),
    "out-uid-inner-newline": (_outb(uid=U[:8] + "\n" + U[9:]), INVALID),
    "out-uid-equals": (_outb(uid="="), INVALID),
    "out-uid-no-hyphens": (_outb(uid=U.replace("-", "")), INVALID),
    "out-uid-braces": (_outb(uid="{" + U + "}"), INVALID),
    "out-listener-newline": (_outb(listeners=[OK_LISTENER + "\nconnect = 6.6.6.6:22"]), INVALID),
    "out-listener-equals": (_outb(listeners=[f"{S2_IP}=5100"]), INVALID),
    "out-listener-no-port": (_outb(listeners=[S2_IP]), INVALID),
    "out-listener-port-0": (_outb(listeners=[f"{S2_IP}:0"]), INVALID),
    "out-listener-port-65536": (_outb(listeners=[f"{S2_IP}:65536"]), INVALID),
    "out-listener-host-name": (_outb(listeners=["server2:5100"]), INVALID),
    "out-listeners-empty": (_outb(listeners=[]), INVALID),
    "out-listeners-5000": (_outb(listeners=[OK_LISTENER] * 5000), INVALID),
    "out-local-port-0": (_outb(ports=[0]), INVALID),
    "out-local-ports-vs-num-conn": (_outb(ports=[5400, 5401], n=1), INVALID),
    "out-num-conn-0": (_outb(n=0), INVALID),
    "out-unknown-option": (_outb(opts={"x": ["s", "y"]}), INVALID),
    "out-option-peer-wrong-type": (_outb(opts={"peer": ["u", 5000]}), INVALID),
    "out-option-peer-newline": (_outb(opts={"peer": ["s", f"{S2_IP}:5000\nx"]}), INVALID),
    "out-option-trust-pem-garbage": (_outb(opts={"trust_pem": ["s", "not a pem"]}), INVALID),
    "out-option-trust-pem-wrong-type": (_outb(opts={"trust_pem": ["u", 1]}), INVALID),
    # Release / RearmEndpoint
    "release-x": (("Release", "s", ["x"]), INVALID),
    "release-empty": (("Release", "s", [""]), INVALID),
    "release-newline": (("Release", "s", [U + "\n"]), INVALID),
    "release-equals": (("Release", "s", ["="]), INVALID),
    "release-5000-chars": (("Release", "s", ["a" * 5000]), INVALID),
    "release-unknown": (("Release", "s", [U]), NOT_FOUND),
    "release-unknown-upper": (("Release", "s", [U.upper()]), NOT_FOUND),
    "rearm-x": (("RearmEndpoint", "s", ["x"]), INVALID),
    "rearm-unknown": (("RearmEndpoint", "s", [U]), NOT_FOUND),
}


@pytest.fixture(scope="module")
def bad_dbus_results(bed):
    """Every BAD_DBUS call, in one process on one connection (fast); what they left behind."""
    s1 = bed["server1"]
    if nothing_created(s1):
        s1.ctl("release", "--all")
    assert nothing_created(s1) == [], "could not empty server1 before the bad-input calls"
    results = dbus_many(s1, [call for call, _ in BAD_DBUS.values()])
    left = nothing_created(s1)
    s1.ctl("release", "--all")
    return dict(zip(BAD_DBUS, results)), left


@pytest.mark.parametrize("case", list(BAD_DBUS), ids=list(BAD_DBUS))
def test_bad_input_over_dbus_gets_a_named_error(bad_dbus_results, case):
    results, _left = bad_dbus_results
    out, expected = results[case], BAD_DBUS[case][1]
    assert out.get("error") == expected, f"{case}: {out if 'reply' in out else out['error']}"
    message = out["message"]
    assert message and "Traceback" not in message and "\n" not in message, message
    # The message is for a human: it does not echo a huge argument back.
    assert len(message) < 600, f"{len(message)}-character error message"
    assert out["endpoints_after"] == [[]], f"{case} created an endpoint"


def test_bad_input_over_dbus_left_nothing_behind(bad_dbus_results):
    _results, left = bad_dbus_results
    assert left == [], f"rejected requests left: {left}"


@pytest.mark.parametrize("call", [
    ("InboundRequest", "s", ["192.168.150.1"]),           # wrong signature
    ("InboundRequest", "", []),
    ("Frobnicate", "", []),                               # no such method
], ids=["wrong-signature", "no-arguments", "unknown-method"])
def test_malformed_dbus_calls_get_a_bus_error_not_a_traceback(empty_s1, call):
    out = dbus(empty_s1, *call)
    assert out.get("error", "").startswith("org.freedesktop.DBus.Error."), out
    assert "Traceback" not in out["message"] and "ServiceError" not in out["error"]


IN = ("inbound-request", "--remote_ip")
BAD_CLI = {
    "ip-three-octets": ([*IN, "1.2.3", "--receiver_ports", "5300"], 2),
    "ip-octet-256": ([*IN, "256.1.1.1", "--receiver_ports", "5300"], 2),
    "ip-empty": ([*IN, "", "--receiver_ports", "5300"], 2),
    "ip-5000-chars": ([*IN, "a" * 5000, "--receiver_ports", "5300"], 2),
    "ip-newline-injection": ([*IN, "1.2.3.4\nconnect = 6.6.6.6", "--receiver_ports", "5300"], 2),
    "ip-unspecified": ([*IN, "0.0.0.0", "--receiver_ports", "5300"], 2),
    "port-0": ([*IN, S1_IP, "--receiver_ports", "0"], 2),
    "port-65536": ([*IN, S1_IP, "--receiver_ports", "65536"], 2),
    "port-huge": ([*IN, S1_IP, "--receiver_ports", "99999999999"], 2),
    "port-negative": ([*IN, S1_IP, "--receiver_ports=-1"], 2),
    "port-text": ([*IN, S1_IP, "--receiver_ports", "http"], 2),
    "port-newline": ([*IN, S1_IP, "--receiver_ports", "5300\nconnect = 6.6.6.6:22"], 2),
    "ports-empty": ([*IN, S1_IP, "--receiver_ports", ""], 2),
    "ports-5000": ([*IN, S1_IP, "--receiver_ports", ",".join(["5300"] * 5000)], 2),
    "ports-missing": ([*IN, S1_IP], 2),
    "num-conn-0": ([*IN, S1_IP, "--receiver_ports", "5300", "--num_conn", "0"], 2),
    # Accepted by the client, refused by the daemon: the daemon's error comes through.
    "num-conn-range-plus-1": ([*IN, S1_IP, "--receiver_ports", "5300",
                               "--num_conn", str(RANGE_SIZE + 1)], 2),
    "num-conn-5000": ([*IN, S1_IP, "--receiver_ports", "5300", "--num_conn", "5000"], 2),
    "num-conn-text": ([*IN, S1_IP, "--receiver_ports", "5300", "--num_conn", "three"], 2),
    "s2cs-injection": ([*IN, S1_IP, "--receiver_ports", "5300", "--s2cs", "1.2.3.4:5000\nx"], 2),
    "unknown-option": ([*IN, S1_IP, "--receiver_ports", "5300", "--frobnicate"], 2),
    "unknown-verb": (["frobnicate"], 2),
    "release-x": (["release", "x"], 2),
    "release-newline": (["release", U + "\n"], 2),
    "release-equals": (["release", "="], 2),
    "release-nothing": (["release"], 2),
    "release-unknown": (["release", U], 3),
    "release-unknown-upper": (["release", U.upper()], 3),
    "status-x": (["status", "x"], 2),
    "status-unknown": (["status", U], 3),
    "logs-x": (["logs", "x"], 2),
    "out-uid-x": (["outbound-request", "x", OK_LISTENER], 2),
    "out-listener-newline": (["outbound-request", U, OK_LISTENER + "\nconnect = 6.6.6.6:22"], 2),
    "out-listener-equals": (["outbound-request", U, f"{S2_IP}=5100"], 2),
    "out-local-port-65536": (["outbound-request", U, OK_LISTENER, "--receiver_ports", "65536"], 2),
}


@pytest.mark.parametrize("case", list(BAD_CLI), ids=list(BAD_CLI))
def test_bad_input_through_scistreamctl(empty_s1, case):
    argv, code = BAD_CLI[case]
    proc = empty_s1.ctl(*argv)
    assert proc.returncode == code, f"{case}: exit {proc.returncode}: {proc.stderr}{proc.stdout}"
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("scistreamctl: "), proc.stderr
    assert "Traceback" not in proc.stderr and len(lines[0]) < 800, proc.stderr


def test_cli_error_as_json(empty_s1):
    proc = empty_s1.ctl("--json", "release", U)
    assert proc.returncode == 3
    err = json.loads(proc.stdout)
    assert (err["error"], err["exit_code"]) == ("NotFound", 3)
    assert U in err["message"]


# --------------------------------------------------------------------------
# 7. journal

def test_logs_by_uid_have_the_relays_and_the_daemons_lines(clean, s1, s2):
    """The daemon's lines carry SCISTREAM_UID (and SCISTREAM_UNIT); the relay's
    carry no uid (their fields are world-readable) and are found by unit:
    scistreamctl logs UID shows both, also after the release."""
    uid, _, (listener,) = inbound(s1, [5300])
    other, _, _ = inbound(s1, [5300])
    unit = unit_of(s1, uid)
    # A handshake gives the relay something to say about this tunnel (from its claimant).
    claim_key(s2, S1_IP, uid)
    tls_client(s2, listener, "x\n", *with_key(uid, secrets.token_hex(32)))

    def relay(e):
        return e.get("SYSLOG_IDENTIFIER") == "scistream-relay"

    def request(e):
        return e.get("SYSLOG_IDENTIFIER") == "scistreamd" and e.get("MESSAGE_ID") == MSG_REQUEST.hex

    entries = journal(s1, f"SCISTREAM_UID={uid}", "+", f"_SYSTEMD_UNIT={unit}",
                      what=f"relay and daemon lines of {uid}",
                      need=lambda es: any(map(relay, es)) and any(map(request, es))
                      and any("accepted connection" in str(e.get("MESSAGE")) for e in es))
    relay_lines = [e for e in entries if relay(e)]
    assert all(e.get("_SYSTEMD_UNIT") == unit for e in relay_lines)
    assert not any("SCISTREAM_UID" in e for e in relay_lines)
    assert all(e.get("SCISTREAM_ROLE") == "inbound" for e in relay_lines)
    assert any("Configuration successful" in e["MESSAGE"] for e in relay_lines)
    assert all(e["SCISTREAM_UID"] == uid for e in entries if not relay(e))
    (req,) = [e for e in entries if request(e)]
    assert req["SCISTREAM_ROLE"] == "inbound" and uid in req["MESSAGE"]
    assert req["SCISTREAM_UNIT"] == unit
    assert "active" in req["MESSAGE"] and f"-> {S1_IP}:5300" in req["MESSAGE"]
    # Nothing of the other tunnel.
    assert not any(other in str(e.get("MESSAGE")) for e in entries)
    assert all(e.get("_SYSTEMD_UNIT") != unit_of(s1, other) for e in entries)

    # scistreamctl logs shows the same lines, and nothing of the other tunnel.
    logs = s1.ctl("logs", uid, check=True).stdout
    assert "scistream-relay" in logs and "Configuration successful" in logs
    assert "accepted connection" in logs
    assert f"inbound endpoint {uid} active" in logs
    assert other not in logs

    s1.ctl("release", uid, check=True)
    journal(s1, f"SCISTREAM_UID={uid}", f"MESSAGE_ID={MSG_RELEASE.hex}",
            what=f"the release line of {uid}", need=lambda es: len(es) == 1)
    # Released: the daemon no longer knows the unit, its journal lines still do.
    logs = s1.ctl("logs", uid, check=True).stdout
    assert "accepted connection" in logs and f"inbound endpoint {uid} released" in logs


# --------------------------------------------------------------------------
# 8. D-Bus objects

def test_endpoint_objects_and_manager_properties(clean, s1):
    before = time.time()
    uid, path, listeners = inbound(s1, [5300, 5301], num_conn=2)
    after = time.time()
    assert UUID_RE.fullmatch(uid), f"uid {uid} is not a random (version 4) UUID"
    assert path == f"{ENDPOINT_PATH_PREFIX}/{_escape(uid)}_inbound"

    objects = managed_objects(s1)
    assert list(objects) == [path]
    props = objects[path][ENDPOINT_IFACE]
    created = props.pop("CreatedAt")
    assert int(before * 1e6) - 1 <= created <= int(after * 1e6) + 1, (before, created, after)
    low = DEFAULTS.port_range[0]
    expected = {"Uid": uid, "Role": "inbound", "State": "active",
                "Listeners": [f"{S1_IP}:{low}", f"{S1_IP}:{low + 1}"],
                "Targets": [f"{S1_IP}:5300", f"{S1_IP}:5301"], "NumConn": 2,
                "NRestarts": 0}
    assert {k: props.get(k) for k in expected} == expected
    # The relay unit, named by an opaque id (never the uid), is the one running.
    assert RELAY_UNIT_RE.fullmatch(props["Unit"]) and uid not in props["Unit"], props
    assert s1.run(["systemctl", "is-active", props["Unit"]]).stdout.strip() == "active"
    assert props["Listeners"] == listeners
    # Properties.Get on the object agrees.
    got = dbus(s1, "Get", "ss", [ENDPOINT_IFACE, "Unit"], path=path, iface=PROPS_IFACE)
    assert got == {"reply": [props["Unit"]]}
    assert dbus(s1, "ListEndpoints", "", []) == {
        "reply": [[[uid, "inbound", "active", listeners]]]}

    manager = dbus(s1, "GetAll", "s", [MANAGER_IFACE], iface=PROPS_IFACE)["reply"][0]
    assert manager == {"Version": __version__, "PeerPort": DEFAULTS.peer_port,
                       "ListenAddress": S1_IP, "PortRange": list(DEFAULTS.port_range)}
    # The same over the root ObjectManager, as a generic client would find it.
    root = dbus(s1, "GetManagedObjects", "", [], path="/", iface=OM_IFACE)["reply"][0]
    assert root["/org/scistream/Tunnel1"][MANAGER_IFACE] == manager
    assert root[path][ENDPOINT_IFACE]["Uid"] == uid


def _escape(uid: str) -> str:
    # systemd's bus_label_escape: a leading digit and every '-' become _xx.
    out = []
    for i, ch in enumerate(uid):
        if ch.isalpha() or (ch.isdigit() and i > 0):
            out.append(ch)
        else:
            out.append(f"_{ord(ch):02x}")
    return "".join(out)


def test_relay_killed_is_restarted_and_the_object_says_so(clean, s1, s2, apps):
    echo_app(apps, s1, 5300, "APP:")
    uid, path, (listener,) = inbound(s1, [5300])
    unit = unit_of(s1, uid)
    key = claimed(s1, s2, uid)
    pid = main_pid(s1, unit)
    watch = SignalWatch(s1, path, until="NRestarts=1", timeout=10)
    try:
        s1.run(["kill", "-9", str(pid)])
        events = watch.events()
    finally:
        watch.close()
    assert not watch.timed_out, f"no PropertiesChanged NRestarts=1; saw {events}"
    changed = [e["body"] for e in events if e["member"] == "PropertiesChanged"]
    assert all(b[0] == ENDPOINT_IFACE for b in changed)
    assert changed[-1][1]["NRestarts"] == 1
    # The listener never closed (its socket unit holds it); wait for the relay itself.
    wait_listening(s1, int(listener.rsplit(":", 1)[1]), S1_IP)
    wait_until(lambda: show(s1, unit, "ActiveState")["ActiveState"] == "active", 30,
               "the relay to run again")
    assert show(s1, unit, "NRestarts", "ActiveState") == {"NRestarts": "1", "ActiveState": "active"}
    assert main_pid(s1, unit) != pid
    props = managed_objects(s1)[path][ENDPOINT_IFACE]
    assert (props["State"], props["NRestarts"]) == ("active", 1)
    assert tls_client(s2, listener, "again\n", *with_key(uid, key))[0] == "APP:again\n"


# --------------------------------------------------------------------------
# 2./3. ports, persistence, relays outliving the daemon

def test_port_used_by_another_program_is_skipped_and_exhaustion_rolls_back(clean, s1, apps):
    low = DEFAULTS.port_range[0]
    echo_app(apps, s1, low, "FOREIGN:")  # not a relay: some other program on the first port
    foreign = residue(s1)
    assert foreign == [f"listening {S1_IP}:{low}"]
    _uid, path, listeners = inbound(s1, [5300])
    assert listeners == [f"{S1_IP}:{low + 1}"]
    after_first = residue(s1)

    # The whole range minus the two taken ports is not enough.
    out = dbus(s1, "InboundRequest", INBOUND_SIG, [S1_IP, [5300], RANGE_SIZE, {}])
    assert out.get("error") == ERR + "PortsExhausted", out
    assert "Traceback" not in out["message"]
    proc = s1.ctl("inbound-request", "--remote_ip", S1_IP, "--receiver_ports", "5300",
                  "--num_conn", str(RANGE_SIZE))
    assert proc.returncode == 5 and proc.stdout == "" and len(proc.stderr.splitlines()) == 1
    assert residue(s1) == after_first, "a failed request left something behind"
    assert endpoint_paths(s1) == [path]
    # The ports held for the failed request were returned: the next one gets the next port.
    _, _, listeners = inbound(s1, [5300])
    assert listeners == [f"{S1_IP}:{low + 2}"]


def test_daemon_restart_keeps_relays_and_their_ports(clean, s1, s2, apps):
    echo_app(apps, s1, 5300, "APP:")
    uid, path, (listener,) = inbound(s1, [5300])
    unit = unit_of(s1, uid)
    pid = main_pid(s1, unit)
    s1.run(["systemctl", "restart", "scistreamd.service"])
    assert s1.run(["systemctl", "is-active", "scistreamd.service"]).stdout.strip() == "active"
    # The relay was not stopped with the daemon, and was adopted by the new one.
    assert main_pid(s1, unit) == pid
    props = managed_objects(s1)[path][ENDPOINT_IFACE]
    assert (props["Uid"], props["State"], props["Listeners"]) == (uid, "active", [listener])
    key = claimed(s1, s2, uid)
    assert tls_client(s2, listener, "still\n", *with_key(uid, key))[0] == "APP:still\n"
    # Its port is still held: a new request does not get it twice.
    _, _, listeners = inbound(s1, [5300])
    assert listeners != [listener] and len(listeners) == 1


# --------------------------------------------------------------------------
# 9. CLI output

def test_cli_keeps_the_guides_output_lines(clean, s1, apps):
    # The server application listens, so the request has nothing to warn about
    # (test_counters.py covers the warning when it does not).
    echo_app(apps, s1, 5300, "APP:")
    # The guide's command, with s2uc's spellings.
    proc = s1.ctl("inbound-request", "--remote_ip", S1_IP, "--s2cs", f"{S1_IP}:5000",
                  "--receiver_ports", "5300", "--num_conn", "1",
                  "--server_cert=/etc/scistream/server.crt")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 3, proc.stdout
    assert lines[0] == "uid; s2cs; access_token; role"
    uid = lines[1].split()[0]
    assert UUID_RE.fullmatch(uid)
    assert lines[1] == f"{uid} {S1_IP}:5000 INVALID_TOKEN PROD"
    assert lines[2] == f"Listeners: ['{S1_IP}:{DEFAULTS.port_range[0]}']"

    # Dashed spellings; s2cs defaults to the daemon's ListenAddress:PeerPort.
    proc = s1.ctl("inbound-request", "--remote-ip", S1_IP, "--receiver-ports", "5300,5301",
                  "--num-conn", "2", check=True)
    lines2 = proc.stdout.splitlines()
    uid2 = lines2[1].split()[0]
    assert lines2[1] == f"{uid2} {S1_IP}:{DEFAULTS.peer_port} INVALID_TOKEN PROD"
    low = DEFAULTS.port_range[0]
    assert lines2[2] == f"Listeners: ['{S1_IP}:{low + 1}', '{S1_IP}:{low + 2}']"

    # --json parses, for every verb.
    made = json.loads(s1.ctl("--json", "inbound-request", "--remote_ip", S1_IP,
                             "--receiver_ports", "5300", check=True).stdout)
    assert set(made) >= {"uid", "role", "s2cs", "listeners", "endpoint"}
    assert (made["role"], made["listeners"]) == ("PROD", [f"{S1_IP}:{low + 3}"])
    assert made["endpoint"] == f"{ENDPOINT_PATH_PREFIX}/{_escape(made['uid'])}_inbound"
    listed = json.loads(s1.ctl("list", "--json", check=True).stdout)
    assert sorted(e["uid"] for e in listed) == sorted([uid, uid2, made["uid"]])
    assert all(e["role"] == "inbound" and e["state"] == "active" for e in listed)
    status = json.loads(s1.ctl("status", uid, "--json", check=True).stdout)
    assert [(s["uid"], s["state"], s["unit"]) for s in status] == [
        (uid, "active", unit_of(s1, uid))]
    human = s1.ctl("list", check=True).stdout
    assert all(u in human for u in (uid, uid2, made["uid"]))
    text = s1.ctl("status", uid, check=True).stdout
    assert re.search(rf"^Unit:\s+{re.escape(unit_of(s1, uid))}$", text, re.M), text
    released = json.loads(s1.ctl("release", uid2, "--json", check=True).stdout)
    assert released == {"released": [uid2]}
    assert json.loads(s1.ctl("release", "--all", "--json", check=True).stdout) == \
        {"released_count": 2}
    assert residue(s1) == []
