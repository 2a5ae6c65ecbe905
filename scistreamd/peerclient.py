"""The peer port's client: how a daemon claims a tunnel's key from its peer.

:class:`PeerClient` holds whom this gateway trusts, what it presents and how
long it waits; the daemon builds one and hands it to the manager. Its
``claim``/``endpoint_state``/``health`` are blocking (``requests``, usable
directly by a synchronous caller); ``claim_async``/``endpoint_info_async``
run them off the event loop on the client's own threads, one per call in
flight, so concurrent claims never wait for each other (asyncio's default
executor has only a handful of threads).

The peer is untrusted input: answers are size-bounded, every field is parsed
before it is returned, and every failure is a named ScistreamError whose
class follows the error name the peer sent (peerwire.ERRORS).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import functools
import hashlib
import logging
import os
import re
import socket
import ssl
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar, Union

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

from . import __version__
from .errors import AccessDenied, InvalidArgument, PeerRejected, PeerUnreachable, ScistreamError
from .model import HostPort, parse_hostport, parse_uid
from .peertls import CLIENT_CERT_ALERTS, client_context, ssl_reason
from .peerwire import (
    MAX_RESPONSE,
    ClaimRequest,
    EndpointState,
    ErrorDoc,
    PeerEndpoint,
    claim_path,
    clean,
    error_for,
    health_path,
    loads,
    state_path,
)
from .recent import Recent
from .tlshttp import BodyTooLarge, BodyTooSlow, read_bounded
from .tlshttp import causes as _causes

logger = logging.getLogger(__name__)


class _PeerAdapter(HTTPAdapter):
    """requests adapter whose only trust is our SSLContext."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self._context = context
        super().__init__(max_retries=0)

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False,
                         **pool_kwargs: Any) -> None:
        pool_kwargs["ssl_context"] = self._context
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        # requests would load its CA bundle into our context here, trusting every
        # public CA for the peer; we trust exactly what the caller gave.
        conn.cert_reqs = "CERT_REQUIRED"
        conn.ca_certs = None
        conn.ca_cert_dir = None

T = TypeVar("T")
_DIGITS = re.compile(r"[0-9]{1,12}")
_UNREACHABLE_ERRNOS = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH,
                                 errno.ETIMEDOUT, errno.EHOSTDOWN, errno.ENETDOWN,
                                 errno.EADDRNOTAVAIL})
_TIMEOUTS = (requests.Timeout, socket.timeout, TimeoutError)
#: Client contexts kept, the most recently used (see PeerClient._context).
_CONTEXTS_KEPT = 16


def _file_stamp(path: Optional[Path]) -> Optional[Tuple[Any, ...]]:
    """What identifies the content of a file the context loads: a changed or
    replaced file gives another stamp (so a new context). None: no file given."""
    if path is None:
        return None
    st = os.stat(path)
    return (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class PeerClient:
    """Talks to peer daemons: trust, client certificate, timeout; built once per daemon.

    ``max_parallel`` bounds the calls in flight from the async methods (the
    daemon gives max_endpoints: one claim per endpoint it may create).
    """

    def __init__(self, *, trust_file: Optional[Path] = None, client_cert: Optional[Path] = None,
                 client_key: Optional[Path] = None, timeout: float = 10.0,
                 max_parallel: int = 1024) -> None:
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise InvalidArgument(f"peer timeout must be a number of seconds > 0, not "
                                  f"{timeout!r}")
        self.trust_file, self.client_cert, self.client_key = trust_file, client_cert, client_key
        self.timeout = float(timeout)
        self._max_parallel = max_parallel
        self._pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._contexts: Recent[Tuple[Any, ...], Tuple[ssl.SSLContext, str]] = Recent(
            _CONTEXTS_KEPT)

    # -- blocking API -----------------------------------------------------------

    def claim(self, peer: Union[HostPort, str], uid: str, listeners: Sequence[HostPort] = (),
              trust_pem: Optional[str] = None) -> PeerEndpoint:
        """Claim endpoint ``uid``'s listeners and key from the peer daemon.

        The peer's certificate is verified against ``trust_pem`` (PEM text,
        wins) or the trust file, else the system CA store, and must list the
        peer's IP as a subjectAltName. Raises InvalidArgument (bad input,
        unloadable trust), PeerUnreachable (no connection, no answer, busy),
        AccessDenied (the peer does not accept this gateway), NotFound (no
        such endpoint), WrongListener (a listener the endpoint lacks; nothing
        claimed), PeerRejected (already claimed, untrusted server, garbage).
        """
        def run(hp: HostPort) -> PeerEndpoint:
            want = parse_uid(uid)
            body = ClaimRequest(tuple(listeners)).to_json()
            doc = self._request(hp, "POST", claim_path(want), body, trust_pem,
                                f"the claim of {want}")
            try:
                endpoint = PeerEndpoint.from_json(doc)
                if endpoint.uid != want:
                    raise InvalidArgument(f"it describes endpoint {endpoint.uid}, not the one "
                                          "asked for")
            except InvalidArgument as e:
                raise PeerRejected(f"peer scistreamd at {hp} answered garbage for endpoint "
                                   f"{want}: {clean(e)}; is it a scistreamd peer port of a "
                                   "compatible version?") from None
            logger.info("claimed endpoint %s from peer %s", want, hp)
            return endpoint

        return self._guard(peer, run)

    def endpoint_state(self, peer: Union[HostPort, str], uid: str) -> str:
        """The state of inbound endpoint ``uid`` at the peer; NotFound if it is gone."""
        return self.endpoint_info(peer, uid).state

    def endpoint_info(self, peer: Union[HostPort, str], uid: str) -> EndpointState:
        """Inbound endpoint ``uid`` at the peer (state, key generation,
        target health); NotFound if it is gone."""
        def run(hp: HostPort) -> EndpointState:
            want = parse_uid(uid)
            doc = self._request(hp, "GET", state_path(want), None, None,
                                f"the state check of {want}")
            try:
                info = EndpointState.from_json(doc)
            except InvalidArgument as e:
                raise PeerRejected(f"peer scistreamd at {hp} answered garbage for endpoint "
                                   f"{want}: {clean(e)}") from None
            if info.uid != want:
                raise PeerRejected(f"peer scistreamd at {hp} answered for endpoint {info.uid}, "
                                   f"not {want}: the peer misbehaves") from None
            return info

        return self._guard(peer, run)

    def health(self, peer: Union[HostPort, str]) -> Dict[str, Any]:
        """The peer's ``/v1/health`` object; same trust and errors as claim."""
        def run(hp: HostPort) -> Dict[str, Any]:
            doc = self._request(hp, "GET", health_path(), None, None, "the health check")
            if not isinstance(doc, dict):
                raise PeerRejected(f"peer scistreamd at {hp} answered garbage to a health "
                                   "check (not a JSON object); is it a scistreamd peer port?")
            return doc

        return self._guard(peer, run)

    # -- async API (the daemon) ---------------------------------------------------

    async def claim_async(self, peer: HostPort, uid: str, listeners: Sequence[HostPort] = (),
                          trust_pem: Optional[str] = None) -> PeerEndpoint:
        return await self._off_loop(self.claim, peer, uid, listeners, trust_pem)

    async def endpoint_state_async(self, peer: HostPort, uid: str) -> str:
        """The state of inbound endpoint ``uid`` at the peer; NotFound if it is gone."""
        return await self._off_loop(self.endpoint_state, peer, uid)

    async def endpoint_info_async(self, peer: HostPort, uid: str) -> EndpointState:
        return await self._off_loop(self.endpoint_info, peer, uid)

    async def _off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        # Our own pool: its threads are made on demand, one per call in flight.
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                self._max_parallel, thread_name_prefix="scistreamd-claim")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    # -- one exchange ---------------------------------------------------------------

    @staticmethod
    def _guard(peer: Union[HostPort, str], run: Callable[[HostPort], T]) -> T:
        """run(peer); whatever goes wrong surfaces as a ScistreamError."""
        try:
            return run(parse_hostport(peer, "peer scistreamd address"))
        except ScistreamError:
            raise
        except Exception as e:
            logger.debug("peer %s: unexpected failure", peer, exc_info=True)
            raise PeerRejected(f"talking to peer scistreamd at {clean(peer, 60)} failed "
                               f"unexpectedly: {type(e).__name__}: {clean(e)}; see the "
                               "daemon's journal") from None

    def _request(self, peer: HostPort, method: str, path: str, body: Optional[Dict[str, Any]],
                 trust_pem: Optional[str], what: str) -> Any:
        """One exchange that must answer 200: its parsed JSON. Raises only ScistreamErrors."""
        ctx, trust = self._context(peer, trust_pem)
        netloc = f"[{peer.host}]:{peer.port}" if peer.host.version == 6 else str(peer)
        headers = {"Accept": "application/json", "User-Agent": f"scistreamd/{__version__}",
                   "Accept-Encoding": "identity"}  # no decompression bombs
        session = requests.Session()
        session.trust_env = False  # no proxies or .netrc between two gateways
        session.mount("https://", _PeerAdapter(ctx))
        try:
            resp = session.request(method, f"https://{netloc}{path}", json=body,
                                   headers=headers, timeout=(self.timeout, self.timeout),
                                   stream=True, allow_redirects=False)
            try:
                status = resp.status_code
                raw = self._read_body(resp, peer)
            finally:
                resp.close()
        except requests.RequestException as e:
            logger.debug("peer %s: %s %s failed", peer, method, path, exc_info=True)
            raise _transport_error(e, peer, trust, self.timeout) from None
        finally:
            session.close()
        try:
            doc = loads(raw)
        except InvalidArgument:
            raise PeerRejected(f"peer scistreamd at {peer} answered garbage (HTTP {status}, "
                               f"not JSON: {clean(raw[:60])!r}); is {peer} a scistreamd peer "
                               "port?") from None
        if status != 200:
            raise error_for(peer, status, ErrorDoc.from_json(doc), what)
        return doc

    def _context(self, peer: HostPort, trust_pem: Optional[str]) -> Tuple[ssl.SSLContext, str]:
        """The client context for ``peer``, built once per peer IP and trust: building
        one (the trust parsed, the client key loaded) cost a claim some 2 ms. A
        context is kept for the same files only (their stamp: a certificate renewed
        on disk or a reload naming other files makes a new one), so each
        connection verifies and presents exactly what building a context anew
        would. The peer port sends no session tickets: nothing is resumed."""
        try:
            key = (str(peer.host), _file_stamp(self.trust_file), _file_stamp(self.client_cert),
                   _file_stamp(self.client_key),
                   None if trust_pem is None else hashlib.sha256(trust_pem.encode()).digest())
        except (OSError, UnicodeError):
            # Unreadable: client_context names the problem; nothing to keep.
            return client_context(peer.host, self.trust_file, trust_pem, self.client_cert,
                                  self.client_key)
        return self._contexts.get_or_make(key, lambda: client_context(
            peer.host, self.trust_file, trust_pem, self.client_cert, self.client_key))

    def _read_body(self, resp: requests.Response, peer: HostPort) -> bytes:
        try:
            return read_bounded(resp.headers.get("Content-Length"), resp.iter_content(16384),
                                MAX_RESPONSE, 3 * self.timeout)
        except BodyTooLarge as e:
            raise PeerRejected(f"peer scistreamd at {peer} answered garbage: {e} (at most "
                               f"{MAX_RESPONSE} expected); is {peer} a scistreamd peer "
                               "port?") from None
        except BodyTooSlow:
            raise PeerUnreachable(f"peer scistreamd at {peer} is too slow: no complete "
                                  f"answer within {3 * self.timeout:g} s; check the peer "
                                  "host and network") from None


# -- transport failures ---------------------------------------------------------------


def _innermost_text(causes: List[BaseException]) -> str:
    for c in reversed(causes):
        if isinstance(c, OSError) and c.strerror:
            return ssl_reason(c)
    return clean(causes[-1] if causes else "unknown error", 160)


def _transport_error(exc: BaseException, peer: HostPort, trust: str,
                     timeout: float) -> ScistreamError:
    causes = list(_causes(exc))
    for c in causes:
        if isinstance(c, ssl.SSLCertVerificationError):
            detail = clean(getattr(c, "verify_message", "") or c.reason or c)
            # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
            if getattr(c, "verify_code", 0) in (62, 64):
                return PeerRejected(
                    f"certificate of {peer} is not valid for {peer.host}: {detail}; the peer's "
                    f"certificate must list {peer.host} as an IP subjectAltName (reissue it), "
                    "or address the peer by an IP its certificate lists")
            return PeerRejected(f"certificate of {peer} is not trusted by {trust}: {detail}; "
                                "pass the peer's certificate or CA with --server_cert")
    for c in causes:
        if isinstance(c, ssl.SSLError) and getattr(c, "reason", None) in CLIENT_CERT_ALERTS:
            return AccessDenied(
                f"peer scistreamd at {peer} refused the TLS handshake ({c.reason}): it accepts "
                "only peers with a client certificate it trusts; this daemon's peer_cert must "
                "be signed by a CA in the peer's peer_trust_file (or be in it): exchange trust "
                "files with the peer's administrator")
    for c in causes:
        unreachable = isinstance(c, OSError) and c.errno in _UNREACHABLE_ERRNOS
        if unreachable or isinstance(c, _TIMEOUTS + (NewConnectionError, ConnectTimeoutError)):
            reason = (c.strerror if unreachable and isinstance(c, OSError) and c.strerror
                      else f"no answer within {timeout:g} s" if isinstance(c, _TIMEOUTS)
                      else _innermost_text(causes))
            return PeerUnreachable(
                f"peer scistreamd at {peer} is not reachable: {reason}; check that scistreamd "
                f"runs there and that its peer_port and the firewall allow TCP port {peer.port}")
    for c in causes:
        # An EOF mid-handshake is a closed connection, not a TLS disagreement.
        if isinstance(c, ssl.SSLError) and not isinstance(
                c, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
            return PeerRejected(
                f"TLS with peer scistreamd at {peer} failed: {ssl_reason(c)}; check that "
                f"{peer} is a scistreamd peer port (it speaks TLS 1.2 or newer) and whether it "
                "requires a client certificate")
    return PeerRejected(
        f"peer scistreamd at {peer} closed the connection ({_innermost_text(causes)}); it may "
        "require a client certificate, have too many connections open, or not be a scistreamd "
        "peer port; see its journal (journalctl -u scistreamd)")


# -- one-call helpers for synchronous callers (and tests) ------------------------------


def claim_endpoint(peer: Union[HostPort, str], uid: str, *, listeners: Sequence[HostPort] = (),
                   trust_pem: Optional[str] = None, **client: Any) -> PeerEndpoint:
    """PeerClient(**client).claim(...): trust_file, client_cert, client_key, timeout."""
    return PeerClient(**client).claim(peer, uid, listeners, trust_pem)


def endpoint_state(peer: Union[HostPort, str], uid: str, **client: Any) -> str:
    return PeerClient(**client).endpoint_state(peer, uid)


def health(peer: Union[HostPort, str], **client: Any) -> Dict[str, Any]:
    return PeerClient(**client).health(peer)
