"""Control plane: how long a tunnel takes to set up and release.

Two views of the same three operations, interleaved run by run:

- CLI: the guide's commands (``scistreamctl inbound-request ...`` on server1,
  ``outbound-request ...`` on server2, ``release UID`` on both), wall time from
  fork to exit, measured inside the host;
- D-Bus: the same calls (InboundRequest, OutboundRequest with the same
  trust_pem the CLI sends, Release) from a long-lived client in each host that
  is connected already; only the method call is timed.

``release`` is the inbound side's release (server1); the outbound side's is
reported as ``release_outbound``. When a goal is missed, the start-up cost of
the CLI is broken down: bare interpreter start, ``scistreamctl --version``
(argparse + the package, no D-Bus) and ``python3 -X importtime``.
"""

from __future__ import annotations

import ast
import logging
from typing import Any, Callable, Dict, List, Tuple

from tests.testbed import Host, Testbed

from . import hosts as H
from .stats import summary

logger = logging.getLogger(__name__)

S1_IP = "192.168.150.1"
S2_IP = "192.168.150.2"
OPS = ("inbound", "outbound", "release", "release_outbound")
CLI_ENV = ["PYTHONPATH=/run/testbed/src", "PYTHONDONTWRITEBYTECODE=1", H.PYCACHE_ENV]


def _parse_request_output(text: str) -> Tuple[str, List[str]]:
    """uid and listeners from the three lines s2uc (and scistreamctl) print."""
    lines = text.splitlines()
    uid = lines[1].split()[0]
    listeners = ast.literal_eval(lines[2].split(":", 1)[1].strip())
    return uid, list(listeners)


def _cli_ok(host: Host, cmd: List[str]) -> Dict[str, Any]:
    r = H.timeit(host, cmd)
    if r["rc"] != 0:
        raise H.BenchError(f"{host.name}: {' '.join(cmd)} exited {r['rc']}: {r['stderr']}")
    return r


def cli_round(s1: Host, s2: Host) -> Dict[str, float]:
    inbound = _cli_ok(s1, ["scistreamctl", "inbound-request", "--remote_ip", S1_IP,
                           "--s2cs", f"{S1_IP}:5000", "--receiver_ports", "5300",
                           "--num_conn", "1", "--server_cert=/etc/scistream/server.crt"])
    uid, listeners = _parse_request_output(inbound["stdout"])
    outbound = _cli_ok(s2, ["scistreamctl", "outbound-request", "--remote_ip", S1_IP,
                            "--s2cs", f"{S2_IP}:5000", "--num_conn", "1",
                            "--server_cert=/etc/scistream/peer-ca.crt", uid, *listeners])
    rel_out = _cli_ok(s2, ["scistreamctl", "release", uid])
    rel_in = _cli_ok(s1, ["scistreamctl", "release", uid])
    return {"inbound": inbound["ms"], "outbound": outbound["ms"], "release": rel_in["ms"],
            "release_outbound": rel_out["ms"]}


def dbus_round(d1: H.DbusDriver, d2: H.DbusDriver, trust_pem: str) -> Dict[str, float]:
    inbound = d1.ok("InboundRequest", "saqua{sv}", [S1_IP, [5300], 1, {}])
    uid, _path, listeners = inbound["reply"]
    outbound = d2.ok("OutboundRequest", "sasaqua{sv}",
                     [uid, listeners, [], 1, {"trust_pem": ["s", trust_pem]}])
    rel_out = d2.ok("Release", "s", [uid])
    rel_in = d1.ok("Release", "s", [uid])
    return {"inbound": inbound["ms"], "outbound": outbound["ms"], "release": rel_in["ms"],
            "release_outbound": rel_out["ms"]}


def cli_breakdown(host: Host, runs: int = 10) -> Dict[str, Any]:
    """Where a CLI call's time goes before any D-Bus traffic."""
    bare = [H.timeit(host, ["/usr/bin/python3", "-c", "pass"])["ms"] for _ in range(runs)]
    bare_isolated = [H.timeit(host, ["/usr/bin/python3", "-I", "-S", "-c", "pass"])["ms"]
                     for _ in range(runs)]
    version = [_cli_ok(host, ["scistreamctl", "--version"])["ms"] for _ in range(runs)]
    # The test bed's read-only source without byte code: what every start would cost
    # if the package were not byte-compiled.
    version_src = [H.timeit(host, ["scistreamctl", "--version"], env=())["ms"]
                   for _ in range(runs)]
    bus_import = [H.timeit(host, ["env", *CLI_ENV, "/usr/bin/python3", "-c",
                                  "import scistreamd.ctl, scistreamd.values, "
                                  "jeepney, jeepney.auth"])["ms"]
                  for _ in range(runs)]
    list_cli = [_cli_ok(host, ["scistreamctl", "list"])["ms"] for _ in range(runs)]
    imp = host.run([*H.SYSTEMD_RUN, "env", *CLI_ENV, "/usr/bin/python3", "-X", "importtime",
                    "-m", "scistreamd.ctl", "list"], check=False)
    top = _top_imports(imp.stderr)
    return {
        "python_bare_ms": summary(bare),
        "python_isolated_no_site_ms": summary(bare_isolated),
        "ctl_version_ms": summary(version),
        "ctl_version_from_source_ms": summary(version_src),
        "ctl_import_plus_busclient_ms": summary(bus_import),
        "ctl_list_ms": summary(list_cli),
        "importtime_top": top,
    }


def systemd_floor(host: Host, runs: int = 10) -> Dict[str, Any]:
    """A stunnel PSK server started with systemd-run until it listens, and stopped.

    What any relay manager on systemd pays per relay: the part of a request the
    daemon cannot make faster.
    """
    import secrets

    port = 6900
    host.write_file(f"{H.BENCH_DIR}/floor.psk", f"bench:{secrets.token_hex(32)}\n", "0600")
    host.write_file(f"{H.BENCH_DIR}/floor.conf", "\n".join([
        "foreground = yes", "pid =", "syslog = no", "", "[floor]",
        f"accept = {S1_IP}:{port}", f"connect = {S1_IP}:5300", "sslVersionMin = TLSv1.3",
        f"PSKsecrets = {H.BENCH_DIR}/floor.psk"]) + "\n")
    r = H.inhost(host, "unit-latency", f"{H.BENCH_DIR}/floor.conf", str(port), "-n", str(runs),
                 as_unit=True)
    return {"start_to_listen_ms": summary(r["start_to_listen_ms"], digits=1),
            "stop_ms": summary(r["stop_ms"], digits=1)}


def _top_imports(text: str, n: int = 12) -> List[Dict[str, Any]]:
    """Top-level imports by cumulative time from ``-X importtime`` output."""
    rows = []
    for line in text.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        try:
            _self, cum, name = line[len("import time:"):].split("|", 2)
            depth = (len(name) - len(name.lstrip())) // 2
            rows.append({"module": name.strip(), "cumulative_ms": int(cum) / 1000,
                         "depth": depth})
        except ValueError:
            continue
    tops = [r for r in rows if r["depth"] == 0]
    tops.sort(key=lambda r: -r["cumulative_ms"])
    return [{"module": r["module"], "cumulative_ms": round(r["cumulative_ms"], 1)}
            for r in tops[:n]]


def run(bed: Testbed, runs: int, warmup: int = 2,
        log: Callable[[str], None] = print) -> Dict[str, Any]:
    s1, s2 = bed["server1"], bed["server2"]
    trust_pem = s2.run(["cat", "/etc/scistream/peer-ca.crt"]).stdout
    d1, d2 = H.DbusDriver(s1), H.DbusDriver(s2)
    cli: Dict[str, List[float]] = {op: [] for op in OPS}
    dbus: Dict[str, List[float]] = {op: [] for op in OPS}
    try:
        for i in range(warmup + runs):
            # Alternate which goes first, so neither always meets a freshly idle daemon.
            order = (("cli", "dbus") if i % 2 == 0 else ("dbus", "cli"))
            for kind in order:
                r = cli_round(s1, s2) if kind == "cli" else dbus_round(d1, d2, trust_pem)
                if i >= warmup:
                    for op in OPS:
                        (cli if kind == "cli" else dbus)[op].append(r[op])
            if i >= warmup and (i - warmup + 1) % 5 == 0:
                log(f"  control plane: {i - warmup + 1}/{runs} rounds")
        breakdown = cli_breakdown(s1)
        floor = systemd_floor(s1)
    finally:
        d1.close()
        d2.close()

    def pick(samples: Dict[str, List[float]]) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for op, vals in samples.items():
            s = summary(vals, digits=1)
            out[op] = s
        return out

    return {"setup_ms": pick(cli), "dbus_ms": pick(dbus), "cli_breakdown": breakdown,
            "systemd_floor_ms": floor,
            "controlplane_config": {"runs": runs, "warmup_discarded": warmup,
                                    "cli": "guide commands, timed fork->exit inside the host",
                                    "dbus": "long-lived client per host, method call only"}}
