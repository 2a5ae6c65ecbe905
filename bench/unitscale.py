"""Why relay starts slow down as relays accumulate: a systemd-only experiment.

    SCISTREAM_TESTBED_NAME=tb-bench python3 -m bench.unitscale [--fillers 0,200,400]
        [--variants relay,relay_private,no_credential] [--probes 5] [--reuse] [--keep]

In one host, K "filler" units run ``sleep infinity`` with the relay unit's
sandbox (scistreamd/relay_unit.py) and then a probe unit of the same kind is
started with ``systemd-run`` (Type=exec: it returns once the process is
executed, i.e. after systemd set up its namespace) and stopped, a few times.
Variants:

- ``relay``: the relay's properties, LoadCredential= included;
- ``relay_private``: the same plus MountFlags=private (mounts made on the host
  later, e.g. other units' /run/credentials/*, no longer propagate into it);
- ``no_credential``: the relay's properties without LoadCredential=;
- ``bind_key``: no LoadCredential=; instead the key directory (root-only on
  the host) is hidden by TemporaryFileSystem= and only the relay's own
  subdirectory is bind-mounted back, readable through a static supplementary
  group: the mounts exist only inside the unit's namespace.

The daemon is not involved: this isolates what systemd does per start.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Dict, List

SANDBOX = [
    "DynamicUser=yes", "NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes",
    "PrivateTmp=yes", "PrivateDevices=yes", "ProtectKernelTunables=yes",
    "ProtectKernelModules=yes", "ProtectKernelLogs=yes", "ProtectControlGroups=yes",
    "ProtectClock=yes", "ProtectHostname=yes", "RestrictNamespaces=yes", "RestrictRealtime=yes",
    "RestrictSUIDSGID=yes", "LockPersonality=yes", "MemoryDenyWriteExecute=yes",
    "CapabilityBoundingSet=", "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX", "UMask=0077",
    "TasksMax=64", "MemoryMax=256M",
]
CRED = "/run/bench/unitscale.cred"
KEYS = "/var/lib/bench-keys"
VARIANTS: Dict[str, List[str]] = {
    "relay": SANDBOX + [f"LoadCredential=psk:{CRED}"],
    "relay_private": SANDBOX + [f"LoadCredential=psk:{CRED}", "MountFlags=private"],
    "no_credential": SANDBOX,
    "bind_key": SANDBOX + ["SupplementaryGroups=scistream-relay",
                           f"TemporaryFileSystem={KEYS}:ro", f"BindReadOnlyPaths={KEYS}/probe"],
}


def main(argv: List[str] | None = None) -> int:
    os.environ.setdefault("SCISTREAM_TESTBED_NAME", "tb-bench")
    p = argparse.ArgumentParser(prog="python3 -m bench.unitscale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fillers", default="0,200,400")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--probes", type=int, default=5)
    p.add_argument("--reuse", action="store_true")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--out", default="")
    a = p.parse_args(argv)

    from tests.testbed import Testbed

    from . import hosts as H
    from .stats import summary

    ks = sorted(int(k) for k in a.fillers.split(","))
    names = [v for v in a.variants.split(",") if v]
    bed = Testbed()
    if not (a.reuse and bed.load()):
        bed.up()
    s1 = bed["server1"]
    result: Dict[str, Any] = {"fillers": ks, "probes": a.probes, "variants": {}}
    try:
        s1.write_file(CRED, "not a secret\n", "0600")
        s1.run(["sh", "-c", f"mkdir -p -m 0700 {KEYS} && mkdir -p -m 0750 {KEYS}/probe && "
                f"echo 'not a secret' > {KEYS}/probe/psk && chmod 0440 {KEYS}/probe/psk && "
                f"chgrp -R scistream-relay {KEYS}/probe"])
        for v in names:
            props = VARIANTS[v]
            opts = [x for prop in props for x in ("-p", prop)]
            fillers = 0
            rows = []
            for k in ks:
                while fillers < k:
                    s1.run(["systemd-run", f"--unit=bench-fill-{fillers}", "--quiet",
                            "-p", "Type=exec", *opts, "/bin/sleep", "infinity"])
                    fillers += 1
                starts = []
                for i in range(a.probes):
                    r = H.timeit(s1, ["systemd-run", f"--unit=bench-probe-{i}", "--quiet",
                                      "-p", "Type=exec", *opts, "/bin/sleep", "infinity"],
                                 env=())
                    if r["rc"] != 0:
                        raise H.BenchError(f"probe failed: {r['stderr']}")
                    starts.append(r["ms"])
                    s1.run(["systemctl", "stop", f"bench-probe-{i}"])
                mounts = int(s1.run(["sh", "-c", "wc -l < /proc/self/mountinfo"]).stdout)
                row = {"k": k, "start_ms": summary(starts, digits=1), "host_mounts": mounts}
                rows.append(row)
                print(f"{v:14} K={k:4}: start {statistics.median(starts):7.1f} ms "
                      f"(host mount table {mounts} entries)", flush=True)
            result["variants"][v] = {"properties": props, "rows": rows}
            t0 = time.monotonic()
            s1.run(["sh", "-c", "systemctl stop 'bench-fill-*' 'bench-probe-*'"], timeout=600)
            print(f"{v:14} stopping {fillers} fillers took {time.monotonic() - t0:.1f} s",
                  flush=True)
        if a.out:
            with open(a.out, "w") as f:
                json.dump(result, f, indent=2)
        return 0
    finally:
        s1.run(["sh", "-c", "systemctl stop 'bench-fill-*' 'bench-probe-*'"], check=False,
               timeout=600)
        if not a.keep:
            bed.down()


if __name__ == "__main__":
    sys.exit(main())
