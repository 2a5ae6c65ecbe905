"""`make demo`: the APS tunnel set-up guide, end to end, on two emulated hosts.

server1 (192.168.150.1) runs the server application (iperf3 -s -p 5300) and
the inbound endpoint; server2 (192.168.150.2) the outbound endpoint, where
the client application (iperf3 -c) connects. Every command is printed with
its output, as an operator would type it.
"""

from __future__ import annotations

import shlex
import sys
from typing import List

from tests.testbed import Host, Testbed, TestbedError, leftovers

BOLD = "\033[1m" if sys.stdout.isatty() else ""
RESET = "\033[0m" if sys.stdout.isatty() else ""


def step(host: Host, cmd: List[str], check: bool = True) -> str:
    print(f"\n{BOLD}[{host.name}]$ {shlex.join(cmd)}{RESET}", flush=True)
    proc = host.run(cmd, check=False, timeout=120)
    out = (proc.stdout + proc.stderr).rstrip()
    if out:
        print(out, flush=True)
    if check and proc.returncode != 0:
        raise TestbedError(f"{cmd[0]} exited {proc.returncode}")
    return proc.stdout


def main() -> int:
    bed = Testbed()
    print("Booting the test bed: server1 = 192.168.150.1, server2 = 192.168.150.2 ...",
          flush=True)
    bed.up()
    s1, s2 = bed["server1"], bed["server2"]
    try:
        print(bed.status())
        step(s1, ["systemctl", "--no-pager", "status", "scistreamd"])
        # The server application, as a unit so it outlives this command.
        step(s1, ["systemd-run", "--unit=iperf3-server", "-p", "DynamicUser=yes",
                  "iperf3", "-s", "-p", "5300"])

        out = step(s1, ["scistreamctl", "inbound-request", "--remote_ip", "192.168.150.1",
                        "--s2cs", "192.168.150.1:5000", "--receiver_ports", "5300",
                        "--num_conn", "1", "--server_cert=/etc/scistream/server.crt"])
        uid = out.splitlines()[1].split()[0]
        listener = out.splitlines()[2].split("'")[1]

        step(s2, ["scistreamctl", "outbound-request", "--remote_ip", "192.168.150.1",
                  "--s2cs", "192.168.150.2:5000", "--receiver_ports", "5100", "--num_conn", "1",
                  "--server_cert=/etc/scistream/peer-ca.crt", uid, listener])

        step(s1, ["ss", "-tlpn"])
        step(s2, ["ss", "-tlpn"])
        step(s2, ["iperf3", "-c", "192.168.150.2", "-p", "5100", "-t", "5"])

        step(s1, ["scistreamctl", "status", uid])
        step(s1, ["scistreamctl", "logs", uid, "-n", "8"])
        step(s1, ["scistreamctl", "release", uid])
        step(s2, ["scistreamctl", "release", uid])
        for host in (s1, s2):
            step(host, ["scistreamctl", "list"])
            step(host, ["systemctl", "list-units", "--no-pager", "--all", "scistream-*"])
        step(s1, ["systemctl", "stop", "iperf3-server"])
        print("\nDemo complete: the tunnel carried iperf3 traffic and was released on both "
              "sides.")
        return 0
    except TestbedError as e:
        print(f"\ndemo failed: {e}", file=sys.stderr)
        for host in (s1, s2):
            print(f"--- journal of {host.name}", file=sys.stderr)
            print(host.journal("-n", "40"), file=sys.stderr)
        return 1
    finally:
        bed.down()
        left = leftovers()
        print("Test bed stopped; nothing left behind." if not left else
              "Left behind: " + "; ".join(left))


if __name__ == "__main__":
    sys.exit(main())
