"""Relay listeners held by socket units vs bound by stunnel: before and after, in one run.

``relay_socket_activation = true`` (the default, "socket units") gives each
relay a transient .socket unit with IP access lists; ``false`` ("stunnel
binds") is the earlier way: stunnel binds its listeners and the daemon polls
until they listen before it replies. Both run on the same daemon version,
switched by a configuration drop-in and a daemon restart on both hosts.

- Throughput: a P1 and a P4 tunnel are made in each mode (relays outlive the
  restart that switches the mode, so all four exist at once) and measured
  with iperf3 alternately, repetition by repetition, as bench/dataplane.py does.
- Setup latency: the control-plane rounds of bench/controlplane.py (D-Bus and
  CLI) in blocks per mode, in the order A B B A, so drift hits both alike.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List

from tests.testbed import Testbed

from . import controlplane, dataplane
from . import hosts as H
from .stats import summary

MODES = {"socket_units": True, "stunnel_binds": False}
MODE_LABELS = {"socket_units": "socket units + IP lists (now)",
               "stunnel_binds": "stunnel binds (before)"}
MODE_DROPIN = "/etc/scistream/conf.d/85-bench-relay-mode.toml"


def set_mode(bed: Testbed, mode: str) -> None:
    for host in bed.hosts.values():
        if MODES[mode]:
            host.run(["rm", "-f", MODE_DROPIN])
        else:
            host.write_file(MODE_DROPIN, "# written by bench/relaymodes.py\n"
                            "relay_socket_activation = false\n")
        host.run(["systemctl", "restart", "scistreamd"], timeout=120)
        H.ensure_up(host)


def _throughput(bed: Testbed, reps: int, seconds: float,
                log: Callable[[str], None]) -> Dict[str, Any]:
    paths: Dict[str, dataplane.RelayPath] = {}
    samples: Dict[str, Dict[int, List[Dict[str, Any]]]] = {}
    dataplane.setup_iperf_servers(bed["server1"])
    try:
        for mode in MODES:
            set_mode(bed, mode)
            paths[mode] = dataplane.setup_scistreamd(bed)
            samples[mode] = {1: [], 4: []}
        order = list(MODES)
        for rep in range(reps):
            rot = order[rep % 2:] + order[:rep % 2]
            for p in (1, 4):
                for mode in rot:
                    r = dataplane.measure_once(bed, paths[mode], p, seconds)
                    samples[mode][p].append(r)
                    g = r.get("gbps")
                    log(f"  rep {rep + 1}/{reps} P{p} {mode:14} "
                        + (f"{g:6.2f} Gbit/s" if g is not None else f"failed: {r.get('error')}"))
    finally:
        dataplane.teardown_paths(paths.values())
        H.stop_units(bed["server1"], [f"bench-iperf-{p}.service" for p in dataplane.IPERF_PORTS])
    out: Dict[str, Any] = {}
    for mode, per_p in samples.items():
        out[mode] = {}
        for p in (1, 4):
            runs = per_p[p]
            out[mode][f"p{p}"] = {
                "gbps": summary([r["gbps"] for r in runs if r.get("gbps") is not None]),
                "runs_gbps": [round(r["gbps"], 4) if r.get("gbps") is not None else None
                              for r in runs],
                "cpu_s_per_gb": summary([r["cpu_s_per_gb"] for r in runs
                                         if r.get("cpu_s_per_gb")])}
    return out


def _setup(bed: Testbed, runs: int, log: Callable[[str], None]) -> Dict[str, Any]:
    s1, s2 = bed["server1"], bed["server2"]
    trust_pem = s2.run(["cat", "/etc/scistream/peer-ca.crt"]).stdout
    dbus: Dict[str, Dict[str, List[float]]] = {m: {op: [] for op in controlplane.OPS}
                                               for m in MODES}
    cli: Dict[str, Dict[str, List[float]]] = {m: {op: [] for op in controlplane.OPS}
                                              for m in MODES}
    first, second = list(MODES)
    blocks = [(first, runs - runs // 2), (second, runs - runs // 2),
              (second, runs // 2), (first, runs // 2)]
    for mode, n in blocks:
        if not n:
            continue
        set_mode(bed, mode)
        d1, d2 = H.DbusDriver(s1), H.DbusDriver(s2)
        try:
            controlplane.dbus_round(d1, d2, trust_pem)  # warm-up after the restart
            controlplane.cli_round(s1, s2)
            for _ in range(n):
                r = controlplane.dbus_round(d1, d2, trust_pem)
                for op in controlplane.OPS:
                    dbus[mode][op].append(r[op])
                r = controlplane.cli_round(s1, s2)
                for op in controlplane.OPS:
                    cli[mode][op].append(r[op])
        finally:
            d1.close()
            d2.close()
        log(f"  setup latency: {n} rounds with {mode}")
    return {"dbus_ms": {m: {op: summary(v, digits=1) for op, v in ops.items()}
                        for m, ops in dbus.items()},
            "cli_ms": {m: {op: summary(v, digits=1) for op, v in ops.items()}
                       for m, ops in cli.items()}}


def run(bed: Testbed, reps: int, seconds: float, cp_runs: int,
        log: Callable[[str], None] = print) -> Dict[str, Any]:
    try:
        tp = _throughput(bed, reps, seconds, log)
        setup = _setup(bed, cp_runs, log)
    finally:
        set_mode(bed, "socket_units")
    return {"relay_modes": {"throughput": tp, **setup,
                            "config": {"modes": MODE_LABELS, "repetitions": reps,
                                       "iperf_seconds": seconds, "setup_runs": cp_runs,
                                       "setup_order": "blocks A B B A per mode, one warm-up "
                                                      "round after each daemon restart"}}}


def markdown(res: Dict[str, Any]) -> List[str]:
    """The before/after table for bench/report.py."""
    rm = res.get("relay_modes")
    if not rm:
        return []

    def med(s: Any, digits: int = 2) -> str:
        return f"{s['median']:.{digits}f}" if s else "–"

    def pct(now: Any, before: Any) -> str:
        if not now or not before or not before["median"]:
            return "–"
        return f"{(now['median'] / before['median'] - 1) * 100:+.0f}%"

    now, before = "socket_units", "stunnel_binds"
    tp = rm.get("throughput") or {}
    lines = ["", "### Relay listeners: socket units + IP access lists vs stunnel binding",
             "", f"Same daemon, relay_socket_activation true (now) vs false (before); "
                 f"{rm['config']['repetitions']} × iperf3 -t {rm['config']['iperf_seconds']:g}, "
                 f"{rm['config']['setup_runs']} setup rounds per mode. Median.", "",
             "| measure | before | now | change |", "|---|---|---|---|"]
    for p in ("p1", "p4"):
        b = ((tp.get(before) or {}).get(p) or {}).get("gbps")
        n = ((tp.get(now) or {}).get(p) or {}).get("gbps")
        lines.append(f"| throughput {p.upper()} Gbit/s | {med(b)} | {med(n)} | {pct(n, b)} |")
    for kind, label in (("dbus_ms", "D-Bus"), ("cli_ms", "CLI")):
        for op in ("inbound", "outbound", "release"):
            b = ((rm.get(kind) or {}).get(before) or {}).get(op)
            n = ((rm.get(kind) or {}).get(now) or {}).get(op)
            lines.append(f"| {label} {op} ms | {med(b, 1)} | {med(n, 1)} | {pct(n, b)} |")
    return lines
