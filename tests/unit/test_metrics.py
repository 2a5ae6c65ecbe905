"""Unit tests of the metrics pieces: request stats (pure), the collector, the HTTP answer."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, List

import pytest

from scistreamd.config import config_from_mapping
from scistreamd.errors import ConfigError, NotFound
from scistreamd.model import Endpoint, Role, State, parse_hostport
from scistreamd.reqstats import BUCKETS, OTHER, RequestStats, label

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from scistreamd.metrics import ManagerCollector, MetricsServer, answer_request  # noqa: E402

UID = "2d2b1a5e-9a3c-4c1e-8f3e-0d3f4c1a7b21"


def test_label_keeps_names_and_replaces_other_text() -> None:
    assert label("InboundRequest") == "InboundRequest"
    assert label("a b") == OTHER
    assert label("x" * 65) == OTHER
    assert label(None) == OTHER


def test_request_stats_counts_and_buckets() -> None:
    s = RequestStats()
    s.record("ListEndpoints", "ok", 0.001)  # on a bound: that bucket (le is inclusive)
    s.record("ListEndpoints", "ok", 0.02)
    s.record("ListEndpoints", "AccessDenied", 100.0)  # above every bound
    s.record("Bad name!", "ok", -1)  # clamped to 0, method as "other"
    assert s.results() == {("ListEndpoints", "ok"): 2, ("ListEndpoints", "AccessDenied"): 1,
                           (OTHER, "ok"): 1}
    h = s.histograms()["ListEndpoints"]
    assert h.count == 3 and h.total == pytest.approx(100.021)
    cum = dict(h.cumulative())
    assert cum["0.001"] == 1 and cum["0.025"] == 2 and cum[repr(BUCKETS[-1])] == 2
    assert cum["+Inf"] == 3


@dataclass
class _Traffic:
    bytes_in: int = 10
    bytes_out: int = 20
    connections_active: int = 1
    connections_total: int = 3
    target_failures: int = 0
    memory_current: int = 2**64 - 1  # systemd's "unknown"


class _Manager:
    def __init__(self, eps: List[Endpoint], traffic: bool = True) -> None:
        self.eps = eps
        self.cfg = config_from_mapping({"max_endpoints": 7})
        if traffic:
            self.traffic = self._traffic

    def list(self) -> List[Endpoint]:
        return self.eps

    def _traffic(self, ep: Endpoint) -> Any:
        if ep.state is State.FAILED:
            raise NotFound("gone")
        return _Traffic()


def _ep(role: Role, state: State, restarts: int = 0) -> Endpoint:
    return Endpoint(uid=UID, role=role, state=state, listeners=(parse_hostport(
        "192.168.150.1:5100", "l"),), targets=(parse_hostport("192.168.150.1:5300", "t"),),
        num_conn=1, n_restarts=restarts, created_at=1.7e9)


def _families(collector: ManagerCollector) -> dict:
    from prometheus_client import CollectorRegistry, generate_latest

    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)
    text = generate_latest(reg).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}, text


def test_collector_states_restarts_and_no_uid_by_default() -> None:
    eps = [_ep(Role.INBOUND, State.ACTIVE, 2), _ep(Role.OUTBOUND, State.FAILED)]
    stats = RequestStats()
    stats.record("claim", "ok", 0.01)
    fams, text = _families(ManagerCollector(_Manager(eps), dbus=RequestStats(), peer=stats))
    states = {s.labels["state"]: s.value for s in fams["scistream_endpoints"].samples}
    assert states == {"starting": 0, "active": 1, "failed": 1, "releasing": 0}
    assert fams["scistream_endpoints_max"].samples[0].value == 7
    assert fams["scistream_relay_max_connections"].samples[0].value == 1024
    restarts = {s.labels["role"]: s.value for s in fams["scistream_relay_restarts"].samples}
    assert restarts == {"inbound": 2, "outbound": 0}
    assert UID not in text  # a uid is a capability: not in labels unless asked
    sample = fams["scistream_relay_restarts"].samples[0]
    assert sample.labels["unit"] == eps[0].unit
    # counters only for the endpoint whose traffic could be read; "unknown" left out
    got = [(s.labels["role"], s.value) for s in fams["scistream_endpoint_received_bytes"].samples]
    assert got == [("inbound", 10)]
    assert not fams["scistream_endpoint_memory_bytes"].samples
    peer = fams["scistream_peer_requests"].samples
    assert [(s.labels, s.value) for s in peer] == [({"method": "claim", "result": "ok"}, 1)]


def test_collector_uid_label_when_asked_and_no_traffic_before_counters() -> None:
    fams, text = _families(ManagerCollector(_Manager([_ep(Role.INBOUND, State.ACTIVE)], False),
                                            uid_label=True))
    assert fams["scistream_relay_restarts"].samples[0].labels["uid"] == UID
    assert "scistream_endpoint_received_bytes" not in fams


def test_answer_request() -> None:
    def render() -> bytes:
        return b"x 1\n"
    ok = answer_request(b"GET /metrics HTTP/1.1\r\nHost: h", render)
    assert ok.startswith(b"HTTP/1.1 200 OK\r\n") and ok.endswith(b"\r\n\r\nx 1\n")
    assert b"Content-Length: 4\r\n" in ok
    head = answer_request(b"HEAD /metrics HTTP/1.1", render)
    assert head.endswith(b"\r\n\r\n")
    assert answer_request(b"GET /other HTTP/1.1", render).startswith(b"HTTP/1.1 404")
    assert answer_request(b"POST /metrics HTTP/1.1", render).startswith(b"HTTP/1.1 405")
    assert answer_request(b"\x16\x03\x01 junk", render).startswith(b"HTTP/1.1 400")


def test_server_serves_and_stops() -> None:
    async def main() -> bytes:
        server = MetricsServer(parse_hostport("127.0.0.1:1", "a").host, 0,
                               _Manager([_ep(Role.INBOUND, State.ACTIVE)]))
        await server.start()
        try:
            r, w = await asyncio.open_connection("127.0.0.1", server.port)
            w.write(b"GET /metrics HTTP/1.0\r\n\r\n")
            await w.drain()
            data = await r.read()
            w.close()
            return data
        finally:
            await server.stop()

    data = asyncio.run(main())
    assert data.startswith(b"HTTP/1.1 200 OK")
    assert b"scistream_endpoints{state=\"active\"} 1.0" in data
    assert b"process_resident_memory_bytes" in data


def test_config_metrics_keys() -> None:
    c = config_from_mapping({})
    assert c.metrics_listen is None and c.metrics_uid_label is False
    c = config_from_mapping({"metrics_listen": "127.0.0.1:9731", "metrics_uid_label": True})
    assert str(c.metrics_listen) == "127.0.0.1:9731" and c.metrics_uid_label
    assert config_from_mapping({"metrics_listen": ""}).metrics_listen is None
    for bad, words in ((9731, "IP:PORT"), ("localhost:9731", "not an IP address"),
                       ("127.0.0.1:5150", "inside port_range"),
                       ("127.0.0.1:5000", "peer port"), ("0.0.0.0:9731", "not a unicast")):
        with pytest.raises(ConfigError, match=words):
            config_from_mapping({"metrics_listen": bad})


def test_dbus_methods_are_counted_by_result() -> None:
    from dbus_next import DBusError

    from scistreamd import reqstats
    from scistreamd.dbus_api import _dbus_errors

    async def Probe(fail: Exception | None = None) -> int:
        if fail is not None:
            raise fail
        return 1

    wrapped = _dbus_errors(Probe)
    before = reqstats.DBUS.results()

    async def main() -> None:
        assert await wrapped() == 1
        for exc in (NotFound("gone"), RuntimeError("bug")):
            with pytest.raises(DBusError):
                await wrapped(exc)

    asyncio.run(main())
    after = reqstats.DBUS.results()
    for result in ("ok", "NotFound", "Failed"):
        assert after[("Probe", result)] == before.get(("Probe", result), 0) + 1
    assert reqstats.DBUS.histograms()["Probe"].count >= 3
