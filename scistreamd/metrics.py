"""The Prometheus metrics endpoint: GET /metrics on ``metrics_listen`` (off by default).

Served on the daemon's own asyncio loop (no thread, no http.server): each
scrape reads the manager's endpoints and the request counters at that moment
through a custom Collector (python3-prometheus-client renders the text
exposition format). Imported only when metrics_listen is set.

What a scrape may show: unit names, roles, states, counters; tunnel uids only
with metrics_uid_label = true. A uid is a capability (whoever knows it can
claim the tunnel's key from the peer port), and every local user can connect
to a loopback port, so uids stay out of the labels unless the operator says
the endpoint is reachable by trusted scrapers only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Callable, Iterable, Iterator, List, Optional

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from . import __version__
from .errors import ScistreamError
from .model import IPAddress, State
from .reqstats import DBUS, PEER, RequestStats

logger = logging.getLogger(__name__)

#: Largest request head we read; scrapers send a few hundred bytes.
MAX_HEAD = 8 * 1024
HEAD_TIMEOUT = 5.0
#: Scrapes served at once; more connections are closed at once (a scraper retries).
MAX_CONNECTIONS = 16
PREFIX = "scistream"


def _request_families(name: str, what: str, stats: RequestStats) -> Iterator[Metric]:
    total = CounterMetricFamily(
        f"{PREFIX}_{name}_requests", f"{what} requests answered, by method and result "
        "(ok or the error name)", labels=["method", "result"])
    for (method, result), n in sorted(stats.results().items()):
        total.add_metric([method, result], n)
    yield total
    hist = HistogramMetricFamily(
        f"{PREFIX}_{name}_request_duration_seconds",
        f"Time to answer {what} requests, by method", labels=["method"])
    for method, h in sorted(stats.histograms().items()):
        hist.add_metric([method], h.cumulative(), sum_value=h.total)
    yield hist


class ManagerCollector:
    """Reads the manager at scrape time (prometheus_client's custom collector protocol)."""

    def __init__(self, manager: Any, *, uid_label: bool = False,
                 dbus: RequestStats = DBUS, peer: RequestStats = PEER) -> None:
        self._m = manager
        self._uid_label = uid_label
        self._dbus = dbus
        self._peer = peer

    def _labels(self) -> List[str]:
        return (["uid"] if self._uid_label else []) + ["unit", "role"]

    def _values(self, ep: Any) -> List[str]:
        return ([ep.uid] if self._uid_label else []) + [ep.unit, ep.role.value]

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(f"{PREFIX}_build_info", "scistreamd version",
                                 labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        endpoints = list(self._m.list())
        by_state = GaugeMetricFamily(f"{PREFIX}_endpoints", "Endpoints on this host, by state",
                                     labels=["state"])
        counts = {s.value: 0 for s in State}
        for ep in endpoints:
            counts[ep.state.value] = counts.get(ep.state.value, 0) + 1
        for state, n in counts.items():
            by_state.add_metric([state], n)
        yield by_state
        cfg = getattr(self._m, "cfg", None)
        if cfg is not None:
            # The limits, so alerts can say "near the cap" without knowing the config.
            cap = GaugeMetricFamily(f"{PREFIX}_endpoints_max", "max_endpoints of this host")
            cap.add_metric([], cfg.max_endpoints)
            yield cap
            conns = GaugeMetricFamily(f"{PREFIX}_relay_max_connections",
                                      "relay_max_connections: connections one relay serves")
            conns.add_metric([], cfg.relay_max_connections)
            yield conns
        yield from self._per_endpoint(endpoints)
        yield from _request_families("dbus", "D-Bus", self._dbus)
        yield from _request_families("peer", "Peer port", self._peer)

    def _per_endpoint(self, endpoints: List[Any]) -> Iterator[Metric]:
        labels = self._labels()
        restarts = CounterMetricFamily(
            f"{PREFIX}_relay_restarts", "Restarts of the endpoint's relay unit (NRestarts)",
            labels=labels)
        up = GaugeMetricFamily(
            f"{PREFIX}_endpoint_active", "1 if the endpoint is active, else 0", labels=labels)
        for ep in endpoints:
            values = self._values(ep)
            restarts.add_metric(values, ep.n_restarts)
            up.add_metric(values, 1 if ep.state is State.ACTIVE else 0)
        yield restarts
        yield up
        yield from self._traffic(endpoints, labels)

    def _traffic(self, endpoints: List[Any], labels: List[str]) -> Iterator[Metric]:
        """Byte and connection counters, where the manager has them (Manager.traffic)."""
        traffic: Optional[Callable[[Any], Any]] = getattr(self._m, "traffic", None)
        if traffic is None:
            return
        fams = {
            "bytes_in": CounterMetricFamily(
                f"{PREFIX}_endpoint_received_bytes",
                "IP bytes the relay unit received (IPIngressBytes)", labels=labels),
            "bytes_out": CounterMetricFamily(
                f"{PREFIX}_endpoint_sent_bytes",
                "IP bytes the relay unit sent (IPEgressBytes)", labels=labels),
            "connections_total": CounterMetricFamily(
                f"{PREFIX}_endpoint_connections", "Connections the relay accepted",
                labels=labels),
            "connections_active": GaugeMetricFamily(
                f"{PREFIX}_endpoint_connections_active", "Connections open through the relay",
                labels=labels),
            "target_failures": CounterMetricFamily(
                f"{PREFIX}_endpoint_target_failures",
                "Connections the relay could not make to its target", labels=labels),
            "memory_current": GaugeMetricFamily(
                f"{PREFIX}_endpoint_memory_bytes", "Memory of the relay unit (MemoryCurrent)",
                labels=labels),
        }
        for ep in endpoints:
            try:
                t = traffic(ep)
            except (ScistreamError, OSError, LookupError) as e:
                logger.debug("metrics: no counters of %s: %s", ep.unit, e)
                continue
            values = self._values(ep)
            for field, fam in fams.items():
                value = getattr(t, field, None)
                # systemd's "unknown" is 2^64-1; such a value is left out, not exported.
                if isinstance(value, int) and 0 <= value < 2**64 - 1:
                    fam.add_metric(values, value)
        yield from fams.values()


def make_registry(manager: Any, *, uid_label: bool = False) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ManagerCollector(manager, uid_label=uid_label))  # type: ignore[arg-type]
    ProcessCollector(registry=registry)  # process_resident_memory_bytes, cpu seconds, fds
    return registry


def _answer(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8",
            with_body: bool = True, extra: Iterable[str] = ()) -> bytes:
    head = [f"HTTP/1.1 {status}", f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}", "Connection: close", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + (body if with_body else b"")


def answer_request(head: bytes, render: Callable[[], bytes]) -> bytes:
    """The whole HTTP answer to one request head (pure but for ``render``)."""
    line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return _answer("400 Bad Request", b"not an HTTP/1.x request\n")
    method, target = parts[0], parts[1]
    path = target.split("?", 1)[0]
    if path not in ("/metrics", "/"):
        return _answer("404 Not Found", b"scistreamd serves only /metrics\n")
    if method not in ("GET", "HEAD"):
        return _answer("405 Method Not Allowed", b"use GET\n", extra=["Allow: GET, HEAD"])
    if path == "/":
        return _answer("200 OK", b"scistreamd metrics: /metrics\n", with_body=method == "GET")
    return _answer("200 OK", render(), CONTENT_TYPE_LATEST, with_body=method == "GET")


class MetricsServer:
    """HTTP on ``address``, one request per connection, on the running loop."""

    def __init__(self, host: IPAddress, port: int, manager: Any, *,
                 uid_label: bool = False) -> None:
        self._host, self._port = host, port
        self._registry = make_registry(manager, uid_label=uid_label)
        self._server: Optional[asyncio.AbstractServer] = None
        self._open = 0

    @property
    def port(self) -> int:
        """The bound port (the real one when configured with port 0)."""
        assert self._server is not None and self._server.sockets
        return int(self._server.sockets[0].getsockname()[1])

    def render(self) -> bytes:
        return generate_latest(self._registry)

    async def start(self) -> None:
        where = f"[{self._host}]:{self._port}" if self._host.version == 6 else \
            f"{self._host}:{self._port}"
        try:
            self._server = await asyncio.start_server(self._serve, str(self._host), self._port,
                                                      reuse_address=True, limit=MAX_HEAD)
        except OSError as e:
            raise ScistreamError(
                f"cannot listen for metrics on {where}: {e.strerror or e}; fix "
                "metrics_listen (an address of this host and a free port) or set it to "
                '""') from None
        logger.info("metrics on http://%s/metrics%s", where,
                    "" if self._host.is_loopback else
                    " (reachable from the network: restrict it to the scrapers)")

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open += 1
        try:
            if self._open > MAX_CONNECTIONS:
                return
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
            except (asyncio.TimeoutError, asyncio.IncompleteReadError,
                    asyncio.LimitOverrunError, ConnectionError):
                return
            writer.write(answer_request(head, self.render))
            with contextlib.suppress(ConnectionError, asyncio.TimeoutError):
                await asyncio.wait_for(writer.drain(), HEAD_TIMEOUT)
        except Exception:  # one bad scrape must not take anything else down
            logger.exception("metrics: serving a scrape failed")
        finally:
            self._open -= 1
            writer.close()
