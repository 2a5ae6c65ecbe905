"""Relays that a flood cannot kill and whose ports nobody can take (issue 11, findings 2, 3).

Each relay's listeners are held by a transient .socket unit (socket activation),
filtered by IP address (IPAddressAllow=/IPAddressDeny=), and stunnel's own
connection cap (relay_max_connections) refuses connections before the relay
reaches its memory cap. Everything here runs on the real test bed.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import subprocess
import threading

import pytest

from scistreamd.config import Config, relay_connection_fit

from .conftest import (
    HOSTTOOL,
    as_user,
    endpoint_properties,
    parse_request_output,
    residue,
    wait_until,
)

S1_IP, S2_IP = "192.168.150.1", "192.168.150.2"
#: A second address of server2 that never claims anything.
STRANGER_IP = "192.168.150.3"
SOCKFLOOD = "/run/testbed/src/tests/integration/sockflood.py"
DEFAULTS = Config()
DROPIN = "/etc/scistream/conf.d/60-test-security-relay.toml"
#: What a relay can hold within its memory and task caps at the defaults: the bound
#: that keeps it alive. A burst may pass relay_max_connections by the connections
#: accepted before stunnel counts them (2 seen on a quiet machine, 49 under load);
#: the cap's default leaves this much room below the memory cap for that.
FIT = relay_connection_fit(DEFAULTS.relay_memory_max, DEFAULTS.relay_tasks_max)


class Tool:
    """sockflood.py running inside ``host`` (optionally as ``user``), JSON lines on stdout."""

    def __init__(self, host, *args: str, user: str = "", timeout: float = 180) -> None:
        import queue

        prefix = as_user(user) if user else []
        self.timeout = timeout
        self.proc = subprocess.Popen(host.nsenter() + prefix + ["python3", SOCKFLOOD, *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1)
        self.lines: queue.Queue = queue.Queue()

        def pump() -> None:
            for line in self.proc.stdout:
                self.lines.put(line.strip())
            self.lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        first = self.read()
        assert first == "READY", f"sockflood {args[0]} did not start: {first!r}"

    def read(self):
        import queue

        try:
            line = self.lines.get(timeout=self.timeout)
        except queue.Empty:
            raise AssertionError(f"sockflood gave no answer within {self.timeout}s") from None
        if line is None:
            raise AssertionError(f"sockflood ended: {self.proc.stderr.read()[-2000:]}")
        return json.loads(line)

    def say(self, line: str):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except Exception:
                self.proc.kill()
                self.proc.wait()


def probe(host, ip: str, port: int, source: str = "", timeout: float = 3) -> str:
    args = ["python3", SOCKFLOOD, "probe", ip, str(port), "--timeout", str(timeout)]
    if source:
        args += ["--source", source]
    return json.loads(host.run(args).stdout)["result"]


def echo(host, ip: str, port: int, text: str = "hello") -> str:
    r = host.run(["python3", HOSTTOOL, "request", ip, str(port), text, "--timeout", "10"],
                 check=False)
    return r.stdout.strip()


def units(host, uid: str, role: str):
    """(service, socket) of an endpoint, as the daemon names them."""
    props = endpoint_properties(host, uid, role)
    assert props, f"no {role} endpoint {uid} on {host.name}"
    service = props["Unit"]
    return service, service[: -len(".service")] + ".socket"


def show(host, unit: str, *props: str) -> dict:
    out = host.run(["systemctl", "show", unit, "-p", ",".join(props)]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def inbound(host, ports, num_conn: int):
    r = host.ctl("inbound-request", "--remote_ip", host.ip, "--receiver_ports",
                 ",".join(map(str, ports)), "--num_conn", str(num_conn))
    assert r.returncode == 0, r.stderr
    uid, _s2cs, _role, listeners = parse_request_output(r.stdout)
    return uid, listeners


def outbound(host, uid: str, listeners, *extra: str):
    r = host.ctl("outbound-request", *extra, uid, *listeners)
    assert r.returncode == 0, r.stderr
    _uid, _s2cs, _role, local = parse_request_output(r.stdout)
    return local


def port_of(listener: str) -> int:
    return int(listener.rsplit(":", 1)[1])


@contextlib.contextmanager
def tunnel(s1, s2, apps, *, sink: bool = False):
    """server2 outbound -> server1 inbound -> echo app on server1 (and a one-shot sink app
    behind listener 0 if ``sink``). Yields (uid, inbound listeners, outbound listeners)."""
    tag = secrets.token_hex(3)
    echo_port, sink_port = 7312, 7311
    apps.start(s1, f"echo-{tag}", "python3", HOSTTOOL, "echo", str(echo_port), "--host", S1_IP)
    ports = [echo_port]
    if sink:
        apps.start(s1, f"sink-{tag}", "python3", HOSTTOOL, "sink", str(sink_port),
                   f"/run/sink-{tag}", "--host", S1_IP)
        ports = [sink_port, echo_port]
    uid, ins = inbound(s1, ports, len(ports))
    try:
        outs = outbound(s2, uid, ins)
        yield uid, ins, outs, f"/run/sink-{tag}"
    finally:
        s2.ctl("release", uid)
        s1.ctl("release", uid)
        s1.run(["rm", "-f", f"/run/sink-{tag}"], check=False)


@pytest.fixture
def fresh(clean, apps):
    yield clean
    for host in clean.hosts.values():
        host.ctl("release", "--all")
        wait_until(lambda h=host: residue(h) == [], 30, f"nothing left on {host.name}")


# ------------------------------------------------------------------- IP lists

def test_unclaimed_inbound_listener_accepts_nobody(fresh, s1, s2, apps):
    """Before the claim nobody has the key: the listener takes no connection at all."""
    apps.start(s1, "echo-unclaimed", "python3", HOSTTOOL, "echo", "7312", "--host", S1_IP)
    uid, ins = inbound(s1, [7312], 1)
    port = port_of(ins[0])
    service, sock = units(s1, uid, "inbound")
    assert show(s1, sock, "ActiveState")["ActiveState"] == "active"
    assert show(s1, sock, "IPAddressAllow")["IPAddressAllow"] == ""
    assert probe(s2, S1_IP, port) == "timeout"
    assert probe(s1, S1_IP, port) == "timeout"
    # After the claim: the claimant (server2) gets through, server1 itself still not.
    outs = outbound(s2, uid, ins)
    assert show(s1, sock, "IPAddressAllow")["IPAddressAllow"] == f"{S2_IP}/32"
    assert echo(s2, S2_IP, port_of(outs[0]), "after-claim") == "after-claim"
    assert probe(s1, S1_IP, port) == "timeout"
    # A re-arm forgets the claimant until the next claim.
    assert s1.ctl("rearm", uid).returncode == 0
    assert show(s1, sock, "IPAddressAllow")["IPAddressAllow"] == ""
    assert probe(s2, S1_IP, port) == "timeout"
    assert show(s1, service, "ActiveState")["ActiveState"] == "active"


def test_access_lists_survive_daemon_reload_and_recreation(fresh, s1, s2, apps):
    """The claimant's address stays the only one allowed after `systemctl daemon-reload`
    (transient units are re-read from their files) and after the relay is recreated from
    persisted state (both units stopped while the daemon was down)."""
    with tunnel(s1, s2, apps) as (uid, ins, outs, _):
        port = port_of(ins[0])
        service, sock = units(s1, uid, "inbound")
        s1.run(["systemctl", "daemon-reload"])
        assert show(s1, sock, "IPAddressAllow")["IPAddressAllow"] == f"{S2_IP}/32"
        assert probe(s1, S1_IP, port) == "timeout"
        assert echo(s2, S2_IP, port_of(outs[0]), "reloaded") == "reloaded"
        s1.run(["systemctl", "stop", "scistreamd"])
        s1.run(["systemctl", "stop", sock, service])
        s1.run(["systemctl", "start", "scistreamd"])
        wait_until(lambda: show(s1, sock, "ActiveState")["ActiveState"] == "active", 30,
                   "the relay to be recreated")
        assert show(s1, sock, "IPAddressAllow")["IPAddressAllow"] == f"{S2_IP}/32"
        assert probe(s1, S1_IP, port) == "timeout"
        assert echo(s2, S2_IP, port_of(outs[0]), "recreated") == "recreated"


def test_flood_from_other_addresses_gets_nothing_through(fresh, s1, s2, apps):
    """Once claimed by server2, another address of server2 and server1 itself get no
    connection to the inbound listener, however many they try; the tunnel goes on."""
    with tunnel(s1, s2, apps) as (uid, ins, outs, _):
        port = port_of(ins[0])
        service, _sock = units(s1, uid, "inbound")
        before = show(s1, service, "NRestarts", "MainPID")
        s2.run(["ip", "addr", "add", f"{STRANGER_IP}/24", "dev", "eth0"])
        try:
            flood = Tool(s2, "flood", S1_IP, str(port), "300", "--source", STRANGER_IP,
                         "--timeout", "5")
            try:
                got = flood.read()
            finally:
                flood.close()
            assert got["connected"] == 0, got
            assert got["timed_out"] == 300, got
        finally:
            s2.run(["ip", "addr", "del", f"{STRANGER_IP}/24", "dev", "eth0"], check=False)
        local = Tool(s1, "flood", S1_IP, str(port), "100", "--timeout", "5")
        try:
            got = local.read()
        finally:
            local.close()
        assert got["connected"] == 0, got
        assert echo(s2, S2_IP, port_of(outs[0]), "still-works") == "still-works"
        assert show(s1, service, "NRestarts", "MainPID") == before
        log = s1.run(["journalctl", "-u", service, "-o", "cat"]).stdout
        accepted = [line.rsplit(" ", 1)[-1].rsplit(":", 1)[0] for line in log.splitlines()
                    if "accepted connection from" in line]
        assert accepted and set(accepted) == {S2_IP}, log[-2000:]


def test_outbound_listener_accepts_only_client_networks(fresh, s1, s2, apps):
    """The outbound relay's plaintext listener: refused from outside outbound_client_networks
    (server1), open from inside (server2 itself); an operator can add a network."""
    with tunnel(s1, s2, apps) as (uid, _ins, outs, _):
        port = port_of(outs[0])
        _service, sock = units(s2, uid, "outbound")
        allow = show(s2, sock, "IPAddressAllow")["IPAddressAllow"].split()
        assert sorted(allow) == sorted(["127.0.0.0/8", "::1/128", f"{S2_IP}/32"]), allow
        assert probe(s1, S2_IP, port) == "timeout"
        assert echo(s2, S2_IP, port, "inside") == "inside"
    s2.run(["sh", "-c", f"printf 'outbound_client_networks = [\"127.0.0.0/8\", "
                        f"\"{S1_IP}/32\"]\\n' > {DROPIN}"])
    try:
        s2.run(["systemctl", "restart", "scistreamd"])
        with tunnel(s1, s2, apps) as (uid, _ins, outs, _):
            port = port_of(outs[0])
            assert echo(s1, S2_IP, port, "from-s1") == "from-s1"
            assert echo(s2, S2_IP, port, "own-address") == "own-address"
    finally:
        s2.run(["rm", "-f", DROPIN])
        s2.run(["systemctl", "restart", "scistreamd"])


# ------------------------------------------------------------------- flood cap

def test_claimant_flood_past_the_cap_is_refused_and_the_relay_survives(fresh, s1, s2, apps):
    """2,600 idle connections from the claimant (what killed the relay before, at
    MemoryMax=256M) while a transfer runs: past relay_max_connections stunnel closes
    new connections, the relay stays up (same PID, NRestarts unchanged) and the
    transfer arrives intact."""
    cap = DEFAULTS.relay_max_connections
    n = 2600
    with tunnel(s1, s2, apps, sink=True) as (uid, ins, outs, sink_out):
        service, _sock = units(s1, uid, "inbound")
        assert int(show(s1, service, "LimitNOFILE")["LimitNOFILE"]) > cap
        before = show(s1, service, "NRestarts", "MainPID", "ActiveState")
        stream = Tool(s2, "stream", S2_IP, str(port_of(outs[0])))
        flood = None
        try:
            flood = Tool(s2, "flood", S1_IP, str(port_of(ins[1])), str(n), "--timeout", "60")
            got = flood.read()
            assert got["connected"] == n, got  # the kernel completes them; stunnel decides

            def settled():
                c = flood.say("check")
                refused = s1.run(["sh", "-c", f"journalctl -u {service} -o cat | "
                                  "grep -c 'Connection rejected: too many clients'"],
                                 check=False).stdout.strip()
                # Settled: every connection is either held or closed, and each closed
                # one is a refusal the relay logged.
                done = (c["open"] + c["closed_by_server"] == n and c["closed_by_server"] > 0
                        and refused == str(c["closed_by_server"]))
                return c if done else None

            state = wait_until(settled, 120, "stunnel to refuse the connections past its cap",
                               interval=1)
            # The tunnel's connection holds one slot. stunnel counts a connection when
            # its thread starts, so a burst can pass the cap by the connections accepted
            # meanwhile (2 seen on a quiet machine, 49 under load); what must hold is
            # that they fit the relay's memory and task caps (FIT), so it is not killed.
            assert cap - 1 <= state["open"] <= FIT, state
            assert show(s1, service, "NRestarts", "MainPID", "ActiveState") == before
            mem = int(show(s1, service, "MemoryCurrent")["MemoryCurrent"])
            assert mem < DEFAULTS.relay_memory_max, mem
            # A new connection now is accepted and closed at once: refused, not queued.
            assert probe(s2, S1_IP, port_of(ins[1]), timeout=10) == "closed"
        finally:
            if flood:
                flood.close()
            sent = stream.say("stop")
            stream.close()
        got = wait_until(lambda: s1.run(["cat", sink_out], check=False).stdout.split(), 60,
                         "the sink to finish")
        assert got == [sent["sha256"], str(sent["bytes"])], (sent, got)
        assert sent["bytes"] > 0
        assert show(s1, service, "NRestarts", "MainPID", "ActiveState") == before
        # Room again once the flood is gone.
        wait_until(lambda: echo(s2, S2_IP, port_of(outs[1]), "after") == "after", 30,
                   "the tunnel to serve again after the flood")
        log = s1.run(["journalctl", "-u", service, "-o", "cat"]).stdout
        assert "Connection rejected: too many clients" in log


# ------------------------------------------------------------------- squatting

def test_squatter_never_gets_the_port_while_the_relay_dies_or_is_rearmed(fresh, s1, s2, apps):
    """An unprivileged user binding the listener port in a loop while the relay is
    killed with SIGKILL (three times) and re-armed (twice): the socket unit keeps the
    port all along; the tunnel works afterwards."""
    with tunnel(s1, s2, apps) as (uid, ins, outs, _):
        port = port_of(ins[0])
        service, sock = units(s1, uid, "inbound")
        squatter = Tool(s1, "squat", S1_IP, str(port), "--seconds", "25", user="sstest-user")
        try:
            for i in range(3):
                pid = show(s1, service, "MainPID")["MainPID"]
                s1.run(["systemctl", "kill", "-s", "KILL", service])

                def restarted(old=pid) -> bool:
                    st = show(s1, service, "MainPID", "ActiveState")
                    return st["ActiveState"] == "active" and st["MainPID"] not in ("0", old)

                wait_until(restarted, 30, f"the relay to restart after kill {i + 1}")
            assert int(show(s1, service, "NRestarts")["NRestarts"]) == 3
            for _ in range(2):
                assert s1.ctl("rearm", uid).returncode == 0
            got = squatter.read()
        finally:
            squatter.close()
        assert got["attempts"] > 100, got
        assert got["got"] == 0, f"the unprivileged user held the relay's port: {got}"
        assert show(s1, sock, "ActiveState")["ActiveState"] == "active"
        # The tunnel works again after a fresh claim.
        s2.ctl("release", uid)
        outs = outbound(s2, uid, ins)
        assert echo(s2, S2_IP, port_of(outs[0]), "after-squat") == "after-squat"


# --------------------------------------------------------------- bind failures

def test_port_taken_before_an_outbound_request_is_named_at_once(fresh, s1, s2, apps):
    """A local port another process holds: the request fails by name, the claim is not
    used up, nothing is left behind."""
    apps.start(s1, "echo-taken", "python3", HOSTTOOL, "echo", "7312", "--host", S1_IP)
    uid, ins = inbound(s1, [7312], 1)
    apps.start(s2, "holder", "python3", HOSTTOOL, "echo", "5190", "--host", S2_IP)
    r = s2.ctl("outbound-request", "--receiver_ports", "5190", uid, *ins)
    assert r.returncode == 4, (r.returncode, r.stdout, r.stderr)
    assert "5190" in r.stderr and "in use by another program" in r.stderr, r.stderr
    props = endpoint_properties(s1, uid, "inbound")
    assert props["ClaimedBy"] == "", props
    units_left = s2.run(["systemctl", "list-units", "--all", "--no-legend", "--plain",
                         "scistream-*"]).stdout
    assert units_left.strip() == "", units_left
    s2.run(["systemctl", "stop", "holder"])
    assert residue(s2) == []
    s1.ctl("release", uid)


def test_relay_recreated_onto_a_taken_port_fails_by_name_and_leaves_nothing(fresh, s1, apps):
    """The one bind failure the allocator's probe cannot prevent: the port was taken while
    the relay was gone (here: the daemon stopped, the units stopped, then another process
    binds). At start-up the socket unit's bind fails at once; the endpoint is failed with
    the port named; release leaves nothing."""
    apps.start(s1, "echo-recreate", "python3", HOSTTOOL, "echo", "7312", "--host", S1_IP)
    uid, ins = inbound(s1, [7312], 1)
    port = port_of(ins[0])
    service, sock = units(s1, uid, "inbound")
    s1.run(["systemctl", "stop", "scistreamd"])
    try:
        s1.run(["systemctl", "stop", sock, service])
        apps.start(s1, "squatter", "python3", HOSTTOOL, "echo", str(port), "--host", S1_IP)
    finally:
        s1.run(["systemctl", "start", "scistreamd"])
    try:
        props = wait_until(lambda: (endpoint_properties(s1, uid, "inbound") or {}).get(
            "State") == "failed" and endpoint_properties(s1, uid, "inbound"), 30,
            "the endpoint to be marked failed")
        assert f"{S1_IP}:{port}" in props["StateDetail"], props
        assert "in use by another process" in props["StateDetail"], props
        assert s1.ctl("release", uid).returncode == 0
    finally:
        s1.run(["systemctl", "stop", "squatter"])
    wait_until(lambda: residue(s1) == [], 30, "nothing left on server1")
