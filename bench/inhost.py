"""Measurement helpers the benchmark runs *inside* a test bed host.

    python3 /run/testbed/src/bench/inhost.py timeit [--env K=V] -- CMD...
        run CMD once; JSON {"ms", "rc", "stdout", "stderr"} (wall time fork -> exit)
    ... iperf HOST PORTS -t SECONDS [-P N]
        one iperf3 client per port (comma-separated), all at once; JSON with the sum
    ... cpu PID...        JSON {"pid": cpu seconds (utime+stime, whole thread group)}
    ... rss [--comm NAME] [--cgroup TEXT] [--pid PID]
        JSON {"count", "rss_kb", "pss_kb"} of the matching processes
    ... unit-latency CONF PORT [-n N]
        systemd-run of stunnel CONF until PORT listens, then systemctl stop; N times
    ... scrape URL [-n N] [--interval S]
        GET URL N times (every S seconds); JSON {"ms": [...], "bytes", "series"}
    ... dbus-driver
        a long-lived system-bus client: one JSON request a line on stdin,
        {"member", "sig", "body", ["path"], ["iface"], ["dest"], ["discard"]};
        one JSON answer a line,
        {"ms": call time, "reply": [...]} or {"ms", "error", "message"}

Only the standard library at the top: this runs under the host's /usr/bin/python3
with the working tree mounted read-only at /run/testbed/src.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any, Dict, List

BUS = "org.scistream.Tunnel1"
MANAGER_PATH = "/org/scistream/Tunnel1"
MANAGER_IFACE = "org.scistream.Tunnel1.Manager"


def timeit(cmd: List[str], env: Dict[str, str]) -> Dict[str, Any]:
    full_env = dict(os.environ, **env)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env)
    ms = (time.perf_counter() - t0) * 1000
    return {"ms": ms, "rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}


def iperf(host: str, ports: List[int], seconds: float, parallel: int) -> Dict[str, Any]:
    """Start one client per port at the same moment; sum what the servers received."""
    procs = []
    for port in ports:
        cmd = ["iperf3", "-c", host, "-p", str(port), "-t", f"{seconds:g}", "-J"]
        if parallel > 1:
            cmd += ["-P", str(parallel)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    per: List[Dict[str, Any]] = []
    errors: List[str] = []
    for port, proc in zip(ports, procs):
        out, err = proc.communicate(timeout=seconds + 60)
        try:
            data = json.loads(out)
        except ValueError:
            errors.append(f"port {port}: iperf3 exited {proc.returncode}: {err.strip()[:300]}")
            continue
        if data.get("error"):
            errors.append(f"port {port}: {data['error']}")
            continue
        recv = data["end"]["sum_received"]
        per.append({"port": port, "bits_per_second": recv["bits_per_second"],
                    "bytes": recv["bytes"], "seconds": recv["seconds"],
                    "retransmits": data["end"].get("sum_sent", {}).get("retransmits")})
    return {"gbps": sum(p["bits_per_second"] for p in per) / 1e9,
            "bytes": sum(p["bytes"] for p in per), "per": per, "errors": errors}


def cpu(pids: List[int]) -> Dict[str, float]:
    tick = os.sysconf("SC_CLK_TCK")
    out: Dict[str, float] = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # utime, stime (fields 14 and 15): the whole thread group, exited threads included.
        out[str(pid)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def _status_kb(pid: str, key: str, name: str = "status") -> int:
    try:
        with open(f"/proc/{pid}/{name}") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss(comm: str, pid: int, cgroup: str) -> Dict[str, Any]:
    pids: List[str] = []
    if pid:
        pids = [str(pid)]
    else:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/comm") as f:
                    if f.read().strip() != comm:
                        continue
                if cgroup:
                    with open(f"/proc/{entry}/cgroup") as f:
                        if cgroup not in f.read():
                            continue
            except OSError:
                continue
            pids.append(entry)
    rss_kb = sum(_status_kb(p, "VmRSS") for p in pids)
    # Pss shares the pages of libssl/libcrypto between relays: what N relays really cost.
    pss_kb = sum(_status_kb(p, "Pss", "smaps_rollup") for p in pids)
    return {"count": len(pids), "rss_kb": rss_kb, "pss_kb": pss_kb}


def _listening(port: int) -> bool:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        return True
        except OSError:
            continue
    return False


def unit_latency(conf: str, port: int, n: int) -> Dict[str, Any]:
    """The floor any relay manager pays: systemd starts stunnel until it listens; stop."""
    starts: List[float] = []
    stops: List[float] = []
    for i in range(n):
        unit = f"bench-floor-{i}.service"
        t0 = time.perf_counter()
        subprocess.run(["systemd-run", f"--unit={unit}", "--collect", "--quiet", "-p",
                        "Type=exec", "/usr/bin/stunnel4", conf], check=True)
        while not _listening(port):
            time.sleep(0.001)
        t1 = time.perf_counter()
        subprocess.run(["systemctl", "stop", unit], check=True)
        t2 = time.perf_counter()
        starts.append((t1 - t0) * 1000)
        stops.append((t2 - t1) * 1000)
    return {"start_to_listen_ms": starts, "stop_ms": stops}


def _variants(sig: str, value: Any) -> Any:
    from dbus_next import Variant

    if sig == "a{sv}" and isinstance(value, dict):
        return {k: Variant(v[0], v[1]) for k, v in value.items()}
    return value


def _plain(v: Any) -> Any:
    from dbus_next import Variant

    if isinstance(v, Variant):
        return _plain(v.value)
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, bytes):
        return v.hex()
    return v


async def dbus_driver() -> None:
    import asyncio

    from dbus_next import BusType, Message, MessageType
    from dbus_next.aio import MessageBus
    from dbus_next.signature import SignatureTree

    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    loop = asyncio.get_running_loop()
    print(json.dumps({"ready": True}), flush=True)
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        req = json.loads(line)
        sig = req.get("sig", "")
        types = [t.signature for t in SignatureTree(sig).types] if sig else []
        body = [_variants(t, v) for t, v in zip(types, req.get("body", []))]
        msg = Message(destination=req.get("dest", BUS), path=req.get("path", MANAGER_PATH),
                      interface=req.get("iface", MANAGER_IFACE), member=req["member"],
                      signature=sig, body=body)
        t0 = time.perf_counter()
        reply = await bus.call(msg)
        ms = (time.perf_counter() - t0) * 1000
        if reply.message_type == MessageType.ERROR:
            out = {"ms": ms, "error": reply.error_name,
                   "message": reply.body[0] if reply.body else ""}
        elif req.get("discard"):
            out = {"ms": ms}
        else:
            out = {"ms": ms, "reply": _plain(reply.body)}
        print(json.dumps(out), flush=True)
    bus.disconnect()


def scrape(url: str, n: int, interval: float) -> Dict[str, Any]:
    """Time whole GETs of a metrics endpoint: connect, render, transfer."""
    import urllib.request

    times: List[float] = []
    body = b""
    for i in range(n):
        if i and interval:
            time.sleep(interval)
        t0 = time.perf_counter()
        with urllib.request.urlopen(url, timeout=30) as r:
            body = r.read()
        times.append((time.perf_counter() - t0) * 1000)
    series = sum(1 for line in body.decode().splitlines() if line and not line.startswith("#"))
    return {"ms": times, "bytes": len(body), "series": series}


def main() -> int:
    p = argparse.ArgumentParser(prog="inhost.py")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("timeit")
    t.add_argument("--env", action="append", default=[])
    t.add_argument("command", nargs=argparse.REMAINDER)
    i = sub.add_parser("iperf")
    i.add_argument("host")
    i.add_argument("ports")
    i.add_argument("-t", type=float, default=5)
    i.add_argument("-P", type=int, default=1)
    c = sub.add_parser("cpu")
    c.add_argument("pids", type=int, nargs="+")
    r = sub.add_parser("rss")
    r.add_argument("--comm", default="")
    r.add_argument("--pid", type=int, default=0)
    r.add_argument("--cgroup", default="", help="only processes whose cgroup path has this")
    u = sub.add_parser("unit-latency")
    u.add_argument("conf")
    u.add_argument("port", type=int)
    u.add_argument("-n", type=int, default=10)
    sc = sub.add_parser("scrape")
    sc.add_argument("url")
    sc.add_argument("-n", type=int, default=20)
    sc.add_argument("--interval", type=float, default=0.0)
    sub.add_parser("dbus-driver")
    a = p.parse_args()
    if a.cmd == "timeit":
        cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
        env = dict(kv.split("=", 1) for kv in a.env)
        print(json.dumps(timeit(cmd, env)))
    elif a.cmd == "iperf":
        print(json.dumps(iperf(a.host, [int(x) for x in a.ports.split(",")], a.t, a.P)))
    elif a.cmd == "cpu":
        print(json.dumps(cpu(a.pids)))
    elif a.cmd == "rss":
        print(json.dumps(rss(a.comm, a.pid, a.cgroup)))
    elif a.cmd == "unit-latency":
        print(json.dumps(unit_latency(a.conf, a.port, a.n)))
    elif a.cmd == "scrape":
        print(json.dumps(scrape(a.url, a.n, a.interval)))
    elif a.cmd == "dbus-driver":
        import asyncio

        asyncio.run(dbus_driver())
    return 0


if __name__ == "__main__":
    sys.exit(main())
