"""The one-command tunnel before/after: a git revision's daemons and CLI against the
working tree's, in one run on the test bed, in alternating blocks.

    SCISTREAM_TESTBED_NAME=tb-x python3 -m bench.tunnelab [--rev REV] [--blocks N] [--block K]

The revision's ``scistreamd/`` is exported to build/tunnelab-before/, and the
working tree's copied to build/tunnelab-after/ (so editing goes on while it
runs; the bed sees the working tree at /run/testbed/src). Each block switches both daemons
to one tree (a drop-in with its PYTHONPATH, then a restart), discards one
warm-up round and times K rounds of each view of bench/tunnelcmd.py that
needs no daemon on the machine itself:

- ``cli_remote``: ``scistreamctl tunnel --remote`` from server2, both halves
  through the user API with a client certificate;
- ``token_warm``: the same as root without ``--remote``: server2 over D-Bus,
  server1 with a bearer token whose introspection is cached (tests/oauthbed.py);
- ``library``: userclient.UserClient in one process (the daemons' share alone).

``--cli-only``: the daemons stay the working tree's and only the CLI alternates,
round by round (no restarts between): the client side's changes alone, finer.

The CLI of each view is the block's tree too (byte code cached, as installed).
Blocks alternate which tree goes first. Prints p50/p95/min per view and tree
as JSON; ``--out FILE`` writes it with the samples and the load average.
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

from tests.testbed import Host, Testbed

from . import hosts as H
from . import tunnelcmd as T
from .stats import summary

REPO = Path(__file__).resolve().parents[1]
BEFORE, AFTER = "build/tunnelab-before", "build/tunnelab-after"
SRC = {"before": f"/run/testbed/src/{BEFORE}", "after": f"/run/testbed/src/{AFTER}"}
#: Drop-ins apply in the order of their file names, whatever their directory: this
#: one must sort after the test bed's own "testbed.conf", whose Environment=PYTHONPATH
#: (the working tree) otherwise wins and both "trees" run the working tree's daemons.
DROPIN = "/run/systemd/system/scistreamd.service.d/zz-tunnelab.conf"


def _cli(which: str) -> List[str]:
    return ["env", f"PYTHONPATH={SRC[which]}", "PYTHONDONTWRITEBYTECODE=1", H.PYTHON, "-m",
            "scistreamd.ctl"]


def _use(bed: Testbed, which: str) -> None:
    """Both daemons run ``which``'s tree."""
    for host in (bed["server1"], bed["server2"]):
        host.write_file(DROPIN, f"[Service]\nEnvironment=PYTHONPATH={SRC[which]}\n")
        host.run(["systemctl", "daemon-reload"])
        host.run(["systemctl", "restart", "scistreamd"], timeout=120)
        H.ensure_up(host)
        # The CLI's byte code of this tree (the daemon's is written as it starts).
        host.run(["env", "-u", "PYTHONDONTWRITEBYTECODE", f"PYTHONPATH={SRC[which]}",
                  H.PYCACHE_ENV, H.PYTHON, "-c", "import scistreamd.ctl.cli, scistreamd.ctl."
                  "args, scistreamd.ctl.verbs, scistreamd.ctl.remote, scistreamd.ctl.bus, "
                  "scistreamd.userclient, scistreamd.ctl.credentials, scistreamd.ctl.output, "
                  "scistreamd.ctl.plans, jeepney, jeepney.io.blocking"], check=False)


def _tunnel(s2: Host, which: str, extra: List[str]) -> float:
    r = H.timeit(s2, [*_cli(which), "tunnel", *T.BOTH, "--remote_ip", T.S1_IP,
                      "--receiver_ports", "5300", *extra])
    if r["rc"] != 0:
        raise H.BenchError(f"{which}: tunnel exited {r['rc']}: {r['stderr']}")
    uid = r["stdout"].splitlines()[1].split()[0]
    rel = s2.run([*_cli(which), "release", uid, *T.BOTH, *extra], check=False)
    if rel.returncode != 0:
        raise H.BenchError(f"{which}: release exited {rel.returncode}: {rel.stderr}")
    return r["ms"]


def _library(s2: Host, which: str, rounds: int) -> List[float]:
    out = s2.run([*H.SYSTEMD_RUN, "env", f"PYTHONPATH={SRC[which]}", H.PYCACHE_ENV, H.PYTHON,
                  "-c", T.LIBRARY, T.DIR, str(rounds + 1)], timeout=600)
    return json.loads(out.stdout)["tunnel"][1:]


def run(bed: Testbed, blocks: int, block: int, log: Any = print,
        cli_only: bool = False) -> Dict[str, Any]:
    s1, s2 = bed["server1"], bed["server2"]
    for host in (s1, s2):
        H.prepare(host)
    T._setup(s1, s2)
    driver, oauth = T._token_setup(bed)
    samples: Dict[str, Dict[str, List[float]]] = {}
    try:
        token = oauth.issue()
        s2.write_file(f"{T.DIR}/token", token, "0600")
        views = {"cli_remote": ["--remote", *T.IDENT],
                 "token_warm": ["--token-file", f"{T.DIR}/token", "--server_cert", T.PEER_CA]}
        if cli_only:  # the working tree's daemons; both trees' byte code cached
            _use(bed, "before")
            _use(bed, "after")
        for b in range(blocks):
            for which in ("before", "after") if b % 2 == 0 else ("after", "before"):
                if not cli_only:
                    _use(bed, which)
                for extra in views.values():
                    _tunnel(s2, which, extra)  # warm-up: connections, caches, token
                for i in range(block):
                    order = list(views.items())
                    for name, extra in order[i % 2:] + order[:i % 2]:
                        samples.setdefault(name, {}).setdefault(which, []).append(
                            _tunnel(s2, which, extra))
                if not cli_only:
                    samples.setdefault("library", {}).setdefault(which, []).extend(
                        _library(s2, which, block))
            log(f"  tunnelab: block {b + 1}/{blocks}")
    finally:
        for host in (s1, s2):
            host.run(["rm", "-f", DROPIN], check=False)
            host.run(["systemctl", "daemon-reload"], check=False)
        driver.close()
        oauth.remove()
        T._teardown(s1, s2)
        for host in (s1, s2):
            H.unprepare(host)
    return {"tunnelab_ms": {name: {which: summary(v, digits=1) for which, v in per.items()}
                            for name, per in samples.items()},
            "tunnelab_paired_ms": {name: paired(per["before"], per["after"], block)
                                   for name, per in samples.items()},
            "tunnelab_config": {"blocks": blocks, "block": block,
                                "loadavg": os.getloadavg()}}


def paired(before: List[float], after: List[float], block: int) -> Dict[str, Any]:
    """after - before, block by block (the two blocks of a pair ran back to back, so a
    change of the machine's load between pairs cancels out): the median of the
    per-pair differences of medians, and in how many pairs "after" was faster."""
    diffs = [statistics.median(after[i:i + block]) - statistics.median(before[i:i + block])
             for i in range(0, min(len(before), len(after)), block)]
    return {"median_diff": round(statistics.median(diffs), 1) if diffs else None,
            "after_faster": sum(d < 0 for d in diffs), "pairs": len(diffs)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", default="HEAD", help="git revision of 'before' (default HEAD)")
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--block", type=int, default=5, help="rounds per block")
    ap.add_argument("--out", help="write the result (with samples) to this JSON file")
    ap.add_argument("--cli-only", action="store_true",
                    help="both trees' CLIs against the working tree's daemons (no restarts: "
                    "finer interleaving, the daemons' share left out)")
    opts = ap.parse_args()
    for tree in (BEFORE, AFTER):
        subprocess.run(["rm", "-rf", str(REPO / tree)], check=True)
        (REPO / tree).mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", opts.rev, "scistreamd"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(REPO / BEFORE)], input=archive, check=True)
    subprocess.run(["cp", "-r", str(REPO / "scistreamd"), str(REPO / AFTER)], check=True)
    subprocess.run(["find", str(REPO / AFTER), "-name", "__pycache__", "-prune", "-exec",
                    "rm", "-rf", "{}", "+"], check=True)
    bed = Testbed()
    if not bed.load():
        bed.up()
    started = time.time()
    result = run(bed, opts.blocks, opts.block, cli_only=opts.cli_only)
    result["tunnelab_config"].update(rev=opts.rev, seconds=round(time.time() - started))
    short = {name: {which: {k: s[k] for k in ("p50", "p95", "min", "n")}
                    for which, s in per.items()}
             for name, per in result["tunnelab_ms"].items()}
    print(json.dumps({"ms": short, "paired": result["tunnelab_paired_ms"],
                      "config": result["tunnelab_config"]}, indent=1))
    if opts.out:
        Path(opts.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
