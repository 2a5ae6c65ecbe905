"""Counters and target health on the real test bed (issue 13, items 1, 2 and 4).

server1 holds the inbound endpoint in front of the server application,
server2 the outbound one the client connects to. Bytes come from systemd's
IP accounting of the relay units, connections and target failures from the
relays' own journal lines (scistreamd/traffic.py); the tests read them the
way people do: `scistreamctl status` (and --json) on each host. Every wait is
"until the condition holds", with a guard that only turns a hang into a failure.
"""

from __future__ import annotations

import json
import subprocess
from typing import Dict, List, Tuple

from tests.integration.conftest import (
    HOSTTOOL,
    parse_request_output,
    tool,
    wait_until,
)

#: What IP accounting adds to N payload bytes on each relay, each direction: IP and
#: TCP headers, TLS records (~22 bytes per 16 KiB record), the ACKs of the other
#: direction, and the handshake. Measured on the test bed for 8 MiB: 0.4-1.0 %
#: (README, "Counters"); the bound leaves room for other segmentation.
TLS_OVERHEAD = 0.03
TLS_SLACK = 64 * 1024
MSG_TARGET_FAILED = "5a1f0c7e6b6d4f3e9a4b2d1c0e9f8a76"


def tunnel(s1, s2, ports: List[int]) -> Tuple[str, List[str], subprocess.CompletedProcess]:
    """Inbound on server1 towards its own ports, outbound on server2: (uid, the outbound
    listeners, the inbound request's result)."""
    r = s1.ctl("inbound-request", "--remote_ip", s1.ip, "--receiver_ports",
               ",".join(map(str, ports)), "--num_conn", str(len(ports)))
    assert r.returncode == 0, r.stderr
    uid, _s2cs, role, listeners = parse_request_output(r.stdout)
    assert role == "PROD"
    o = s2.ctl("outbound-request", "--server_cert", "/etc/scistream/peer-ca.crt", uid,
               *listeners)
    assert o.returncode == 0, o.stderr
    _uid, _s2cs, _role, local = parse_request_output(o.stdout)
    return uid, local, r


def status_json(host, uid: str) -> Dict[str, dict]:
    r = host.ctl("--json", "status", uid)
    assert r.returncode == 0, r.stderr
    return {e["role"]: e for e in json.loads(r.stdout)}


def status_text(host, uid: str) -> Dict[str, str]:
    """The one endpoint of ``uid`` on ``host`` as `status` prints it: key -> value."""
    r = host.ctl("status", uid)
    assert r.returncode == 0, r.stderr
    return {k.rstrip(":"): v.strip() for k, v in
            (line.split(None, 1) for line in r.stdout.splitlines() if " " in line)}


def hostport(listener: str) -> Tuple[str, str]:
    ip, _, port = listener.rpartition(":")
    return ip, port


def test_bytes_through_a_tunnel_agree_on_both_hosts(clean, s1, s2, apps):
    n = 8 * 1024 * 1024
    out = "/tmp/counters-sink.out"
    s1.run(["rm", "-f", out])
    apps.start(s1, "counters-sink", "python3", HOSTTOOL, "sink", "5311", out)
    uid, (listener,), _ = tunnel(s1, s2, [5311])
    for host, role in ((s1, "inbound"), (s2, "outbound")):
        # The relay's memory is read once it runs (the next poll, within a second).
        e = wait_until(lambda h=host, r=role: (lambda x: x if x["memory_current"] > 0 else None)(
            status_json(h, uid)[r]), 30, f"the {role} relay's memory")
        # Nothing went through yet: at most a handshake's worth of bytes.
        assert e["bytes_in"] < TLS_SLACK and e["bytes_out"] < TLS_SLACK, e
        assert e["connections_total"] == 0 and e["main_pid"] > 0, e

    sent = tool(s2, "send", *hostport(listener), str(n)).stdout.split()
    got = wait_until(lambda: s1.run(["cat", out], check=False).stdout.split(), 60,
                     "the sink's digest")
    assert got == sent and got[1] == str(n)

    def settled(host, role):
        e = status_json(host, uid)[role]
        # The poller reads the units until the connection ended and after.
        ok = (e["connections_active"] == 0 and e["connections_total"] == 1
              and e["bytes_in"] >= n and e["bytes_out"] >= n)
        return e if ok else None

    inbound = wait_until(lambda: settled(s1, "inbound"), 30, "the inbound counters")
    outbound = wait_until(lambda: settled(s2, "outbound"), 30, "the outbound counters")
    for e in (inbound, outbound):
        for key in ("bytes_in", "bytes_out"):
            assert n <= e[key] <= n * (1 + TLS_OVERHEAD) + TLS_SLACK, (key, e[key], n)
    # The two hosts count the same TLS stream, each from its side.
    assert abs(inbound["bytes_in"] - outbound["bytes_out"]) <= n * TLS_OVERHEAD + TLS_SLACK
    # JSON: snake_case, ISO 8601 UTC timestamps, no D-Bus internals.
    assert inbound["created_at"].endswith("Z") and "T" in inbound["created_at"]
    assert inbound["target_reachable"] == "yes"
    assert not any(k[0].isupper() or k == "path" for k in inbound)
    # and people see it in human units
    text = status_text(s1, uid)
    assert text["BytesIn"].endswith(f"({inbound['bytes_in']} B)") and "MiB" in text["BytesIn"]
    listing = s1.ctl("list").stdout.splitlines()
    assert listing[0].split()[:8] == ["UID", "ROLE", "STATE", "AGE", "IN/OUT", "CONNS", "PEER",
                                      "LISTENERS"]
    row = next(line.split() for line in listing if line.startswith(uid))
    assert row[4].startswith("8.") and row[5] == "0" and row[6] == s2.ip


def test_open_connections_are_counted_and_closed(clean, s1, s2, apps):
    n = 5
    apps.start(s1, "counters-echo", "python3", HOSTTOOL, "echo", "5312", "--tag", "c:")
    uid, (listener,), _ = tunnel(s1, s2, [5312])
    flood = subprocess.Popen(s2.nsenter() + ["python3", HOSTTOOL, "flood", *hostport(listener),
                                             str(n), "--guard", "60"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert json.loads(flood.stdout.readline())["connected"] == n

        def active(host, role, want):
            e = status_json(host, uid)[role]
            return e if e["connections_active"] == want else None

        wait_until(lambda: active(s2, "outbound", n), 30, f"{n} active outbound connections")
        wait_until(lambda: active(s1, "inbound", n), 30, f"{n} active inbound connections")
        assert status_text(s1, uid)["ConnectionsActive"] == str(n)
        assert status_text(s2, uid)["ConnectionsActive"] == str(n)
        flood.stdin.write("\n")
        flood.stdin.flush()
        flood.stdout.readline()
    finally:
        if flood.poll() is None:
            flood.stdin.close()
            flood.wait(30)
    for host, role in ((s2, "outbound"), (s1, "inbound")):
        e = wait_until(lambda h=host, r=role: active(h, r, 0), 30, f"0 active on {role}")
        assert e["connections_total"] == n, e


def test_target_down_is_named_on_both_sides_and_clears(clean, s1, s2, apps):
    port = 5313
    target = f"{s1.ip}:{port}"
    uid, (listener,), inbound = tunnel(s1, s2, [port])
    # The request succeeds (applications often start after their tunnel) but warns,
    # on stderr: stdout keeps the guide's three lines.
    assert inbound.stderr.startswith("scistreamctl: warning: ") and target in inbound.stderr
    assert len(inbound.stdout.splitlines()) == 3
    assert status_json(s1, uid)["inbound"]["target_reachable"] == "no"

    # A client connection through the tunnel: the server application refuses.
    assert tool(s2, "request", *hostport(listener), "hello", "--timeout", "15",
                check=False).stdout.strip() in ("EOF", "RESET")
    refused = f"the server application at {target} refused the connection"

    def failed(host, role):
        e = status_json(host, uid)[role]
        return e if e["target_failures"] >= 1 and refused in e["last_target_failure"] else None

    e1 = wait_until(lambda: failed(s1, "inbound"), 30, "the inbound side to name the refusal")
    assert e1["target_reachable"] == "no" and e1["last_target_failure_at"].endswith("Z")
    assert refused in status_text(s1, uid)["LastTargetFailure"]
    # The outbound side learns it through the peer check (peer_check_interval).
    e2 = wait_until(lambda: failed(s2, "outbound"), 60, "the outbound side to name it")
    assert e2["target_reachable"] == "no"
    assert refused in status_text(s2, uid)["LastTargetFailure"]
    journal = s1.run(["journalctl", f"MESSAGE_ID={MSG_TARGET_FAILED}", f"SCISTREAM_UID={uid}",
                      "-o", "cat", "--no-pager"]).stdout
    assert refused in journal

    # The application starts: the tunnel works, and the health clears on both sides.
    apps.start(s1, "counters-late-echo", "python3", HOSTTOOL, "echo", str(port), "--tag", "late:")
    assert tool(s2, "request", *hostport(listener), "hello", "--timeout", "15",
                check=False).stdout.strip() == "late:hello"

    def cleared(host, role):
        e = status_json(host, uid)[role]
        return e if e["target_reachable"] == "yes" else None

    e1 = wait_until(lambda: cleared(s1, "inbound"), 30, "the inbound health to clear")
    assert e1["target_failures"] >= 1  # the history stays
    wait_until(lambda: cleared(s2, "outbound"), 60, "the outbound health to clear")


def test_counts_survive_a_daemon_restart(clean, s1, s2, apps):
    """The restarted daemon replays its relays' lines: open connections stay counted."""
    n = 3
    apps.start(s1, "counters-restart-echo", "python3", HOSTTOOL, "echo", "5314", "--tag", "r:")
    uid, (listener,), _ = tunnel(s1, s2, [5314])
    flood = subprocess.Popen(s2.nsenter() + ["python3", HOSTTOOL, "flood", *hostport(listener),
                                             str(n), "--guard", "60"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert json.loads(flood.stdout.readline())["connected"] == n
        wait_until(lambda: status_json(s1, uid)["inbound"]["connections_active"] == n, 30,
                   f"{n} active inbound connections")
        s1.run(["systemctl", "restart", "scistreamd"])
        e = wait_until(lambda: (lambda x: x if x["connections_active"] == n else None)(
            status_json(s1, uid)["inbound"]), 30, "the restarted daemon to count them")
        assert e["connections_total"] == n and e["bytes_in"] > 0
        # The tunnel still carries data (relays outlive the daemon).
        assert tool(s2, "request", *hostport(listener), "hi", "--timeout", "15",
                    check=False).stdout.strip() == "r:hi"
        flood.stdin.write("\n")
        flood.stdin.flush()
        flood.stdout.readline()
    finally:
        if flood.poll() is None:
            flood.stdin.close()
            flood.wait(30)
    e = wait_until(lambda: (lambda x: x if x["connections_active"] == 0 else None)(
        status_json(s1, uid)["inbound"]), 30, "0 active after the restart")
    assert e["connections_total"] == n + 1
