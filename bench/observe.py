"""Observability costs (issue 13): IP accounting, the metrics endpoint, watch.

``python3 -m bench.run --only observe`` runs this section alone
(``--observe-n N`` for the endpoint count, default 1000; --quick: 100).

1. Throughput with IPAccounting on vs off, side by side: one scistreamd tunnel
   (P1), its four relay units (.service and .socket on both hosts) switched with
   ``systemctl set-property --runtime UNIT IPAccounting=yes|no`` between
   repetitions, in the order on/off, off/on, ... so drift hits both alike.
   "off" is checked: the units' IPIngressBytes read as unset then. The cost is
   the paired median ratio; the noise is the spread of the "on" runs.
2. N inbound endpoints on server1 (idle: no connections), with
   ``metrics_listen = "127.0.0.1:9731"`` (a conf.d drop-in):
   - ``scrape_ms``: GET /metrics from inside the host, 20 times (the whole
     exchange: connect, render, transfer), and the body's size;
   - ``daemon_rss_mb``: VmRSS of scistreamd after the scrapes;
   - ``daemon_cpu_pct``: CPU of scistreamd over a window, as % of one core,
     idle (nobody watching) and while ``scistreamctl watch`` follows all N
     (plus the watch process's own CPU), and while Prometheus-like scrapes
     come every second; "idle" only once the new relays' start-up work settled
     (5 s windows under 1 %, at most 2 minutes: ``settle_s``).
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any, Callable, Dict, List

from tests.testbed import Host, Testbed

from . import hosts as H
from .stats import summary

logger = logging.getLogger(__name__)

S1_IP = "192.168.150.1"
DROPIN = "/etc/scistream/conf.d/90-bench-observe.toml"
METRICS = "127.0.0.1:9731"
PORT_LOW = 30000
WATCH_UNIT = "bench-observe-watch"
SCRAPE_UNIT = "bench-observe-scrape"
GOALS = {"scrape_ms": 100, "daemon_rss_mb": 80, "daemon_cpu_watched_pct": 2.0}


# --------------------------------------------------------------------------
# 1. IP accounting on vs off


def _accounting_units(bed: Testbed, path: Any) -> Dict[str, List[str]]:
    return {h: [u for svc in units for u in (svc, svc[:-len(".service")] + ".socket")]
            for h, units in path.units.items()}


def set_accounting(bed: Testbed, units: Dict[str, List[str]], on: bool) -> bool:
    """Switch IP accounting of the units; True if systemd reports it as asked."""
    value = "yes" if on else "no"
    ok = True
    for h, us in units.items():
        host = bed[h]
        for u in us:
            host.run(["systemctl", "set-property", "--runtime", u, f"IPAccounting={value}"])
        shown = host.run(["systemctl", "show", "-P", "IPAccounting", *us]).stdout.split()
        ok = ok and shown == [value] * len(us)
        if not on:
            # Unset counters read as "[no data]" (or empty): nothing is counted.
            got = host.run(["systemctl", "show", "-P", "IPIngressBytes", *us]).stdout.split("\n")
            ok = ok and not any(x.strip().isdigit() for x in got)
    return ok


def accounting(bed: Testbed, reps: int, seconds: float,
               log: Callable[[str], None]) -> Dict[str, Any]:
    from .dataplane import measure_once, setup_iperf_servers, setup_scistreamd

    setup_iperf_servers(bed["server1"])
    path = setup_scistreamd(bed)
    units = _accounting_units(bed, path)
    runs: Dict[str, List[float]] = {"on": [], "off": []}
    cpu: Dict[str, List[float]] = {"on": [], "off": []}
    verified = True
    try:
        for rep in range(reps):
            order = ("on", "off") if rep % 2 == 0 else ("off", "on")
            for mode in order:
                verified = set_accounting(bed, units, mode == "on") and verified
                r = measure_once(bed, path, 1, seconds)
                if r.get("gbps"):
                    runs[mode].append(r["gbps"])
                    if r.get("cpu_s_per_gb") is not None:
                        cpu[mode].append(r["cpu_s_per_gb"])
            log(f"  accounting rep {rep + 1}/{reps}: on {runs['on'][-1:]} off "
                f"{runs['off'][-1:]} Gbit/s")
        set_accounting(bed, units, True)
    finally:
        path.teardown()
    pairs = [a / b for a, b in zip(runs["on"], runs["off"]) if a and b]
    on, off = summary(runs["on"]), summary(runs["off"])
    noise = None
    if on and on["median"]:
        noise = round((on["max"] - on["min"]) / on["median"] * 100, 1)
    return {
        "gbps_on": on, "gbps_off": off,
        "cpu_s_per_gb_on": summary(cpu["on"]), "cpu_s_per_gb_off": summary(cpu["off"]),
        "paired_ratio_on_off": round(statistics.median(pairs), 3) if pairs else None,
        "cost_pct": round((1 - statistics.median(pairs)) * 100, 1) if pairs else None,
        "noise_pct_on_runs": noise,
        "off_verified": verified,
        "config": {"repetitions": reps, "iperf_seconds": seconds, "p": 1,
                   "switch": "systemctl set-property --runtime UNIT IPAccounting=yes|no on "
                             "both relays' .service and .socket units",
                   "order": "on/off then off/on, alternating"},
    }


# --------------------------------------------------------------------------
# 2. N endpoints: scrape, RSS, CPU


def configure(s1: Host, n: int) -> None:
    high = PORT_LOW + n + 100
    s1.write_file(DROPIN, "# written by bench/observe.py; removed when it ends\n"
                  f'port_range = "{PORT_LOW}-{high}"\nmax_endpoints = {n + 100}\n'
                  f'metrics_listen = "{METRICS}"\n')
    s1.run(["systemctl", "restart", "scistreamd"], timeout=300)
    H.ensure_up(s1)


def unconfigure(s1: Host) -> None:
    s1.run(["rm", "-f", DROPIN], check=False)
    s1.run(["systemctl", "restart", "scistreamd"], check=False, timeout=300)


def _daemon_cpu_pct(s1: Host, pid: int, window: float) -> float:
    before = H.inhost(s1, "cpu", str(pid))[str(pid)]
    t0 = time.monotonic()
    time.sleep(window)
    after = H.inhost(s1, "cpu", str(pid))[str(pid)]
    return round((after - before) / (time.monotonic() - t0) * 100, 2)


def _pids_cpu(s1: Host, pids: List[int]) -> float:
    vals = H.inhost(s1, "cpu", *map(str, pids))
    return sum(vals.values())


def many(bed: Testbed, n: int, window: float, log: Callable[[str], None]) -> Dict[str, Any]:
    s1 = bed["server1"]
    d = H.DbusDriver(s1)
    try:
        d.ok("ReleaseAll")
    finally:
        d.close()
    configure(s1, n)
    out: Dict[str, Any] = {"n": n, "window_s": window}
    notes: List[str] = []
    d = H.DbusDriver(s1)
    try:
        log(f"  observe: creating {n} endpoints ...")
        t0 = time.perf_counter()
        created, fails = 0, 0
        while created < n and fails < 3:
            r = d.call("InboundRequest", "saqua{sv}", [S1_IP, [5300], 1, {}])
            if "error" in r:
                fails += 1
                notes.append(f"request {created + 1} failed: {r['error']}: {r['message']}")
                continue
            fails = 0
            created += 1
        out["created"] = created
        out["create_s"] = round(time.perf_counter() - t0, 1)
        time.sleep(5)  # let the start-up counter reads settle
        scrape = H.inhost(s1, "scrape", f"http://{METRICS}/metrics", "-n", "20", timeout=300)
        out["scrape_ms"] = summary(scrape["ms"], digits=1)
        out["scrape_bytes"] = scrape["bytes"]
        out["scrape_series"] = scrape["series"]
        pid = H.main_pid(s1, "scistreamd.service")
        out["daemon_rss_mb"] = round(
            H.inhost(s1, "rss", "--pid", str(pid))["rss_kb"] / 1024, 1)
        log(f"  observe N={created}: scrape {out['scrape_ms']['median']} ms "
            f"({scrape['bytes']} B), daemon RSS {out['daemon_rss_mb']} MB")
        # New relays keep the daemon busy for a while (their first counter reads, their
        # start-up journal lines): idle is measured once that has settled.
        t0 = time.monotonic()
        while time.monotonic() - t0 < 120 and _daemon_cpu_pct(s1, pid, 5.0) > 1.0:
            pass
        out["settle_s"] = round(time.monotonic() - t0, 1)
        out["daemon_cpu_idle_pct"] = _daemon_cpu_pct(s1, pid, window)
        # Watch all N: one connection following every endpoint's signals.
        H.run_unit(s1, WATCH_UNIT, ["sh", "-c", "exec scistreamctl watch > /dev/null"],
                   [f"Environment=PATH={H.HOST_PATH}", f"Environment={H.PYCACHE_ENV}"])
        time.sleep(3)  # its snapshot of N endpoints
        wpid = H.main_pid(s1, f"{WATCH_UNIT}.service")
        w0 = _pids_cpu(s1, [wpid]) if wpid else 0.0
        t0 = time.monotonic()
        out["daemon_cpu_watched_pct"] = _daemon_cpu_pct(s1, pid, window)
        if wpid:
            out["watch_cpu_pct"] = round((_pids_cpu(s1, [wpid]) - w0)
                                         / (time.monotonic() - t0) * 100, 2)
            out["watch_rss_mb"] = round(
                H.inhost(s1, "rss", "--pid", str(wpid))["rss_kb"] / 1024, 1)
        else:
            notes.append("watch was not running during the window")
        H.stop_units(s1, [WATCH_UNIT])
        out["daemon_cpu_idle_after_pct"] = _daemon_cpu_pct(s1, pid, window)
        # Prometheus' cadence at its most eager (1 s), for the cost of being scraped.
        H.run_unit(s1, SCRAPE_UNIT, ["python3", H.INHOST, "scrape",
                                     f"http://{METRICS}/metrics", "-n", "100000",
                                     "--interval", "1"])
        time.sleep(1)
        out["daemon_cpu_scraped_1s_pct"] = _daemon_cpu_pct(s1, pid, window)
        H.stop_units(s1, [SCRAPE_UNIT])
        out["daemon_rss_after_mb"] = round(
            H.inhost(s1, "rss", "--pid", str(pid))["rss_kb"] / 1024, 1)
        log(f"  observe N={created}: daemon CPU idle {out['daemon_cpu_idle_pct']}%, watched "
            f"{out['daemon_cpu_watched_pct']}% (watch itself {out.get('watch_cpu_pct')}%), "
            f"scraped every 1 s {out['daemon_cpu_scraped_1s_pct']}%")
        d.ok("ReleaseAll")
    finally:
        H.stop_units(s1, [WATCH_UNIT, SCRAPE_UNIT])
        try:
            d.call("ReleaseAll")
        finally:
            d.close()
        unconfigure(s1)
    out["notes"] = notes
    return out


def run(bed: Testbed, reps: int, seconds: float, n: int, window: float = 30.0,
        log: Callable[[str], None] = print) -> Dict[str, Any]:
    res: Dict[str, Any] = {}
    log(f"  observe: IP accounting on vs off ({reps} pairs of iperf3 -t {seconds:g}) ...")
    res["accounting"] = accounting(bed, reps, seconds, log)
    res["many"] = many(bed, n, window, log)
    return {"observe": res}


def goals(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    m = (results.get("observe") or {}).get("many") or {}
    if not m:
        return []
    n = m.get("created")
    values = {"scrape_ms": (m.get("scrape_ms") or {}).get("median"),
              "daemon_rss_mb": m.get("daemon_rss_after_mb", m.get("daemon_rss_mb")),
              "daemon_cpu_watched_pct": m.get("daemon_cpu_watched_pct")}
    return [{"goal": f"observe N={n} {k} <= {want}", "value": values[k],
             "met": values[k] is not None and values[k] <= want} for k, want in GOALS.items()]


def markdown(results: Dict[str, Any]) -> List[str]:
    o = results.get("observe")
    if not o:
        return []
    lines: List[str] = []
    a = o.get("accounting") or {}
    if a:
        def med(s: Any) -> str:
            return f"{s['median']:.2f} ({s['min']:.2f}–{s['max']:.2f})" if s else "–"
        lines += ["", f"### IP accounting on vs off ({a['config']['repetitions']} pairs, "
                      f"iperf3 -t {a['config']['iperf_seconds']:g}, P1)", "",
                  "| IPAccounting | Gbit/s median (min–max) | relay CPU s/GB |", "|---|---|---|",
                  f"| on | {med(a.get('gbps_on'))} | {med(a.get('cpu_s_per_gb_on'))} |",
                  f"| off | {med(a.get('gbps_off'))} | {med(a.get('cpu_s_per_gb_off'))} |",
                  "", f"Paired median on/off {a.get('paired_ratio_on_off')} (cost "
                      f"{a.get('cost_pct')} %); spread of the 'on' runs "
                      f"{a.get('noise_pct_on_runs')} % of their median; off verified: "
                      f"{a.get('off_verified')}."]
    m = o.get("many") or {}
    if m:
        s = m.get("scrape_ms") or {}
        lines += ["", f"### {m.get('created')} idle endpoints: metrics, memory, CPU", "",
                  "| measure | value | goal |", "|---|---|---|",
                  f"| GET /metrics ms, median (p95) | {s.get('median')} ({s.get('p95')}) "
                  f"| ≤ 100 |",
                  f"| /metrics size | {m.get('scrape_bytes')} B, {m.get('scrape_series')} "
                  f"series | |",
                  f"| daemon RSS MB | {m.get('daemon_rss_after_mb')} | ≤ 80 |",
                  f"| daemon CPU % of a core, idle (before / after watching) | "
                  f"{m.get('daemon_cpu_idle_pct')} / {m.get('daemon_cpu_idle_after_pct')} | |",
                  f"| daemon CPU %, watched by scistreamctl watch | "
                  f"{m.get('daemon_cpu_watched_pct')} | < 2 |",
                  f"| scistreamctl watch CPU % (RSS MB) | {m.get('watch_cpu_pct')} "
                  f"({m.get('watch_rss_mb')}) | |",
                  f"| daemon CPU %, scraped every 1 s | {m.get('daemon_cpu_scraped_1s_pct')} "
                  f"| |"]
    return lines
