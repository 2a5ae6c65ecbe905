"""Issue 11, the smaller holes, on the real test bed.

- Standard D-Bus interfaces answer by name: Peer.GetMachineId used to go
  unanswered (a dbus-next 0.2.3 bug) and wrote a traceback to the journal on
  every call; every standard method (Peer, Introspectable, Properties,
  ObjectManager; unknown interfaces and members, wrong signatures, absent
  objects, endpoint objects) now answers or fails with a named error, as an
  unprivileged user and as root, and leaves no traceback.
- Target policy: an inbound endpoint may forward only to the networks and
  ports ``allowed_targets`` allows; loopback and link-local only when a rule
  names them.
"""

from __future__ import annotations

import json
from typing import List, Optional

import pytest

from tests.integration.conftest import (
    HOSTTOOL,
    DaemonWatch,
    as_user,
    dbus,
    journal_cursor,
    journal_since,
    parse_request_output,
    residue,
    restart_daemon,
    tool,
    wait_listening,
)

pytestmark = pytest.mark.testbed

USER = "sstest-user"
MANAGER_PATH = "/org/scistream/Tunnel1"
MANAGER = "org.scistream.Tunnel1.Manager"
ENDPOINT = "org.scistream.Tunnel1.Endpoint"
PEER = "org.freedesktop.DBus.Peer"
INTROSPECTABLE = "org.freedesktop.DBus.Introspectable"
PROPERTIES = "org.freedesktop.DBus.Properties"
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"

REPLY = "reply"
DENIED = "org.scistream.Tunnel1.Error.AccessDenied"  # scistreamd's own check
BUS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"  # the bus policy
UNKNOWN_METHOD = "org.freedesktop.DBus.Error.UnknownMethod"
UNKNOWN_OBJECT = "org.freedesktop.DBus.Error.UnknownObject"
UNKNOWN_PROPERTY = "org.freedesktop.DBus.Error.UnknownProperty"
READ_ONLY = "org.freedesktop.DBus.Error.PropertyReadOnly"
NOT_SUPPORTED = "org.freedesktop.DBus.Error.NotSupported"

#: Journal text that means dbus-next or scistreamd hit an exception on a message.
TRACEBACK_MARKS = ("Traceback", "got unexpected error", "raised an exception",
                   "internal error in", "ServiceError")


def dbus_batch(host, calls: List[dict], user: Optional[str] = None) -> List[dict]:
    """The calls in order on one bus connection inside ``host`` (as ``user``); one answer each."""
    prefix = as_user(user) if user else []
    out = host.run(prefix + ["python3", HOSTTOOL, "dbusbatch"],
                   input="".join(json.dumps(c) + "\n" for c in calls), check=False)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[:1] == ["READY"], out.stdout[:500] + out.stderr[-2000:]
    answers = [json.loads(x) for x in lines[1:]]
    assert len(answers) == len(calls), out.stdout[-2000:]
    return answers


def call(path: str, iface: Optional[str], member: str, sig: str = "", body=()) -> dict:
    return {"method": member, "sig": sig, "body": list(body), "path": path, "iface": iface}


def assert_no_traceback(host, cursor: str) -> None:
    text = journal_since(host, cursor, "-u", "scistreamd.service")
    bad = [x for x in text.splitlines() if any(m in x for m in TRACEBACK_MARKS)]
    assert bad == [], f"scistreamd on {host.name} logged exceptions:\n{text[-4000:]}"


def machine_id(host) -> str:
    mid = host.run(["cat", "/etc/machine-id"]).stdout.strip()
    assert len(mid) == 32, mid
    return mid


# --------------------------------------------------------------------------
# Standard D-Bus interfaces

def test_get_machine_id_answers_an_unprivileged_user_100_times(s1):
    watch = DaemonWatch(s1)
    cursor = journal_cursor(s1)
    answers = dbus_batch(s1, [call(MANAGER_PATH, PEER, "GetMachineId")] * 100, user=USER)
    assert answers == [{"reply": [machine_id(s1)]}] * 100, answers[:3]
    assert_no_traceback(s1, cursor)
    watch.check()


EP = "<endpoint>"  # replaced by the test endpoint's object path

#: (what, path, interface, member, signature, body, answer for root, for sstest-user).
#: An answer is REPLY or the error name. BUS_DENIED: the bus policy stops the call
#: before scistreamd; DENIED: scistreamd's own check (uids are capabilities).
STANDARD_CALLS = [
    ("Peer.Ping", MANAGER_PATH, PEER, "Ping", "", [], REPLY, REPLY),
    ("Peer.GetMachineId on /", "/", PEER, "GetMachineId", "", [], REPLY, REPLY),
    ("Peer.Ping on an absent object", "/nope", PEER, "Ping", "", [], REPLY, REPLY),
    ("Peer, unknown member", MANAGER_PATH, PEER, "Pong", "", [], UNKNOWN_METHOD, DENIED),
    ("Peer.Ping, wrong signature", MANAGER_PATH, PEER, "Ping", "s", ["x"],
     UNKNOWN_METHOD, UNKNOWN_METHOD),
    ("Peer.GetMachineId, wrong signature", MANAGER_PATH, PEER, "GetMachineId", "u", [1],
     UNKNOWN_METHOD, UNKNOWN_METHOD),
    ("Introspect", MANAGER_PATH, INTROSPECTABLE, "Introspect", "", [], REPLY, REPLY),
    ("Introspect /", "/", INTROSPECTABLE, "Introspect", "", [], REPLY, REPLY),
    # Only the manager and its ancestors are public: dbus-next lists as children
    # of a path every exported path containing it, so any other path is privileged.
    ("Introspect an absent object", "/org/nope", INTROSPECTABLE, "Introspect", "", [],
     REPLY, DENIED),
    ("Introspect, wrong signature", MANAGER_PATH, INTROSPECTABLE, "Introspect", "s", ["x"],
     UNKNOWN_METHOD, UNKNOWN_METHOD),
    ("Introspect the endpoints", MANAGER_PATH + "/endpoint", INTROSPECTABLE, "Introspect", "",
     [], REPLY, DENIED),
    ("Properties.Get Version", MANAGER_PATH, PROPERTIES, "Get", "ss", [MANAGER, "Version"],
     REPLY, REPLY),
    ("Properties.GetAll of the manager", MANAGER_PATH, PROPERTIES, "GetAll", "s", [MANAGER],
     REPLY, REPLY),
    ("Properties.Get, unknown property", MANAGER_PATH, PROPERTIES, "Get", "ss",
     [MANAGER, "Nope"], UNKNOWN_PROPERTY, UNKNOWN_PROPERTY),
    ("Properties.Set, read-only", MANAGER_PATH, PROPERTIES, "Set", "ssv",
     [MANAGER, "Version", ["s", "9"]], READ_ONLY, BUS_DENIED),
    ("Properties.Get, wrong signature", MANAGER_PATH, PROPERTIES, "Get", "s", [MANAGER],
     UNKNOWN_METHOD, UNKNOWN_METHOD),
    ("Properties.Get on an absent object", MANAGER_PATH + "/nope", PROPERTIES, "Get", "ss",
     [MANAGER, "Version"], UNKNOWN_OBJECT, DENIED),
    ("Properties.Get, empty interface", MANAGER_PATH, PROPERTIES, "Get", "ss", ["", "Version"],
     NOT_SUPPORTED, DENIED),
    ("Properties.GetAll of Peer", MANAGER_PATH, PROPERTIES, "GetAll", "s", [PEER],
     REPLY, DENIED),
    ("Properties, unknown member", MANAGER_PATH, PROPERTIES, "Delete", "", [],
     UNKNOWN_METHOD, BUS_DENIED),
    ("GetManagedObjects /", "/", OBJECT_MANAGER, "GetManagedObjects", "", [], REPLY, DENIED),
    ("GetManagedObjects on an absent object", "/nope", OBJECT_MANAGER, "GetManagedObjects", "",
     [], REPLY, DENIED),
    ("unknown interface", MANAGER_PATH, "org.example.Nope", "Foo", "", [],
     UNKNOWN_METHOD, BUS_DENIED),
    ("manager method, wrong signature", MANAGER_PATH, MANAGER, "ListEndpoints", "s", ["x"],
     UNKNOWN_METHOD, DENIED),
    ("manager, unknown method", MANAGER_PATH, MANAGER, "Nope", "", [],
     UNKNOWN_METHOD, BUS_DENIED),
    ("method call without interface", MANAGER_PATH, None, "ListEndpoints", "", [],
     UNKNOWN_METHOD, BUS_DENIED),
    ("endpoint Properties.GetAll", EP, PROPERTIES, "GetAll", "s", [ENDPOINT], REPLY, DENIED),
    ("endpoint Properties.Get Uid", EP, PROPERTIES, "Get", "ss", [ENDPOINT, "Uid"],
     REPLY, DENIED),
    ("endpoint Properties.Set State", EP, PROPERTIES, "Set", "ssv",
     [ENDPOINT, "State", ["s", "active"]], READ_ONLY, BUS_DENIED),
    ("endpoint Introspect", EP, INTROSPECTABLE, "Introspect", "", [], REPLY, DENIED),
    ("endpoint Peer.Ping", EP, PEER, "Ping", "", [], REPLY, DENIED),
    ("endpoint Peer.GetMachineId", EP, PEER, "GetMachineId", "", [], REPLY, DENIED),
    ("endpoint GetManagedObjects", EP, OBJECT_MANAGER, "GetManagedObjects", "", [],
     REPLY, DENIED),
    ("endpoint Release, wrong signature", EP, ENDPOINT, "Release", "s", ["x"],
     UNKNOWN_METHOD, DENIED),
    ("absent endpoint Properties.GetAll", MANAGER_PATH + "/endpoint/nope_inbound", PROPERTIES,
     "GetAll", "s", [ENDPOINT], UNKNOWN_OBJECT, DENIED),
]


@pytest.fixture
def endpoint_path(s1, s2, clean) -> str:
    """An inbound endpoint on server1 (target server2:5300; nothing needs to listen there)."""
    out = s1.ctl("inbound-request", "--remote_ip", s2.ip, "--receiver_ports", "5300", "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["endpoint"]


@pytest.mark.parametrize("user", [None, USER], ids=["root", "unprivileged"])
def test_standard_interfaces_answer_by_name(s1, endpoint_path, user):
    watch = DaemonWatch(s1)
    cursor = journal_cursor(s1)
    calls = [call(endpoint_path if path == EP else path, iface, member, sig, body)
             for _w, path, iface, member, sig, body, _r, _u in STANDARD_CALLS]
    answers = dbus_batch(s1, calls, user=user)
    got = {row[0]: (REPLY if "reply" in a else a.get("error") or a) for row, a in
           zip(STANDARD_CALLS, answers)}
    want = {row[0]: row[7 if user else 6] for row in STANDARD_CALLS}
    assert got == want
    for row, a in zip(STANDARD_CALLS, answers):
        assert "Traceback" not in a.get("message", ""), (row[0], a)
    by_name = dict(zip((row[0] for row in STANDARD_CALLS), answers))
    mid = machine_id(s1)
    assert by_name["Peer.GetMachineId on /"]["reply"] == [mid]
    if user is None:
        assert by_name["endpoint Peer.GetMachineId"]["reply"] == [mid]
        # The read-only Set changed nothing.
        state = by_name["endpoint Properties.GetAll"]["reply"][0]["State"]
        assert state == ["s", "active"], state
    # Nothing a caller sent changed anything: the endpoint is still there, active.
    after = dbus_batch(s1, [call(endpoint_path, PROPERTIES, "Get", "ss", [ENDPOINT, "State"])])
    assert after == [{"reply": [["s", "active"]]}], after
    assert_no_traceback(s1, cursor)
    watch.check()


def test_forged_systemd_signals_are_ignored(s1, s2, clean):
    """Anyone the bus policy lets send signals (root here) may send scistreamd a unicast
    "systemd" signal: of the wrong shape it must not raise; well-formed, it must not
    complete a job (only systemd's own broadcasts count)."""
    watch = DaemonWatch(s1)
    cursor = journal_cursor(s1)
    for args in (["org.freedesktop.systemd1.Manager.JobRemoved", "string:x"],
                 ["org.freedesktop.systemd1.Manager.UnitRemoved"],
                 ["org.freedesktop.systemd1.Manager.JobRemoved", "uint32:1",
                  "objpath:/org/freedesktop/systemd1/job/1", "string:x.service",
                  "string:failed"]):
        s1.run(["dbus-send", "--system", "--type=signal", "--dest=org.scistream.Tunnel1",
                "/org/freedesktop/systemd1", *args])
    # Still serving: a request goes through and is released again.
    out = s1.ctl("inbound-request", "--remote_ip", s2.ip, "--receiver_ports", "5300")
    assert out.returncode == 0, out.stderr
    assert s1.ctl("release", "--all").returncode == 0
    assert residue(s1) == []
    assert_no_traceback(s1, cursor)
    watch.check()


# --------------------------------------------------------------------------
# Target policy (allowed_targets)

DROPIN = "/etc/scistream/conf.d/60-test-targets.toml"
ACCESS_EXIT = 9
LO_RULE = "127.0.0.1 5300"
TEN_RULE = "10.0.0.0/8 5000-5100"


@pytest.fixture
def target_rules(s1, clean):
    """server1 with allowed_targets from a conf.d drop-in; the drop-in removed afterwards."""
    s1.run(["tee", DROPIN], input=(
        "# written by test_security_misc.py; removed when the test ends\n"
        f'allowed_targets = ["192.168.150.0/24", "{LO_RULE}", "{TEN_RULE}"]\n'))
    try:
        restart_daemon(s1)
        yield s1
    finally:
        s1.ctl("release", "--all")
        s1.run(["rm", "-f", DROPIN])
        restart_daemon(s1)


def refused(host, ip: str, port: int) -> str:
    """inbound-request to ip:port must fail with exit 9 and leave nothing; its stderr."""
    out = host.ctl("inbound-request", "--remote_ip", ip, "--receiver_ports", str(port))
    assert out.returncode == ACCESS_EXIT, (out.returncode, out.stdout, out.stderr)
    assert out.stdout == "" and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "Traceback" not in out.stderr
    assert residue(host) == [], "a refused request left something behind"
    return out.stderr


@pytest.mark.parametrize("ip", ["127.0.0.1", "::1", "::ffff:127.0.0.1", "169.254.1.1",
                                "fe80::1"])
def test_loopback_and_link_local_targets_are_refused_by_default(s1, clean, ip):
    watch = DaemonWatch(s1)
    text = refused(s1, ip, 5300)
    kind = "link-local" if ip.startswith(("169.254", "fe80")) else "loopback"
    assert f"{kind} targets are allowed only by a rule of allowed_targets" in text, text
    # The same refusal by name over D-Bus.
    out = dbus(s1, "InboundRequest", "saqua{sv}", [ip, [5300], 1, {}])
    assert out.get("error") == "org.scistream.Tunnel1.Error.AccessDenied", out
    assert residue(s1) == []
    watch.check()


def test_loopback_target_allowed_by_a_rule_carries_data(target_rules, s1, s2, apps):
    """With a rule naming 127.0.0.1:5300, a tunnel reaches an app listening on loopback only."""
    apps.start(s1, "echo-lo-5300", "python3", HOSTTOOL, "echo", "5300", "--tag", "LO:",
               "--host", "127.0.0.1")
    wait_listening(s1, 5300, "127.0.0.1")
    out = s1.ctl("inbound-request", "--remote_ip", "127.0.0.1", "--receiver_ports", "5300")
    assert out.returncode == 0, out.stderr
    uid, _s2cs, _role, listeners = parse_request_output(out.stdout)
    try:
        out2 = s2.ctl("outbound-request", "--remote_ip", s1.ip, uid, *listeners)
        assert out2.returncode == 0, out2.stderr
        _uid, _s, _r, local = parse_request_output(out2.stdout)
        ip, port = local[0].rsplit(":", 1)
        reply = tool(s2, "request", ip, port, "through-loopback", check=False)
        assert reply.stdout.strip() == "LO:through-loopback", reply.stdout + reply.stderr
    finally:
        s2.ctl("release", uid)
        s1.ctl("release", uid)


def test_targets_outside_the_rules_are_refused_naming_the_rule(target_rules, s1):
    watch = DaemonWatch(s1)
    text = refused(s1, "127.0.0.1", 5301)
    assert f'rule "{LO_RULE}" of allowed_targets covers 127.0.0.1 but not port 5301' in text, text
    text = refused(s1, "10.1.2.3", 6000)
    assert f'rule "{TEN_RULE}" of allowed_targets covers 10.1.2.3 but not port 6000' in text, text
    # Not named by any rule: other loopback addresses, other networks.
    assert "loopback targets are allowed only by a rule" in refused(s1, "127.0.0.2", 5300)
    text = refused(s1, "172.16.0.1", 5300)
    assert "no rule of allowed_targets covers it" in text and f'"{TEN_RULE}"' in text, text
    # One refused port of several refuses the whole request (5000 alone is allowed).
    out = s1.ctl("inbound-request", "--remote_ip", "10.1.2.3", "--receiver_ports", "5000,6000",
                 "--num_conn", "2")
    assert out.returncode == ACCESS_EXIT and "port 6000" in out.stderr, out.stderr
    assert residue(s1) == []
    # Inside the rules: accepted.
    ok = s1.ctl("inbound-request", "--remote_ip", "10.1.2.3", "--receiver_ports", "5100")
    assert ok.returncode == 0, ok.stderr
    ok = s1.ctl("inbound-request", "--remote_ip", "192.168.150.2", "--receiver_ports", "22")
    assert ok.returncode == 0, ok.stderr
    watch.check()
