"""Data plane: iperf3 throughput server2 -> server1 through each relay path, and relay CPU.

Paths, all on the same two hosts in the same run, measured interleaved:

- ``direct``: no relay, iperf3 client on server2 to the servers on server1;
- ``stunnel_pair``: a hand-written stunnel pair (TLS 1.3, TLS_AES_128_GCM_SHA256,
  PSK, nothing else), started by the benchmark as plain transient units;
- ``upstream_config``: a stunnel pair with upstream SciStream 1.2.1's template
  (global PSKsecrets, ``securityLevel = 0``, ``debug = 7``, ``sslVersionMax =
  TLSv1.2``, ``ciphers = eNULL`` per service); what is negotiated is recorded;
- ``scistreamd``: tunnels made with scistreamctl as in the guide (num_conn 1 for
  P1, num_conn 4 for P4).

Shape of P4, the same for every path: four mappings, i.e. four iperf3 servers
(5300-5303) behind four listeners, four iperf3 clients (-P 1 each) started at
the same moment; the result is the sum of what the servers received. This is
what ``--num_conn 4`` builds (one listener per connection), and it keeps iperf3
(single-threaded) from being the bottleneck.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from tests.testbed import Host, Testbed

from . import hosts as H
from .stats import summary

logger = logging.getLogger(__name__)

S1_IP = "192.168.150.1"
S2_IP = "192.168.150.2"
IPERF_PORTS = [5300, 5301, 5302, 5303]
PATHS = ("direct", "stunnel_pair", "upstream_config", "scistreamd")
STUNNEL = "/usr/bin/stunnel4"
PSK_IDENTITY = "bench"


@dataclass
class RelayPath:
    name: str
    target: str  # where the iperf3 clients on server2 connect
    p1_ports: List[int]
    p4_ports: List[int]
    #: host name -> relay units of this path there (their main PIDs are sampled for CPU)
    units: Dict[str, List[str]] = field(default_factory=dict)
    negotiated: str = ""
    config: Dict[str, str] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    broken: str = ""  # why this path cannot be measured, if so
    teardown: Optional[Callable[[], None]] = None


def stunnel_conf(global_lines: Sequence[str], sections: Sequence[Tuple[str, Sequence[str]]]) -> str:
    out = list(global_lines)
    for name, lines in sections:
        out += ["", f"[{name}]", *lines]
    return "\n".join(out) + "\n"


def _psk_line() -> str:
    return f"{PSK_IDENTITY}:{secrets.token_hex(32)}\n"


def _start_pair(bed: Testbed, name: str, server_conf: str, client_conf: str, psk: str,
                server_ports: Sequence[int], client_ports: Sequence[int],
                unit_props: Sequence[str] = ()) -> Dict[str, List[str]]:
    s1, s2 = bed["server1"], bed["server2"]
    units = {}
    for host, conf, ports, role in ((s1, server_conf, server_ports, "server"),
                                    (s2, client_conf, client_ports, "client")):
        # Readable by a DynamicUser= unit only when unit_props ask for one (experiments).
        mode = "0644" if any(p.startswith("DynamicUser") for p in unit_props) else "0600"
        host.write_file(f"{H.BENCH_DIR}/{name}.psk", psk, mode)
        host.write_file(f"{H.BENCH_DIR}/{name}-{role}.conf", conf)
        unit = f"bench-{name}-{role}.service"
        H.run_unit(host, unit, [STUNNEL, f"{H.BENCH_DIR}/{name}-{role}.conf"], unit_props)
        H.wait_listening(host, ports)
        units[host.name] = [unit]
    return units


# ------------------------------------------------------------------ paths

def setup_iperf_servers(s1: Host) -> None:
    for port in IPERF_PORTS:
        H.run_unit(s1, f"bench-iperf-{port}.service", ["iperf3", "-s", "-p", str(port)])
    H.wait_listening(s1, IPERF_PORTS)


def setup_direct() -> RelayPath:
    return RelayPath("direct", S1_IP, IPERF_PORTS[:1], IPERF_PORTS)


def setup_stunnel_pair(bed: Testbed, base: int = 6100, name: str = "stunnel_pair",
                       extra_section: Sequence[str] = (),
                       suites: str = "TLS_AES_128_GCM_SHA256",
                       unit_props: Sequence[str] = ()) -> RelayPath:
    """The pair a user would write by hand: TLS 1.3, AES-128-GCM, PSK; no tuning."""
    ports = [base + i for i in range(len(IPERF_PORTS))]
    glob = ["foreground = yes", "pid =", "syslog = no",
            # info: the negotiated suite is logged once per connection (no per-byte logging).
            "debug = info"]
    common = ["sslVersionMin = TLSv1.3", f"ciphersuites = {suites}",
              f"PSKsecrets = {H.BENCH_DIR}/{name}.psk", *extra_section]
    server = stunnel_conf(glob, [
        (f"m{i}", [f"accept = {S1_IP}:{p}", f"connect = {S1_IP}:{t}", *common])
        for i, (p, t) in enumerate(zip(ports, IPERF_PORTS))])
    client = stunnel_conf(glob, [
        (f"m{i}", ["client = yes", f"accept = {S2_IP}:{p}", f"connect = {S1_IP}:{p}",
                   f"PSKidentity = {PSK_IDENTITY}", *common])
        for i, p in enumerate(ports)])
    units = _start_pair(bed, name, server, client, _psk_line(), ports, ports, unit_props)
    return RelayPath(name, S2_IP, ports[:1], ports, units=units,
                     config={"server": server, "client": client})


def setup_upstream_config(bed: Testbed, base: int = 6200) -> RelayPath:
    """Upstream SciStream 1.2.1's stunnel.conf.j2, rendered for these hosts.

    Kept verbatim apart from paths: global PSKsecrets, securityLevel 0, debug 7,
    sslVersionMax TLSv1.2, and per service ``accept = <port>`` (all addresses)
    and ``ciphers = eNULL``.
    """
    ports = [base + i for i in range(len(IPERF_PORTS))]

    def conf(role: str, client: str, targets: Sequence[str]) -> str:
        glob = ["; Stunnel Configuration (upstream SciStream 1.2.1 template)", "fips = no",
                f"PSKsecrets = {H.BENCH_DIR}/upstream_config.psk", "securityLevel = 0",
                "debug = 7", "foreground = yes", "sslVersionMax = TLSv1.2",
                f"pid = {H.BENCH_DIR}/upstream_config-{role}.pid"]
        return stunnel_conf(glob, [
            (str(p), [f"client = {client}", f"accept = {p}", f"connect = {t}",
                      "ciphers = eNULL"])
            for p, t in zip(ports, targets)])

    server = conf("server", "no", [f"{S1_IP}:{t}" for t in IPERF_PORTS])
    client = conf("client", "yes", [f"{S1_IP}:{p}" for p in ports])
    path = RelayPath("upstream_config", S2_IP, ports[:1], ports,
                     config={"server": server, "client": client})
    try:
        path.units = _start_pair(bed, "upstream_config", server, client, _psk_line(),
                                 ports, ports)
    except H.BenchError as e:
        path.broken = f"the upstream configuration does not start under this stunnel: {e}"
    return path


def _ctl(host: Host, *args: str) -> Dict[str, Any]:
    import json

    proc = host.ctl("--json", *args, timeout=60)
    if proc.returncode != 0:
        raise H.BenchError(f"{host.name}: scistreamctl {args[0]} exited {proc.returncode}: "
                           f"{proc.stderr.strip()}")
    return json.loads(proc.stdout)


def make_tunnel(bed: Testbed, ports: Sequence[int]) -> Tuple[str, List[str]]:
    """A tunnel as in the guide; returns (uid, server2 listener ports as host:port)."""
    s1, s2 = bed["server1"], bed["server2"]
    n = str(len(ports))
    inbound = _ctl(s1, "inbound-request", "--remote_ip", S1_IP, "--s2cs", f"{S1_IP}:5000",
                   "--receiver_ports", ",".join(map(str, ports)), "--num_conn", n,
                   "--server_cert=/etc/scistream/server.crt")
    uid = inbound["uid"]
    outbound = _ctl(s2, "outbound-request", "--remote_ip", S1_IP, "--s2cs", f"{S2_IP}:5000",
                    "--num_conn", n, "--server_cert=/etc/scistream/peer-ca.crt", uid,
                    *inbound["listeners"])
    return uid, outbound["listeners"]


def _relay_unit(host: Host, uid: str, role: str) -> str:
    """The relay unit of endpoint (uid, role): ``scistreamctl status``'s Unit."""
    # status --json speaks snake_case since issue 13 (endpoint_json); D-Bus names before.
    (ep,) = [e for e in _ctl(host, "status", uid) if e.get("role", e.get("Role")) == role]
    return ep.get("unit", ep.get("Unit"))


def setup_scistreamd(bed: Testbed) -> RelayPath:
    s1, s2 = bed["server1"], bed["server2"]
    uid1, l1 = make_tunnel(bed, IPERF_PORTS[:1])
    uid4, l4 = make_tunnel(bed, IPERF_PORTS)
    p1 = [int(x.rsplit(":", 1)[1]) for x in l1]
    p4 = [int(x.rsplit(":", 1)[1]) for x in l4]
    # Relay units are named by an opaque relay id: the endpoints' Unit property.
    units = {s1.name: [_relay_unit(s1, uid1, "inbound"), _relay_unit(s1, uid4, "inbound")],
             s2.name: [_relay_unit(s2, uid1, "outbound"), _relay_unit(s2, uid4, "outbound")]}
    relay_id4 = units[s1.name][1][len("scistream-inbound-"):-len(".service")]
    conf = s1.run(["cat", f"/var/lib/scistream/keys/{relay_id4}-inbound/stunnel.conf"],
                  check=False).stdout

    def teardown() -> None:
        for uid in (uid1, uid4):
            s2.ctl("release", uid)
            s1.ctl("release", uid)

    return RelayPath("scistreamd", S2_IP, p1, p4, units=units, teardown=teardown,
                     config={"server": conf}, notes=[f"tunnels {uid1} (P1), {uid4} (P4)"])


# ------------------------------------------------------------ measurement

def _relay_pids(bed: Testbed, path: RelayPath) -> Dict[str, List[int]]:
    return {h: [H.main_pid(bed[h], u) for u in units] for h, units in path.units.items()}


def _cpu(bed: Testbed, pids: Dict[str, List[int]]) -> Dict[str, float]:
    out = {}
    for h, plist in pids.items():
        if plist:
            vals = H.inhost(bed[h], "cpu", *map(str, plist))
            out[h] = sum(vals.values())
    return out


def measure_once(bed: Testbed, path: RelayPath, p: int, seconds: float) -> Dict[str, Any]:
    s2 = bed["server2"]
    ports = path.p1_ports if p == 1 else path.p4_ports
    pids = _relay_pids(bed, path)
    for attempt in range(3):
        before = _cpu(bed, pids)
        res = H.inhost(s2, "iperf", path.target, ",".join(map(str, ports)), "-t",
                       f"{seconds:g}", timeout=seconds + 90, as_unit=True)
        after = _cpu(bed, pids)
        if not res["errors"] and len(res["per"]) == len(ports):
            break
        # iperf3 -s refuses a test while it still winds down the previous one.
        logger.info("%s P%d attempt %d: %s", path.name, p, attempt + 1, res["errors"])
        time.sleep(1.0)
    else:
        return {"gbps": None, "error": "; ".join(res["errors"])}
    cpu = {h: round(after[h] - before.get(h, 0.0), 3) for h in after}
    gb = res["bytes"] / 1e9
    out: Dict[str, Any] = {"gbps": res["gbps"], "bytes": res["bytes"], "relay_cpu_s": cpu}
    if cpu and gb > 0:
        out["cpu_s_per_gb"] = sum(cpu.values()) / gb
    return out


def negotiated_suite(bed: Testbed, path: RelayPath) -> str:
    """What the relays logged as the negotiated protocol and cipher, when they log it."""
    for h, units in path.units.items():
        for u in units:
            lines = H.journal_grep(bed[h], u, "ciphersuite:")
            if lines:
                # "LOG6[0]: TLSv1.3 ciphersuite: TLS_AES_128_GCM_SHA256 (128-bit encryption)"
                return lines[-1].split("]: ", 1)[-1].strip()
    return ""


def run(bed: Testbed, reps: int, seconds: float, paths: Sequence[str] = PATHS,
        log: Callable[[str], None] = print) -> Dict[str, Any]:
    s1 = bed["server1"]
    setup_iperf_servers(s1)
    built: Dict[str, RelayPath] = {}
    try:
        setups: Dict[str, Callable[[], RelayPath]] = {
            "direct": setup_direct,
            "stunnel_pair": lambda: setup_stunnel_pair(bed),
            "upstream_config": lambda: setup_upstream_config(bed),
            "scistreamd": lambda: setup_scistreamd(bed),
        }
        for name in paths:
            if name not in setups:
                raise H.BenchError(f"unknown path {name!r}: choose from {', '.join(PATHS)}")
            try:
                built[name] = setups[name]()
            except Exception as e:  # report the path as not measured, measure the others
                logger.error("setting up %s failed: %s", name, e)
                built[name] = RelayPath(name, "", [], [], broken=f"set-up failed: {e}")
        samples: Dict[str, Dict[int, List[Dict[str, Any]]]] = {
            n: {1: [], 4: []} for n in built}
        order = [n for n in built if not built[n].broken]
        for rep in range(reps):
            # Rotate the order every repetition: drift on a shared machine hits all paths alike.
            rot = order[rep % len(order):] + order[:rep % len(order)] if order else []
            for p in (1, 4):
                for name in rot:
                    r = measure_once(bed, built[name], p, seconds)
                    samples[name][p].append(r)
                    g = r.get("gbps")
                    log(f"  rep {rep + 1}/{reps} P{p} {name:16} "
                        + (f"{g:6.2f} Gbit/s" if g is not None else f"failed: {r.get('error')}")
                        + (f"  relay cpu {r['cpu_s_per_gb']:.2f} s/GB"
                           if r.get("cpu_s_per_gb") else ""))
        for path in built.values():
            if not path.broken:
                path.negotiated = negotiated_suite(bed, path)
        return _results(built, samples, reps, seconds)
    finally:
        teardown_paths(built.values())
        for h in ("server1", "server2"):
            units = [u for path in built.values() if path.name != "scistreamd"
                     for u in path.units.get(h, [])]
            if h == "server1":
                units += [f"bench-iperf-{p}.service" for p in IPERF_PORTS]
            H.stop_units(bed[h], units)


def _results(built: Dict[str, RelayPath], samples: Dict[str, Dict[int, List[Dict[str, Any]]]],
             reps: int, seconds: float) -> Dict[str, Any]:
    throughput: Dict[str, Dict[str, Optional[float]]] = {}
    detail: Dict[str, Any] = {}
    cpu: Dict[str, Dict[str, Optional[float]]] = {}
    for name, path in built.items():
        throughput[name] = {}
        cpu[name] = {}
        detail[name] = {"negotiated": path.negotiated, "notes": path.notes,
                        "broken": path.broken or None, "config": path.config}
        for p in (1, 4):
            key = f"p{p}"
            runs = samples[name][p]
            t = summary([r["gbps"] for r in runs if r.get("gbps") is not None])
            c = summary([r["cpu_s_per_gb"] for r in runs if r.get("cpu_s_per_gb")])
            throughput[name][key] = t["median"] if t else None
            cpu[name][key] = c["median"] if c else None
            detail[name][key] = {"gbps": t, "cpu_s_per_gb": c,
                                 # one per repetition, in order (None: failed), for paired ratios
                                 "runs_gbps": [round(r["gbps"], 4) if r.get("gbps") is not None
                                               else None for r in runs],
                                 "errors": [r["error"] for r in runs if r.get("error")],
                                 "relay_cpu_s": [r.get("relay_cpu_s") for r in runs]}
    return {"throughput": throughput, "cpu_s_per_gb": cpu, "throughput_detail": detail,
            "dataplane_config": {"repetitions": reps, "iperf_seconds": seconds,
                                 "direction": "server2 -> server1 (iperf3 client on server2)",
                                 "p4_shape": "4 mappings: 4 iperf3 servers behind 4 listeners, "
                                             "4 concurrent iperf3 -P 1 clients, summed"}}


def teardown_paths(paths: Iterable[Any]) -> None:
    """Tear down every built path; one that fails is logged and the rest still go."""
    for path in paths:
        if path.teardown:
            try:
                path.teardown()
            except Exception as e:  # keep tearing down the rest
                logger.warning("teardown of %s: %s", path.name, e)
