"""Talking to the test bed hosts: in-host helper calls, a D-Bus driver, small file and unit ops.

Everything that sends traffic or times something runs *inside* a host
(nsenter), never in the machine's own network namespace.
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
from typing import Any, Dict, List, Optional, Sequence

from tests.testbed import Host, TestbedError

logger = logging.getLogger(__name__)

PYTHON = "/usr/bin/python3"
INHOST = "/run/testbed/src/bench/inhost.py"
BENCH_DIR = "/run/bench"  # per-host tmpfs (the host's private /run)
HOST_PATH = "/run/testbed/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Byte code of the working tree (mounted read-only) and of what it imports, written
#: once and then only read, as an installed (byte-compiled) package would be.
PYCACHE = f"{BENCH_DIR}/pycache"
PYCACHE_ENV = f"PYTHONPYCACHEPREFIX={PYCACHE}"
DAEMON_DROPIN = "/run/systemd/system/scistreamd.service.d/90-bench.conf"
# Measured work runs as a unit of the host's systemd, so it competes for CPU inside
# the host's cgroup like everything else there, not from the machine's root cgroup.
SYSTEMD_RUN = ["systemd-run", "--pipe", "--wait", "--quiet", "--collect",
               f"--setenv=PATH={HOST_PATH}", "--setenv=LANG=C.UTF-8"]


class BenchError(RuntimeError):
    pass


def inhost(host: Host, *args: str, timeout: float = 120, as_unit: bool = False) -> Any:
    """Run an inhost.py command in ``host``; returns its JSON output.

    ``as_unit``: run it as a transient unit of the host (for anything timed or
    CPU-heavy); otherwise straight from nsenter (cheap reads).
    """
    prefix = SYSTEMD_RUN if as_unit else []
    proc = host.run([*prefix, PYTHON, INHOST, *args], check=False, timeout=timeout)
    if proc.returncode != 0:
        raise BenchError(f"{host.name}: inhost.py {' '.join(args[:2])} exited "
                         f"{proc.returncode}: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout)


def timeit(host: Host, cmd: Sequence[str], timeout: float = 120,
           env: Sequence[str] = (PYCACHE_ENV,)) -> Dict[str, Any]:
    """Wall time of ``cmd`` from fork to exit, measured inside ``host``."""
    opts = [f"--env={e}" for e in env]
    return inhost(host, "timeit", *opts, "--", *cmd, timeout=timeout, as_unit=True)


def main_pid(host: Host, unit: str) -> int:
    out = host.run(["systemctl", "show", "-p", "MainPID", "--value", unit]).stdout.strip()
    pid = int(out or 0)
    if not pid:
        raise BenchError(f"{host.name}: {unit} has no main process (not running?)")
    return pid


def listening(host: Host, ports: Sequence[int]) -> bool:
    out = host.run(["ss", "-Htln"], check=False).stdout
    open_ports = set()
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 4:
            open_ports.add(fields[3].rsplit(":", 1)[-1])
    return all(str(p) in open_ports for p in ports)


def wait_listening(host: Host, ports: Sequence[int], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not listening(host, ports):
        if time.monotonic() > deadline:
            raise BenchError(f"{host.name}: ports {list(ports)} not listening after {timeout:g}s")
        time.sleep(0.05)


def run_unit(host: Host, unit: str, argv: Sequence[str], props: Sequence[str] = ()) -> None:
    """Start ``argv`` as transient unit ``unit`` in ``host`` (stopped first if it exists)."""
    stop_units(host, [unit])
    cmd = ["systemd-run", f"--unit={unit}", "--collect", "-p", "Type=exec"]
    for p in props:
        cmd += ["-p", p]
    host.run(cmd + ["--", *argv])


def stop_units(host: Host, units: Sequence[str]) -> None:
    if units:
        host.run(["systemctl", "stop", *units], check=False)
        host.run(["systemctl", "reset-failed", *units], check=False)


def journal_grep(host: Host, unit: str, needle: str) -> List[str]:
    out = host.run(["journalctl", "-u", unit, "--no-pager", "-o", "cat"], check=False).stdout
    return [ln for ln in out.splitlines() if needle in ln]


class DbusDriver:
    """A long-lived system-bus client inside a host; times method calls alone."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.proc = subprocess.Popen(host.nsenter() + [*SYSTEMD_RUN, PYTHON, INHOST,
                                                       "dbus-driver"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1)
        first = self._readline()
        if not first.get("ready"):
            raise BenchError(f"{host.name}: D-Bus driver did not start: {first}")

    def _readline(self) -> Dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise BenchError(f"{self.host.name}: D-Bus driver died: {err[-800:]}")
        return json.loads(line)

    def call(self, member: str, sig: str = "", body: Sequence[Any] = (),
             path: Optional[str] = None, iface: Optional[str] = None,
             dest: Optional[str] = None, discard: bool = False) -> Dict[str, Any]:
        """One call; ``discard``: only its time comes back, not the reply body."""
        req: Dict[str, Any] = {"member": member, "sig": sig, "body": list(body),
                               "discard": discard}
        if path:
            req["path"] = path
        if iface:
            req["iface"] = iface
        if dest:
            req["dest"] = dest
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._readline()

    def ok(self, member: str, sig: str = "", body: Sequence[Any] = ()) -> Dict[str, Any]:
        out = self.call(member, sig, body)
        if "error" in out:
            raise BenchError(f"{self.host.name}: {member} failed: {out['error']}: "
                             f"{out['message']}")
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


CONF_DROPIN = "/etc/scistream/conf.d/80-bench.toml"


def prepare(host: Host) -> None:
    """Set a host up for measuring; undone by :func:`unprepare`.

    - relays log at "info", which adds one line per connection naming the
      negotiated TLS suite (the hand-written pair logs at the same level);
    - the daemon and the CLI get byte code, as installing the package would:
      the test bed runs the working tree from a read-only mount with
      PYTHONDONTWRITEBYTECODE=1, so every start would compile every module.
    """
    host.write_file(CONF_DROPIN, "# written by bench/; removed when it ends\n"
                    'relay_log_level = "info"\n')
    host.run(["mkdir", "-p", PYCACHE])
    host.write_file(DAEMON_DROPIN, "[Service]\n"
                    f"Environment={PYCACHE_ENV} PYTHONDONTWRITEBYTECODE=\n"
                    f"ReadWritePaths={PYCACHE}\n")
    host.run(["systemctl", "daemon-reload"])
    host.run(["systemctl", "restart", "scistreamd"], timeout=120)
    ensure_up(host)
    # -u: a PYTHONDONTWRITEBYTECODE inherited from the caller would leave the cache empty.
    warm = ["env", "-u", "PYTHONDONTWRITEBYTECODE", "PYTHONPATH=/run/testbed/src",
            PYCACHE_ENV, PYTHON]
    # Every module of the package, as installing it byte-compiles them all (the CLI's
    # remote mode imports modules that neither the daemon nor 'list' does).
    host.run([*warm, "-m", "compileall", "-q", "/run/testbed/src/scistreamd"])
    host.run([*warm, "-m", "scistreamd.ctl", "--help"], check=False)
    host.run([*warm, "-m", "scistreamd.ctl", "list"], check=False)
    host.run([*warm, "-c", "import ast, json, scistreamd.ctl, scistreamd.model, "
              "jeepney, jeepney.auth"])
    host.run([*warm, "-c", "import scistreamd.daemon, scistreamd.manager, scistreamd.dbus_api, "
              "scistreamd.peerclient, scistreamd.peerserver, scistreamd.systemd, "
              "scistreamd.certs"], check=False)
    cached = host.run(["find", PYCACHE, "-name", "*.pyc"]).stdout.split()
    if not any("/scistreamd/" in c for c in cached) or not any("/asyncio/" in c for c in cached):
        raise BenchError(f"{host.name}: no byte code was written to {PYCACHE}: "
                         "CLI timings would include compiling every module")


def unprepare(host: Host) -> None:
    host.run(["rm", "-f", DAEMON_DROPIN, CONF_DROPIN], check=False)
    host.run(["systemctl", "daemon-reload"], check=False)
    host.run(["systemctl", "restart", "scistreamd"], check=False, timeout=120)


def ensure_up(host: Host) -> None:
    st = host.run(["systemctl", "is-active", "scistreamd"], check=False).stdout.strip()
    if st != "active":
        raise TestbedError(f"{host.name}: scistreamd is {st}")
