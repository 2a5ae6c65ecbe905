"""Relay tuning experiments: stunnel pairs that differ in one setting, measured interleaved.

    SCISTREAM_TESTBED_NAME=tb-bench python3 -m bench.explore [--reps 5] [--seconds 5]
        [--variants base,nodelay0,...] [--with-scistreamd] [--reuse] [--keep]

Every variant is the hand-written TLS 1.3 AES-128-GCM PSK pair of the main
benchmark plus the extra per-service lines below, on both sides, or (the
UNIT_VARIANTS) that pair run with some of the relay units' sandbox properties. The result
(median Gbit/s and relay CPU s/GB, P1 and P4) is the evidence for a change of
what scistreamd/relay.py renders; nothing here changes the product.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Tuple

from .unitscale import SANDBOX

#: name -> (TLS 1.3 suites, extra lines in every service section on both sides)
AES128 = "TLS_AES_128_GCM_SHA256"
VARIANTS: Dict[str, Tuple[str, List[str]]] = {
    "base": (AES128, []),
    # stunnel's own default is TCP_NODELAY=yes on both sockets (see stunnel4 -sockets).
    "nodelay0": (AES128, ["socket = l:TCP_NODELAY=0", "socket = r:TCP_NODELAY=0"]),
    "nodelay0_remote": (AES128, ["socket = r:TCP_NODELAY=0"]),
    "bufs4m": (AES128, ["socket = l:SO_SNDBUF=4194304", "socket = l:SO_RCVBUF=4194304",
                        "socket = r:SO_SNDBUF=4194304", "socket = r:SO_RCVBUF=4194304"]),
    "sndbuf1m": (AES128, ["socket = l:SO_SNDBUF=1048576", "socket = r:SO_SNDBUF=1048576"]),
    "chacha": ("TLS_CHACHA20_POLY1305_SHA256", []),
    "aes256": ("TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256", []),
    # what scistreamd renders today: three suites, AES-128 first, explicit TCP_NODELAY
    "product_lines": ("TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:"
                      "TLS_CHACHA20_POLY1305_SHA256",
                      ["socket = l:TCP_NODELAY=1", "socket = r:TCP_NODELAY=1"]),
}
#: name -> unit properties of the relay units (the base pair's config): what the
#: sandbox of scistreamd's relay units costs, piece by piece.
SECCOMP_PROPS = ["MemoryDenyWriteExecute=yes", "RestrictNamespaces=yes", "RestrictRealtime=yes",
                 "RestrictSUIDSGID=yes", "LockPersonality=yes",
                 "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX"]
UNIT_VARIANTS: Dict[str, List[str]] = {
    "sandbox": SANDBOX,
    "memmax": ["MemoryMax=256M"],
    "seccomp": SECCOMP_PROPS,
    "dynamicuser": ["DynamicUser=yes"],
    # Scheduling: what the relay unit could ask of the CPU scheduler on a host
    # whose cores are shared with the applications (as on the 2-core test bed).
    "sched_batch": ["CPUSchedulingPolicy=batch"],
    "nice_minus5": ["Nice=-5"],
    "batch_nice_minus5": ["CPUSchedulingPolicy=batch", "Nice=-5"],
}


def main(argv: List[str] | None = None) -> int:
    os.environ.setdefault("SCISTREAM_TESTBED_NAME", "tb-bench")
    p = argparse.ArgumentParser(prog="python3 -m bench.explore", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--variants", default="base,nodelay0,bufs4m")
    p.add_argument("--with-scistreamd", action="store_true",
                   help="also measure a scistreamctl tunnel (the product's rendering + sandbox)")
    p.add_argument("--reuse", action="store_true", help="attach to a running test bed")
    p.add_argument("--keep", action="store_true", help="leave the test bed up")
    p.add_argument("--out", default="", help="write the JSON result here too")
    a = p.parse_args(argv)

    from tests.testbed import Testbed

    from . import dataplane as D
    from .machine import CpuSampler, machine_info
    from .stats import summary

    names = [v for v in a.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS and v not in UNIT_VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}: choose from "
                f"{', '.join([*VARIANTS, *UNIT_VARIANTS])}")
    bed = Testbed()
    if not (a.reuse and bed.load()):
        bed.up()
    sampler = CpuSampler()
    sampler.start()
    info = machine_info(os.environ["SCISTREAM_TESTBED_NAME"])
    paths: Dict[str, D.RelayPath] = {}
    try:
        for h in bed.hosts.values():
            D.H.prepare(h)
        D.setup_iperf_servers(bed["server1"])
        for i, v in enumerate(names):
            suites, extra = VARIANTS.get(v, VARIANTS["base"])
            paths[v] = D.setup_stunnel_pair(bed, base=6300 + 10 * i, name=f"x_{v}",
                                            extra_section=extra, suites=suites,
                                            unit_props=UNIT_VARIANTS.get(v, ()))
        if a.with_scistreamd:
            paths["scistreamd"] = D.setup_scistreamd(bed)
        samples: Dict[str, Dict[int, List[Dict[str, Any]]]] = {
            n: {1: [], 4: []} for n in paths}
        order = list(paths)
        for rep in range(a.reps):
            rot = order[rep % len(order):] + order[:rep % len(order)]
            for pp in (1, 4):
                for n in rot:
                    r = D.measure_once(bed, paths[n], pp, a.seconds)
                    samples[n][pp].append(r)
                    print(f"rep {rep + 1} P{pp} {n:16} {r.get('gbps') or 0:6.2f} Gbit/s "
                          f"{r.get('cpu_s_per_gb') or 0:5.2f} s/GB", flush=True)
        result: Dict[str, Any] = {"machine": info, "load": sampler.stop(),
                                  "reps": a.reps, "seconds": a.seconds, "variants": {}}
        print("\n| variant | suites; extra lines | P1 Gbit/s | P4 Gbit/s | P1 s/GB | P4 s/GB |")
        print("|---|---|---|---|---|---|")
        for n in paths:
            suites, extra = VARIANTS.get(n, ("(scistreamd's)", ["(scistreamctl tunnel)"]))
            if n in UNIT_VARIANTS:
                suites, extra = AES128, [f"unit: {' '.join(UNIT_VARIANTS[n])}"]
            row: Dict[str, Any] = {"suites": suites, "extra": extra}
            for pp in (1, 4):
                row[f"p{pp}"] = summary([r["gbps"] for r in samples[n][pp] if r.get("gbps")])
                row[f"p{pp}_cpu_s_per_gb"] = summary(
                    [r["cpu_s_per_gb"] for r in samples[n][pp] if r.get("cpu_s_per_gb")])
            result["variants"][n] = row

            def fmt(s: Any) -> str:
                return f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})" if s else "-"
            print(f"| {n} | {suites}; {'; '.join(extra) or '-'} | {fmt(row['p1'])} | "
                  f"{fmt(row['p4'])} | {fmt(row['p1_cpu_s_per_gb'])} | "
                  f"{fmt(row['p4_cpu_s_per_gb'])} |")
        if a.out:
            with open(a.out, "w") as f:
                json.dump(result, f, indent=2)
        return 0
    finally:
        for path in paths.values():
            if path.teardown:
                path.teardown()
            for h, units in path.units.items():
                if path.name != "scistreamd":
                    D.H.stop_units(bed[h], units)
        D.H.stop_units(bed["server1"], [f"bench-iperf-{x}.service" for x in D.IPERF_PORTS])
        if not a.keep:
            bed.down()
        else:
            for h in bed.hosts.values():
                D.H.unprepare(h)



if __name__ == "__main__":
    sys.exit(main())
