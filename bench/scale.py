"""Scale: many inbound endpoints on one host (server1).

For each N (ascending; endpoints accumulate): create the missing endpoints one
after the other through a long-lived D-Bus client, then measure

- ``daemon_rss_mb``: VmRSS of scistreamd;
- ``relays_rss_mb``: VmRSS summed over the relay processes (scistream.slice),
  plus ``relays_pss_mb``, which counts shared library pages once;
- ``list_ms``: ListEndpoints call time (median of 10);
- ``create_s``: wall time to create this batch;
- ``readopt_s``: ``systemctl restart scistreamd`` until it returns, i.e. until
  the restarted daemon sent READY=1, which it does only after re-adopting
  every endpoint; all N are then checked to be listed and active.

Where the time goes: the restart with no endpoints (``restart_empty_s``), the
per-endpoint slope, what re-adoption asks systemd (one ListUnitsByPatterns for
all relays, one Get of NRestarts per relay) timed from a client, for reference
the two GetAll per relay that 0.1.0 made, and the systemd floor (systemd-run of
a stunnel until it listens) at each N.

max_endpoints and port_range are raised with a conf.d drop-in in the host.
Before each batch the memory it will need is estimated from the relays so far;
an N that would leave less than ``headroom_mb`` available is skipped and
reported as such instead of pushing the machine into swap or the OOM killer.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

from tests.testbed import Host, Testbed

from . import hosts as H
from .stats import summary

logger = logging.getLogger(__name__)

S1_IP = "192.168.150.1"
DROPIN = "/etc/scistream/conf.d/90-bench-scale.toml"
PORT_LOW = 20000
RELAY_CGROUP = "/scistream.slice/"


def _mem_available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _daemon_rss_mb(s1: Host) -> float:
    pid = H.main_pid(s1, "scistreamd.service")
    return H.inhost(s1, "rss", "--pid", str(pid))["rss_kb"] / 1024


def _relays(s1: Host) -> Dict[str, Any]:
    return H.inhost(s1, "rss", "--comm", "stunnel", "--cgroup", RELAY_CGROUP, timeout=300)


def _list(d: H.DbusDriver, n: int = 10) -> Dict[str, Any]:
    times, rows = [], []
    for _ in range(n):
        r = d.ok("ListEndpoints")
        times.append(r["ms"])
        rows = r["reply"][0]
    return {"ms": summary(times, digits=2), "rows": rows}


def _unit_path(unit: str) -> str:
    """systemd's D-Bus object path of a unit (bus label escaping)."""
    out = []
    for i, ch in enumerate(unit):
        if ch.isascii() and (ch.isalpha() or (ch.isdigit() and i > 0)):
            out.append(ch)
        else:
            out.append(f"_{ord(ch):02x}")
    return "/org/freedesktop/systemd1/unit/" + "".join(out)


def _adopt_costs(d: H.DbusDriver, rows: List[Any], sample: int = 20) -> Dict[str, Any]:
    """What re-adoption asks systemd: one ListUnitsByPatterns for all relays and
    one Get(NRestarts) per relay; and, for reference, the two GetAll per relay
    (Unit and Service) that 0.1.0 read instead.
    """
    per_unit: List[float] = []
    per_unit_getall: List[float] = []
    # Relay units are named by an opaque relay id: the endpoint's Unit property.
    objects = d.call("GetManagedObjects", "", [], iface="org.freedesktop.DBus.ObjectManager")
    if "error" in objects:
        raise H.BenchError(f"GetManagedObjects: {objects['error']}: {objects['message']}")
    unit_of = {(e["Uid"], e["Role"]): e["Unit"] for ifaces in objects["reply"][0].values()
               for e in [ifaces.get("org.scistream.Tunnel1.Endpoint")] if e}
    for row in rows[:sample]:
        path = _unit_path(unit_of[(row[0], row[1])])
        r = d.call("Get", "ss", ["org.freedesktop.systemd1.Service", "NRestarts"], path=path,
                   dest="org.freedesktop.systemd1", iface="org.freedesktop.DBus.Properties",
                   discard=True)
        if "error" in r:
            raise H.BenchError(f"Get {path}: {r['error']}: {r['message']}")
        per_unit.append(r["ms"])
        total = 0.0
        for iface in ("org.freedesktop.systemd1.Unit", "org.freedesktop.systemd1.Service"):
            r = d.call("GetAll", "s", [iface], path=path, dest="org.freedesktop.systemd1",
                       iface="org.freedesktop.DBus.Properties", discard=True)
            if "error" in r:
                raise H.BenchError(f"GetAll {path}: {r['error']}: {r['message']}")
            total += r["ms"]
        per_unit_getall.append(total)
    batch: List[float] = []
    for _ in range(3):
        r = d.call("ListUnitsByPatterns", "asas", [[], ["scistream-*-*.service"]],
                   path="/org/freedesktop/systemd1", dest="org.freedesktop.systemd1",
                   iface="org.freedesktop.systemd1.Manager", discard=True)
        batch.append(r["ms"])
    return {"get_nrestarts_ms_per_endpoint": summary(per_unit, digits=2),
            "status_getall_ms_per_endpoint_0_1_0": summary(per_unit_getall, digits=2),
            "list_units_by_patterns_ms": summary(batch, digits=1)}


def _wait_active(host: Host, timeout: float) -> bool:
    """Whether scistreamd is (again) active within ``timeout`` (Restart=on-failure retries)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = host.run(["systemctl", "is-active", "scistreamd"], check=False).stdout.strip()
        if st == "active":
            return True
        time.sleep(0.5)
    return False


def configure(s1: Host, max_n: int) -> None:
    high = PORT_LOW + max_n + 100
    s1.write_file(DROPIN, "# written by bench/scale.py; removed when it ends\n"
                  f'port_range = "{PORT_LOW}-{high}"\nmax_endpoints = {max_n + 100}\n')
    s1.run(["systemctl", "restart", "scistreamd"], timeout=120)
    H.ensure_up(s1)


def unconfigure(s1: Host) -> None:
    s1.run(["rm", "-f", DROPIN], check=False)
    s1.run(["systemctl", "restart", "scistreamd"], check=False, timeout=300)


def run(bed: Testbed, ns: Sequence[int], headroom_mb: float = 3072,
        log: Callable[[str], None] = print) -> Dict[str, Any]:
    s1, s2 = bed["server1"], bed["server2"]
    ns = sorted(set(ns))
    rows: List[Dict[str, Any]] = []
    notes: List[str] = []
    # Start from nothing: earlier sections' tunnels are gone, leftovers would skew N.
    for h in (s1, s2):
        d = H.DbusDriver(h)
        try:
            d.ok("ReleaseAll")
        finally:
            d.close()
    configure(s1, max(ns))
    # The fixed part of a restart (interpreter, imports, bus, peer port), no endpoints.
    empty = [H.timeit(s1, ["systemctl", "restart", "scistreamd"], timeout=120)["ms"] / 1000
             for _ in range(3)]
    restart_empty_s = statistics.median(empty)
    from .controlplane import systemd_floor

    d = H.DbusDriver(s1)
    created = 0
    per_relay_mb = 0.0
    try:
        for n in ns:
            need = n - created
            if per_relay_mb:
                want = need * per_relay_mb
                avail = _mem_available_mb()
                if avail - want < headroom_mb:
                    notes.append(f"N={n} skipped: {need} more relays need ~{want:.0f} MB, "
                                 f"{avail:.0f} MB available, keeping {headroom_mb:.0f} MB free")
                    log("  " + notes[-1])
                    break
            log(f"  scale: creating {need} endpoints (to N={n}) ...")
            t0 = time.perf_counter()
            call_ms: List[float] = []
            failed = ""
            in_a_row = 0
            while created < n:
                r = d.call("InboundRequest", "saqua{sv}", [S1_IP, [5300], 1, {}])
                if "error" not in r:
                    in_a_row = 0
                    call_ms.append(r["ms"])
                    created += 1
                    continue
                # On an overloaded machine a relay can miss relay_start_timeout; the daemon
                # rolls it back. Say so, try again, give up after 3 failures in a row.
                in_a_row += 1
                failed = f"{r['error']}: {r['message']}"
                if in_a_row >= 3:
                    break
                notes.append(f"N={n}: request {created + 1} failed, retried: {failed}")
                log("  " + notes[-1])
                failed = ""
            create_s = time.perf_counter() - t0
            if failed:
                notes.append(f"N={n}: creation stopped after {created} endpoints: {failed}")
                log("  " + notes[-1])
                break
            relays = _relays(s1)
            daemon_mb = _daemon_rss_mb(s1)
            listing = _list(d)
            per_relay_mb = relays["pss_kb"] / 1024 / max(relays["count"], 1)
            costs = _adopt_costs(d, listing["rows"])
            floor = systemd_floor(s1, runs=5)
            log(f"  scale N={n}: restarting scistreamd to time re-adoption ...")
            restart = H.timeit(s1, ["systemctl", "restart", "scistreamd"], timeout=600)
            readopt_ok = restart["rc"] == 0
            if not readopt_ok:
                why = s1.run(["journalctl", "-u", "scistreamd", "-n", "3", "--no-pager", "-o",
                              "cat"], check=False).stdout.strip().replace("\n", " | ")
                notes.append(f"N={n}: systemctl restart scistreamd failed: {why}")
                log("  " + notes[-1])
                if not _wait_active(s1, 120):
                    break
            after = _list(d)
            active = sum(1 for row in after["rows"] if row[2] == "active")
            if len(after["rows"]) != n or active != n:
                readopt_ok = False
                notes.append(f"N={n}: after restart {len(after['rows'])} endpoints listed, "
                             f"{active} active (expected {n})")
            row = {
                "n": n,
                "daemon_rss_mb": round(daemon_mb, 1),
                "relays_rss_mb": round(relays["rss_kb"] / 1024, 1),
                "list_ms": listing["ms"]["median"],
                "create_s": round(create_s, 2),
                "readopt_s": round(restart["ms"] / 1000, 2) if readopt_ok else None,
                # extras
                "batch": need,
                "relays_pss_mb": round(relays["pss_kb"] / 1024, 1),
                "relay_processes": relays["count"],
                "per_relay_pss_mb": round(per_relay_mb, 2),
                "create_call_ms": summary(call_ms, digits=1),
                "list_ms_detail": listing["ms"],
                "daemon_rss_after_readopt_mb": round(_daemon_rss_mb(s1), 1),
                "list_ms_after_readopt": after["ms"]["median"],
                "mem_available_mb": round(_mem_available_mb()),
                "systemd_floor_start_ms": floor["start_to_listen_ms"]["median"],
                **costs,
            }
            if row["readopt_s"] is not None:
                row["readopt_ms_per_endpoint"] = round(
                    (row["readopt_s"] - restart_empty_s) * 1000 / n, 2)
            rows.append(row)
            log(f"  scale N={n}: daemon {row['daemon_rss_mb']} MB, relays "
                f"{row['relays_rss_mb']} MB RSS / {row['relays_pss_mb']} MB PSS, list "
                f"{row['list_ms']} ms, create {row['create_s']} s, re-adopt {row['readopt_s']} s")
        t0 = time.perf_counter()
        d.ok("ReleaseAll")
        release_all_s = time.perf_counter() - t0
    finally:
        d.close()
        # After an error too: later runs on this host need it clean.
        _wait_active(s1, 120)
        try:
            d = H.DbusDriver(s1)
            d.call("ReleaseAll")
            d.close()
        except (H.BenchError, OSError) as e:
            logger.warning("ReleaseAll after scale: %s", e)
        unconfigure(s1)
    return {"scale": rows, "scale_notes": notes,
            "scale_config": {"host": "server1", "endpoint": "inbound, num_conn 1",
                             "release_all_s": round(release_all_s, 2),
                             "restart_empty_s": round(restart_empty_s, 2),
                             "headroom_mb": headroom_mb}}
