"""The TLS peer port: how the outbound daemon obtains a tunnel's key from the inbound one.

Gateway A (inbound side) holds endpoint ``uid`` with its listeners and a random
PSK. Gateway B's daemon asks A for that endpoint over TLS and gets the
listeners and the key. A uid is a capability and the key is handed out once;
the bookkeeping of who claimed what lives in the :class:`PeerHandler` (the
manager), this module only carries the request.

Server side: stdlib ``http.server`` + ``ssl`` in threads (no extra dependency),
bridged to the daemon's asyncio loop with ``run_coroutine_threadsafe``. Every
connection gets its own worker thread which does the TLS handshake itself, so a
client that never finishes a handshake or a request cannot stall the accept
loop, other clients, or the event loop. Concurrency, body size, per-operation
and per-connection time are all bounded.

Client side: ``requests`` with our own ``SSLContext`` (blocking; call it with
``asyncio.to_thread``). The peer is untrusted input: the answer is size-bounded
and every field is parsed before it is returned.

API (JSON over HTTPS, one request per connection)::

    GET  /v1/health                 -> 200 {"status": "ok"} (+ "version", ... for a
                                       verified client certificate)
    GET  /v1/endpoints/<uid>        -> 200 {"uid", "state"}
    POST /v1/endpoints/<uid>/claim  {} -> 200 {"uid", "listeners", "psk", "cipher_suites"}

Peer authentication: with a client CA the server asks every client for a
certificate (CERT_OPTIONAL): one that does not chain to the CA fails the
handshake; none at all completes it, so that with ``require_client_cert``
the claim and state requests get a named 403 AccessDenied (saying what to
configure) instead of a bare TLS alert. Who asked is a :class:`PeerIdentity`.

Errors are ``{"error": "<Name>", "message": "..."}``: 400 InvalidArgument,
403 AccessDenied, 404 NotFound (no such endpoint) or UnknownPath, 405
MethodNotAllowed, 409 PeerRejected (already claimed), 411 LengthRequired,
413 PayloadTooLarge, 500 Failed (never a traceback), 503 Busy.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import ipaddress
import json
import logging
import re
import selectors
import socket
import ssl
import threading
import time
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Protocol, Sequence, Set, Tuple, Union

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

from . import __version__
from .errors import (
    AccessDenied,
    AlreadyExists,
    ConfigError,
    InvalidArgument,
    NotFound,
    PeerRejected,
    PeerUnreachable,
    ScistreamError,
)
from .model import (
    MAX_LIST_LEN,
    HostPort,
    IPAddress,
    PeerIdentity,
    parse_hostport,
    parse_hostport_list,
    parse_uid,
)
from .relay import parse_ciphersuites, parse_psk

logger = logging.getLogger(__name__)

API_PREFIX = "/v1"
DEFAULT_PEER_PORT = 5000
#: Largest answer the client accepts; 1024 IPv6 listeners fit comfortably.
MAX_RESPONSE = 64 * 1024
#: Thread name prefix of everything the server runs (tests look for leftovers).
THREAD_PREFIX = "scistreamd-peer"
#: journald MESSAGE_ID of a refused peer request (no or untrusted certificate, not
#: the endpoint's allowed peer); manager.MSG_CLAIM_REFUSED is the same id.
MSG_PEER_REFUSED = uuid.UUID("5a1f0c7e6b6d4f3e9a4b2d1c0e9f8a75")

# After the response, keep reading (and discarding) for a moment before the
# close: closing a socket with unread input makes the kernel send RST, which
# can destroy our response (413, a TLS alert) before the client has read it.
_LINGER_SECONDS = 2.0
_LINGER_BYTES = 1024 * 1024
_REFUSAL_LOG_INTERVAL = 10.0
_DIGITS = re.compile(r"[0-9]{1,12}")
# "(_ssl.c:992)" in OpenSSL error texts: noise for a user.
_SSL_SOURCE = re.compile(r"\s*\(_ssl\.c:\d+\)")

#: HTTP status of each named failure a handler may raise.
_STATUS_OF_ERROR: Dict[str, int] = {
    InvalidArgument.name: 400,
    AccessDenied.name: 403,
    NotFound.name: 404,
    PeerRejected.name: 409,
    AlreadyExists.name: 409,
}
#: Error names of statuses the HTTP machinery itself produces.
_ERROR_NAME_OF_STATUS: Dict[int, str] = {
    400: "InvalidArgument",
    404: "UnknownPath",
    405: "MethodNotAllowed",
    408: "RequestTimeout",
    411: "LengthRequired",
    413: "PayloadTooLarge",
    500: "Failed",
    503: "Busy",
}


def _clean(text: object, limit: int = 200) -> str:
    """Untrusted text made safe for one log or message line: printable and short."""
    s = "".join(c if c.isprintable() else "?" for c in str(text))
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _netloc(peer: HostPort) -> str:
    return f"[{peer.host}]:{peer.port}" if peer.host.version == 6 else f"{peer.host}:{peer.port}"


# ===========================================================================
# Server side


class PeerHandler(Protocol):
    """What the peer port asks the daemon; implemented by the manager.

    Both run on the daemon's event loop. ``claim`` returns a JSON-safe dict
    ``{"uid", "listeners": ["ip:port", ...], "psk": "<64 hex>", "cipher_suites"}``
    and raises NotFound (no such inbound endpoint), PeerRejected (already
    claimed), AccessDenied (not the endpoint's allowed peer) or
    InvalidArgument; ``claimant`` is the peer's address and, when it
    presented a verified client certificate, that certificate's names.
    """

    async def claim(
        self, uid: str, claimant: PeerIdentity, listeners: Tuple[HostPort, ...] = ()
    ) -> Dict[str, Any]: ...

    async def endpoint_state(self, uid: str) -> Dict[str, Any]: ...

    async def health(self) -> Dict[str, Any]: ...


class _HandlerTimeout(Exception):
    """The event loop did not answer within the server's timeout."""


class _Conn:
    """One accepted connection and what the server needs to cut it short."""

    __slots__ = ("addr", "deadline", "reaped", "sock", "thread", "waker", "who")

    def __init__(self, sock: socket.socket, addr: Tuple[Any, ...], deadline: float) -> None:
        self.sock = sock
        self.addr = addr
        self.who = _format_client(addr)
        self.deadline = deadline
        self.reaped = False
        # A second descriptor of the same socket: shutdown() on it wakes a worker
        # blocked in recv() on the TLS wrapper, from another thread, without
        # touching the SSL object the worker is using.
        self.waker: socket.socket | None = sock.dup()
        self.thread: threading.Thread | None = None

    def wake(self) -> None:
        if self.waker is not None:
            with contextlib.suppress(OSError):
                self.waker.shutdown(socket.SHUT_RDWR)


def _format_client(addr: Tuple[Any, ...]) -> str:
    try:
        ip: IPAddress = ipaddress.ip_address(addr[0])
    except (ValueError, IndexError, TypeError):
        return _clean(addr, 80)
    # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d; show them as IPv4.
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return f"[{ip}]:{addr[1]}" if ip.version == 6 else f"{ip}:{addr[1]}"


class _Listener:
    """The bound socket, and a socket pair that interrupts the accept loop at once."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.thread: threading.Thread | None = None

    def close(self) -> None:
        for s in (self.sock, self.wake_r, self.wake_w):
            s.close()


class PeerServer:
    """The TLS peer port of this daemon.

    ``client_ca``: PEM CA(s) that client certificates must chain to (None: no
    client certificates are asked for). ``require_client_cert``: claims and
    endpoint state need a verified client certificate (else 403 AccessDenied),
    and health answers without one reveal nothing but {"status": "ok"}.

    ``timeout`` bounds the TLS handshake, each socket read/write and each call
    into the event loop; a whole connection may live at most ``3 * timeout``.
    At most ``max_connections`` connections are served at once; more are
    closed right after accept. Usable as ``async with PeerServer(...) as srv``.
    """

    def __init__(
        self,
        host: Union[IPAddress, str],
        port: int,
        cert: Path,
        key: Path,
        client_ca: Path | None,
        handler: PeerHandler,
        loop: asyncio.AbstractEventLoop,
        *,
        require_client_cert: bool,
        timeout: float = 10.0,
        max_body: int = 64 * 1024,
        max_connections: int = 64,
    ) -> None:
        if not timeout > 0:
            raise InvalidArgument(f"peer port timeout must be > 0 seconds, not {timeout!r}")
        if not isinstance(max_body, int) or max_body < 2:
            raise InvalidArgument(f"peer port max_body must be >= 2 bytes, not {max_body!r}")
        if not isinstance(max_connections, int) or max_connections < 1:
            raise InvalidArgument(
                f"peer port max_connections must be >= 1, not {max_connections!r}"
            )
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise InvalidArgument(f"peer port {port!r} is not a port number: give 1..65535")
        try:
            self._host: IPAddress = ipaddress.ip_address(str(host))
        except ValueError:
            raise InvalidArgument(
                f"peer port address {_clean(host, 60)!r} is not an IP address: set "
                "listen_address to a literal address such as 0.0.0.0 or 192.168.150.1"
            ) from None
        self._port = port
        self._cert = Path(cert)
        self._key = Path(key)
        self._client_ca = Path(client_ca) if client_ca is not None else None
        self._require_client_cert = bool(require_client_cert)
        self._handler = handler
        self._loop = loop
        self._timeout = float(timeout)
        self._max_body = max_body
        self._max_connections = max_connections
        self._ctx: ssl.SSLContext | None = None
        self._listener: _Listener | None = None
        self._lock = threading.Lock()
        self._conns: Set[_Conn] = set()
        self._slots = threading.BoundedSemaphore(max_connections)
        self._refused = 0
        self._refused_logged_at = -_REFUSAL_LOG_INTERVAL
        self._stopping = False

    # -- public --------------------------------------------------------------

    @property
    def address(self) -> HostPort:
        """The bound address (the real port when constructed with port 0)."""
        if self._listener is None:
            raise RuntimeError("the peer server is not running")
        return HostPort(self._host, self._listener.sock.getsockname()[1])

    @property
    def running(self) -> bool:
        return self._listener is not None

    async def start(self) -> None:
        """Load the TLS material and listen.

        Raises ConfigError (naming the file) when the certificate, key or client
        CA cannot be loaded, and ScistreamError when the address cannot be bound.
        """
        if self._listener is not None:
            return
        self._ctx = self._make_context()
        listener = self._bind()
        self._stopping = False
        listener.thread = threading.Thread(
            target=self._accept_loop, args=(listener,), name=f"{THREAD_PREFIX}-accept", daemon=True
        )
        self._listener = listener
        listener.thread.start()
        if self._require_client_cert:
            mode = "client certificates required" + (
                f", verified with {self._client_ca}" if self._client_ca else
                ", but no CA to verify them with: every claim is refused"
            )
        else:
            mode = "client certificates NOT required (peer_require_client_cert = false)" + (
                f"; presented ones verified with {self._client_ca}" if self._client_ca else ""
            )
        logger.info("peer port listening on %s (TLS; %s)", self.address, mode)

    async def stop(self) -> None:
        """Stop accepting, cut open connections short and join every thread."""
        listener = self._listener
        if listener is None:
            return
        self._listener = None
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def finished() -> None:
            if not done.done():
                done.set_result(None)

        def work() -> None:
            try:
                self._stop_blocking(listener)
            finally:
                with contextlib.suppress(RuntimeError):  # the loop is already closed
                    loop.call_soon_threadsafe(finished)

        # A thread of our own, not the default executor: joining workers may
        # take a moment and must not hold the loop (their claims run on it).
        stopper = threading.Thread(target=work, name=f"{THREAD_PREFIX}-stop", daemon=True)
        stopper.start()
        await done
        stopper.join()
        logger.info("peer port stopped")

    async def __aenter__(self) -> PeerServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- setup ---------------------------------------------------------------

    def _make_context(self) -> ssl.SSLContext:
        for path, what in ((self._cert, "certificate"), (self._key, "private key")):
            try:
                with open(path, "rb"):
                    pass
            except OSError as e:
                raise ConfigError(
                    str(path),
                    "",
                    f"cannot read the peer-port TLS {what}: {e.strerror or e}; "
                    "create it or fix its permissions (the daemon must be able to read it)",
                ) from None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        # TLS 1.2 fallback: forward-secret AEAD suites only (TLS 1.3 suites are all fine).
        ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")
        ctx.options |= ssl.OP_NO_COMPRESSION
        # One request per connection; resumption buys nothing and tickets are
        # extra writes a short-lived client may never read.
        ctx.num_tickets = 0
        try:
            ctx.load_cert_chain(str(self._cert), str(self._key))
        except (ssl.SSLError, OSError, ValueError) as e:
            raise ConfigError(
                str(self._cert),
                "",
                f"cannot load the peer-port certificate with key {self._key}: {_ssl_reason(e)}; "
                "both must be PEM and the key must belong to the certificate",
            ) from None
        if self._client_ca is not None:
            try:
                ctx.load_verify_locations(cafile=str(self._client_ca))
            except (ssl.SSLError, OSError, ValueError) as e:
                raise ConfigError(
                    str(self._client_ca),
                    "",
                    f"cannot load the CA for peer client certificates: {_ssl_reason(e)}; "
                    "give a readable PEM file of the CA(s) that sign peer daemons' certificates",
                ) from None
            # Optional at the TLS level: a client without a certificate still gets
            # an HTTP answer naming the fix (see _RequestHandler._authenticated);
            # a certificate that does not chain to the CA fails the handshake.
            ctx.verify_mode = ssl.CERT_OPTIONAL
            # The trust may be the peer's own CA-issued certificate (pinning), as
            # on the client side.
            ctx.verify_flags |= getattr(ssl, "VERIFY_X509_PARTIAL_CHAIN", 0x80000)
        return ctx

    def _bind(self) -> _Listener:
        family = socket.AF_INET6 if self._host.version == 6 else socket.AF_INET
        where = f"[{self._host}]" if self._host.version == 6 else str(self._host)
        where = f"{where}:{self._port}"
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            # Rebinding right after a restart must not fail on TIME_WAIT leftovers;
            # on Linux this still refuses a port another socket listens on.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # "::" should also take IPv4 peers, whatever the sysctl default is.
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((str(self._host), self._port))
            sock.listen(128)
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            if e.errno == errno.EADDRINUSE:
                hint = (
                    "another program listens there (see: ss -ltnp 'sport = :"
                    f"{self._port}'); stop it or choose another peer_port"
                )
            elif e.errno == errno.EADDRNOTAVAIL:
                hint = "that address is not configured on this host; fix listen_address"
            elif e.errno == errno.EACCES:
                hint = "ports below 1024 need CAP_NET_BIND_SERVICE; choose peer_port >= 1024"
            else:
                hint = "check listen_address and peer_port"
            raise ScistreamError(
                f"cannot listen on the peer port {where}: {e.strerror or e}; {hint}"
            ) from None
        return _Listener(sock)

    # -- accept loop (accept thread) ----------------------------------------

    def _accept_loop(self, listener: _Listener) -> None:
        sel = selectors.DefaultSelector()
        try:
            sel.register(listener.sock, selectors.EVENT_READ)
            sel.register(listener.wake_r, selectors.EVENT_READ)
            while not self._stopping:
                # Sleep until a connection, stop(), or the next connection deadline.
                sel.select(self._next_deadline_in())
                if self._stopping:
                    break
                self._reap_expired()
                self._accept_pending(listener.sock)
        except Exception:
            logger.exception("peer port: the accept loop failed; peers cannot connect any more")
        finally:
            sel.close()

    def _accept_pending(self, sock: socket.socket) -> None:
        for _ in range(64):  # a bounded burst, then look at deadlines again
            try:
                conn, addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    logger.error("peer port: cannot accept connections: %s", e.strerror or e)
                    # The backlog stays readable: pause instead of spinning hot.
                    time.sleep(0.1)
                    return
                continue  # that client gave up between SYN and accept
            self._dispatch(conn, addr)

    def _next_deadline_in(self) -> float | None:
        with self._lock:
            deadlines = [c.deadline for c in self._conns if not c.reaped]
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def _dispatch(self, sock: socket.socket, addr: Tuple[Any, ...]) -> None:
        if self._stopping or not self._slots.acquire(blocking=False):
            self._refused += 1
            now = time.monotonic()
            # A flood must not flood the journal too: one line per interval.
            if now - self._refused_logged_at >= _REFUSAL_LOG_INTERVAL:
                logger.warning(
                    "peer port: %d connections in progress (max_connections); refused %d "
                    "connection(s), the last from %s",
                    self._max_connections,
                    self._refused,
                    _format_client(addr),
                )
                self._refused = 0
                self._refused_logged_at = now
            sock.close()
            return
        conn: _Conn | None = None
        try:
            conn = _Conn(sock, addr, time.monotonic() + 3 * self._timeout)
            thread = threading.Thread(
                target=self._serve_connection,
                args=(conn,),
                name=f"{THREAD_PREFIX}-{conn.who}",
                daemon=True,
            )
            conn.thread = thread
            with self._lock:
                self._conns.add(conn)
            thread.start()
        except Exception:  # e.g. out of descriptors or threads: drop this one, keep serving
            logger.exception("peer port: cannot serve %s", _format_client(addr))
            self._forget(conn)
            sock.close()
            self._slots.release()

    def _reap_expired(self) -> None:
        now = time.monotonic()
        with self._lock:
            for conn in self._conns:
                if conn.deadline <= now and not conn.reaped:
                    conn.reaped = True
                    logger.info(
                        "peer port: closing connection from %s: no complete exchange within %.0f s",
                        conn.who,
                        3 * self._timeout,
                    )
                    conn.wake()

    def _forget(self, conn: _Conn | None) -> None:
        if conn is None:
            return
        with self._lock:
            self._conns.discard(conn)
            if conn.waker is not None:
                conn.waker.close()
                conn.waker = None

    def _stop_blocking(self, listener: _Listener) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            listener.wake_w.send(b"x")
        if listener.thread is not None:
            listener.thread.join()  # after this no new workers appear
        with self._lock:
            conns = list(self._conns)
            for conn in conns:
                conn.wake()
        for conn in conns:
            if conn.thread is not None:
                conn.thread.join(self._timeout + _LINGER_SECONDS)
                if conn.thread.is_alive():
                    logger.warning("peer port: connection thread for %s did not end", conn.who)
        listener.close()

    # -- one connection (worker thread) --------------------------------------

    def _serve_connection(self, conn: _Conn) -> None:
        tls: ssl.SSLSocket | None = None
        try:
            conn.sock.settimeout(self._timeout)
            ctx = self._ctx
            if ctx is None or self._stopping:
                return
            # Handshake here, not in accept: a client that never sends a
            # ClientHello costs this thread its timeout and nothing else.
            tls = ctx.wrap_socket(conn.sock, server_side=True, do_handshake_on_connect=False)
            try:
                tls.do_handshake()
            except ssl.SSLError as e:
                if _is_client_cert_failure(e):
                    logger.warning(
                        "peer port: refused %s: its client certificate is not trusted (%s)",
                        conn.who, _cert_failure_text(e),
                        extra={"MESSAGE_ID": MSG_PEER_REFUSED.hex},
                    )
                else:
                    logger.debug("peer port: TLS handshake with %s failed: %s", conn.who, e)
                self._linger(tls)
                return
            except OSError as e:  # timeout, reset, stopped
                logger.debug("peer port: TLS handshake with %s failed: %s", conn.who, e)
                return
            if self._stopping:
                return
            _RequestHandler(tls, conn.addr, self)
            self._linger(tls)
        except OSError as e:
            logger.debug("peer port: connection with %s ended: %s", conn.who, e)
        except Exception:
            logger.exception("peer port: unexpected error serving %s", conn.who)
        finally:
            with contextlib.suppress(OSError):
                (tls or conn.sock).close()
            self._forget(conn)
            self._slots.release()

    def _linger(self, tls: ssl.SSLSocket) -> None:
        """Half-close, then drain the client's leftovers briefly (see _LINGER_SECONDS)."""
        try:
            # SSLSocket.shutdown drops the SSL layer: the drain below reads raw bytes.
            tls.shutdown(socket.SHUT_WR)
            end = time.monotonic() + min(self._timeout, _LINGER_SECONDS)
            budget = _LINGER_BYTES
            while budget > 0:
                left = end - time.monotonic()
                if left <= 0:
                    break
                tls.settimeout(left)
                data = tls.recv(min(65536, budget))
                if not data:
                    break
                budget -= len(data)
        except OSError:
            pass

    # -- bridge to the event loop --------------------------------------------

    def _call(self, make: Callable[[], Any]) -> Any:
        """Run the coroutine ``make()`` on the daemon's loop; wait at most ``timeout``."""
        coro = make()
        try:
            fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        except RuntimeError:  # loop closed: the daemon is going down
            coro.close()
            raise _HandlerTimeout("the daemon is shutting down") from None
        try:
            return fut.result(self._timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise _HandlerTimeout(f"no answer within {self._timeout:g} s") from None
        except concurrent.futures.CancelledError:
            raise _HandlerTimeout("the request was cancelled") from None


def _is_client_cert_failure(e: ssl.SSLError) -> bool:
    return isinstance(e, ssl.SSLCertVerificationError) or getattr(e, "reason", "") in (
        "PEER_DID_NOT_RETURN_A_CERTIFICATE",
        "NO_CERTIFICATES_RETURNED",
    )


def _cert_failure_text(e: ssl.SSLError) -> str:
    if isinstance(e, ssl.SSLCertVerificationError) and getattr(e, "verify_message", ""):
        return _clean(e.verify_message, 120)
    return _ssl_reason(e)


def _ssl_reason(e: BaseException) -> str:
    if isinstance(e, ssl.SSLError) and getattr(e, "reason", None):
        return str(e.reason)
    if isinstance(e, OSError) and e.strerror:
        return _clean(_SSL_SOURCE.sub("", e.strerror))
    return _clean(_SSL_SOURCE.sub("", str(e)))


class _RequestHandler(BaseHTTPRequestHandler):
    """One HTTP request on an already handshaken TLS socket; always closes after it."""

    protocol_version = "HTTP/1.1"
    server_version = "scistreamd"
    sys_version = ""
    disable_nagle_algorithm = True
    server: PeerServer

    # -- plumbing ------------------------------------------------------------

    def version_string(self) -> str:
        return "scistreamd"  # no Python/OS version leak

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        logger.debug(
            "peer port %s: %s", _format_client(self.client_address), _clean(format % args, 300)
        )

    def _send_json(
        self, code: int, doc: Dict[str, Any], headers: Tuple[Tuple[str, str], ...] = ()
    ) -> None:
        body = (json.dumps(doc, separators=(",", ":")) + "\n").encode("utf-8")
        self.close_connection = True
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        # A claim answer carries a key: no intermediary may keep it.
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_error_json(
        self, code: int, name: str, message: str, headers: Tuple[Tuple[str, str], ...] = ()
    ) -> None:
        self._send_json(code, {"error": name, "message": message}, headers)

    def _send_failure(self, err: ScistreamError) -> None:
        self._send_error_json(_STATUS_OF_ERROR.get(err.name, 500), err.name, str(err))

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The stdlib's own errors (bad request line, header limits...) as JSON."""
        code = int(code)
        if code == HTTPStatus.NOT_IMPLEMENTED:  # no do_<METHOD>: an unknown method
            self._method_not_allowed(())
            return
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "Error"
        name = _ERROR_NAME_OF_STATUS.get(code) or phrase.title().replace(" ", "").replace("-", "")
        self._send_error_json(code, name, _clean(message or phrase))

    def handle_expect_100(self) -> bool:
        # Refuse an oversized body before inviting the client to send it.
        length = (self.headers.get("Content-Length") or "").strip()
        if _DIGITS.fullmatch(length) and int(length) > self.server._max_body:
            self._too_large(int(length))
            return False
        return super().handle_expect_100()

    # -- routing -------------------------------------------------------------

    def _route(self) -> None:
        self.close_connection = True
        parts = self.path.split("?", 1)[0].split("/")
        if parts == ["", "v1", "health"]:
            if self._allowed(("GET",)):
                self._health()
        elif len(parts) == 5 and parts[1:3] == ["v1", "endpoints"] and parts[4] == "claim":
            if self._allowed(("POST",)):
                self._claim(parts[3])
        elif len(parts) == 4 and parts[1:3] == ["v1", "endpoints"]:
            if self._allowed(("GET",)):
                self._endpoint_state(parts[3])
        else:
            self._send_error_json(
                404,
                "UnknownPath",
                "no such API path: this scistreamd peer port serves GET /v1/health, "
                "GET /v1/endpoints/<uid> and POST /v1/endpoints/<uid>/claim",
            )

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _route

    def _allowed(self, methods: Tuple[str, ...]) -> bool:
        if self.command in methods:
            return True
        self._method_not_allowed(methods)
        return False

    def _method_not_allowed(self, methods: Tuple[str, ...]) -> None:
        allow = ", ".join(methods) if methods else "GET, POST"
        self._send_error_json(
            405,
            "MethodNotAllowed",
            f"method not allowed here; use {allow}",
            (("Allow", allow),),
        )

    def _too_large(self, length: int) -> None:
        self._send_error_json(
            413,
            "PayloadTooLarge",
            f"the request body has {length} bytes; at most {self.server._max_body} are accepted",
        )

    def _read_json_object(self) -> Dict[str, Any] | None:
        """The request body as a JSON object, or None after answering an error."""
        if "Transfer-Encoding" in self.headers:
            self._send_error_json(
                411,
                "LengthRequired",
                "send the body with Content-Length; chunked transfer encoding is not accepted",
            )
            return None
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            self._send_error_json(
                411, "LengthRequired", "send Content-Length with the JSON body (e.g. {})"
            )
            return None
        raw = lengths[0].strip()
        if len(lengths) != 1 or not _DIGITS.fullmatch(raw):
            self._send_error_json(400, "InvalidArgument", "Content-Length is malformed")
            return None
        length = int(raw)
        if length > self.server._max_body:
            self._too_large(length)
            return None
        # Empty body means no options, same as {}.
        data = self.rfile.read(length) if length else b"{}"
        if len(data) != length and length:
            raise ConnectionError("client closed before sending the whole body")
        try:
            doc = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            doc = None
        if not isinstance(doc, dict):
            self._send_error_json(
                400, "InvalidArgument", "the request body must be a JSON object, e.g. {}"
            )
            return None
        return doc

    def _identity(self) -> PeerIdentity:
        """Who is asking: the address, and the names of a verified client certificate."""
        who = _format_client(self.client_address)
        if self.server._client_ca is None:
            return PeerIdentity(who)  # no certificate was asked for
        try:
            # The dict form is empty unless the certificate was verified (CERT_OPTIONAL
            # fails the handshake for one that does not chain to the CA).
            cert = self.connection.getpeercert()
        except (ValueError, OSError):
            cert = None
        if not cert:
            return PeerIdentity(who)
        return _identity_of(who, cert)

    def _authenticated(self, what: str, uid: str, who: PeerIdentity) -> bool:
        """False (after a named 403) when a verified client certificate is required and absent."""
        if who.verified or not self.server._require_client_cert:
            return True
        if self.server._client_ca is None:
            why = "this gateway has no CA to verify peer certificates with"
            fix = ("its administrator must install the peer's CA or certificate as "
                   "peer_trust_file (or peer_client_ca) and restart scistreamd")
        else:
            why = "no client certificate was presented"
            fix = ("configure peer_cert/peer_key on the claiming gateway and exchange trust "
                   "files: each gateway's peer_trust_file must hold the other's CA or "
                   "certificate")
        logger.warning(
            "peer port: refused %s of endpoint %s by %s: %s",
            what, uid, who, why,
            extra={"MESSAGE_ID": MSG_PEER_REFUSED.hex, "SCISTREAM_UID": uid},
        )
        self._send_error_json(
            403, AccessDenied.name,
            f"{why}, and this peer port serves only peers with a trusted client certificate: "
            f"{fix}",
        )
        return False

    # -- endpoints -----------------------------------------------------------

    def _health(self) -> None:
        if not self._identity().verified:
            # Anyone may see that the port is up; the version and counts are for peers.
            self._respond_ok({"status": "ok"})
            return
        try:
            info = self.server._call(self.server._handler.health)
        except _HandlerTimeout as e:
            self._send_error_json(503, "Busy", f"the daemon is busy ({e}); try again")
            return
        except ScistreamError as e:
            self._send_failure(e)
            return
        except Exception:
            logger.exception("peer port: health check failed")
            self._send_error_json(500, "Failed", "internal error; see the journal of scistreamd")
            return
        doc = dict(info) if isinstance(info, dict) else {}
        doc.setdefault("status", "ok")
        doc.setdefault("version", __version__)
        doc.setdefault("api", API_PREFIX.strip("/"))
        self._respond_ok(doc)

    def _endpoint_state(self, raw_uid: str) -> None:
        """Whether an inbound endpoint still exists (no key material): for the outbound side."""
        try:
            uid = parse_uid(raw_uid)
            if not self._authenticated("a state check", uid, self._identity()):
                return
            result = self.server._call(lambda: self.server._handler.endpoint_state(uid))
        except _HandlerTimeout as e:
            self._send_error_json(503, "Busy", f"the daemon is busy ({e}); try again")
            return
        except ScistreamError as e:
            self._send_failure(e)
            return
        except Exception:
            logger.exception("peer port: endpoint state of %s failed", raw_uid[:64])
            self._send_error_json(500, "Failed", "internal error; see the journal of scistreamd")
            return
        self._respond_ok(result if isinstance(result, dict) else {})

    def _claim(self, raw_uid: str) -> None:
        claimant = self._identity()
        try:
            uid = parse_uid(raw_uid)
        except InvalidArgument as e:
            self._send_failure(e)
            return
        # Before the body is read: an unauthenticated client gets nothing processed.
        if not self._authenticated("a claim", uid, claimant):
            return
        doc = self._read_json_object()
        if doc is None:
            return
        try:
            # The listeners the claimant will connect to: checked before the key
            # leaves, so a mistyped listener does not use up the one claim.
            listeners = parse_hostport_list(doc.get("listeners", []), "listeners", min_len=0)
            unknown = set(doc) - {"listeners"}
            if unknown:
                raise InvalidArgument(f"unknown claim fields: {', '.join(sorted(unknown))[:200]}")
        except InvalidArgument as e:
            self._send_failure(e)
            return
        handler = self.server._handler
        try:
            result = self.server._call(lambda: handler.claim(uid, claimant, listeners))
        except _HandlerTimeout as e:
            logger.warning("peer port: claim of endpoint %s by %s: %s", uid, claimant, e)
            self._send_error_json(503, "Busy", f"the daemon is busy ({e}); try again")
            return
        except ScistreamError as e:
            if isinstance(e, AccessDenied):  # the manager logged it, with the endpoint's fields
                logger.debug("peer port: refused claim of endpoint %s by %s: %s", uid, claimant, e)
            else:
                logger.info("peer port: refused claim of endpoint %s by %s: %s", uid, claimant, e)
            self._send_failure(e)
            return
        except Exception:
            logger.exception("peer port: claim of endpoint %s by %s failed", uid, claimant)
            self._send_error_json(500, "Failed", "internal error; see the journal of scistreamd")
            return
        if not isinstance(result, dict):
            logger.error("peer port: claim handler returned %s, not a dict", type(result).__name__)
            self._send_error_json(500, "Failed", "internal error; see the journal of scistreamd")
            return
        logger.info("peer port: handed the key of endpoint %s to %s", uid, claimant)
        self._respond_ok(result)

    def _respond_ok(self, doc: Dict[str, Any]) -> None:
        try:
            json.dumps(doc)
        except (TypeError, ValueError):
            logger.exception("peer port: answer is not JSON-serialisable")
            self._send_error_json(500, "Failed", "internal error; see the journal of scistreamd")
            return
        self._send_json(200, doc)


def _identity_of(who: str, cert: Dict[str, Any]) -> PeerIdentity:
    """A PeerIdentity from ssl's dict form of a verified certificate."""
    ips: List[IPAddress] = []
    dns: List[str] = []
    for kind, value in cert.get("subjectAltName", ()):
        if not isinstance(value, str):
            continue
        if kind == "IP Address":
            # ssl prints IPv6 SANs in full upper-case form: parse, do not compare text.
            with contextlib.suppress(ValueError):
                ips.append(ipaddress.ip_address(value.strip()))
        elif kind == "DNS":
            dns.append(_clean(value, 253))
    cn = ""
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName" and not cn:
                cn = _clean(value, 64)
    return PeerIdentity(who, True, tuple(ips[:16]), tuple(dns[:16]), cn)


# ===========================================================================
# Client side


@dataclass(frozen=True)
class PeerEndpoint:
    """An inbound endpoint as the peer described it; every field already validated."""

    uid: str
    listeners: Tuple[HostPort, ...]
    psk: str = field(repr=False)  # never in logs or reprs
    cipher_suites: str


class _PeerSSLContext(ssl.SSLContext):
    """Verifies the server against the IP we dialled, whatever urllib3 passes.

    urllib3 1.26 sends no server_hostname for IP literals and falls back to its
    own name matching (which also accepts a commonName); forcing the dialled
    IP here makes OpenSSL check the IP subjectAltName itself, in every version.
    """

    expected_host = ""

    def wrap_socket(self, sock: socket.socket, *args: Any, **kwargs: Any) -> ssl.SSLSocket:  # type: ignore[override]
        kwargs["server_hostname"] = self.expected_host
        return super().wrap_socket(sock, *args, **kwargs)


class _PeerAdapter(HTTPAdapter):
    """requests adapter whose only trust is our SSLContext."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self._context = context
        super().__init__(max_retries=0)

    def init_poolmanager(
        self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any
    ) -> None:
        pool_kwargs["ssl_context"] = self._context
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        # requests would load its CA bundle into our context here, trusting
        # every public CA for the peer; we trust exactly what the caller gave.
        conn.cert_reqs = "CERT_REQUIRED"
        conn.ca_certs = None
        conn.ca_cert_dir = None


def _client_context(
    peer: HostPort,
    trust_file: Path | None,
    trust_pem: str | None,
    client_cert: Path | None,
    client_key: Path | None,
) -> Tuple[ssl.SSLContext, str]:
    """The client SSLContext and a description of what it trusts (for messages)."""
    ctx = _PeerSSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED + hostname check
    ctx.expected_host = str(peer.host)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # Allow pinning the peer's own (CA-issued) certificate, not only its root.
    ctx.verify_flags |= getattr(ssl, "VERIFY_X509_PARTIAL_CHAIN", 0x80000)
    if trust_pem is not None:
        trust = "the certificate given with --server_cert"
        if not isinstance(trust_pem, str) or "-----BEGIN CERTIFICATE-----" not in trust_pem:
            raise InvalidArgument(
                "the peer certificate given with --server_cert is not PEM: pass the peer's "
                "certificate (or its CA) as a '-----BEGIN CERTIFICATE-----' file"
            )
        try:
            ctx.load_verify_locations(cadata=trust_pem)
        except (ssl.SSLError, ValueError, TypeError) as e:
            raise InvalidArgument(
                "the peer certificate given with --server_cert cannot be loaded: "
                f"{_ssl_reason(e)}; pass the peer's PEM certificate or CA"
            ) from None
    elif trust_file is not None:
        trust = str(trust_file)
        try:
            ctx.load_verify_locations(cafile=str(trust_file))
        except (ssl.SSLError, OSError, ValueError) as e:
            raise InvalidArgument(
                f"cannot load the peer trust file {trust_file}: {_ssl_reason(e)}; "
                "give a readable PEM file with the peer's certificate or CA"
            ) from None
    else:
        trust = "the system CA store"
        ctx.load_default_certs()
    if client_cert is not None or client_key is not None:
        if client_cert is None:
            raise InvalidArgument("a client key was given without a client certificate: give both")
        try:
            ctx.load_cert_chain(
                str(client_cert), str(client_key) if client_key is not None else None
            )
        except (ssl.SSLError, OSError, ValueError) as e:
            raise InvalidArgument(
                f"cannot load the client certificate {client_cert}"
                + (f" with key {client_key}" if client_key is not None else "")
                + f": {_ssl_reason(e)}; both must be readable PEM and the key must match"
            ) from None
    return ctx, trust


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """exc and everything it wraps (requests/urllib3 nest errors in args/reason)."""
    seen: Set[int] = set()
    stack: List[BaseException | None] = [exc]
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


#: TLS alerts a server sends when it does not accept our client certificate (or its absence).
_CLIENT_CERT_ALERTS = frozenset(
    {
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
        "SSLV3_ALERT_HANDSHAKE_FAILURE",
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        "TLSV1_ALERT_UNKNOWN_CA",
        "TLSV1_ALERT_ACCESS_DENIED",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED",
        "SSLV3_ALERT_CERTIFICATE_REVOKED",
    }
)
_UNREACHABLE_ERRNOS = frozenset(
    {
        errno.ECONNREFUSED,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ETIMEDOUT,
        errno.EHOSTDOWN,
        errno.ENETDOWN,
        errno.EADDRNOTAVAIL,
    }
)


def _transport_error(
    exc: BaseException, peer: HostPort, trust: str, timeout: float
) -> ScistreamError:
    causes = list(_causes(exc))
    for c in causes:
        if isinstance(c, ssl.SSLCertVerificationError):
            detail = _clean(getattr(c, "verify_message", "") or c.reason or c)
            # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
            if getattr(c, "verify_code", 0) in (62, 64):
                return PeerRejected(
                    f"certificate of {peer} is not valid for {peer.host}: {detail}; the peer's "
                    f"certificate must list {peer.host} as an IP subjectAltName (reissue it), "
                    "or address the peer by an IP its certificate lists"
                )
            return PeerRejected(
                f"certificate of {peer} is not trusted by {trust}: {detail}; "
                "pass the peer's certificate or CA with --server_cert"
            )
    for c in causes:
        if isinstance(c, ssl.SSLError) and getattr(c, "reason", None) in _CLIENT_CERT_ALERTS:
            return AccessDenied(
                f"peer scistreamd at {peer} refused the TLS handshake ({c.reason}): it accepts "
                "only peers with a client certificate it trusts; this daemon's peer_cert must "
                "be signed by a CA in the peer's peer_trust_file (or be in it): exchange trust "
                "files with the peer's administrator"
            )
    for c in causes:
        if isinstance(
            c,
            (
                requests.Timeout,
                socket.timeout,
                TimeoutError,
                NewConnectionError,
                ConnectTimeoutError,
            ),
        ) or (isinstance(c, OSError) and c.errno in _UNREACHABLE_ERRNOS):
            reason = (
                c.strerror
                if isinstance(c, OSError) and c.errno in _UNREACHABLE_ERRNOS and c.strerror
                else f"no answer within {timeout:g} s"
                if isinstance(c, (requests.Timeout, socket.timeout, TimeoutError))
                else _innermost_text(causes)
            )
            return PeerUnreachable(
                f"peer scistreamd at {peer} is not reachable: {reason}; check that scistreamd "
                f"runs there and that its peer_port and the firewall allow TCP port {peer.port}"
            )
    for c in causes:
        # An EOF mid-handshake is a closed connection, not a TLS disagreement.
        if isinstance(c, ssl.SSLError) and not isinstance(
            c, (ssl.SSLEOFError, ssl.SSLZeroReturnError)
        ):
            return PeerRejected(
                f"TLS with peer scistreamd at {peer} failed: {_ssl_reason(c)}; check that "
                f"{peer} is a scistreamd peer port (it speaks TLS 1.2 or newer) and whether it "
                "requires a client certificate"
            )
    return PeerRejected(
        f"peer scistreamd at {peer} closed the connection ({_innermost_text(causes)}); it may "
        "require a client certificate, have too many connections open, or not be a scistreamd "
        "peer port; see its journal (journalctl -u scistreamd)"
    )


def _innermost_text(causes: List[BaseException]) -> str:
    for c in reversed(causes):
        if isinstance(c, OSError) and c.strerror:
            return _ssl_reason(c)
    return _clean(causes[-1] if causes else "unknown error", 160)


def _exchange(
    peer: HostPort,
    method: str,
    path: str,
    body: bytes | None,
    *,
    trust_file: Path | None,
    trust_pem: str | None,
    client_cert: Path | None,
    client_key: Path | None,
    timeout: float,
) -> Tuple[int, Any]:
    """One request; returns (status, parsed JSON). Raises only ScistreamErrors."""
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise InvalidArgument(f"peer timeout must be a number of seconds > 0, not {timeout!r}")
    ctx, trust = _client_context(peer, trust_file, trust_pem, client_cert, client_key)
    url = f"https://{_netloc(peer)}{path}"
    headers = {
        "Accept": "application/json",
        "Accept-Encoding": "identity",  # no decompression bombs
        "User-Agent": f"scistreamd/{__version__}",
    }
    if body is not None:
        headers["Content-Type"] = "application/json"
    deadline = time.monotonic() + 3 * timeout
    session = requests.Session()
    session.trust_env = False  # no proxies or .netrc between two gateways
    session.mount("https://", _PeerAdapter(ctx))
    try:
        resp = session.request(
            method,
            url,
            data=body,
            headers=headers,
            timeout=(timeout, timeout),
            stream=True,
            allow_redirects=False,
        )
        try:
            status = resp.status_code
            declared = (resp.headers.get("Content-Length") or "").strip()
            if _DIGITS.fullmatch(declared) and int(declared) > MAX_RESPONSE:
                raise PeerRejected(
                    f"peer scistreamd at {peer} answered garbage: a {declared}-byte body "
                    f"(at most {MAX_RESPONSE} expected); is {peer} a scistreamd peer port?"
                )
            chunks: List[bytes] = []
            size = 0
            for chunk in resp.iter_content(16384):
                size += len(chunk)
                if size > MAX_RESPONSE:
                    raise PeerRejected(
                        f"peer scistreamd at {peer} answered garbage: more than {MAX_RESPONSE} "
                        f"bytes; is {peer} a scistreamd peer port?"
                    )
                chunks.append(chunk)
                if time.monotonic() > deadline:
                    raise PeerUnreachable(
                        f"peer scistreamd at {peer} is too slow: no complete answer within "
                        f"{3 * timeout:g} s; check the peer host and network"
                    )
        finally:
            resp.close()
    except requests.RequestException as e:
        logger.debug("peer %s: %s %s failed", peer, method, path, exc_info=True)
        raise _transport_error(e, peer, trust, timeout) from None
    finally:
        session.close()
    raw = b"".join(chunks)
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise PeerRejected(
            f"peer scistreamd at {peer} answered garbage (HTTP {status}, not JSON: "
            f"{_clean(raw[:60])!r}); is {peer} a scistreamd peer port?"
        ) from None
    return status, doc


def _status_error(peer: HostPort, status: int, doc: Any, uid: str | None) -> ScistreamError:
    """The named failure for a non-200 answer."""
    name = doc.get("error") if isinstance(doc, dict) else None
    msg = doc.get("message") if isinstance(doc, dict) else None
    name = _clean(name, 40) if isinstance(name, str) else ""
    # Room for the peer's whole message: its refusals name the fix at the end.
    msg = _clean(msg, 480) if isinstance(msg, str) else ""
    said = f" (peer says: {msg})" if msg else ""
    if status == 400:
        return InvalidArgument(f"peer scistreamd at {peer} refused the request{said}")
    if status == 404 and name == "NotFound" and uid is not None:
        return NotFound(
            f"peer {peer} has no endpoint {uid}{said}; check the uid, and that the inbound "
            f"request was made on that host and not released"
        )
    if status == 409:
        return PeerRejected(
            f"the key of endpoint {uid} was already claimed from {peer}{said}; a key is handed "
            "out once: release the endpoint on the inbound side and make a new inbound request"
        )
    if status == 403:
        # Keeps its name (AccessDenied, exit 9): the peer does not accept this gateway.
        return AccessDenied(
            f"peer scistreamd at {peer} refused access{said}; ask its administrator to allow "
            "this gateway"
        )
    if status == 503:
        return PeerUnreachable(f"peer scistreamd at {peer} is busy{said}; try again shortly")
    what = f"HTTP {status}" + (f" {name}" if name else "")
    return PeerRejected(
        f"peer scistreamd at {peer} answered {what}{said}; is {peer} a scistreamd peer port "
        "of a compatible version? See its journal (journalctl -u scistreamd)"
    )


def _parse_claim(doc: Any, uid: str, peer: HostPort) -> PeerEndpoint:
    def garbage(why: str) -> PeerRejected:
        return PeerRejected(
            f"peer scistreamd at {peer} answered garbage for endpoint {uid}: {why}; "
            "is it a scistreamd peer port of a compatible version?"
        )

    if not isinstance(doc, dict):
        raise garbage("the answer is not a JSON object")
    missing = [k for k in ("uid", "listeners", "psk", "cipher_suites") if k not in doc]
    if missing:
        raise garbage(f"the answer lacks {', '.join(missing)}")
    try:
        got_uid = parse_uid(doc["uid"])
    except InvalidArgument:
        raise garbage("its uid is malformed") from None
    if got_uid != uid:
        raise garbage(f"it describes endpoint {got_uid}, not the one asked for")
    raw_listeners = doc["listeners"]
    if not isinstance(raw_listeners, list) or not 1 <= len(raw_listeners) <= MAX_LIST_LEN:
        raise garbage(f"listeners must be a list of 1..{MAX_LIST_LEN} 'ip:port' strings")
    try:
        listeners = tuple(parse_hostport(item, "peer listener") for item in raw_listeners)
    except InvalidArgument as e:
        raise garbage(_clean(e)) from None
    try:
        psk = parse_psk(doc["psk"])
    except InvalidArgument:
        raise garbage("the key is not 64 lower-case hex characters") from None
    try:
        suites = parse_ciphersuites(doc["cipher_suites"])
    except InvalidArgument as e:
        raise garbage(f"cipher_suites: {_clean(e)}") from None
    return PeerEndpoint(uid=uid, listeners=listeners, psk=psk, cipher_suites=suites)


def _as_peer(peer: Union[HostPort, str]) -> HostPort:
    return parse_hostport(peer, "peer scistreamd address")


def _guard(peer: Any, call: Callable[[], Any]) -> Any:
    """Run call(); whatever goes wrong surfaces as a ScistreamError."""
    try:
        return call()
    except ScistreamError:
        raise
    except Exception as e:
        logger.debug("peer %s: unexpected failure", peer, exc_info=True)
        raise PeerRejected(
            f"talking to peer scistreamd at {peer} failed unexpectedly: "
            f"{type(e).__name__}: {_clean(e)}; see the daemon's journal"
        ) from None


def _request_ok(
    peer: HostPort, method: str, path: str, body: bytes | None, uid: str | None,
    trust: Dict[str, Any],
) -> Any:
    """One exchange that must answer 200; its parsed JSON body."""
    status, doc = _exchange(peer, method, path, body, **trust)
    if status != 200:
        raise _status_error(peer, status, doc, uid)
    return doc


def claim_endpoint(
    peer: HostPort,
    uid: str,
    *,
    trust_file: Path | None = None,
    trust_pem: str | None = None,
    client_cert: Path | None = None,
    client_key: Path | None = None,
    timeout: float = 10.0,
    listeners: Sequence[HostPort] = (),
) -> PeerEndpoint:
    """Claim endpoint ``uid``'s listeners and key from the peer daemon (blocking).

    The peer's certificate is verified against ``trust_pem`` (PEM text, wins)
    or ``trust_file`` (a CA bundle or the peer's own certificate), else the
    system CA store, and must list the peer's IP as a subjectAltName.

    Raises only ScistreamErrors:

    - InvalidArgument: bad ``uid``/``peer``, unloadable trust or client
      certificate, or the peer said 400;
    - PeerUnreachable: refused, timed out, no route, or the peer said 503 (busy);
    - AccessDenied: the peer does not accept this gateway: it refused our
      client certificate (or its absence) in the handshake, or said 403
      (no trusted certificate, or not the endpoint's allowed peer);
    - PeerRejected: untrusted or mismatched server certificate, the key was
      already claimed (409), any other status, or the answer is garbage (not
      JSON, too large, wrong uid, malformed listeners/key/suites);
    - NotFound: the peer has no such endpoint (404 NotFound).
    """
    trust = dict(trust_file=trust_file, trust_pem=trust_pem, client_cert=client_cert,
                 client_key=client_key, timeout=timeout)

    def run() -> PeerEndpoint:
        hp = _as_peer(peer)
        want = parse_uid(uid)
        body = json.dumps({"listeners": [str(h) for h in listeners]}).encode()
        doc = _request_ok(hp, "POST", f"{API_PREFIX}/endpoints/{want}/claim", body, want,
                          trust)
        endpoint = _parse_claim(doc, want, hp)
        logger.info("claimed endpoint %s from peer %s", want, hp)
        return endpoint

    return _guard(peer, run)


def endpoint_state(
    peer: HostPort,
    uid: str,
    *,
    trust_file: Path | None = None,
    trust_pem: str | None = None,
    client_cert: Path | None = None,
    client_key: Path | None = None,
    timeout: float = 10.0,
) -> str:
    """The state of inbound endpoint ``uid`` at the peer (blocking); NotFound if it is gone."""
    trust = dict(trust_file=trust_file, trust_pem=trust_pem, client_cert=client_cert,
                 client_key=client_key, timeout=timeout)

    def run() -> str:
        hp = _as_peer(peer)
        want = parse_uid(uid)
        doc = _request_ok(hp, "GET", f"{API_PREFIX}/endpoints/{want}", None, want, trust)
        state = doc.get("state") if isinstance(doc, dict) else None
        if not isinstance(state, str) or not state.isalpha() or len(state) > 32:
            raise PeerRejected(f"peer scistreamd at {hp} answered garbage for endpoint {want}")
        return state

    return _guard(peer, run)


def health(
    peer: HostPort,
    *,
    trust_file: Path | None = None,
    trust_pem: str | None = None,
    client_cert: Path | None = None,
    client_key: Path | None = None,
    timeout: float = 10.0,
) -> Dict[str, Any]:
    """The peer's ``/v1/health`` object (blocking); same trust and errors as claim_endpoint."""
    trust = dict(trust_file=trust_file, trust_pem=trust_pem, client_cert=client_cert,
                 client_key=client_key, timeout=timeout)

    def run() -> Dict[str, Any]:
        hp = _as_peer(peer)
        doc = _request_ok(hp, "GET", f"{API_PREFIX}/health", None, None, trust)
        if not isinstance(doc, dict):
            raise PeerRejected(
                f"peer scistreamd at {hp} answered garbage to a health check (not a JSON "
                "object); is it a scistreamd peer port?"
            )
        return doc

    return _guard(peer, run)
