"""One command for both ends: ``scistreamctl tunnel`` from server2 naming both daemons.

Three views, interleaved run by run (release of both ends after each, timed too):

- ``cli_remote``: ``scistreamctl tunnel --remote ...``: both halves through the
  user API (HTTPS, a client-certificate identity), wall time fork -> exit inside
  server2, as a workflow host would run it;
- ``cli_mixed``: the same as root without ``--remote``: server2's own daemon over
  D-Bus, server1's through the user API;
- ``library``: userclient.UserClient in one long-lived process in server2 (no
  interpreter start, no imports): create inbound on server1 (answered early),
  outbound on server2, then the wait for server1's relay start;
- ``guide_two_commands``: what ``tunnel`` replaces, the guide's two commands each
  typed on its own gateway (inbound-request on server1, outbound-request on
  server2, over D-Bus), the sum of their wall times; release on each.

- ``token_warm`` / ``token_cold``: ``scistreamctl tunnel`` as root from server2
  (server2 over D-Bus) with server1 reached with a bearer token issued by the
  test bed's OAuth server (tests/oauthbed.py; server1 introspects it): the same
  token every run (cache warm), or a token issued just before each run (the
  inbound request's check is a real introspection; issuing is not timed).
  They run in the same rounds as the views above (server1 checks tokens all along).

On a loaded machine compare the views of one run with each other (they are
interleaved), not with other runs.

The identity is a client certificate (user_client_ca), except in the token views.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable, Dict, List

from tests.testbed import Host, Testbed

from . import hosts as H
from .stats import summary

logger = logging.getLogger(__name__)

S1_IP = "192.168.150.1"
S2_IP = "192.168.150.2"
DIR = f"{H.BENCH_DIR}/remotecli"
DROPIN = "/etc/scistream/conf.d/72-bench-remotecli.toml"
NAME = "bench-robot.example.org"
PEER_CA = "/etc/scistream/peer-ca.crt"
RULES = f"""# written by bench/tunnelcmd.py; removed when it ends
user_client_ca = "{DIR}/user-ca.crt"

[[user_rules]]
name = "bench"
identities = ["cert:{NAME}"]
inbound_targets = ["192.168.150.0/24 5300-5310"]
outbound = true
max_endpoints = 64
"""
IDENT = ["--client-cert", f"{DIR}/robot.crt", "--client-key", f"{DIR}/robot.key",
         "--server_cert", PEER_CA]
BOTH = ["--server-s2cs", f"{S1_IP}:5000", "--client-s2cs", f"{S2_IP}:5000"]

#: Runs inside server2: n rounds of the library calls, JSON of the times (ms).
LIBRARY = r"""
import json, sys, time
from pathlib import Path
from scistreamd.userclient import UserClient
d, n = sys.argv[1], int(sys.argv[2])
kw = dict(trust_file=Path("/etc/scistream/peer-ca.crt"), client_cert=Path(d + "/robot.crt"),
          client_key=Path(d + "/robot.key"))
a, b = UserClient("192.168.150.1:5000", **kw), UserClient("192.168.150.2:5000", **kw)
out = {"tunnel": [], "release": []}
for _ in range(n):
    t0 = time.perf_counter()
    try:  # as tunnel does: the inbound side answers while its relay starts
        made = a.create_inbound("192.168.150.1", [5300], 1, "192.168.150.2", early=True)
    except TypeError:  # a version without early answers (bench.tunnelab --rev)
        made = a.create_inbound("192.168.150.1", [5300], 1, "192.168.150.2")
    b.create_outbound(made["uid"], made["listeners"], 1, peer="192.168.150.1:5000")
    if made["endpoint"].get("state") == "starting":
        a.wait_started(made["uid"])
    t1 = time.perf_counter()
    b.release(made["uid"]); a.release(made["uid"])
    t2 = time.perf_counter()
    out["tunnel"].append((t1 - t0) * 1000); out["release"].append((t2 - t1) * 1000)
print(json.dumps(out))
"""


def _setup(s1: Host, s2: Host) -> None:
    from scistreamd import certs

    ca = certs.make_ca("bench user CA")
    robot = certs.make_host_cert(NAME, [], [NAME], issuer=ca)
    for host in (s1, s2):
        host.run(["mkdir", "-p", DIR])
        host.write_file(f"{DIR}/user-ca.crt", ca.cert_pem().decode())
        host.write_file(DROPIN, RULES)
        host.run(["systemctl", "restart", "scistreamd"], timeout=120)
        H.ensure_up(host)
    s2.write_file(f"{DIR}/robot.crt", robot.cert_pem().decode())
    s2.write_file(f"{DIR}/robot.key", robot.key_pem().decode(), "0600")


def _teardown(s1: Host, s2: Host) -> None:
    for host in (s1, s2):
        host.run(["scistreamctl", "release", "--all"], check=False)
        host.run(["rm", "-rf", DROPIN, DIR], check=False)
        host.run(["systemctl", "restart", "scistreamd"], check=False, timeout=120)


def _tunnel(s2: Host, remote: bool) -> Dict[str, float]:
    more = ["--remote"] if remote else []
    r = H.timeit(s2, ["scistreamctl", "tunnel", *BOTH, "--remote_ip", S1_IP,
                      "--receiver_ports", "5300", *more, *IDENT])
    if r["rc"] != 0:
        raise H.BenchError(f"tunnel exited {r['rc']}: {r['stderr']}")
    uid = r["stdout"].splitlines()[1].split()[0]
    rel = H.timeit(s2, ["scistreamctl", "release", uid, *BOTH, *more, *IDENT])
    if rel["rc"] != 0:
        raise H.BenchError(f"release exited {rel['rc']}: {rel['stderr']}")
    return {"tunnel": r["ms"], "release": rel["ms"]}


def _guide(s1: Host, s2: Host) -> Dict[str, float]:
    """The guide's two commands, each on its own gateway (D-Bus), and release on each."""
    times = []
    inbound = H.timeit(s1, ["scistreamctl", "inbound-request", "--remote_ip", S1_IP,
                            "--s2cs", f"{S1_IP}:5000", "--receiver_ports", "5300"])
    if inbound["rc"] != 0:
        raise H.BenchError(f"inbound-request exited {inbound['rc']}: {inbound['stderr']}")
    lines = inbound["stdout"].splitlines()
    uid = lines[1].split()[0]
    listeners = lines[2].split(":", 1)[1].strip().strip("[]").replace("'", "").split(", ")
    outbound = H.timeit(s2, ["scistreamctl", "outbound-request", "--s2cs", f"{S2_IP}:5000",
                             f"--server_cert={PEER_CA}", uid, *listeners])
    if outbound["rc"] != 0:
        raise H.BenchError(f"outbound-request exited {outbound['rc']}: {outbound['stderr']}")
    for host in (s2, s1):
        times.append(H.timeit(host, ["scistreamctl", "release", uid])["ms"])
    return {"tunnel": inbound["ms"] + outbound["ms"], "release": sum(times)}


def _token_setup(bed: Testbed) -> Any:
    """The OAuth server on server2, server1's daemon checking tokens, a rule for alice."""
    from tests.oauthbed import Driver, OAuth, config

    s1 = bed["server1"]
    driver = Driver(s1)
    oauth = OAuth(bed, driver)
    oauth.start()
    keys = "".join(f"{k} = {json.dumps(v)}\n" for k, v in config().items())
    alice = (f'\n[[user_rules]]\nname = "alice"\nidentities = ["token:{oauth.alice["sub"]}"]\n'
             'inbound_targets = ["192.168.150.1 5300"]\nmax_endpoints = 64\n')
    s1.write_file(DROPIN, keys + RULES + alice)  # one file: user_rules are not merged
    s1.run(["systemctl", "restart", "scistreamd"], timeout=120)
    H.ensure_up(s1)
    return driver, oauth


def _token_tunnel(s2: Host, token: str) -> Dict[str, float]:
    s2.write_file(f"{DIR}/token", token, "0600")
    ident = ["--token-file", f"{DIR}/token", "--server_cert", PEER_CA]
    r = H.timeit(s2, ["scistreamctl", "tunnel", *BOTH, "--remote_ip", S1_IP,
                      "--receiver_ports", "5300", *ident])
    if r["rc"] != 0:
        raise H.BenchError(f"tunnel (token) exited {r['rc']}: {r['stderr']}")
    uid = r["stdout"].splitlines()[1].split()[0]
    rel = H.timeit(s2, ["scistreamctl", "release", uid, *BOTH, *ident])
    if rel["rc"] != 0:
        raise H.BenchError(f"release (token) exited {rel['rc']}: {rel['stderr']}")
    return {"tunnel": r["ms"], "release": rel["ms"]}


def run(bed: Testbed, runs: int = 20, warmup: int = 2,
        log: Callable[[str], None] = print) -> Dict[str, Any]:
    s1, s2 = bed["server1"], bed["server2"]
    _setup(s1, s2)
    # The token views run in the same rounds as the others (a machine whose speed
    # drifts from one minute to the next then moves every view alike).
    driver = oauth = None
    samples: Dict[str, List[float]] = {}
    try:
        driver, oauth = _token_setup(bed)
        warm = oauth.issue()
        kinds = ["cli_remote", "cli_mixed", "guide_two_commands", "token_warm", "token_cold"]
        for i in range(warmup + runs):
            for kind in kinds[i % len(kinds):] + kinds[:i % len(kinds)]:  # each first in turn
                if kind == "guide_two_commands":
                    got = _guide(s1, s2)
                elif kind.startswith("token"):
                    got = _token_tunnel(s2, warm if kind == "token_warm" else oauth.issue())
                else:
                    got = _tunnel(s2, kind == "cli_remote")
                if i >= warmup:
                    for op, ms in got.items():
                        samples.setdefault(f"{kind}_{op}", []).append(ms)
            if i >= warmup and (i - warmup + 1) % 5 == 0:
                log(f"  tunnel command: {i - warmup + 1}/{runs} rounds")
        out = s2.run([*H.SYSTEMD_RUN, "env", "PYTHONPATH=/run/testbed/src", H.PYCACHE_ENV,
                      H.PYTHON, "-c", LIBRARY, DIR, str(runs + warmup)], timeout=600)
        lib = json.loads(out.stdout)
        samples["library_tunnel"] = lib["tunnel"][warmup:]
        samples["library_release"] = lib["release"][warmup:]
    finally:
        if driver is not None:
            driver.close()
        if oauth is not None:
            oauth.remove()
        _teardown(s1, s2)
    return {"tunnel_command_ms": {k: summary(v, digits=1) for k, v in sorted(samples.items())},
            "tunnel_command_config": {
                "runs": runs, "warmup_discarded": warmup,
                "from": "server2, naming server1 (inbound) and server2 (outbound)",
                "identity": "client certificate (user_client_ca); token_*: a bearer token "
                            "(OAuth server of tests/oauthbed.py) for server1",
                "goal": "p50 <= 300 ms (issue 14; upstream's two s2uc calls ~1.8 s)"}}
