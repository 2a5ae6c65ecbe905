"""Local users cannot watch tunnels being made (issue 11, finding 1), on the real test bed.

A tunnel uid is a capability: whoever knows it may claim the tunnel's key
from the inbound gateway's peer port (once; with peer client certificates
not required, anyone). The review found an unprivileged user on server1
learning each uid as it was made (the daemon's D-Bus signals, relay unit
names, descriptions, LogExtraFields, bind paths, cgroups,
/run/systemd/transient) and stealing the key before the legitimate peer.

Here ``sstest-user`` does all of that at once while root runs the guide's
scenario, and learns nothing: no uid in anything collected, no key from
any uid-shaped string found, the legitimate outbound request succeeds and
the data arrive intact. ``sstest-member`` (group scistream) watching the
same bus does get the signals with the uid: the user's watch could see it.
"""

from __future__ import annotations

import json
import subprocess
from typing import Dict, List

import pytest

from tests.integration.conftest import (
    HOSTTOOL,
    KEY_DIR,
    STATE_DIR,
    as_user,
    dbus,
    parse_request_output,
    residue,
    run_as,
    tool,
    wait_until,
)
from tests.integration.snoop import candidates

pytestmark = pytest.mark.testbed

SNOOP = "/run/testbed/src/tests/integration/snoop.py"
USER = "sstest-user"
MEMBER = "sstest-member"
S1_IP = "192.168.150.1"
S2_IP = "192.168.150.2"
PEER_PORT = 5000
PEER_CA = "/etc/scistream/peer-ca.crt"
BUS = "org.scistream.Tunnel1"
MANAGER_PATH = "/org/scistream/Tunnel1"
ENDPOINT_IFACE = "org.scistream.Tunnel1.Endpoint"
MIB = 1024 * 1024

#: The "lab" configuration: peer client certificates not required.
LAB_DROPIN = "peer_require_client_cert = false\n"
DROPIN = "/etc/scistream/conf.d/50-test-security-local.toml"
CONFIGS: Dict[str, str] = {"default": "", "lab": LAB_DROPIN}


def _restart(host) -> None:
    host.run(["systemctl", "restart", "scistreamd.service"])  # Type=notify: ready on return


@pytest.fixture(params=sorted(CONFIGS))
def config(request, bed):
    """Both hosts run scistreamd with the configuration named by the parameter."""
    hosts = [bed["server1"], bed["server2"]]
    text = CONFIGS[request.param]
    for h in hosts:
        h.ctl("release", "--all")
        if text:
            h.run(["sh", "-c", f"cat > {DROPIN}"], input=text)
            _restart(h)
    try:
        yield request.param
    finally:
        for h in hosts:
            h.ctl("release", "--all")
            if text:
                h.run(["rm", "-f", DROPIN])
                _restart(h)


class Snoop:
    """snoop.py watch inside ``host`` as ``user``; subscribed when constructed."""

    def __init__(self, host, user: str, *extra: str) -> None:
        self.proc = subprocess.Popen(
            host.nsenter() + as_user(user) + ["python3", SNOOP, "watch", *extra],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            bufsize=1)
        first = self.proc.stdout.readline().strip()
        if first != "READY":
            self.close()
            raise AssertionError(f"snoop as {user} did not start: {first!r} "
                                 f"{self.proc.stderr.read()}")

    def _ask(self, cmd: str) -> str:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"snoop ended: {self.proc.stderr.read()[-3000:]}"
        return line

    def sync(self) -> None:
        assert self._ask("sync").strip() == "SYNCED"

    def dump(self) -> dict:
        return json.loads(self._ask("dump"))

    def stop(self) -> dict:
        out = json.loads(self._ask("stop"))
        self.proc.wait(timeout=120)
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


def text_of(found: dict) -> str:
    return "\n".join(found["seen"] + [json.dumps(s) for s in found["signals"]])


def needles(uid: str) -> List[str]:
    """Every way the uid could be written: as is, without dashes, its long groups,
    and as a D-Bus object path component (systemd's escaping, used by scistreamd)."""
    groups = uid.split("-")
    escaped = "_3" + uid[0] + uid[1:].replace("-", "_2d") if uid[0].isdigit() else \
        uid.replace("-", "_2d")
    return [uid, uid.upper(), uid.replace("-", ""), groups[0], groups[-1], escaped]


def leaks(uid: str, found: dict) -> List[str]:
    text = text_of(found)
    lines = [x for x in text.splitlines() if any(n in x for n in needles(uid))]
    return lines[:10]


def from_daemon(found: dict) -> List[dict]:
    return [s for s in found["signals"] if s["sender"] in found["owners"]]


def endpoint_unit(host, uid: str, role: str) -> str:
    """The relay unit of (uid, role), as the daemon says (the Unit property)."""
    out = dbus(host, "GetManagedObjects", "", [], iface="org.freedesktop.DBus.ObjectManager")
    for ifaces in out["reply"][0].values():
        props = ifaces.get(ENDPOINT_IFACE)
        if props and props["Uid"] == uid and props["Role"] == role:
            return props["Unit"]
    raise AssertionError(f"no {role} endpoint {uid} on {host.name}")


def claim_all(host, uids: List[str]) -> dict:
    """sstest-user claims each of ``uids`` from server1's peer port."""
    out = run_as(host, USER, ["python3", SNOOP, "claim", S1_IP, str(PEER_PORT)],
                 input="".join(u + "\n" for u in uids), timeout=600)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_a_local_user_learns_no_uid_and_steals_no_key(config, bed, apps):
    s1, s2 = bed["server1"], bed["server2"]
    digest_file = "/run/security-local-sink.digest"
    s1.run(["rm", "-f", digest_file])
    apps.start(s1, "security-local-sink", "python3", HOSTTOOL, "sink", "5300", digest_file)
    user = Snoop(s1, USER)
    member = Snoop(s1, MEMBER, "--signals-only")
    try:
        # --- root on server1: the guide's inbound request
        r = s1.ctl("inbound-request", "--remote_ip", S1_IP, "--s2cs", f"{S1_IP}:{PEER_PORT}",
                   "--receiver_ports", "5300", "--num_conn", "1")
        assert r.returncode == 0, r.stderr
        uid, _s2cs, _role, listeners = parse_request_output(r.stdout)
        unit = endpoint_unit(s1, uid, "inbound")
        user.sync()
        member.sync()

        # --- the thief: every uid-shaped string it found, claimed at once
        early = user.dump()
        assert leaks(uid, early) == []
        tried = candidates(text_of(early))
        stolen = claim_all(s1, tried)
        assert stolen["keys"] == [], stolen
        assert uid not in tried

        # --- root on server2: the legitimate outbound request still gets the key
        r = s2.ctl("outbound-request", "--remote_ip", S1_IP, "--s2cs", f"{S2_IP}:{PEER_PORT}",
                   "--receiver_ports", "5100", "--num_conn", "1", f"--server_cert={PEER_CA}",
                   uid, *listeners)
        assert r.returncode == 0, f"outbound-request failed ({r.returncode}): {r.stderr}"
        _uid, _s2cs, _role, local = parse_request_output(r.stdout)
        ip, _, port = local[0].rpartition(":")
        nbytes = 8 * MIB
        sent = tool(s2, "send", ip, port, str(nbytes), timeout=300).stdout.split()

        def digest():
            got = s1.run(["cat", digest_file], check=False)
            return got.stdout.split() if got.returncode == 0 else None

        received = wait_until(digest, 120, f"the sink on server1 to write {digest_file}")
        assert received == sent, f"sent sha256/bytes {sent}, the application got {received}"
        user.sync()
        member.sync()

        # Re-armed (a new key, a new claim): still nothing to see. The uid goes
        # on stdin: a command line is readable by every local user.
        r = s1.ctl("rearm", "-", input=uid + "\n")
        assert r.returncode == 0, r.stderr
        assert endpoint_unit(s1, uid, "inbound") == unit  # same unit: re-arm keeps its name
        user.sync()
        member.sync()
        found = user.stop()
        watched = member.stop()
    finally:
        user.close()
        member.close()

    # --- what the user got: nothing that names the uid ...
    assert leaks(uid, found) == [], "the unprivileged user saw the uid:\n" + "\n".join(
        leaks(uid, found))
    late = [u for u in candidates(text_of(found)) if u not in tried]
    assert claim_all(s1, late)["keys"] == []
    assert from_daemon(found) == [], f"signals of scistreamd reached {USER}"
    notes = found["bus"]
    assert notes["AddMatch"].startswith("OK"), notes
    assert notes["BecomeMonitor"] == "org.freedesktop.DBus.Error.AccessDenied", notes
    # ... although it looked where the uid used to be, and its subscription worked:
    text = text_of(found)
    assert unit in text, f"{USER} never saw the relay unit {unit}: the search proves nothing"
    assert f"/run/systemd/transient/{unit}" in text
    assert "BindReadOnlyPaths=" in text and "LogExtraFields=" in text
    assert "/usr/bin/stunnel" in text and "scistream.slice" in text  # relay cmdline, cgroup
    assert found["signals"], f"{USER} received no signal at all: the subscription is broken"
    assert found["owners"], "the watcher never learnt scistreamd's bus name"
    assert any("No journal files were opened" in x or "insufficient permissions" in x
               for x in found["seen"] if x.startswith("journalctl")), "the journal is readable"
    # The positive control: group scistream receives the daemon's signals, uid and all.
    assert from_daemon(watched), f"{MEMBER} got no signal of scistreamd"
    assert uid in json.dumps(from_daemon(watched)), f"{MEMBER}'s signals lack the uid"

    if config == "lab":
        # The thief's claim works when it has a uid: it found none above.
        r = s1.ctl("inbound-request", "--remote_ip", S1_IP, "--receiver_ports", "5301")
        assert r.returncode == 0, r.stderr
        other, *_ = parse_request_output(r.stdout)
        assert claim_all(s1, [other])["keys"] == [other]
        s1.ctl("release", other)

    for h in (s1, s2):
        assert h.ctl("release", uid).returncode == 0
    s1.run(["rm", "-f", digest_file])
    assert residue(s1) == [] and residue(s2) == []


def test_unprivileged_introspection_names_no_endpoint(s1, clean):
    """dbus-next lists every exported path containing the asked one as a child:
    Introspect of "/endpoint" listed each endpoint's uid to anyone. Now only
    the manager and its ancestors are public, the manager without children."""
    r = s1.ctl("inbound-request", "--remote_ip", S1_IP, "--receiver_ports", "5300")
    assert r.returncode == 0, r.stderr
    uid = parse_request_output(r.stdout)[0]
    last = uid.split("-")[-1]
    for path in ("/endpoint", "/Tunnel1/endpoint", "/e", "/org/scistream/Tunnel1/endpoint"):
        out = dbus(s1, "Introspect", "", [], user=USER, path=path,
                   iface="org.freedesktop.DBus.Introspectable")
        assert out.get("error") == "org.scistream.Tunnel1.Error.AccessDenied", (path, out)
        root = dbus(s1, "Introspect", "", [], path=path,
                    iface="org.freedesktop.DBus.Introspectable")
        if path == "/endpoint":
            assert last in root["reply"][0]  # the hole this closes (root may see it)
    manager = dbus(s1, "Introspect", "", [], user=USER, path=MANAGER_PATH,
                   iface="org.freedesktop.DBus.Introspectable")["reply"][0]
    assert "org.scistream.Tunnel1.Manager" in manager and "<node name=\"endpoint\"" not in manager
    full = dbus(s1, "Introspect", "", [], path=MANAGER_PATH,
                iface="org.freedesktop.DBus.Introspectable")["reply"][0]
    assert "<node name=\"endpoint\"" in full
    for path in ("/", "/org", "/org/scistream"):
        out = dbus(s1, "Introspect", "", [], user=USER, path=path,
                   iface="org.freedesktop.DBus.Introspectable")
        assert "reply" in out and last not in out["reply"][0], (path, out)


def test_relay_units_carry_no_uid_and_logs_still_find_everything(s1, clean):
    """Unit name, Description, LogExtraFields, bind path: an opaque relay id,
    not the uid; `scistreamctl logs UID` shows the relay's own lines and the
    daemon's, and after release still both."""
    r = s1.ctl("inbound-request", "--remote_ip", S1_IP, "--receiver_ports", "5300")
    assert r.returncode == 0, r.stderr
    uid = parse_request_output(r.stdout)[0]
    unit = endpoint_unit(s1, uid, "inbound")
    relay_id = unit[len("scistream-inbound-"):-len(".service")]
    assert len(relay_id) == 16 and int(relay_id, 16) >= 0, unit
    show = s1.run(["systemctl", "show", unit]).stdout
    props = dict(line.split("=", 1) for line in show.splitlines() if "=" in line)
    assert props["Description"] == "SciStream inbound relay"
    assert props["LogExtraFields"].split() == ["SCISTREAM_ROLE=inbound"]
    assert f"/var/lib/scistream/keys/{relay_id}-inbound" in props["BindReadOnlyPaths"]
    assert all(n not in show for n in needles(uid))

    def logs() -> str:
        s1.run(["journalctl", "--sync"], check=False)
        out = s1.ctl("logs", uid)
        return out.stdout if out.returncode == 0 else ""

    # stunnel's start-up lines are the relay's own; the "active" line the daemon's.
    both = wait_until(lambda: (lambda t: t if "stunnel" in t and "active" in t else None)(
        logs()), 30, "the relay's and the daemon's lines in scistreamctl logs")
    assert "scistream-relay" in both and "scistreamd" in both, both
    assert s1.ctl("release", uid).returncode == 0
    after = wait_until(lambda: (lambda t: t if "released" in t else None)(logs()), 30,
                       "the release line in scistreamctl logs")
    assert "scistream-relay" in after, "after release the relay's lines are gone from logs"


# --------------------------------------------------------------------------
# upgrade: relays of the previous version, named by their uid

def _make_legacy(s1, uid: str) -> str:
    """Turn inbound endpoint ``uid`` into what the previous version left: a state
    record without relay_id, key directory and running unit named by the uid
    (with the uid in Description and LogExtraFields). Returns that unit."""
    unit = endpoint_unit(s1, uid, "inbound")
    relay_id = unit[len("scistream-inbound-"):-len(".service")]
    legacy_unit = f"scistream-inbound-{uid}.service"
    legacy_dir = f"{KEY_DIR}/{uid}-inbound"
    s1.run(["systemctl", "stop", "scistreamd.service"])
    # The relay and the .socket unit that holds its listeners (the previous version
    # had none: its stunnel bound them itself).
    s1.run(["systemctl", "stop", unit, unit[: -len(".service")] + ".socket"])
    s1.run(["mv", f"{KEY_DIR}/{relay_id}-inbound", legacy_dir])
    drop = ("import json,sys; p=sys.argv[1]; d=json.load(open(p)); del d['relay_id']; "
            "open(p,'w').write(json.dumps(d))")
    s1.run(["python3", "-c", drop, f"{STATE_DIR}/{uid}-inbound.json"])
    s1.run(["systemd-run", f"--unit={legacy_unit}", "--slice=scistream.slice", "--quiet",
            "-p", "Type=exec", "-p", "Restart=on-failure", "-p", "DynamicUser=yes",
            "-p", f"Description=SciStream inbound relay {uid}",
            "-p", f"BindReadOnlyPaths={legacy_dir}:/run/scistream-relay",
            "-p", "SupplementaryGroups=scistream-relay",
            "-p", f"LogExtraFields=SCISTREAM_UID={uid}",
            "-p", "LogExtraFields=SCISTREAM_ROLE=inbound",
            "-p", "SyslogIdentifier=scistream-relay",
            "/usr/bin/stunnel4", "/run/scistream-relay/stunnel.conf"])
    return legacy_unit


def _ask(s2, listener: str, text: str) -> str:
    ip, port = listener.rsplit(":", 1)
    return tool(s2, "request", ip, port, text, "--timeout", "20", check=False).stdout.strip()


@pytest.mark.parametrize("how", ["rearm", "recreate"])
def test_relays_of_the_previous_version_are_adopted_then_renamed(s1, s2, clean, apps, how):
    """After an upgrade the old relay (named by its uid) is adopted unchanged:
    same unit, same process, same key, the tunnel keeps working. It keeps that
    name (and leaks the uid) until a re-arm or a recreation (e.g. after a
    reboot) moves it to an opaque relay id; its old key directory goes."""
    apps.start(s1, "legacy-echo", "python3", HOSTTOOL, "echo", "5330", "--tag", "L:")
    r = s1.ctl("inbound-request", "--remote_ip", S1_IP, "--receiver_ports", "5330")
    assert r.returncode == 0, r.stderr
    uid, _s2cs, _role, listeners = parse_request_output(r.stdout)
    r = s2.ctl("outbound-request", "--remote_ip", S1_IP, f"--server_cert={PEER_CA}", "-",
               *listeners, input=uid + "\n")
    assert r.returncode == 0, r.stderr
    local = parse_request_output(r.stdout)[3][0]
    try:
        legacy_unit = _make_legacy(s1, uid)
        pid = s1.run(["systemctl", "show", "-P", "MainPID", legacy_unit]).stdout.strip()
        wait_until(lambda: _ask(s2, local, "old") == "L:old", 60, "the legacy relay to serve")
    finally:
        s1.run(["systemctl", "start", "scistreamd.service"])

    # Adopted as it is.
    assert endpoint_unit(s1, uid, "inbound") == legacy_unit
    props = dbus(s1, "GetManagedObjects", "", [],
                 iface="org.freedesktop.DBus.ObjectManager")["reply"][0]
    (state,) = [i[ENDPOINT_IFACE]["State"] for i in props.values()
                if i.get(ENDPOINT_IFACE, {}).get("Uid") == uid]
    assert state == "active"
    assert s1.run(["systemctl", "show", "-P", "MainPID", legacy_unit]).stdout.strip() == pid
    assert s1.run(["test", "-d", f"{KEY_DIR}/{uid}-inbound"], check=False).returncode == 0
    assert _ask(s2, local, "adopted") == "L:adopted"

    if how == "rearm":
        r = s1.ctl("rearm", "-", input=uid + "\n")
        assert r.returncode == 0, r.stderr
    else:  # the unit is gone while the daemon is down, as after a reboot
        s1.run(["systemctl", "stop", "scistreamd.service"])
        s1.run(["systemctl", "stop", legacy_unit])
        s1.run(["systemctl", "start", "scistreamd.service"])
    unit = endpoint_unit(s1, uid, "inbound")
    assert unit != legacy_unit and uid not in unit, unit
    relay_id = unit[len("scistream-inbound-"):-len(".service")]
    assert s1.run(["systemctl", "is-active", unit]).stdout.strip() == "active"
    assert s1.run(["systemctl", "is-active", legacy_unit], check=False).stdout.strip() \
        in ("inactive", "unknown")
    assert s1.run(["ls", KEY_DIR]).stdout.split() == [f"{relay_id}-inbound"]
    record = json.loads(s1.run(["cat", f"{STATE_DIR}/{uid}-inbound.json"]).stdout)
    assert record["relay_id"] == relay_id
    if how == "rearm":  # a new key: the peer claims again
        assert s2.ctl("release", uid).returncode == 0
        r = s2.ctl("outbound-request", "--remote_ip", S1_IP, f"--server_cert={PEER_CA}",
                   "--receiver_ports", local.rsplit(":", 1)[1], "-", *listeners,
                   input=uid + "\n")
        assert r.returncode == 0, r.stderr
    wait_until(lambda: _ask(s2, local, "renamed") == "L:renamed", 60, "the renamed relay")
    for h in (s1, s2):
        assert h.ctl("release", uid).returncode == 0
    apps.stop_all()
    assert residue(s1) == [] and residue(s2) == []
