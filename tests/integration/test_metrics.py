"""Prometheus metrics on the real test bed (issue 13, item 5).

server1's scistreamd serves /metrics on loopback (a conf.d drop-in); a real
Prometheus server (Debian's `prometheus`) runs inside server1 as a unit with a
generated scrape configuration, scrapes it every second, and the test reads the
counters back through Prometheus' own HTTP query API (/api/v1/query) after a
known number of bytes went through a tunnel. Every wait is "until it holds"
with a guard that only turns a hang into a failure.
"""

from __future__ import annotations

import json

import pytest

from tests.integration.conftest import (
    HOSTTOOL,
    parse_request_output,
    restart_daemon,
    tool,
    wait_until,
)

DROPIN = "/etc/scistream/conf.d/70-test-metrics.toml"
METRICS = "127.0.0.1:9731"
PROM = "127.0.0.1:9090"
PROM_CONFIG = "/tmp/test-metrics-prometheus.yml"
PROM_DATA = "/tmp/test-metrics-prometheus-data"
#: Payload bytes sent through the tunnel; IP accounting counts them plus headers.
PAYLOAD = 4 * 1024 * 1024

SCRAPE_CONFIG = f"""\
# written by tests/integration/test_metrics.py
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: scistreamd
    static_configs:
      - targets: ["{METRICS}"]
"""

_GET = """
import sys, urllib.parse, urllib.request
url = sys.argv[1]
if len(sys.argv) > 2:
    url += "?" + urllib.parse.urlencode({"query": sys.argv[2]})
try:
    with urllib.request.urlopen(url, timeout=10) as r:
        sys.stdout.write(r.read().decode())
except OSError as e:
    sys.stdout.write("")
    sys.stderr.write(str(e))
"""


def http_get(host, url: str, query: str = "") -> str:
    """GET ``url`` from inside ``host`` (python3's urllib): the body, "" when it fails."""
    args = ["python3", "-c", _GET, url] + ([query] if query else [])
    return host.run(args, check=False).stdout


def promql(host, query: str) -> list:
    """The result vector of ``query`` from Prometheus inside ``host``: [(labels, value)]."""
    body = http_get(host, f"http://{PROM}/api/v1/query", query)
    if not body:
        return []
    doc = json.loads(body)
    assert doc["status"] == "success", doc
    return [(r["metric"], float(r["value"][1])) for r in doc["data"]["result"]]


@pytest.fixture
def metrics(s1, clean, apps):
    """server1 serving /metrics on loopback, and a Prometheus scraping it."""
    s1.run(["tee", DROPIN], input=(
        "# written by test_metrics.py; removed when the test ends\n"
        f'metrics_listen = "{METRICS}"\n'))
    try:
        restart_daemon(s1)
        s1.run(["rm", "-rf", PROM_DATA])
        s1.run(["tee", PROM_CONFIG], input=SCRAPE_CONFIG)
        apps.start(s1, "test-prometheus", "prometheus", f"--config.file={PROM_CONFIG}",
                   f"--storage.tsdb.path={PROM_DATA}", f"--web.listen-address={PROM}")
        wait_until(lambda: "Ready" in http_get(s1, f"http://{PROM}/-/ready"), 120,
                   "Prometheus to be ready")
        yield s1
    finally:
        s1.ctl("release", "--all")
        s1.run(["rm", "-f", DROPIN])
        restart_daemon(s1)
        s1.run(["rm", "-rf", PROM_DATA, PROM_CONFIG], check=False)


def test_prometheus_scrapes_scistreamd_and_reads_back_the_counters(metrics, s1, s2, apps):
    out = "/tmp/metrics-sink.out"
    s1.run(["rm", "-f", out])
    apps.start(s1, "metrics-sink", "python3", HOSTTOOL, "sink", "5341", out)
    r = s1.ctl("inbound-request", "--remote_ip", s1.ip, "--receiver_ports", "5341")
    assert r.returncode == 0, r.stderr
    uid, _s2cs, _role, listeners = parse_request_output(r.stdout)
    o = s2.ctl("outbound-request", "--server_cert", "/etc/scistream/peer-ca.crt", uid,
               *listeners)
    assert o.returncode == 0, o.stderr
    (local,) = parse_request_output(o.stdout)[3]
    unit = json.loads(s1.ctl("--json", "status", uid).stdout)[0]["unit"]

    # Prometheus sees the target up and the endpoint active.
    wait_until(lambda: promql(s1, 'up{job="scistreamd"} == 1'), 60, "the target to be up")
    wait_until(lambda: promql(s1, 'scistream_endpoints{state="active"} == 1'), 60,
               "one active endpoint in Prometheus")

    ip, port = local.rsplit(":", 1)
    sent = tool(s2, "send", ip, port, str(PAYLOAD)).stdout.split()
    got = wait_until(lambda: s1.run(["cat", out], check=False).stdout.split(), 60,
                     "the sink's digest")
    assert got == sent and got[1] == str(PAYLOAD)

    # The inbound relay sent the payload on to the application: its sent bytes, read
    # back through Prometheus' query API, cover it (IP accounting adds headers).
    query = f'scistream_endpoint_sent_bytes_total{{role="inbound",unit="{unit}"}}'
    got = wait_until(lambda: [v for _, v in promql(s1, query) if v >= PAYLOAD], 90,
                     f"{query} >= {PAYLOAD} in Prometheus")
    assert got[0] < PAYLOAD * 1.1, got
    received = promql(s1, f'scistream_endpoint_received_bytes_total{{unit="{unit}"}}')
    assert received and received[0][1] >= PAYLOAD, received
    conns = wait_until(lambda: promql(
        s1, f'scistream_endpoint_connections_total{{unit="{unit}"}} >= 1'), 60,
        "the connection in Prometheus")
    assert conns[0][1] == 1

    # Requests by method and result: the D-Bus request that made the endpoint, the
    # peer's claim of its key, and their latency histograms.
    assert wait_until(lambda: promql(
        s1, 'scistream_dbus_requests_total{method="InboundRequest",result="ok"} >= 1'), 60,
        "the InboundRequest counted")
    assert wait_until(lambda: promql(
        s1, 'scistream_peer_requests_total{method="claim",result="ok"} >= 1'), 60,
        "the peer's claim counted")
    assert promql(s1, 'scistream_dbus_request_duration_seconds_count'
                      '{method="InboundRequest"} >= 1')
    assert promql(s1, 'scistream_relay_restarts_total{role="inbound"} == 0')

    # The uid is a capability: not in any series unless metrics_uid_label says so.
    text = http_get(s1, f"http://{METRICS}/metrics")
    assert unit in text and uid not in text

    # Released: gone from the endpoint series, counted as no endpoint.
    assert s1.ctl("release", uid).returncode == 0
    assert s2.ctl("release", uid).returncode == 0
    wait_until(lambda: promql(s1, 'sum(scistream_endpoints) == 0'), 60,
               "no endpoints in Prometheus after the release")


def test_metrics_refuse_other_paths_and_methods(metrics, s1):
    def status(method: str, path: str) -> str:
        code = ("import http.client,sys; c=http.client.HTTPConnection(sys.argv[1], timeout=10);"
                "c.request(sys.argv[2], sys.argv[3]); print(c.getresponse().status)")
        return s1.run(["python3", "-c", code, METRICS, method, path]).stdout.strip()

    assert status("GET", "/metrics") == "200"
    assert status("GET", "/secret") == "404"
    assert status("POST", "/metrics") == "405"
    # Only on the configured address: not on the host's network address.
    other = s1.run(["python3", "-c", "import socket,sys; s=socket.socket();"
                    "print(s.connect_ex((sys.argv[1], 9731)))", s1.ip]).stdout.strip()
    assert other != "0"
