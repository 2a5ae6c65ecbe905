"""Load on the real test bed (issue 5, item 6).

- many InboundRequests at once get distinct ports (no double allocation);
- hundreds of request/release cycles in a five-port range never exhaust it,
  and PortsExhausted comes exactly when the range is really full;
- one tunnel (inbound on server1, outbound on server2) carries hundreds of
  sequential connections and long-lived ones while others come and go.
  Upstream SciStream's relay hung after about 15 connections.

Counts only: no throughput figures, no timed assertions (waits are bounded
guards that fail with a message).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from typing import Dict, List

import pytest

from scistreamd.config import Config
from scistreamd.interface import MANAGER
from scistreamd.relay import stunnel_max_clients
from tests.integration.conftest import (
    HOSTTOOL,
    Apps,
    DaemonWatch,
    DBusBatch,
    residue,
    tool,
    wait_listening,
)

S1_IP = "192.168.150.1"
S2_IP = "192.168.150.2"
DEFAULTS = Config()
LOW, HIGH = DEFAULTS.port_range
INBOUND_SIG = MANAGER.methods["InboundRequest"].in_sig
OUTBOUND_SIG = MANAGER.methods["OutboundRequest"].in_sig
ERR = "org.scistream.Tunnel1.Error."

#: Sizes.
CONCURRENT = 50
CYCLES = 300
SEQUENTIAL = 500
HOLD, CHURN = 20, 200

SMALL_DROPIN = "/etc/scistream/conf.d/50-small.toml"
SMALL_LOW, SMALL_HIGH = 5100, 5104
SMALL_SIZE = SMALL_HIGH - SMALL_LOW + 1


def inbound_req(ports=(5300,), num_conn: int = 1) -> dict:
    return DBusBatch.request("InboundRequest", INBOUND_SIG, [S1_IP, list(ports), num_conn, {}])


def release_req(uid: str) -> dict:
    return DBusBatch.request("Release", "s", [uid])


def port_of(listener: str) -> int:
    return int(listener.rsplit(":", 1)[1])


def listening_ports(host) -> set:
    out = host.run(["ss", "-Htln"]).stdout
    return {int(line.split()[3].rsplit(":", 1)[1]) for line in out.splitlines() if line.strip()}


# --------------------------------------------------------------------------
# many requests at once

def test_concurrent_inbound_requests_get_distinct_ports(hosts, bus1):
    s1, _ = hosts
    watch = DaemonWatch(s1)
    assert residue(s1) == []
    # Twice: the second round reuses every port the first one released.
    for round_ in range(2):
        # Half ask for two ports: allocation has to stay exact under contention.
        reqs = [inbound_req((5300 + i % 3,), 1 + i % 2) for i in range(CONCURRENT)]
        outs = bus1.calls(reqs)
        failed = [o for o in outs if "reply" not in o]
        assert failed == [], f"round {round_}: {len(failed)} of {CONCURRENT} failed: {failed[:3]}"
        uids = [o["reply"][0] for o in outs]
        listeners = [x for o in outs for x in o["reply"][2]]
        ports = [port_of(x) for x in listeners]
        want = sum(1 + i % 2 for i in range(CONCURRENT))
        assert len(set(uids)) == CONCURRENT, "a uid was handed out twice"
        assert len(ports) == want and len(set(ports)) == want, (
            f"round {round_}: ports given out twice: "
            f"{sorted(p for p in ports if ports.count(p) > 1)}")
        assert all(LOW <= p <= HIGH and x.startswith(S1_IP + ":")
                   for p, x in zip(ports, listeners)), listeners
        for o, req in zip(outs, reqs):
            assert len(o["reply"][2]) == req["body"][2], o
        missing = set(ports) - listening_ports(s1)
        assert missing == set(), f"round {round_}: nothing listens on {sorted(missing)}"
        listed = bus1.call("ListEndpoints")["reply"][0]
        assert sorted(e[0] for e in listed) == sorted(uids)
        assert {e[2] for e in listed} == {"active"}, listed
        units = s1.run(["systemctl", "list-units", "--no-legend", "--plain", "--state=active",
                        "scistream-inbound-*.service"]).stdout.split("\n")
        assert len([u for u in units if u.strip()]) == CONCURRENT

        released = bus1.calls([release_req(u) for u in uids])
        assert released == [{"reply": []}] * CONCURRENT, [r for r in released if "reply" not in r]
        assert residue(s1) == [], f"round {round_}: left behind after release"
    watch.check()


def test_a_burst_beyond_capacity_never_takes_the_daemon_down(hosts, bus1):
    """More requests at once than the range has ports: each gets an answer, the daemon stays.

    dbus-next 0.2.3 dropped the daemon's bus connection when a burst filled its
    socket (EAGAIN): every request in flight got NoReply and the daemon exited.
    """
    s1, _ = hosts
    watch = DaemonWatch(s1)
    burst = HIGH - LOW + 1 + 9  # under the bus's 128 pending calls per connection
    outs = bus1.calls([inbound_req() for _ in range(burst)])
    names = {}
    for o in outs:
        key = "ok" if "reply" in o else o["error"]
        names[key] = names.get(key, 0) + 1
    # Only the range's size can succeed; a loaded machine may also time some starts out.
    assert set(names) <= {"ok", ERR + "PortsExhausted", ERR + "RelayFailed"}, names
    assert names.get(ERR + "PortsExhausted", 0) >= burst - (HIGH - LOW + 1), names
    watch.check(journal=False)
    uids = [o["reply"][0] for o in outs if "reply" in o]
    ports = [port_of(o["reply"][2][0]) for o in outs if "reply" in o]
    assert len(set(ports)) == len(ports), "a port was given out twice"
    released = bus1.calls([release_req(u) for u in uids])
    assert released == [{"reply": []}] * len(uids)
    assert residue(s1) == [], "the burst left something behind"
    assert bus1.call("ListEndpoints") == {"reply": [[]]}
    watch.check()


# --------------------------------------------------------------------------
# a small port range

class TestSmallPortRange:
    """Port range 5100-5104 on server1 (a drop-in), restored afterwards."""

    @pytest.fixture(scope="class")
    def small(self, hosts, bus1):
        s1, _ = hosts
        s1.ctl("release", "--all")

        def port_range() -> List[int]:
            out = bus1.call("Get", "ss", ["org.scistream.Tunnel1.Manager", "PortRange"],
                            iface="org.freedesktop.DBus.Properties")
            return out["reply"][0][1]

        try:
            s1.run(["sh", "-c", f"printf 'port_range = \"{SMALL_LOW}-{SMALL_HIGH}\"\\n' > "
                                f"{SMALL_DROPIN}"])
            s1.run(["systemctl", "restart", "scistreamd.service"])
            assert port_range() == [SMALL_LOW, SMALL_HIGH], "the drop-in did not take effect"
            yield s1
        finally:
            s1.ctl("release", "--all")
            s1.run(["rm", "-f", SMALL_DROPIN])
            s1.run(["systemctl", "restart", "scistreamd.service"])
            assert port_range() == [LOW, HIGH], "the default port range did not come back"

    def test_hundreds_of_cycles_never_exhaust_it(self, small, bus1):
        s1 = small
        watch = DaemonWatch(s1)
        cycles = 0
        used: Dict[int, int] = {}
        round_ = 0
        while cycles < CYCLES:
            # 1..5 at once: the range always suffices if nothing leaks.
            k = min(1 + round_ % SMALL_SIZE, CYCLES - cycles)
            outs = bus1.calls([inbound_req() for _ in range(k)])
            failed = [o for o in outs if "reply" not in o]
            assert failed == [], (
                f"after {cycles} request/release cycles, {len(failed)} of {k} requests "
                f"failed: {failed[:2]}: something leaked")
            ports = [port_of(o["reply"][2][0]) for o in outs]
            assert len(set(ports)) == k and all(SMALL_LOW <= p <= SMALL_HIGH for p in ports)
            for p in ports:
                used[p] = used.get(p, 0) + 1
            released = bus1.calls([release_req(o["reply"][0]) for o in outs])
            assert released == [{"reply": []}] * k, released
            cycles += k
            round_ += 1
            if round_ % 25 == 0:
                assert residue(s1) == [], f"left behind after {cycles} cycles"
        assert residue(s1) == []
        assert bus1.call("ListEndpoints") == {"reply": [[]]}
        assert sorted(used) == list(range(SMALL_LOW, SMALL_HIGH + 1)), used
        assert sum(used.values()) == CYCLES
        watch.check()

    def test_ports_exhausted_when_really_full_and_nothing_created(self, small, bus1):
        s1 = small
        watch = DaemonWatch(s1)
        outs = bus1.calls([inbound_req() for _ in range(SMALL_SIZE)])
        assert all("reply" in o for o in outs), outs
        uids = [o["reply"][0] for o in outs]
        assert sorted(port_of(o["reply"][2][0]) for o in outs) == list(
            range(SMALL_LOW, SMALL_HIGH + 1))
        full = residue(s1)

        sixth = bus1.call("InboundRequest", INBOUND_SIG, [S1_IP, [5300], 1, {}])
        assert sixth.get("error") == ERR + "PortsExhausted", sixth
        assert f"{SMALL_LOW}-{SMALL_HIGH}" in sixth["message"], sixth
        cli = s1.ctl("inbound-request", "--remote_ip", S1_IP, "--receiver_ports", "5300")
        assert cli.returncode == 5, (cli.returncode, cli.stdout, cli.stderr)
        assert "Traceback" not in cli.stderr and cli.stderr.strip(), cli.stderr
        assert "port" in cli.stderr.lower(), cli.stderr
        assert residue(s1) == full, "a refused request left something behind"
        assert sorted(e[0] for e in bus1.call("ListEndpoints")["reply"][0]) == sorted(uids)

        # One port free: a request for two gets none (all or nothing), one for one gets it.
        assert bus1.call("Release", "s", [uids[2]]) == {"reply": []}
        freed = port_of(outs[2]["reply"][2][0])
        two = bus1.call("InboundRequest", INBOUND_SIG, [S1_IP, [5300], 2, {}])
        assert two.get("error") == ERR + "PortsExhausted", two
        one = bus1.call("InboundRequest", INBOUND_SIG, [S1_IP, [5300], 1, {}])
        assert "reply" in one and port_of(one["reply"][2][0]) == freed, one
        uids[2] = one["reply"][0]
        released = bus1.calls([release_req(u) for u in uids])
        assert released == [{"reply": []}] * SMALL_SIZE, released
        assert residue(s1) == []
        watch.check()


# --------------------------------------------------------------------------
# one tunnel, many connections

@contextlib.contextmanager
def tunnel_between(hosts, bus1, bus2, num_conn: int = 1):
    """server2 --outbound relay--> server1 --inbound relay--> line echo app on server1:5300."""
    s1, s2 = hosts
    apps = Apps()
    tag = f"T{secrets.token_hex(3)}:"
    count_file = f"/tmp/echoloop-{secrets.token_hex(4)}.count"
    made: List[DBusBatch] = []
    uid = ""
    try:
        apps.start(s1, f"echoloop-{secrets.token_hex(4)}", "python3", HOSTTOOL, "echoloop",
                   "5300", "--tag", tag, "--count-file", count_file, "--host", S1_IP)
        wait_listening(s1, 5300, S1_IP)
        out = bus1.call("InboundRequest", INBOUND_SIG, [S1_IP, [5300], num_conn, {}])
        assert "reply" in out, out
        uid, path1, listeners = out["reply"]
        made.append(bus1)
        out = bus2.call("OutboundRequest", OUTBOUND_SIG, [uid, listeners, [], num_conn, {}])
        assert "reply" in out, out
        made.append(bus2)
        path2, entries = out["reply"]
        # Relay units are named by an opaque id: each endpoint's Unit property
        # (dbusbatch answers a Variant as [signature, value]).
        units = {h.name: bus.call("Get", "ss", ["org.scistream.Tunnel1.Endpoint", "Unit"],
                                  path=path, iface="org.freedesktop.DBus.Properties")
                 ["reply"][0][1] for h, bus, path in ((s1, bus1, path1), (s2, bus2, path2))}
        yield {"s1": s1, "s2": s2, "uid": uid, "entries": entries, "tag": tag,
               "count_file": count_file, "units": units}
    finally:
        for bus in made:
            bus.call("Release", "s", [uid])
        apps.stop_all()
        s1.run(["rm", "-f", count_file], check=False)


def relay_state(t) -> Dict[str, str]:
    """ActiveState, NRestarts and MainPID of both relays: equal before and after = no restart."""
    state = {}
    for host in (t["s1"], t["s2"]):
        out = host.run(["systemctl", "show", t["units"][host.name], "-p",
                        "ActiveState,NRestarts,MainPID"]).stdout
        state[host.name] = " ".join(sorted(out.split()))
    return state


def accepted(t) -> int:
    """Connections the echo application has accepted so far."""
    out = t["s1"].run(["cat", t["count_file"]], check=False).stdout.strip()
    return int(out) if out else 0


def echo_load(t, *args: str) -> dict:
    host = t["entries"][0].rsplit(":", 1)[0]
    ports = ",".join(x.rsplit(":", 1)[1] for x in t["entries"])
    out = tool(t["s2"], "echoload", host, ports, "--tag", t["tag"], *args, timeout=900)
    return json.loads(out.stdout)


def assert_full_relays_held(t, res: dict, before: Dict[str, str]) -> None:
    """What a tunnel whose relays are full must still do (echo_load --hold/--churn result
    ``res``): every connection that got through at first answers in every later round,
    refused ones are closed rather than left hanging, no relay restarted, and the tunnel
    serves again afterwards."""
    first = res["hold_rounds"][0]
    assert all(r == first for r in res["hold_rounds"]), (
        f"established connections stopped answering: {[len(r) for r in res['hold_rounds']]}")
    assert not any("timed out" in f for f in res["failures"]), (
        f"refused connections hung instead of being closed: {res['failures']}")
    assert relay_state(t) == before, "a relay restarted when it was full"
    after = echo_load(t, "--sequential", "5")
    assert after["sequential_ok"] == 5, f"the tunnel did not recover: {after}"


class TestOneTunnel:
    @pytest.fixture(scope="class")
    def tunnel(self, hosts, bus1, bus2):
        with tunnel_between(hosts, bus1, bus2) as t:
            yield t

    def test_hundreds_of_sequential_connections(self, tunnel):
        t = tunnel
        before = relay_state(t)
        assert all("ActiveState=active" in v and "NRestarts=0" in v for v in before.values())
        start = accepted(t)
        res = echo_load(t, "--sequential", str(SEQUENTIAL))
        assert (res["sequential_ok"], res["sequential_bad"]) == (SEQUENTIAL, 0), res
        # Each round trip was its own connection all the way to the application.
        assert accepted(t) - start == SEQUENTIAL
        assert relay_state(t) == before, "a relay restarted under the load"

    def test_long_lived_connections_survive_churn(self, tunnel):
        t = tunnel
        before = relay_state(t)
        start = accepted(t)
        res = echo_load(t, "--hold", str(HOLD), "--churn", str(CHURN))
        rounds = 2 + CHURN // max(1, CHURN // 4)  # start, each quarter, end
        assert (res["churn_ok"], res["churn_bad"]) == (CHURN, 0), res
        assert (res["hold_ok"], res["hold_bad"]) == (HOLD * rounds, 0), res
        assert res["hold_rounds"] == [list(range(HOLD))] * rounds
        assert accepted(t) - start == HOLD + CHURN
        assert relay_state(t) == before, "a relay restarted under the load"
        # And the tunnel still serves new connections afterwards.
        after = echo_load(t, "--sequential", "5")
        assert after["sequential_ok"] == 5, after

    @pytest.mark.xfail(
        strict=False,
        reason="known product issue, open: at a relay's TasksMax cap stunnel sometimes leaves a "
               "refused connection hanging (and once echoed raw TLS bytes to the client) instead "
               "of closing it; seen in 1 of ~6 clean runs on 2026-11-25")
    def test_more_connections_than_a_relay_allows_fail_cleanly(self, tunnel):
        """Past a relay's capacity new connections are refused; the established ones go on.

        An operator caps a relay's tasks (relay_tasks_max; stunnel runs a thread per
        connection). The cap is lowered on both running relays, as
        `systemctl set-property --runtime` would, so the test needs few connections.
        """
        t = tunnel
        cap = 32
        over = cap + 6
        for host in (t["s1"], t["s2"]):
            host.run(["systemctl", "set-property", "--runtime", t["units"][host.name],
                      f"TasksMax={cap}"])
        before = relay_state(t)
        try:
            res = echo_load(t, "--hold", str(over), "--churn", "8", "--timeout", "60")
        finally:
            for host in (t["s1"], t["s2"]):
                host.run(["systemctl", "set-property", "--runtime", t["units"][host.name],
                          f"TasksMax={DEFAULTS.relay_tasks_max}"])
        first = res["hold_rounds"][0]
        assert len(first) >= HOLD, res
        assert_full_relays_held(t, res, before)


CAP_DROPIN = "/etc/scistream/conf.d/50-cap.toml"


class TestConnectionCap:
    """relay_max_connections (a drop-in on both hosts): the cap a relay reaches before
    TasksMax and MemoryMax, where stunnel closes new connections at once."""

    #: Above the smallest cap stunnel's descriptor arithmetic closes cleanly with one
    #: listener (scistreamd.relay.relay_nofile; a cap of 32 left connections waiting in
    #: the backlog instead: accept() ran out of descriptors first).
    CAP = 400

    @pytest.fixture(scope="class")
    def capped(self, hosts, bus1, bus2):
        for h in hosts:
            h.run(["sh", "-c", f"printf 'relay_max_connections = {self.CAP}\\n' > {CAP_DROPIN}"])
            h.run(["systemctl", "restart", "scistreamd.service"])
        try:
            with tunnel_between(hosts, bus1, bus2) as t:
                yield t
        finally:
            for h in hosts:
                h.run(["rm", "-f", CAP_DROPIN])
                h.run(["systemctl", "restart", "scistreamd.service"])

    # Not run in `make test` while it is known to fail: each failing run waits out its
    # hanging connections (483 s of an 18-minute suite on 2026-12-03). Run it by hand with
    # --runxfail when working on the cap.
    @pytest.mark.xfail(
        run=False,
        reason="open: through a tunnel whose two relays are both at relay_max_connections "
               "(400), established connections go on and no relay restarts, but connections "
               "past the cap were seen to time out instead of being closed (8 of 8 churn "
               "connections, 2026-12-03); a direct flood of an inbound listener is closed "
               "cleanly (test_security_relay.py)")
    def test_more_connections_than_the_cap_fail_cleanly(self, capped):
        """Past relay_max_connections new connections are closed at once; the established
        ones go on; no relay restarts (the TasksMax variant above is the xfail)."""
        t = capped
        for host in (t["s1"], t["s2"]):
            nofile = host.run(["systemctl", "show", t["units"][host.name], "-p",
                               "LimitNOFILE", "--value"]).stdout.strip()
            assert stunnel_max_clients(int(nofile)) == self.CAP, nofile
        before = relay_state(t)
        res = echo_load(t, "--hold", str(self.CAP + 6), "--churn", "8", "--timeout", "60")
        first = res["hold_rounds"][0]
        # stunnel counts a connection when its thread starts: a burst may pass by a few.
        assert HOLD <= len(first) <= self.CAP + 8, res
        assert_full_relays_held(t, res, before)
        log = t["s2"].run(["journalctl", "-u", t["units"]["server2"], "-o", "cat"]).stdout
        assert "Connection rejected: too many clients" in log


def test_num_conn_parallel_connections_all_get_through(hosts, bus1, bus2):
    """A tunnel with num_conn N carries N parallel connections, one per listener.

    num_conn is accepted up to the size of port_range, and stunnel needs a thread
    per connection: the default relay_tasks_max must not be what limits a tunnel
    (upstream's relays hung after ~15 connections; ours once stopped at 62).
    """
    n = 70
    with tunnel_between(hosts, bus1, bus2, num_conn=n) as t:
        assert len(t["entries"]) == n
        res = echo_load(t, "--hold", str(n), "--timeout", "60")
        served = len(res["hold_rounds"][0])
        assert (res["hold_ok"], res["hold_bad"]) == (2 * n, 0), (
            f"only {served} of {n} parallel connections (one per listener of a num_conn={n} "
            f"tunnel) got through (relays run with TasksMax={DEFAULTS.relay_tasks_max}; "
            f"stunnel needs a thread per connection). First failures: {res['failures'][:3]}")


def test_daemons_list_nothing_afterwards(hosts, bus1, bus2):
    """Load tests leave nothing: no endpoint, unit, key, state or listener."""
    # Teardown of the class fixtures has released everything by now.
    for host, bus in zip(hosts, (bus1, bus2)):
        for _ in range(50):
            if residue(host) == []:
                break
            time.sleep(0.1)
        assert residue(host) == [], host.name
        assert bus.call("ListEndpoints") == {"reply": [[]]}
