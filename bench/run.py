"""`make bench`: throughput, small-message latency, setup latency and scale, side by side,
in one run on the test bed.

    python3 -m bench.run [--reps 5] [--seconds 5] [--cp-runs 20] [--lat-rounds 5000]
                         [--scale 100,250,500,1000]
                         [--only dataplane,latency,controlplane,scale,relaymodes,tokens,observe,
                                 tunnel] [--observe-n 1000] [--observe-window 30]
                         [--quick] [--reuse] [--keep] [--results DIR]

Boots its own two-host test bed (named ``tb-bench`` unless
SCISTREAM_TESTBED_NAME says otherwise, so it never touches another test
bed), measures, tears it down, and writes ``bench/results/latest.json``, a
dated copy ``bench/results/<UTC date-time>.json`` and ``latest.png``, and
prints a markdown table. ``--quick`` (short runs, small N, for development)
writes ``quick-latest.*`` instead, so it never replaces a real run's results.

Numbers are only comparable between runs on a quiet machine: the JSON records
the load average and any other test beds that were up (``machine.noisy``).
Nothing here asserts a time; the goals are reported, met or missed.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

RESULTS = Path(__file__).resolve().parent / "results"
SECTIONS = ("dataplane", "latency", "controlplane", "scale", "relaymodes", "tokens",
            "observe", "tunnel")
DEFAULT_TESTBED = "tb-bench"


def _parse_ns(text: str) -> List[int]:
    try:
        ns = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a list of numbers like 100,250") from None
    if not ns or any(n < 1 for n in ns):
        raise argparse.ArgumentTypeError("give positive endpoint counts, e.g. 100,250,500,1000")
    return ns


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5, help="data-plane repetitions (default 5)")
    p.add_argument("--seconds", type=float, default=5, help="iperf3 -t (default 5)")
    p.add_argument("--cp-runs", type=int, default=20, help="control-plane runs (default 20)")
    p.add_argument("--lat-rounds", type=int, default=5000,
                   help="timed round trips per latency run (default 5000)")
    p.add_argument("--scale", type=_parse_ns, default=[100, 250, 500, 1000],
                   help="endpoint counts (default 100,250,500,1000)")
    p.add_argument("--observe-n", type=int, default=1000,
                   help="idle endpoints for the observe section's scrape/RSS/CPU figures "
                        "(default 1000; --quick: 100). --only observe runs that section alone")
    p.add_argument("--observe-window", type=float, default=30.0,
                   help="seconds over which the daemon's CPU is measured (default 30)")
    p.add_argument("--only", default=",".join(SECTIONS),
                   help=f"comma-separated sections to run (default {','.join(SECTIONS)})")
    p.add_argument("--quick", action="store_true",
                   help="development run: 2 reps of 1 s, 5 control-plane runs, 1000 round "
                        "trips, N=20,50; "
                        "writes quick-latest.* (explicit options still win)")
    p.add_argument("--reuse", action="store_true",
                   help="attach to a running test bed of the same name instead of booting one")
    p.add_argument("--keep", action="store_true", help="leave the test bed up afterwards")
    p.add_argument("--results", type=Path, default=RESULTS, help=f"output dir (default {RESULTS})")
    p.add_argument("--no-plot", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        given = set(argv if argv is not None else sys.argv[1:])
        if "--reps" not in given:
            a.reps = 2
        if "--seconds" not in given:
            a.seconds = 1
        if "--cp-runs" not in given:
            a.cp_runs = 5
        if "--scale" not in given:
            a.scale = [20, 50]
        if "--observe-n" not in given:
            a.observe_n = 100
        if "--observe-window" not in given:
            a.observe_window = 10.0
        if "--lat-rounds" not in given:
            a.lat_rounds = 1000
    a.sections = [s for s in a.only.split(",") if s]
    bad = [s for s in a.sections if s not in SECTIONS]
    if bad:
        p.error(f"unknown section(s) {bad}: choose from {', '.join(SECTIONS)}")
    return a


def _noisy(machine: Dict[str, Any]) -> str:
    reasons = []
    others = sorted(set(machine.get("other_testbeds_start", []))
                    | set(machine.get("other_testbeds_end", [])))
    if others:
        reasons.append(f"other test beds were up ({', '.join(others)})")
    load = machine.get("loadavg_start") or [0.0]
    if load and load[0] > 1.0:
        reasons.append(f"load average {load[0]:.2f} at start")
    if reasons:
        return "; ".join(reasons) + ": numbers are not comparable, rerun on a quiet machine"
    return ""


def main(argv: Optional[List[str]] = None) -> int:
    a = parse_args(argv)
    # Before importing the test bed: its name is read at import time.
    os.environ.setdefault("SCISTREAM_TESTBED_NAME", DEFAULT_TESTBED)
    logging.basicConfig(level=logging.WARNING, format="bench: %(levelname)s: %(message)s")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

    from tests.testbed import Testbed

    from . import hosts, report
    from .machine import CpuSampler, loadavg, machine_info, other_testbeds

    name = os.environ["SCISTREAM_TESTBED_NAME"]
    if os.geteuid() != 0:
        print("bench: needs root (the test bed uses namespaces and cgroups)", file=sys.stderr)
        return 2

    def log(msg: str) -> None:
        print(msg, flush=True)

    results: Dict[str, Any] = {"schema": 1}
    machine = machine_info(name)
    sampler = CpuSampler()
    sampler.start()
    t_start = time.monotonic()
    results["config"] = {"reps": a.reps, "iperf_seconds": a.seconds, "cp_runs": a.cp_runs,
                         "lat_rounds": a.lat_rounds,
                         "scale_n": a.scale, "sections": a.sections, "quick": a.quick,
                         "observe_n": a.observe_n, "observe_window_s": a.observe_window,
                         "hosts": "relay_log_level info (negotiated suite logged per "
                                  "connection); daemon and CLI byte code precompiled "
                                  "(PYTHONPYCACHEPREFIX), as an installed package has; all "
                                  "measured work runs as units inside the hosts"}
    errors: Dict[str, str] = {}
    bed = Testbed()
    log(f"bench: test bed {name!r}: " + ("attaching" if a.reuse else "booting") + " ...")
    if not (a.reuse and bed.load()):
        bed.up()
    try:
        for h in bed.hosts.values():
            hosts.prepare(h)

        def section(name: str, module: str, message: str,
                    measure: Callable[[Any], Dict[str, Any]]) -> None:
            """Section ``name`` (bench/``module``.py) if asked for: imported only then;
            a failure while measuring is recorded and the other sections still run."""
            if name not in a.sections:
                return
            mod = importlib.import_module(f".{module}", __package__)
            log(f"bench: {message} ...")
            try:
                results.update(measure(mod))
            except Exception as e:
                errors[name] = f"{type(e).__name__}: {e}"
                traceback.print_exc()

        section("dataplane", "dataplane",
                f"data plane ({a.reps} × iperf3 -t {a.seconds:g}, P1 and P4)",
                lambda m: m.run(bed, a.reps, a.seconds, log=log))
        section("latency", "latency",
                f"small-message latency ({a.reps} × {a.lat_rounds} round trips)",
                lambda m: m.run(bed, a.reps, a.lat_rounds, log=log))
        section("controlplane", "controlplane",
                f"control plane ({a.cp_runs} runs of CLI and D-Bus)",
                lambda m: m.run(bed, a.cp_runs, log=log))
        section("scale", "scale", f"scale (N = {', '.join(map(str, a.scale))})",
                lambda m: m.run(bed, a.scale, log=log))
        section("relaymodes", "relaymodes",
                "relay listeners, socket units vs stunnel binding (before/after)",
                lambda m: m.run(bed, a.reps, a.seconds, a.cp_runs, log=log))
        section("tokens", "tokens", "bearer token checks (cached check, introspections per 100)",
                lambda m: m.run(bed, 2 if a.quick else 5, 1000 if a.quick else 10000, log=log))
        section("observe", "observe",
                f"observability (IP accounting on/off, {a.observe_n} endpoints: "
                "metrics scrape, RSS, CPU while watched)",
                lambda m: m.run(bed, a.reps, a.seconds, a.observe_n, a.observe_window, log=log))
        section("tunnel", "tunnelcmd", f"one-command tunnel ({a.cp_runs} runs, remote and mixed)",
                lambda m: m.run(bed, a.cp_runs, log=log))
    finally:
        if not a.keep:
            bed.down()
        elif bed.load():
            for h in bed.hosts.values():
                hosts.unprepare(h)
    machine["loadavg_end"] = loadavg()
    machine["other_testbeds_end"] = other_testbeds(name)
    machine["machine_cpu_during_run"] = sampler.stop()
    machine["duration_s"] = round(time.monotonic() - t_start, 1)
    machine["noisy"] = _noisy(machine)
    results["machine"] = machine
    results["goals"] = report.goals(results)
    if errors:
        results["errors"] = errors
    results["notes"] = _notes(results)

    # A run of some sections never replaces a whole run's latest.json.
    prefix = "quick-" if a.quick else (
        "" if set(a.sections) == set(SECTIONS) else "-".join(a.sections) + "-")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    written = report.write_json(results, a.results, prefix, stamp)
    print()
    print(report.markdown(results))
    if not a.no_plot:
        png = report.plot(results, a.results / f"{prefix}latest.png")
        if png:
            written.append(png)
        else:
            print("bench: matplotlib is missing (apt-get install python3-matplotlib): no figure",
                  file=sys.stderr)
    print("bench: wrote " + ", ".join(str(p) for p in written))
    return 1 if errors else 0


def _notes(results: Dict[str, Any]) -> List[str]:
    notes: List[str] = []
    d = (results.get("throughput_detail") or {}).get("upstream_config") or {}
    neg = d.get("negotiated") or ""
    if "NULL" in neg:
        notes.append(f"upstream_config negotiated '{neg}': no encryption, and an anonymous "
                     "(unauthenticated) key exchange when the suite is AECDH — its PSK is "
                     "not what protects the link")
    return notes


if __name__ == "__main__":
    sys.exit(main())
