"""python3 -m tests.testbed up|down|status|exec HOST -- CMD...|journal HOST [ARGS]"""

from __future__ import annotations

import argparse
import subprocess
import sys

from .core import Testbed, TestbedError, leftovers


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m tests.testbed", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("up", help="boot server1 and server2 (cleans leftovers first)")
    sub.add_parser("down", help="stop both hosts; leaves nothing behind")
    sub.add_parser("status", help="what runs")
    sub.add_parser("leftovers", help="list anything a test bed left on this machine")
    ex = sub.add_parser("exec", help="run a command inside a host")
    ex.add_argument("host")
    ex.add_argument("command", nargs=argparse.REMAINDER)
    jo = sub.add_parser("journal", help="journalctl of a host (works after down too)")
    jo.add_argument("host")
    jo.add_argument("args", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    bed = Testbed()
    try:
        if a.cmd == "up":
            bed.up()
            print(bed.status())
        elif a.cmd == "down":
            bed.down()
            left = leftovers()
            print("\n".join(left) if left else "test bed is down; nothing left behind")
            return 1 if left else 0
        elif a.cmd == "status":
            print(bed.status())
        elif a.cmd == "leftovers":
            left = leftovers()
            print("\n".join(left) if left else "nothing")
            return 1 if left else 0
        elif a.cmd == "exec":
            cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
            if a.host not in bed.hosts or not cmd:
                p.error("usage: exec HOST -- CMD [ARGS...]; hosts: " + ", ".join(bed.hosts))
            bed.load()
            return subprocess.run(bed[a.host].nsenter() + cmd).returncode
        elif a.cmd == "journal":
            args = a.args[1:] if a.args[:1] == ["--"] else a.args
            sys.stdout.write(bed[a.host].journal(*args))
    except TestbedError as e:
        print(f"testbed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
