"""tlshttp: the CLI's keep-alive connections (Connections, on http.client) against the
canned HTTPS server of test_ctl_remote, and the bounded read both clients share."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from scistreamd.peertls import client_context
from scistreamd.tlshttp import BodyTooLarge, Connections, read_bounded
from scistreamd.userclient import UserClient
from scistreamd.values import parse_hostport

from .test_ctl_ahead import Counted


@pytest.fixture
def keepalive(tmp_path: Path):
    c = Counted(tmp_path)
    handler = c.httpd.RequestHandlerClass
    handler.protocol_version = "HTTP/1.1"  # keeps connections open, as the peer port does
    handler.timeout = 0.5  # and closes one idle this long
    c.answers["GET /v1/tunnels"] = (200, {"tunnels": []})
    yield c
    c.close()


def _conns(c: Counted, idle_max: float = 5.0) -> Connections:
    hp = parse_hostport(c.addr, "x")
    ctx, _trust = client_context(hp.host, c.ca, None, None, None)
    return Connections(str(hp.host), hp.port, ctx, 5.0, idle_max)


def _get(conns: Connections) -> Any:
    status, raw = conns.exchange("GET", "/v1/tunnels", None, {}, 1 << 20, 10)
    return status, json.loads(raw)


def test_a_connection_is_kept_for_the_next_exchange(keepalive: Counted) -> None:
    conns = _conns(keepalive)
    assert _get(conns) == _get(conns) == (200, {"tunnels": []})
    assert keepalive.accepted == 1 and len(keepalive.seen) == 2


def test_one_the_server_closed_is_replaced_without_an_error(keepalive: Counted) -> None:
    conns = _conns(keepalive)
    _get(conns)
    threading.Event().wait(1.0)  # the server closes the idle connection after 0.5 s
    assert _get(conns)[0] == 200
    assert keepalive.accepted == 2


def test_one_idle_too_long_is_not_used(keepalive: Counted) -> None:
    conns = _conns(keepalive, idle_max=0.0)
    _get(conns)
    _get(conns)
    assert keepalive.accepted == 2


def test_threads_never_share_a_connection(keepalive: Counted) -> None:
    keepalive.delays["GET /v1/tunnels"] = 0.3
    conns = _conns(keepalive)
    got = []
    threads = [threading.Thread(target=lambda: got.append(_get(conns))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert got == [(200, {"tunnels": []})] * 3
    assert keepalive.accepted == 3  # all at once: one connection each
    _get(conns)
    assert keepalive.accepted == 3  # then kept, and used again


def test_read_bounded() -> None:
    assert read_bounded("3", [b"a", b"bc"], 3, 5) == b"abc"
    assert read_bounded(None, iter([]), 3, 5) == b""
    with pytest.raises(BodyTooLarge):
        read_bounded("4", [b"x"], 3, 5)  # declared: nothing read
    with pytest.raises(BodyTooLarge):
        read_bounded(None, [b"ab", b"cd"], 3, 5)  # undeclared, found while reading


def test_an_ipv6_daemon(tmp_path: Path) -> None:
    """A daemon named [addr]:port: reached, verified by its IP subjectAltName, and
    named in the Host header as RFC 9110 wants (brackets)."""
    c = Counted(tmp_path, "::1")
    try:
        c.answers["GET /v1/tunnels"] = (200, {"tunnels": []})
        client = UserClient(c.addr, trust_file=c.ca, timeout=5)
        assert client.list() == []
        assert c.hosts == [c.addr]
    finally:
        c.close()
