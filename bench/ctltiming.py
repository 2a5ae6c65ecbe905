"""scistreamctl before/after: the CLI of a git revision and of the working tree,
timed in one run on the test bed, call by call interleaved.

    SCISTREAM_TESTBED_NAME=tb-x python3 -m bench.ctltiming [--rev REV] [--runs N]

The revision's ``scistreamd/`` is exported to build/ctltiming-before/ (the bed
sees the working tree at /run/testbed/src); the daemon is the working tree's
for both. Inside server1, each round runs ``--version``, ``list`` and
``inbound-request`` (then an untimed ``release --all``) with each CLI, in
alternating order, with byte-code caches warmed, and a bare ``python3 -c pass``
per round (the CLI goal's yardstick). Prints p50/p90/min in ms, the ratios of
the p50s to the bare start's and the load average as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

REPO = Path(__file__).resolve().parents[1]
BEFORE = "build/ctltiming-before"
SRC = {"before": f"/run/testbed/src/{BEFORE}", "after": "/run/testbed/src"}


def _env(which: str) -> Dict[str, str]:
    env = dict(os.environ, PYTHONPATH=SRC[which], PYTHONPYCACHEPREFIX=f"/tmp/ctltiming-{which}")
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # installed packages are byte-compiled
    return env


def _ctl(which: str, *args: str) -> float:
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "scistreamd.ctl", *args], env=_env(which),
                         capture_output=True, text=True, cwd="/")
    ms = (time.perf_counter() - start) * 1000
    if res.returncode != 0:
        raise SystemExit(f"{which}: scistreamctl {' '.join(args)}: {res.stderr.strip()}")
    return ms


def in_host(runs: int, ip: str) -> Dict[str, Any]:
    """The measurement itself (runs inside a bed host)."""
    for which in SRC:  # each tree is the one meant, and its caches are warm
        probe = subprocess.run([sys.executable, "-c", "import scistreamd.ctl as c; "
                                "print(c.__file__)"], env=_env(which), capture_output=True,
                               text=True, cwd="/")
        assert probe.stdout.startswith(SRC[which] + "/"), (which, probe.stdout, probe.stderr)
        for _ in range(3):
            _ctl(which, "--version")
            _ctl(which, "list")
    times: Dict[str, Dict[str, List[float]]] = {}
    for i in range(runs):
        for which in ("before", "after") if i % 2 == 0 else ("after", "before"):
            for name, args in (("--version", ["--version"]), ("list", ["list"]),
                               ("inbound-request", ["inbound-request", "--remote_ip", ip,
                                                    "--receiver_ports", "5300"])):
                times.setdefault(name, {}).setdefault(which, []).append(_ctl(which, *args))
            _ctl(which, "release", "--all")
        # The goal's yardstick, in the same rounds: a bare interpreter start.
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True, cwd="/")
        times.setdefault("python3 -c pass", {}).setdefault("bare", []).append(
            (time.perf_counter() - start) * 1000)
    out: Dict[str, Any] = {
        name: {which: {"p50": round(statistics.median(v), 1),
                       "p90": round(sorted(v)[max(0, int(len(v) * 0.9) - 1)], 1),
                       "min": round(min(v), 1), "n": len(v)}
               for which, v in per.items()}
        for name, per in times.items()}
    bare = out["python3 -c pass"]["bare"]["p50"]
    out["ratio_to_bare_p50"] = {name: {which: round(st["p50"] / bare, 2)
                                       for which, st in out[name].items()}
                                for name in times if name != "python3 -c pass"}
    out["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", default="HEAD~1", help="git revision of the 'before' CLI")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--in-host", metavar="IP", help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.in_host:
        print(json.dumps(in_host(opts.runs, opts.in_host), indent=1))
        return 0
    from tests.testbed import Testbed

    dest = REPO / BEFORE
    subprocess.run(["rm", "-rf", str(dest)], check=True)
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", opts.rev, "scistreamd"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    bed = Testbed()
    bed.up()
    s1 = bed["server1"]
    out = s1.run(["env", "PYTHONPATH=/run/testbed/src", "/usr/bin/python3", "-m",
                  "bench.ctltiming", "--runs", str(opts.runs), "--in-host", s1.ip],
                 check=False, timeout=3600)
    sys.stdout.write(out.stdout)
    sys.stderr.write(out.stderr)
    return out.returncode


if __name__ == "__main__":
    sys.exit(main())
