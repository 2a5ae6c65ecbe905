"""Who may do what over D-Bus (issue 5, item 4), on the real test bed.

Every host has two test users: ``sstest-user`` (not in group scistream) and
``sstest-member`` (in it). A tunnel uid is a capability (whoever knows it
can claim the tunnel's key from the peer port), so an unprivileged user may
read only the daemon's own properties: listing or inspecting endpoints,
creating and releasing need root, group ``scistream`` or a polkit grant.
Two layers enforce it: the D-Bus policy (allow-listed methods, name owned by
root only) and scistreamd's per-connection check.
"""

from __future__ import annotations

import json
from typing import Dict

import pytest

from tests.integration.conftest import dbus, residue, run_as

pytestmark = pytest.mark.testbed

USER = "sstest-user"
MEMBER = "sstest-member"
BUS = "org.scistream.Tunnel1"
MANAGER_PATH = "/org/scistream/Tunnel1"
ENDPOINT_PREFIX = "/org/scistream/Tunnel1/endpoint"
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"
PROPERTIES = "org.freedesktop.DBus.Properties"
INTROSPECTABLE = "org.freedesktop.DBus.Introspectable"
DAEMON_DENIED = "org.scistream.Tunnel1.Error.AccessDenied"
BUS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"
DENIED = (DAEMON_DENIED, BUS_DENIED)
PERMISSION_EXIT = 9

#: RequestName(NAME, DO_NOT_QUEUE) on the system bus; prints the error name or OK.
REQUEST_NAME = r"""
import asyncio, sys
from dbus_next import BusType, Message, MessageType
from dbus_next.aio import MessageBus

async def main():
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    reply = await bus.call(Message(
        destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
        interface="org.freedesktop.DBus", member="RequestName", signature="su",
        body=[sys.argv[1], 4]))
    print(reply.error_name if reply.message_type == MessageType.ERROR else "OK %s" % reply.body)

asyncio.run(main())
"""


def root_state(host) -> Dict:
    """What exists on a host, seen by root: endpoints and leftovers of any."""
    out = host.ctl("list", "--json")
    assert out.returncode == 0, out.stderr
    # What the endpoints are, not what their relays are doing (counters move).
    keep = ("uid", "role", "state", "listeners")
    return {"endpoints": [{k: e[k] for k in keep} for e in json.loads(out.stdout)],
            "residue": sorted(residue(host))}


def assert_refused_plainly(out, what: str) -> None:
    assert out.returncode == PERMISSION_EXIT, f"{what}: exit {out.returncode}\n{out.stderr}"
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("scistreamctl: permission denied"), \
        f"{what}: {out.stderr!r}"
    assert "Traceback" not in out.stderr + out.stdout
    assert out.stdout == ""


@pytest.fixture
def root_endpoint(s1, clean):
    """An inbound endpoint on server1 created by root: (uid, object path)."""
    out = s1.ctl("inbound-request", "--remote_ip", s1.ip, "--receiver_ports", "5400", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    yield data["uid"], data["endpoint"]


def test_unprivileged_user_reads_only_the_daemons_own_properties(s1, root_endpoint):
    """Version (and the manager's other properties) are public; nothing else is."""
    out = run_as(s1, USER, ["busctl", "get-property", BUS, MANAGER_PATH,
                            "org.scistream.Tunnel1.Manager", "Version"])
    assert out.returncode == 0 and out.stdout.startswith('s "'), out.stderr
    reply = dbus(s1, "GetAll", "s", ["org.scistream.Tunnel1.Manager"], user=USER,
                 iface=PROPERTIES)
    assert set(reply["reply"][0]) >= {"Version", "PeerPort", "ListenAddress", "PortRange"}
    assert "error" not in dbus(s1, "Ping", "", [], user=USER, iface="org.freedesktop.DBus.Peer")


def test_unprivileged_scistreamctl_is_refused_plainly(s1, root_endpoint):
    """list, status, inbound-request, release: exit 9, one plain line, no traceback,
    and nothing is created or removed."""
    uid, _path = root_endpoint
    before = root_state(s1)
    for args in (["list"], ["list", "--json"], ["status", uid],
                 ["inbound-request", "--remote_ip", s1.ip, "--receiver_ports", "5401"],
                 ["release", uid], ["release", "--all"]):
        out = run_as(s1, USER, ["scistreamctl", *args])
        if "--json" in args:
            assert json.loads(out.stdout)["exit_code"] == PERMISSION_EXIT
            out.stdout = ""
        assert_refused_plainly(out, " ".join(args))
    assert root_state(s1) == before


def test_unprivileged_dbus_inspection_is_refused(s1, root_endpoint):
    """No path of the daemon tells an unprivileged user an endpoint's uid or
    properties: ObjectManager (on any path, / included), Properties of an
    endpoint object, ListEndpoints, introspection below the endpoint prefix."""
    uid, path = root_endpoint
    for p in ("/", "/org", "/org/scistream", MANAGER_PATH, ENDPOINT_PREFIX):
        reply = dbus(s1, "GetManagedObjects", "", [], user=USER, path=p, iface=OBJECT_MANAGER)
        assert reply.get("error") in DENIED, (p, reply)
    for method, sig, body in (("GetAll", "s", ["org.scistream.Tunnel1.Endpoint"]),
                              ("Get", "ss", ["org.scistream.Tunnel1.Endpoint", "Uid"])):
        reply = dbus(s1, method, sig, body, user=USER, path=path, iface=PROPERTIES)
        assert reply.get("error") in DENIED, (method, reply)
    reply = dbus(s1, "ListEndpoints", "", [], user=USER)
    assert reply.get("error") in DENIED, reply
    reply = dbus(s1, "WaitStarted", "s", [uid], user=USER)  # would tell a uid exists
    assert reply.get("error") in DENIED, reply
    for p in (ENDPOINT_PREFIX, path):
        reply = dbus(s1, "Introspect", "", [], user=USER, path=p, iface=INTROSPECTABLE)
        assert reply.get("error") in DENIED, (p, reply)
    tree = run_as(s1, USER, ["busctl", "tree", "--list", BUS])
    assert uid.split("-")[0] not in tree.stdout + tree.stderr
    # Root sees it all, so the refusals above are about the caller, not the paths.
    reply = dbus(s1, "GetManagedObjects", "", [], path="/", iface=OBJECT_MANAGER)
    assert path in reply["reply"][0]
    reply = dbus(s1, "Get", "ss", ["org.scistream.Tunnel1.Endpoint", "Uid"], path=path,
                 iface=PROPERTIES)
    assert reply == {"reply": [uid]}
    assert dbus(s1, "WaitStarted", "s", [uid]) == {"reply": []}  # no start going on


def test_member_of_group_scistream_manages_tunnels(s1, root_endpoint):
    """sstest-member may list, inspect, create and release (its own and root's)."""
    uid, _path = root_endpoint
    out = run_as(s1, MEMBER, ["scistreamctl", "inbound-request", "--remote_ip", s1.ip,
                              "--receiver_ports", "5402", "--json"])
    assert out.returncode == 0, out.stderr
    mine = json.loads(out.stdout)["uid"]
    out = run_as(s1, MEMBER, ["scistreamctl", "list", "--json"])
    assert out.returncode == 0, out.stderr
    assert sorted(e["uid"] for e in json.loads(out.stdout)) == sorted([uid, mine])
    out = run_as(s1, MEMBER, ["scistreamctl", "status", uid])
    assert out.returncode == 0 and "State:       active" in out.stdout, out.stderr
    for u in (mine, uid):
        out = run_as(s1, MEMBER, ["scistreamctl", "release", u])
        assert out.returncode == 0, out.stderr
    assert root_state(s1) == {"endpoints": [], "residue": []}


@pytest.mark.parametrize("user", [USER, MEMBER])
def test_bus_policy_allows_only_listed_methods(s1, user):
    """Methods not in the policy's allow-list never reach the daemon, whoever calls
    (group scistream changes nothing at the bus level); root gets through to the
    daemon, which does not know the method."""
    for iface, method in (("org.scistream.Tunnel1.Manager", "Frobnicate"),
                          ("org.scistream.Tunnel1.Endpoint", "Frobnicate"),
                          ("org.example.Other", "ListEndpoints"),
                          (PROPERTIES, "Set")):
        reply = dbus(s1, method, "", [], user=user, iface=iface)
        assert reply.get("error") == BUS_DENIED, (iface, method, reply)
        assert "Rejected send message" in reply["message"]
    reply = dbus(s1, "Frobnicate", "", [])
    assert reply.get("error") == "org.freedesktop.DBus.Error.UnknownMethod", reply


@pytest.mark.parametrize("user", [USER, MEMBER])
def test_only_root_may_own_the_bus_name(s1, user):
    out = run_as(s1, user, ["python3", "-c", REQUEST_NAME, BUS])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == BUS_DENIED
    # The daemon still owns it.
    owner = s1.run(["busctl", "call", "org.freedesktop.DBus", "/org/freedesktop/DBus",
                    "org.freedesktop.DBus", "GetConnectionUnixProcessID", "s", BUS]).stdout
    main_pid = s1.run(["systemctl", "show", "-P", "MainPID", "scistreamd"]).stdout
    assert owner.split() == ["u", main_pid.strip()]


# --------------------------------------------------------------------------
# polkit: the test bed does not run polkitd; this test starts one in server1

POLKIT_RULE = (
    "polkit.addRule(function(action, subject) {\n"
    f'    if (action.id == "org.scistream.tunnel1.manage" && subject.user == "{USER}") {{\n'
    "        return polkit.Result.YES;\n"
    "    }\n"
    "});\n")
ACTIONS = "/usr/share/polkit-1/actions"
RULES = "/etc/polkit-1/rules.d/50-sstest-scistream.rules"


@pytest.fixture
def polkit(s1):
    """polkitd on server1's system bus, with scistreamd's actions and a rule
    granting org.scistream.tunnel1.manage (only) to sstest-user.

    The actions directory is read-only machine state shared by every host, so
    a copy with the project's policy added is bind-mounted over it in server1's
    mount namespace only; the rule goes to server1's own /etc.
    """
    if s1.run(["test", "-x", "/usr/lib/polkit-1/polkitd"], check=False).returncode:
        pytest.skip("polkitd is not installed on this machine")
    s1.run(["sh", "-c", f"mkdir -p /run/sstest-polkit && cp -a {ACTIONS}/. /run/sstest-polkit/ "
                        "&& cp /run/testbed/src/etc/polkit/org.scistream.tunnel1.policy "
                        f"/run/sstest-polkit/ && mount --bind /run/sstest-polkit {ACTIONS}"])
    try:
        s1.run(["sh", "-c", f"cat > {RULES}"], input=POLKIT_RULE)
        # The distribution's polkit.service as a transient unit of the same name,
        # so D-Bus activation (SystemdService=polkit.service) finds it too.
        s1.run(["systemd-run", "--unit=polkit", "--quiet", "-p", "Type=dbus",
                "-p", "BusName=org.freedesktop.PolicyKit1",
                "/usr/lib/polkit-1/polkitd", "--no-debug"])
        yield
    finally:
        s1.run(["systemctl", "stop", "polkit"], check=False)
        s1.run(["rm", "-f", RULES], check=False)
        s1.run(["umount", ACTIONS], check=False)
        s1.run(["rm", "-rf", "/run/sstest-polkit"], check=False)


def test_polkit_grant_lets_a_user_manage(s1, clean, polkit):
    """With polkitd running, a rule granting org.scistream.tunnel1.manage lets
    sstest-user create and release; inspecting (tunnel1.inspect, not granted)
    stays refused. Without polkitd the same calls are refused."""
    out = run_as(s1, USER, ["scistreamctl", "inbound-request", "--remote_ip", s1.ip,
                            "--receiver_ports", "5403", "--json"])
    assert out.returncode == 0, out.stderr
    uid = json.loads(out.stdout)["uid"]
    assert [e["uid"] for e in root_state(s1)["endpoints"]] == [uid]
    assert_refused_plainly(run_as(s1, USER, ["scistreamctl", "list"]), "list")
    assert_refused_plainly(run_as(s1, USER, ["scistreamctl", "status", uid]), "status")
    out = run_as(s1, USER, ["scistreamctl", "release", uid])
    assert out.returncode == 0, out.stderr
    assert root_state(s1) == {"endpoints": [], "residue": []}

    s1.run(["systemctl", "stop", "polkit"])
    out = run_as(s1, USER, ["scistreamctl", "inbound-request", "--remote_ip", s1.ip,
                            "--receiver_ports", "5403"])
    assert_refused_plainly(out, "inbound-request without polkitd")
    assert root_state(s1) == {"endpoints": [], "residue": []}
