"""The peer port's server: TLS + one HTTP request per connection, on the daemon's loop.

A reader callback on the listening socket accepts plain TCP and starts a task
per connection in one step (asyncio's Server, like a task around sock_accept,
can lose a connection accepted just before it stops). TLS runs through memory
BIOs (peertls.ServerTls): the server counts a connection before any TLS work,
sends every TLS alert before closing, and needs no thread. Deadlines: the
handshake (short), each read, the daemon's answer (else 503 Busy) and the
whole connection (3 x timeout, against slowloris). Connections are capped in
total and per source address: a flood that never starts TLS holds at most its
own source's share, each connection for the short handshake deadline. (A share
fits a gateway's concurrent claims; the unit's LimitNOFILE covers the total.)

Peer authentication: with a client CA every client is asked for a
certificate (CERT_OPTIONAL): one that does not chain fails the handshake;
none at all completes it, so that with ``require_client_cert`` claims and
state checks get a named 403 AccessDenied instead of a bare TLS alert.

The user API (/v1/tunnels) is answered by userapi.UserApi. A certificate that
chains to ``user_client_ca`` but not to the peer CA is a user's: for claims and
state checks it counts as none.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import ipaddress
import logging
import socket
import ssl
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Dict, Optional, Protocol, Tuple, Union

from . import __version__, reqstats
from .errors import AccessDenied, InvalidArgument, ScistreamError
from .identity import Identity
from .listensock import ConnectionCaps, bind_listener
from .model import HostPort, IPAddress, parse_uid
from .peerident import PeerIdentity
from .peertls import (
    ServerTls,
    cert_failure_text,
    format_client,
    identity_of,
    is_client_cert_failure,
    server_context,
)
from .peerwire import (
    API_PREFIX,
    METHODS,
    MSG_PEER_REFUSED,
    PATHS_HELP,
    ClaimRequest,
    Refusal,
    RequestHead,
    clean,
    dumps,
    loads,
    response,
    route,
)
from .userwire import user_route

if TYPE_CHECKING:  # they import the manager and cryptography: only their types here
    from .userapi import UserRequests
    from .usercert import UserCertMatcher

logger = logging.getLogger(__name__)

#: Largest request head (request line + headers).
MAX_HEAD = 16 * 1024
# After the answer, read and discard the client's leftovers for a moment before
# closing: closing with unread input makes the kernel send RST, which can destroy
# the answer (a 413, a TLS alert) before the client has read it.
_LINGER_SECONDS = 2.0
_LINGER_BYTES = 1024 * 1024
_INTERNAL = "internal error; see the journal of scistreamd"


class PeerHandler(Protocol):
    """What the peer port asks the daemon (the manager); all on the daemon's loop.

    ``claim`` returns the PeerEndpoint's JSON and raises named errors (their
    name goes to the peer); ``claimant`` is who asked.
    """

    async def claim(self, uid: str, claimant: PeerIdentity,
                    listeners: Tuple[HostPort, ...] = ()) -> Dict[str, Any]: ...

    async def endpoint_state(self, uid: str) -> Dict[str, Any]: ...

    async def health(self) -> Dict[str, Any]: ...


async def _read_head(tls: ServerTls) -> RequestHead:
    buf = b""
    while b"\r\n\r\n" not in buf:
        if len(buf) > MAX_HEAD:
            raise Refusal("HeaderTooLarge", f"the request head is over {MAX_HEAD} bytes")
        data = await tls.read(16384)
        if not data:
            raise ConnectionError("the client closed before sending a whole request")
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    return RequestHead.parse(head, rest)


def _user_label(method: str, target: str) -> str:
    """The metrics label of a user API request ("user_list", "user_inbound", ...)."""
    try:
        return "user_" + user_route(method, target)[0]
    except Refusal:
        return "user_unknown"


class PeerServer:
    """The TLS peer port of this daemon; serves on the loop that calls :meth:`start`.

    ``client_ca``: PEM CA(s) client certificates must chain to (None: none are
    asked for). ``require_client_cert``: claims and state checks need a
    verified client certificate (else 403 AccessDenied), and health answers
    without one reveal nothing but {"status": "ok"}. ``timeout`` bounds
    reading a request and the daemon's answer; the handshake gets
    ``handshake_timeout`` (default min(timeout, 3 s)), a whole connection
    3 x timeout. At most ``max_connections`` connections at once, of which at
    most ``max_per_source`` from one IP address; more are closed at once.
    """

    def __init__(self, host: Union[IPAddress, str], port: int, cert: Path, key: Path,
                 client_ca: Optional[Path], handler: PeerHandler, *,
                 require_client_cert: bool, timeout: float = 10.0, max_body: int = 64 * 1024,
                 max_connections: int = 1024, max_per_source: int = 64,
                 handshake_timeout: Optional[float] = None,
                 user_api: Optional[UserRequests] = None,
                 user_certs: Optional[UserCertMatcher] = None) -> None:
        if not timeout > 0:
            raise InvalidArgument(f"peer port timeout must be > 0 seconds, not {timeout!r}")
        for what, value, low in (("max_body", max_body, 2), ("max_connections",
                                 max_connections, 1), ("max_per_source", max_per_source, 1)):
            if not isinstance(value, int) or value < low:
                raise InvalidArgument(f"peer port {what} must be >= {low}, not {value!r}")
        try:
            self._host: IPAddress = ipaddress.ip_address(str(host))
        except ValueError:
            raise InvalidArgument(
                f"peer port address {clean(host, 60)!r} is not an IP address: set "
                "listen_address to a literal address such as 0.0.0.0 or 192.168.150.1") from None
        self._port = port
        self._cert, self._key = Path(cert), Path(key)
        self._client_ca = Path(client_ca) if client_ca is not None else None
        self._require = bool(require_client_cert)
        self._handler = handler
        self._user_api = user_api
        self._user_certs = user_certs
        self._timeout = float(timeout)
        self._handshake_timeout = handshake_timeout or min(self._timeout, 3.0)
        self._max_body = max_body
        self._caps = ConnectionCaps(max_connections, max_per_source)
        self._ctx: Optional[ssl.SSLContext] = None
        self._sock: Optional[socket.socket] = None
        #: connection task -> its socket (closed by stop() even if the task never ran)
        self._tasks: Dict[asyncio.Task, socket.socket] = {}

    # -- life cycle -------------------------------------------------------------

    @property
    def address(self) -> HostPort:
        """The bound address (the real port when constructed with port 0)."""
        if self._sock is None:
            raise RuntimeError("the peer server is not running")
        return HostPort(self._host, self._sock.getsockname()[1])

    @property
    def running(self) -> bool:
        return self._sock is not None

    async def start(self) -> None:
        """Load the TLS material and listen: ConfigError names a file that does not
        load, ScistreamError an address that cannot be bound."""
        if self._sock is not None:
            return
        self._ctx = server_context(self._cert, self._key, self._client_ca,
                                   self._user_certs.ca_file if self._user_certs else None)
        self._sock = bind_listener(self._host, self._port)
        asyncio.get_running_loop().add_reader(self._sock.fileno(), self._accept)
        if self._require:
            mode = "client certificates required" + (
                f", verified with {self._client_ca}" if self._client_ca else
                ", but no CA to verify them with: every claim is refused")
        else:
            mode = "client certificates NOT required (peer_require_client_cert = false)" + (
                f"; presented ones verified with {self._client_ca}" if self._client_ca else "")
        logger.info("peer port listening on %s (TLS; %s)", self.address, mode)

    def reload_tls(self, cert: Path, key: Path, client_ca: Optional[Path],
                   require_client_cert: bool) -> None:
        """Use new TLS files (or new contents of the same files) for the connections
        accepted from now on; open ones finish with the old. ConfigError (nothing
        changed) when one does not load."""
        ctx = server_context(Path(cert), Path(key), client_ca)
        self._ctx = ctx
        self._cert, self._key = Path(cert), Path(key)
        self._client_ca = Path(client_ca) if client_ca is not None else None
        self._require = bool(require_client_cert)
        logger.info("peer port TLS reloaded (%s, %s; client certificates %s%s)", cert, key,
                    "required" if self._require else "not required",
                    f", verified with {client_ca}" if client_ca else ", no CA to verify them")

    async def stop(self) -> None:
        """Stop accepting and cut open connections short."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        asyncio.get_running_loop().remove_reader(sock.fileno())
        sock.close()
        tasks = dict(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for conn in tasks.values():
            conn.close()
        self._tasks.clear()
        self._caps.clear()
        logger.info("peer port stopped")

    async def __aenter__(self) -> PeerServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- one connection -----------------------------------------------------------

    def _accept(self) -> None:
        sock = self._sock
        for _ in range(64):  # a bounded burst, then other work gets its turn
            if sock is None:
                return
            try:
                conn, addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    logger.error("peer port: cannot accept connections: %s", e.strerror or e)
                    # The backlog stays readable: pause instead of spinning hot.
                    loop = asyncio.get_running_loop()
                    loop.remove_reader(sock.fileno())
                    loop.call_later(0.1, self._resume, sock)
                    return
                continue  # that client gave up between SYN and accept
            who = format_client(addr)
            source = who.rpartition(":")[0]
            if not self._caps.admit(source, who):
                conn.close()
                continue
            conn.setblocking(False)
            self._tasks[asyncio.ensure_future(self._serve(conn, who, source))] = conn

    def _resume(self, sock: socket.socket) -> None:
        if self._sock is sock:
            asyncio.get_running_loop().add_reader(sock.fileno(), self._accept)

    async def _serve(self, conn: socket.socket, who: str, source: str) -> None:
        writer: Optional[asyncio.StreamWriter] = None
        try:
            reader, writer = await asyncio.open_connection(sock=conn, limit=MAX_HEAD)
            await asyncio.wait_for(self._connection(reader, writer, who), 3 * self._timeout)
        except asyncio.TimeoutError:
            logger.info("peer port: closing connection from %s: no complete exchange within "
                        "%g s", who, 3 * self._timeout)
        except (OSError, ConnectionError) as e:
            logger.debug("peer port: connection with %s ended: %s", who, e)
        except Exception:
            logger.exception("peer port: unexpected error serving %s", who)
        finally:
            if writer is not None:
                writer.transport.abort()
            conn.close()
            self._tasks.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
            self._caps.done(source)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                          who: str) -> None:
        assert self._ctx is not None
        tls = ServerTls(self._ctx, reader, writer, self._timeout)
        try:
            await asyncio.wait_for(tls.handshake(), self._handshake_timeout)
        except ssl.SSLError as e:
            if is_client_cert_failure(e):
                logger.warning("peer port: refused %s: its client certificate is not trusted "
                               "(%s)", who, cert_failure_text(e),
                               extra={"MESSAGE_ID": MSG_PEER_REFUSED.hex})
            else:
                logger.debug("peer port: TLS handshake with %s failed: %s", who, e)
            await self._linger(reader, writer)
            return
        except asyncio.TimeoutError:
            logger.debug("peer port: no TLS handshake from %s within %g s", who,
                         self._handshake_timeout)
            return
        cert = tls.obj.getpeercert() if self._ctx.verify_mode != ssl.CERT_NONE else None
        # The dict form is empty unless the certificate was verified.
        claimant = identity_of(who, cert) if cert else PeerIdentity(who)
        user = None
        if cert and self._user_certs is not None:
            der = tls.obj.getpeercert(binary_form=True) or b""
            user = self._user_certs.identity_of(der)
            if user is not None and not self._user_certs.peer_ca_issued(der):
                claimant = PeerIdentity(who)  # a user's certificate claims nothing
        method, what, result, started = "GET", "none", reqstats.OK, time.monotonic()
        # Each read waits at most timeout, the whole connection 3 x timeout (_serve).
        try:
            req = await _read_head(tls)
            started = time.monotonic()  # latency: from a whole request head to the answer
            method, what = req.method, route(req.target)[0] or "unknown"
            if what == "user":
                what = _user_label(req.method, req.target)
                status, doc = await self._user(req, tls, user, claimant)
            else:
                status, doc = 200, await self._answer(req, tls, claimant)
            headers: Tuple[Tuple[str, str], ...] = ()
        except Refusal as r:
            status, doc, headers = r.status, r.to_json(), r.headers
            result = r.name
        await tls.write(response(status, doc, headers, with_body=method != "HEAD"))
        if what != "none":
            reqstats.PEER.record(what, result, time.monotonic() - started)
        await tls.close_notify()
        await self._linger(reader, writer)

    async def _linger(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Half-close, then drain the client's leftovers briefly (see _LINGER_SECONDS)."""
        with contextlib.suppress(OSError, RuntimeError):
            writer.write_eof()
        end = time.monotonic() + min(self._timeout, _LINGER_SECONDS)
        budget = _LINGER_BYTES
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            while budget > 0 and time.monotonic() < end:
                data = await asyncio.wait_for(reader.read(65536), end - time.monotonic())
                if not data:
                    break
                budget -= len(data)

    # -- the API ------------------------------------------------------------------

    async def _answer(self, req: RequestHead, tls: ServerTls, who: PeerIdentity) -> Dict[str, Any]:
        """The 200 answer's document; raises Refusal for anything else."""
        name, raw_uid = route(req.target)
        if not name:
            raise Refusal("UnknownPath", f"no such API path: {PATHS_HELP}")
        if req.method != METHODS[name]:
            raise Refusal("MethodNotAllowed", f"method not allowed here; use {METHODS[name]}",
                        (("Allow", METHODS[name]),))
        if name == "health":
            if not who.verified:
                # Anyone may see that the port is up; the version and counts are for peers.
                return {"status": "ok"}
            doc = dict(await self._call(self._handler.health(), who, "health"))
            doc.setdefault("status", "ok")
            doc.setdefault("version", __version__)
            doc.setdefault("api", API_PREFIX.strip("/"))
            return doc
        try:
            uid = parse_uid(raw_uid)
        except InvalidArgument as e:
            raise Refusal(e.name, str(e)) from None
        what = "a claim" if name == "claim" else "a state check"
        self._authenticate(what, uid, who)  # before the body: nothing processed unasked
        if name == "state":
            return await self._call(self._handler.endpoint_state(uid), who, uid)
        body = await self._read_body(req, tls)
        try:
            claim = ClaimRequest.from_json(loads(body))
        except InvalidArgument as e:
            raise Refusal(e.name, "the request body must be a JSON object, e.g. {}"
                        if str(e) == "not JSON" else str(e)) from None
        result = await self._call(self._handler.claim(uid, who, claim.listeners), who, uid)
        logger.info("peer port: handed the key of endpoint %s to %s", uid, who)
        return result

    async def _user(self, req: RequestHead, tls: ServerTls, cert: Optional[Identity],
                    who: PeerIdentity) -> Tuple[int, Dict[str, Any]]:
        """A user API request, answered by userapi.UserApi; with more time: a creation
        may claim a key from a peer and start a relay (still within 3 x timeout)."""
        if self._user_api is None:
            raise Refusal("UnknownPath", "this gateway does not serve the user API")
        answer = self._user_api.answer(req, functools.partial(self._read_body, req, tls),
                                       cert, who.address)
        return await self._call(answer, who, f"{req.method} {clean(req.target, 80)}",
                                2 * self._timeout)

    def _authenticate(self, what: str, uid: str, who: PeerIdentity) -> None:
        """A named 403 when a verified client certificate is required and absent."""
        if who.verified or not self._require:
            return
        if self._client_ca is None:
            why = "this gateway has no CA to verify peer certificates with"
            fix = ("its administrator must install the peer's CA or certificate as "
                   "peer_trust_file (or peer_client_ca) and run 'systemctl reload scistreamd'")
        else:
            why = "no client certificate was presented"
            fix = ("configure peer_cert/peer_key on the claiming gateway and exchange trust "
                   "files: each gateway's peer_trust_file must hold the other's CA or "
                   "certificate")
        logger.warning("peer port: refused %s of endpoint %s by %s: %s", what, uid, who, why,
                       extra={"MESSAGE_ID": MSG_PEER_REFUSED.hex, "SCISTREAM_UID": uid})
        raise Refusal(AccessDenied.name, f"{why}, and this peer port serves only peers with a "
                    f"trusted client certificate: {fix}")

    async def _read_body(self, req: RequestHead, tls: ServerTls) -> bytes:
        length = req.body_length(self._max_body)
        if "100-continue" in (v.lower() for v in req.all("expect")):
            await tls.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = req.rest
        while len(body) < length:
            data = await tls.read(length - len(body))
            if not data:
                raise ConnectionError("the client closed before sending the whole body")
            body += data
        # Empty body means no options, same as {}.
        return body[:length] if length else b"{}"

    async def _call(self, coro: Awaitable[Any], who: PeerIdentity,
                    what: str, timeout: float = 0.0) -> Any:
        """The daemon's answer within the timeout; its named failures go to the peer.

        The answer is a JSON object, or (user API) a (status, JSON object) pair."""
        timeout = timeout or self._timeout
        try:
            result = await asyncio.wait_for(coro, timeout)
        except asyncio.TimeoutError:
            logger.warning("peer port: %s for %s: no answer within %g s", what, who, timeout)
            raise Refusal("Busy", f"the daemon is busy (no answer within {timeout:g} s); "
                        "try again") from None
        except Refusal:
            raise
        except ScistreamError as e:
            if e.internal:  # this host's trouble (systemd, config): details to the journal
                logger.error("peer port: %s for %s failed: %s", what, who, e)
                raise Refusal("Failed", _INTERNAL) from None
            # AccessDenied: the manager logged it, with the endpoint's fields.
            logger.log(logging.DEBUG if isinstance(e, AccessDenied) else logging.INFO,
                       "peer port: refused %s by %s: %s", what, who, e)
            status = getattr(e, "http_status", 0)
            raise Refusal(e.name, str(e), getattr(e, "http_headers", ()), status) from None
        except Exception:
            logger.exception("peer port: %s for %s failed", what, who)
            raise Refusal("Failed", _INTERNAL) from None
        try:
            doc = result[1] if isinstance(result, tuple) and len(result) == 2 else result
            if isinstance(doc, dict) and dumps(doc):
                return result
        except (TypeError, ValueError):
            pass
        logger.error("peer port: %s for %s: the daemon's answer is not a JSON object", what, who)
        raise Refusal("Failed", _INTERNAL)
