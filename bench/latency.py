"""Small-message latency: 64-byte request/response round trips over one connection.

Per path (the data plane's: direct, the hand-made stunnel pair, upstream's
configuration, scistreamd) a client on server2 holds one connection to an
echo server on server1, sends 64 bytes and waits for the 64 bytes back:
``warmup`` times untimed, then ``rounds`` times timed, each round trip on its
own. One client process serves all paths, taking turns in blocks of 50 round
trips (the first path rotating per repetition), so a change of load on a
shared machine falls on every path alike; p50 and p99 of one run are one
sample per path. Both applications set TCP_NODELAY, as request/response
programs do.

Besides the product's default, scistreamd is measured with other relay
scheduling settings (tunnels made after a conf.d drop-in and a daemon
restart), so the default can be chosen with latency and throughput in view:
``scistreamd`` is whatever the configuration says (``relay_cpu_scheduling``
"batch", ``relay_nice`` -5 by default), ``scistreamd_other`` the "other"
policy at the same nice, ``scistreamd_other_nice0`` "other" at nice 0,
``scistreamd_batch_nice0`` "batch" at nice 0; ``stunnel_pair_batch`` is the
hand-made pair run with scistreamd's default scheduling (what scheduling alone
does). What scistreamd's relays really run with is read back from the process
(``ps -o cls,ni``).

Two halves in one file: the in-host part below (standard library only: it
runs in a test bed host as ``python3 /run/testbed/src/bench/latency.py
serve|client ...``) and the orchestration (``run``), called by bench.run.
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import statistics
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

SIZE = 64
APP_PORT = 5300  # the echo server on server1 (the data plane's first iperf3 port)
SCRIPT = "/run/testbed/src/bench/latency.py"


# ------------------------------------------------------------ in-host part

def _recv_exactly(conn: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed the connection")
        buf += chunk
    return bytes(buf)


def serve(host: str, port: int) -> None:
    """Echo SIZE-byte messages back, one thread per connection, until killed."""
    srv = socket.create_server((host, port))

    def echo(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            try:
                while True:
                    conn.sendall(_recv_exactly(conn, SIZE))
            except (ConnectionError, OSError):
                return

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=echo, args=(conn,), daemon=True).start()


def _percentile(sorted_us: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted values (a value that was measured)."""
    k = max(0, min(len(sorted_us) - 1, math.ceil(q / 100 * len(sorted_us)) - 1))
    return sorted_us[k]


def _stats(times: List[float], rounds: int, warmup: int) -> Dict[str, Any]:
    times.sort()
    return {"rounds": rounds, "warmup": warmup, "p50_us": _percentile(times, 50),
            "p90_us": _percentile(times, 90), "p99_us": _percentile(times, 99),
            "p999_us": _percentile(times, 99.9), "min_us": times[0], "max_us": times[-1],
            "mean_us": statistics.fmean(times)}


def client(targets: Sequence[Tuple[str, int]], rounds: int, warmup: int,
           block: int) -> List[Dict[str, Any]]:
    """Round trips on one connection per target; microsecond percentiles of the timed ones.

    The targets take turns in blocks of ``block`` round trips, so a change of
    load on a shared machine falls on every path alike (paths measured one
    after the other differed by 2x between neighbouring runs on a busy host).
    """
    msg = bytes(range(SIZE))
    conns = []
    try:
        for host, port in targets:
            conn = socket.create_connection((host, port), timeout=30)
            conns.append(conn)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(warmup):
                conn.sendall(msg)
                _recv_exactly(conn, SIZE)
        times: List[List[float]] = [[] for _ in conns]
        clock = time.perf_counter_ns
        done = 0
        while done < rounds:
            n = min(block, rounds - done)
            for conn, out in zip(conns, times):
                for _ in range(n):
                    t0 = clock()
                    conn.sendall(msg)
                    back = _recv_exactly(conn, SIZE)
                    out.append((clock() - t0) / 1000)
                    if back != msg:
                        raise ValueError("the echo differs from what was sent")
            done += n
    finally:
        for conn in conns:
            conn.close()
    return [_stats(t, rounds, warmup) for t in times]


def _main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="latency.py")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("host")
    s.add_argument("port", type=int)
    c = sub.add_parser("client")
    c.add_argument("targets", nargs="+", help="HOST:PORT (IPv4) of each path")
    c.add_argument("--rounds", type=int, default=5000)
    c.add_argument("--warmup", type=int, default=500)
    c.add_argument("--block", type=int, default=50)
    a = p.parse_args(argv)
    if a.cmd == "serve":
        serve(a.host, a.port)
    else:
        targets = [(t.rsplit(":", 1)[0], int(t.rsplit(":", 1)[1])) for t in a.targets]
        print(json.dumps(client(targets, a.rounds, a.warmup, a.block)))
    return 0


# ------------------------------------------------------------ orchestration

#: scistreamd variants beyond the configured default: name -> conf.d drop-in text.
SCHED_VARIANTS: Dict[str, str] = {
    "scistreamd_other": 'relay_cpu_scheduling = "other"\n',
    "scistreamd_other_nice0": 'relay_cpu_scheduling = "other"\nrelay_nice = 0\n',
    "scistreamd_batch_nice0": 'relay_cpu_scheduling = "batch"\nrelay_nice = 0\n',
}
#: The hand-made pair run with scistreamd's default scheduling: what scheduling alone does.
PAIR_BATCH_PROPS = ["CPUSchedulingPolicy=batch", "Nice=-5"]
VARIANT_DROPIN = "/etc/scistream/conf.d/85-bench-latency.toml"
PATHS = ("direct", "stunnel_pair", "stunnel_pair_batch", "upstream_config", "scistreamd",
         *SCHED_VARIANTS)


def _relay_sched(bed: Any, host_name: str, endpoint: str) -> str:
    """'<policy> nice <n>' of the relay behind an endpoint object (ps cls/ni)."""
    host = bed[host_name]
    unit = host.run(["busctl", "get-property", "org.scistream.Tunnel1", endpoint,
                     "org.scistream.Tunnel1.Endpoint", "Unit"], check=False).stdout.split()
    if len(unit) != 2:
        return "?"
    pid = host.run(["systemctl", "show", "-p", "MainPID", "--value", unit[1].strip('"')],
                   check=False).stdout.strip()
    out = host.run(["ps", "-o", "cls=,ni=", "-p", pid], check=False).stdout.split()
    return f"{out[0]} nice {out[1]}" if len(out) == 2 else "?"


def _tunnel(bed: Any, name: str) -> Dict[str, Any]:
    """A one-connection scistreamctl tunnel to the echo server; its port and relays' scheduling."""
    from . import dataplane as D

    s1, s2 = bed["server1"], bed["server2"]
    inbound = D._ctl(s1, "inbound-request", "--remote_ip", D.S1_IP, "--s2cs", f"{D.S1_IP}:5000",
                     "--receiver_ports", str(APP_PORT), "--num_conn", "1",
                     "--server_cert=/etc/scistream/server.crt")
    uid = inbound["uid"]
    outbound = D._ctl(s2, "outbound-request", "--remote_ip", D.S1_IP, "--s2cs",
                      f"{D.S2_IP}:5000", "--num_conn", "1",
                      "--server_cert=/etc/scistream/peer-ca.crt", uid, *inbound["listeners"])
    port = int(outbound["listeners"][0].rsplit(":", 1)[1])
    sched = {"server1": _relay_sched(bed, "server1", inbound["endpoint"]),
             "server2": _relay_sched(bed, "server2", outbound["endpoint"])}
    return {"name": name, "uid": uid, "port": port, "sched": sched}


def _restart_daemons(bed: Any, dropin: Optional[str]) -> None:
    from . import hosts as H

    for h in bed.hosts.values():
        if dropin is None:
            h.run(["rm", "-f", VARIANT_DROPIN], check=False)
        else:
            h.write_file(VARIANT_DROPIN, "# written by bench/latency.py; removed when it "
                         "ends\n" + dropin)
        h.run(["systemctl", "restart", "scistreamd"], timeout=120)
        H.ensure_up(h)


def measure(bed: Any, targets: Sequence[Tuple[str, int]], rounds: int,
            warmup: int) -> List[Dict[str, Any]]:
    """One client run on server2 over every path at once (interleaved); one result each."""
    from . import hosts as H

    proc = bed["server2"].run([*H.SYSTEMD_RUN, H.PYTHON, SCRIPT, "client",
                               *(f"{h}:{p}" for h, p in targets),
                               "--rounds", str(rounds), "--warmup", str(warmup)],
                              check=False, timeout=900)
    if proc.returncode != 0:
        err = {"error": f"client exited {proc.returncode}: {proc.stderr.strip()[-300:]}"}
        return [err for _ in targets]
    return json.loads(proc.stdout)


def run(bed: Any, reps: int, rounds: int = 5000, warmup: int = 500,
        paths: Sequence[str] = PATHS, log: Callable[[str], None] = print) -> Dict[str, Any]:
    from . import dataplane as D
    from . import hosts as H

    s1 = bed["server1"]
    H.run_unit(s1, "bench-latency-echo.service",
               [H.PYTHON, SCRIPT, "serve", D.S1_IP, str(APP_PORT)])
    H.wait_listening(s1, [APP_PORT])
    built: Dict[str, Dict[str, Any]] = {}
    pairs: List[D.RelayPath] = []
    tunnels: List[str] = []
    try:
        for name in paths:
            try:
                if name == "direct":
                    built[name] = {"target": D.S1_IP, "port": APP_PORT}
                elif name in ("stunnel_pair", "stunnel_pair_batch", "upstream_config"):
                    if name == "upstream_config":
                        rp = D.setup_upstream_config(bed, base=6210)
                    elif name == "stunnel_pair":
                        rp = D.setup_stunnel_pair(bed, base=6110)
                    else:
                        rp = D.setup_stunnel_pair(bed, base=6130, name=name,
                                                  unit_props=PAIR_BATCH_PROPS)
                    pairs.append(rp)
                    if rp.broken:
                        built[name] = {"broken": rp.broken}
                    else:
                        built[name] = {"target": rp.target, "port": rp.p1_ports[0]}
                elif name == "scistreamd" or name in SCHED_VARIANTS:
                    if name != "scistreamd":
                        _restart_daemons(bed, SCHED_VARIANTS[name])
                    t = _tunnel(bed, name)
                    tunnels.append(t["uid"])
                    built[name] = {"target": D.S2_IP, "port": t["port"], "sched": t["sched"],
                                   "uid": t["uid"]}
                else:
                    raise H.BenchError(f"unknown path {name!r}: choose from {', '.join(PATHS)}")
            except Exception as e:  # report it as not measured, measure the others
                built[name] = {"broken": f"set-up failed: {e}"}
        if any(n in SCHED_VARIANTS for n in paths):
            _restart_daemons(bed, None)  # the tunnels keep their relays' settings
        samples: Dict[str, List[Dict[str, Any]]] = {n: [] for n in built}
        order = [n for n in built if "broken" not in built[n]]
        for rep in range(reps):
            # Rotate which path goes first within each block, too.
            rot = order[rep % len(order):] + order[:rep % len(order)] if order else []
            got = measure(bed, [(built[n]["target"], built[n]["port"]) for n in rot],
                          rounds, warmup)
            for name, r in zip(rot, got):
                samples[name].append(r)
                log(f"  rep {rep + 1}/{reps} {name:24} "
                    + (f"p50 {r['p50_us']:7.1f} µs  p99 {r['p99_us']:7.1f} µs"
                       if "error" not in r else f"failed: {r['error']}"))
        return _results(built, samples, reps, rounds, warmup)
    finally:
        for uid in tunnels:
            bed["server2"].ctl("release", uid)
            s1.ctl("release", uid)
        for h in ("server1", "server2"):
            units = [u for rp in pairs for u in rp.units.get(h, [])]
            if h == "server1":
                units.append("bench-latency-echo.service")
            H.stop_units(bed[h], units)
        if bed["server1"].run(["test", "-e", VARIANT_DROPIN], check=False).returncode == 0:
            _restart_daemons(bed, None)


def _results(built: Dict[str, Dict[str, Any]], samples: Dict[str, List[Dict[str, Any]]],
             reps: int, rounds: int, warmup: int) -> Dict[str, Any]:
    from .stats import summary

    latency: Dict[str, Dict[str, Optional[float]]] = {}
    detail: Dict[str, Any] = {}
    for name, b in built.items():
        runs = samples.get(name, [])
        ok = [r for r in runs if "error" not in r]
        p50 = summary([r["p50_us"] for r in ok])
        p99 = summary([r["p99_us"] for r in ok])
        latency[name] = {"p50_us": p50["median"] if p50 else None,
                         "p99_us": p99["median"] if p99 else None}
        detail[name] = {"broken": b.get("broken"), "relay_sched": b.get("sched"),
                        "p50_us": p50, "p99_us": p99,
                        # one per repetition, in order (None: failed), for paired ratios
                        "runs": [{k: round(v, 1) for k, v in r.items() if k.endswith("_us")}
                                 if "error" not in r else None for r in runs],
                        "errors": [r["error"] for r in runs if "error" in r]}
    return {"latency": latency, "latency_detail": detail,
            "latency_config": {"repetitions": reps, "rounds": rounds, "warmup": warmup,
                               "message_bytes": SIZE,
                               "shape": "client on server2, echo server on server1, one "
                                        "connection per path, paths interleaved in blocks "
                                        "of 50 round trips, TCP_NODELAY on both "
                                        "applications"}}


def paired_ratios(results: Dict[str, Any], a: str, b: str, key: str) -> List[float]:
    """a/b of ``key`` (p50_us, p99_us) per repetition, both measured in that repetition."""
    d = results.get("latency_detail") or {}
    xs = (d.get(a) or {}).get("runs") or []
    ys = (d.get(b) or {}).get("runs") or []
    return [round(x[key] / y[key], 3) for x, y in zip(xs, ys) if x and y and y[key]]


#: The issue's goal: scistreamd's p50 and p99 at most this times upstream's, in every run.
GOAL_RATIO = 0.8


def goals(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    out: List[Dict[str, Any]] = []
    for key in ("p50_us", "p99_us"):
        ratios = paired_ratios(results, "scistreamd", "upstream_config", key)
        if ratios:
            out.append({"goal": f"latency {key[:3]} scistreamd / upstream_config <= "
                                f"{GOAL_RATIO} in every repetition",
                        "value": max(ratios), "per_repetition": ratios,
                        "met": max(ratios) <= GOAL_RATIO})
    return out


def markdown(results: Dict[str, Any]) -> List[str]:
    cfg = results.get("latency_config")
    if not cfg:
        return []
    lines = ["", f"### Small-message latency: {cfg['message_bytes']}-byte request/response, "
                 f"{cfg['rounds']} round trips after {cfg['warmup']} warm-up, "
                 f"{cfg['repetitions']} repetitions",
             "", "µs, median over repetitions of each run's percentile (min–max); "
                 "ratios paired per repetition against upstream_config.", "",
             "| path | relay scheduling (server1 / server2) | p50 µs | p99 µs "
             "| p50 / upstream | p99 / upstream |", "|---|---|---|---|---|---|"]

    def fmt(s: Optional[Dict[str, Any]]) -> str:
        return f"{s['median']:.0f} ({s['min']:.0f}–{s['max']:.0f})" if s else "–"

    for name, d in (results.get("latency_detail") or {}).items():
        if d.get("broken"):
            lines.append(f"| {name} | – | – | – | – | not measured: {d['broken']} |")
            continue
        sched = d.get("relay_sched")
        sched_txt = f"{sched['server1']} / {sched['server2']}" if sched else "–"
        r50 = paired_ratios(results, name, "upstream_config", "p50_us")
        r99 = paired_ratios(results, name, "upstream_config", "p99_us")
        lines.append(f"| {name} | {sched_txt} | {fmt(d['p50_us'])} | {fmt(d['p99_us'])} | "
                     f"{', '.join(map(str, r50)) or '–'} | {', '.join(map(str, r99)) or '–'} |")
    return lines


if __name__ == "__main__":
    sys.exit(_main())
