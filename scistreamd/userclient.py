"""The user API's client: a person's or a workflow's calls to a (remote) scistreamd.

The user API lives on the peer port beside the daemon-to-daemon claim API
(JSON over HTTPS)::

    POST   /v1/tunnels/inbound   {"remote_ip", "receiver_ports", "num_conn", "allowed_peer"?}
                                 -> 201 {"uid", "listeners", "endpoint"}
    POST   /v1/tunnels/outbound  {"uid", "remote_listeners", "local_ports"?, "num_conn",
                                  "peer"?, "trust_pem"?} -> 201 {"listeners", "endpoint"}
    GET    /v1/tunnels           -> 200 {"tunnels": [endpoint, ...]}   (the caller's own)
    GET    /v1/tunnels/<uid>     -> 200 {"tunnels": [...]}
    DELETE /v1/tunnels/<uid>     -> 200 {"released": n}

Every call carries ``Authorization: Bearer <token>`` when there is a token,
and the client certificate when one is given. The daemon is verified like a
peer (peertls.client_context: the given CA/cert or the system store, and an
IP subjectAltName for the address it is reached at).

Failures are the daemon's named errors, as D-Bus gives them: the error name
in the answer alone picks the class (scistreamd/errors.py), so scistreamctl
exits with the same code either way. Not reaching the daemon at all is
:class:`DaemonUnreachable` (the CLI's exit 10, as for a daemon that is not
running locally). The exchanges are tlshttp.Connections (http.client), not
``requests``: see there why.
"""

from __future__ import annotations

import http.client
import socket
import ssl
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Type

from . import __version__, errors
from .errors import AccessDenied, InvalidArgument, ScistreamError
from .peertls import CLIENT_CERT_ALERTS, client_context, ssl_reason
from .tlshttp import BodyTooLarge, BodyTooSlow, Connections, causes
from .values import HostPort, parse_hostport, parse_uid
from .wiretext import clean, dumps, loads

TUNNELS_PATH = "/v1/tunnels"
#: Largest answer read: a list of every tunnel of a busy identity fits.
MAX_ANSWER = 8 * 1024 * 1024
#: A connection (opened ahead by :meth:`UserClient.warm`, or kept alive after a
#: call) that idled longer than this is not used: the daemon closes a connection
#: that sends no request for peer_timeout (10 s by default; an administrator may
#: set less).
IDLE_MAX = 1.0


class DaemonUnreachable(ScistreamError):
    """No answer from the daemon named (refused, no route, timeout, busy)."""

    name = "DaemonUnreachable"
    exit_code = 10  # scistreamctl's "not running / unreachable"


class UntrustedServer(ScistreamError):
    """The daemon's certificate is not trusted (or not for the address used)."""

    name = "UntrustedServer"


def _error_classes() -> Dict[str, Type[ScistreamError]]:
    """Error name -> class: every named error of scistreamd/errors.py (also those added
    later, e.g. AuthUnavailable), the ones a daemon sends."""
    out: Dict[str, Type[ScistreamError]] = {}
    stack: List[Type[ScistreamError]] = [ScistreamError]
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if cls.__module__ == errors.__name__ and not cls.internal:
            out.setdefault(cls.name, cls)
    return out


def error_from_answer(daemon: HostPort, status: int, doc: Any, what: str) -> ScistreamError:
    """The exception a non-2xx answer to ``what`` means; its class follows the error name."""
    name = doc.get("error") if isinstance(doc, dict) else None
    message = doc.get("message") if isinstance(doc, dict) else None
    name = clean(name, 40) if isinstance(name, str) else ""
    message = clean(message, 480) if isinstance(message, str) else ""
    cls = _error_classes().get(name)
    if name == "Busy":
        return DaemonUnreachable(f"scistreamd at {daemon} is busy ({message or 'HTTP 503'}): "
                                 "try again shortly")
    if name == "UnknownPath":
        return ScistreamError(f"scistreamd at {daemon} has no user API ({what} answered HTTP "
                              f"{status} UnknownPath): it is an older version; upgrade it, or "
                              "run the command on that host without --s2cs")
    if cls is not None and cls is not ScistreamError:
        return cls(f"scistreamd at {daemon}: {message or name}")
    said = f" {name}" if name else ""
    return ScistreamError(f"scistreamd at {daemon} answered {what} with HTTP {status}{said}"
                          f"{': ' + message if message else ''}; see its journal "
                          "(journalctl -u scistreamd)")


class UserClient:
    """Calls on one daemon's user API; build one per daemon."""

    def __init__(self, daemon: HostPort | str, *, token: Optional[str] = None,
                 trust_pem: Optional[str] = None, trust_file: Optional[Path] = None,
                 client_cert: Optional[Path] = None, client_key: Optional[Path] = None,
                 timeout: float = 30.0) -> None:
        self.daemon = parse_hostport(daemon, "scistreamd address (--s2cs)")
        self._token = token
        self.timeout = float(timeout)
        self._context, self._trust = client_context(self.daemon.host, trust_file, trust_pem,
                                                    client_cert, client_key)
        self._conns = Connections(str(self.daemon.host), self.daemon.port, self._context,
                                  self.timeout, IDLE_MAX)

    def __repr__(self) -> str:  # never the token
        return f"UserClient({self.daemon}, token={'yes' if self._token else 'no'})"

    # -- the calls ---------------------------------------------------------------

    def create_inbound(self, remote_ip: str, receiver_ports: Sequence[int], num_conn: int,
                       allowed_peer: str = "", early: bool = False) -> Dict[str, Any]:
        """{"uid", "listeners": [str], "endpoint": {...}} (validated uid and listeners).

        ``early``: answered as soon as the endpoint exists, its relay maybe still
        starting (endpoint "state" "starting"; an older daemon ignores it and
        answers when the relay runs): call :meth:`wait_started` before relying on it.
        """
        body: Dict[str, Any] = {"remote_ip": remote_ip, "receiver_ports": list(receiver_ports),
                                "num_conn": num_conn}
        if allowed_peer:
            body["allowed_peer"] = allowed_peer
        path = f"{TUNNELS_PATH}/inbound" + ("?early=1" if early else "")
        doc = self._call("POST", path, body, "the inbound request")
        uid = self._field(doc, "uid", "the inbound request", parse_uid)
        return {"uid": uid, "listeners": self._listeners(doc, "the inbound request"),
                "endpoint": self._endpoint(doc)}

    def create_outbound(self, uid: str, remote_listeners: Sequence[str], num_conn: int,
                        local_ports: Sequence[int] = (), peer: Optional[str] = None,
                        trust_pem: Optional[str] = None) -> Dict[str, Any]:
        """{"listeners": [str], "endpoint": {...}}."""
        body: Dict[str, Any] = {"uid": parse_uid(uid), "remote_listeners": list(remote_listeners),
                                "num_conn": num_conn}
        if local_ports:
            body["local_ports"] = list(local_ports)
        if peer:
            body["peer"] = peer
        if trust_pem is not None:
            body["trust_pem"] = trust_pem
        doc = self._call("POST", f"{TUNNELS_PATH}/outbound", body, "the outbound request")
        return {"listeners": self._listeners(doc, "the outbound request"),
                "endpoint": self._endpoint(doc)}

    def list(self) -> List[Dict[str, Any]]:
        """The caller's own endpoints there (endpoint JSON, uid/role/state checked)."""
        return self._tunnels(self._call("GET", TUNNELS_PATH, None, "the list request"))

    def status(self, uid: str) -> List[Dict[str, Any]]:
        want = parse_uid(uid)
        return self._tunnels(self._call("GET", f"{TUNNELS_PATH}/{want}", None,
                                        f"the status request of {want}"))

    def wait_started(self, uid: str) -> List[Dict[str, Any]]:
        """status() once the early start of inbound ``uid`` is over; its failure (e.g.
        RelayFailed; the endpoint is then gone there) raised by name."""
        want = parse_uid(uid)
        return self._tunnels(self._call("GET", f"{TUNNELS_PATH}/{want}?wait=1", None,
                                        f"the start of {want}"))

    def release(self, uid: str) -> int:
        """How many endpoints of ``uid`` were released there."""
        want = parse_uid(uid)
        doc = self._call("DELETE", f"{TUNNELS_PATH}/{want}", None, f"the release of {want}")
        n = doc.get("released") if isinstance(doc, dict) else None
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise self._garbage(f"the release of {want}", "no count 'released'")
        return n

    def close(self) -> None:
        self._conns.close()

    def warm(self) -> None:
        """Open the connection of the next call now (TCP and the TLS handshake, the
        daemon verified as for any call), e.g. in a thread while another daemon
        works: the call then starts with its request. Best effort: a failure here is
        left to the call, which opens its own connection and reports it. Safe beside
        a call in another thread (each exchange has a connection of its own).
        """
        try:
            self._conns.open()
        except Exception as e:  # the call will say what is wrong, by name
            import logging  # here: ~6 ms that no successful command needs

            logging.getLogger(__name__).debug("opening a connection to %s ahead failed: %s",
                                              self.daemon, e)

    # -- answers -------------------------------------------------------------------

    def _garbage(self, what: str, why: str) -> ScistreamError:
        return ScistreamError(f"scistreamd at {self.daemon} answered {what} with something "
                              f"else than the user API's answer ({why}); is it a scistreamd "
                              "of a compatible version?")

    def _field(self, doc: Any, key: str, what: str, parse: Any) -> Any:
        try:
            return parse(doc[key])
        except (KeyError, TypeError, InvalidArgument):
            raise self._garbage(what, f"no valid {key!r}") from None

    def _listeners(self, doc: Any, what: str) -> List[str]:
        raw = doc.get("listeners") if isinstance(doc, dict) else None
        if not isinstance(raw, list) or not raw:
            raise self._garbage(what, "no 'listeners'")
        try:
            return [str(parse_hostport(x, "listener")) for x in raw]
        except InvalidArgument:
            raise self._garbage(what, "a listener is not 'ip:port'") from None

    @staticmethod
    def _endpoint(doc: Any) -> Dict[str, Any]:
        ep = doc.get("endpoint") if isinstance(doc, dict) else None
        return ep if isinstance(ep, dict) else {}

    def _tunnels(self, doc: Any) -> List[Dict[str, Any]]:
        raw = doc.get("tunnels") if isinstance(doc, dict) else None
        if not isinstance(raw, list):
            raise self._garbage("the list request", "no 'tunnels' list")
        out = []
        for ep in raw:
            if not isinstance(ep, dict):
                raise self._garbage("the list request", "a tunnel is not an object")
            try:
                ep["uid"] = parse_uid(ep.get("uid"))
            except InvalidArgument:
                raise self._garbage("the list request", "a tunnel without a valid uid") \
                    from None
            for key in ("role", "state"):
                if not isinstance(ep.get(key), str):
                    raise self._garbage("the list request", f"a tunnel without {key!r}")
            listeners = ep.get("listeners", [])
            if not isinstance(listeners, list) or not all(isinstance(x, str)
                                                          for x in listeners):
                raise self._garbage("the list request", "listeners not a list of strings")
            out.append(ep)
        return out

    # -- one exchange ----------------------------------------------------------------

    def _call(self, method: str, path: str, body: Optional[Dict[str, Any]], what: str) -> Any:
        headers = {"Accept": "application/json", "User-Agent": f"scistreamctl/{__version__}",
                   "Accept-Encoding": "identity"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        data = None
        if body is not None:
            data = dumps(body)
            headers["Content-Type"] = "application/json"
        try:
            status, raw = self._conns.exchange(method, path, data, headers, MAX_ANSWER,
                                               3 * self.timeout)
        except BodyTooLarge:
            raise ScistreamError(f"scistreamd at {self.daemon} answered more than "
                                 f"{MAX_ANSWER} bytes; is it a scistreamd peer port?") from None
        except BodyTooSlow:
            raise DaemonUnreachable(f"scistreamd at {self.daemon} is too slow: no whole "
                                    f"answer within {3 * self.timeout:g} s") from None
        except (OSError, http.client.HTTPException) as e:
            raise self._transport_error(e) from None
        try:
            doc = loads(raw)
        except InvalidArgument:
            raise ScistreamError(f"scistreamd at {self.daemon} answered {what} with HTTP "
                                 f"{status} and no JSON ({clean(raw[:60])!r}); is "
                                 f"{self.daemon} a scistreamd peer port?") from None
        if not 200 <= status < 300:
            raise error_from_answer(self.daemon, status, doc, what)
        return doc

    def _transport_error(self, exc: BaseException) -> ScistreamError:
        d = self.daemon
        found = list(causes(exc))
        for c in found:
            if isinstance(c, ssl.SSLCertVerificationError):
                detail = clean(getattr(c, "verify_message", "") or c.reason or c)
                if getattr(c, "verify_code", 0) in (62, 64):  # host/IP mismatch
                    return UntrustedServer(
                        f"the certificate of scistreamd at {d} is not valid for {d.host}: "
                        f"{detail}; name the daemon by an address its certificate lists")
                return UntrustedServer(
                    f"the certificate of scistreamd at {d} is not trusted by {self._trust}: "
                    f"{detail}; give its CA (or its certificate) with --server_cert")
        for c in found:
            if isinstance(c, ssl.SSLError) and getattr(c, "reason", None) in CLIENT_CERT_ALERTS:
                return AccessDenied(
                    f"scistreamd at {d} refused the TLS handshake ({c.reason}): it did not "
                    "accept the client certificate (or wants one); give a certificate from a "
                    "CA it accepts for users with --client-cert/--client-key, or a token")
        for c in found:
            if isinstance(c, (socket.timeout, TimeoutError)):  # apart until 3.10
                return DaemonUnreachable(f"scistreamd at {d} did not answer within "
                                         f"{self.timeout:g} s: check the host, or give a "
                                         "larger --timeout")
            if isinstance(c, OSError) and c.strerror and not isinstance(c, ssl.SSLError):
                return DaemonUnreachable(
                    f"scistreamd at {d} is not reachable ({c.strerror}): check the address "
                    f"and port given with --s2cs, that scistreamd runs there and that TCP "
                    f"port {d.port} is open to you")
        for c in found:
            if isinstance(c, ssl.SSLError) and not isinstance(
                    c, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
                return ScistreamError(f"TLS with scistreamd at {d} failed: {ssl_reason(c)}; "
                                      "is it a scistreamd peer port?")
        return DaemonUnreachable(f"scistreamd at {d} closed the connection without an "
                                 "answer: see its journal (journalctl -u scistreamd)")
