"""HTTPS pieces on the standard library alone: the CLI's keep-alive connections to one
daemon (:class:`Connections`, on ``http.client``), and what both clients of the
peer port share (peerclient: daemon to daemon, on ``requests``; userclient: a
user to a daemon): the bounded read of an answer and the walk through nested
exceptions.

Why the CLI does not use ``requests`` as the daemon does: importing it (with
urllib3, chardet, charset_normalizer, idna, cookies) cost every remote command
~55 ms of CPU before its first byte left, half of the CLI's own time, and all
the CLI asks of an HTTP client is one JSON exchange at a time over a TLS context
it built itself: no proxies, redirects, cookies, retries or CA bundle, each of
which requests had to be told to leave out. The daemon keeps requests (the
declared HTTP client): its import is paid once per start, not per call.
"""

from __future__ import annotations

import http.client
import select
import ssl
import threading
import time
from typing import Any, Iterable, Iterator, List, Mapping, Optional, Set, Tuple

from .errors import ScistreamError


def causes(exc: BaseException) -> Iterator[BaseException]:
    """exc and everything it wraps (requests/urllib3 nest errors in args/reason)."""
    seen: Set[int] = set()
    stack: List[Optional[BaseException]] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        stack.append(e.__cause__)
        if not e.__suppress_context__:  # urllib3 suppresses its py2-compat TypeError
            stack.append(e.__context__)
        stack.extend(a for a in e.args if isinstance(a, BaseException))
        reason = getattr(e, "reason", None)
        if isinstance(reason, BaseException):
            stack.append(reason)


class BodyTooLarge(ScistreamError):
    """An answer over the caller's limit (the caller names it in its own error)."""


class BodyTooSlow(ScistreamError):
    """No whole answer within the caller's deadline."""


def read_bounded(declared: Optional[str], pieces: Iterable[bytes], limit: int,
                 seconds: float) -> bytes:
    """An answer's body from its ``pieces``: at most ``limit`` bytes, whole within
    ``seconds`` (a peer that trickles its answer must not hold a thread).
    ``declared``: its Content-Length header, if any. Raises BodyTooLarge or
    BodyTooSlow; the caller turns them into its named error."""
    declared = (declared or "").strip()
    if declared.isdigit() and len(declared) < 20 and int(declared) > limit:
        raise BodyTooLarge(f"a {declared}-byte body")
    deadline = time.monotonic() + seconds
    chunks: List[bytes] = []
    size = 0
    for piece in pieces:
        size += len(piece)
        if size > limit:
            raise BodyTooLarge(f"more than {limit} bytes")
        chunks.append(piece)
        if time.monotonic() > deadline:
            raise BodyTooSlow(f"no complete answer within {seconds:g} s")
    return b"".join(chunks)


class _Conn(http.client.HTTPSConnection):
    #: When its last answer was read (or it was opened): how long it has idled.
    idle_since = 0.0


class Connections:
    """Keep-alive HTTPS connections to one daemon, over the caller's SSLContext only
    (what it trusts, the identity it checks, the certificate it presents).

    Each exchange takes an idle connection or opens one, and gives it back once
    its answer was read whole: threads never share one. A connection idle for
    over ``idle_max`` seconds is closed, not used (the server may be closing it
    just then), as is one the server has already closed. Nothing is retried: a
    request that failed may have been carried out.
    """

    def __init__(self, host: str, port: int, context: ssl.SSLContext, timeout: float,
                 idle_max: float) -> None:
        self._host, self._port, self._context = host, port, context
        self._timeout, self._idle_max = timeout, idle_max
        self._idle: List[_Conn] = []
        self._lock = threading.Lock()

    def open(self) -> None:
        """One connection ready (TCP and the TLS handshake, the server verified) for
        the next exchange. Raises what connecting raised."""
        conn = self._new()
        try:
            conn.connect()
        except BaseException:
            conn.close()
            raise
        self._give_back(conn)

    def exchange(self, method: str, path: str, body: Optional[bytes],
                 headers: Mapping[str, str], limit: int, seconds: float) -> Tuple[int, bytes]:
        """(status, body) of one request; the body read as :func:`read_bounded` does.
        Raises OSError (ssl.SSLError, TimeoutError, ...), http.client.HTTPException,
        BodyTooLarge, BodyTooSlow."""
        conn = self._take()
        reusable = False
        try:
            conn.request(method, path, body=body, headers=dict(headers))
            resp = conn.getresponse()
            raw = read_bounded(resp.getheader("Content-Length"),
                               iter(lambda: resp.read(65536), b""), limit, seconds)
            reusable = not resp.will_close
            return resp.status, raw
        finally:
            if reusable:
                self._give_back(conn)
            else:
                conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _new(self) -> _Conn:
        return _Conn(self._host, self._port, timeout=self._timeout, context=self._context)

    def _take(self) -> _Conn:
        now = time.monotonic()
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return self._new()
            if now - conn.idle_since <= self._idle_max and not _closed(conn):
                return conn
            conn.close()

    def _give_back(self, conn: _Conn) -> None:
        conn.idle_since = time.monotonic()
        with self._lock:
            self._idle.append(conn)


def _closed(conn: Any) -> bool:
    """Whether the server closed an idle connection (or sent something unasked,
    which is as bad): its socket reads without a request."""
    sock = conn.sock
    if sock is None:
        return True
    try:
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return True
