"""The peer port's wire format: paths, JSON documents, error names and statuses.

Both sides of the peer port use this module (peerserver, peerclient); it
knows nothing of sockets or TLS. API (JSON over HTTPS, one request per
connection)::

    GET  /v1/health                 -> 200 {"status": "ok"} (+ "version", ... for a
                                       verified client certificate)
    GET  /v1/endpoints/<uid>        -> 200 {"uid", "state"}
    POST /v1/endpoints/<uid>/claim  {"listeners": [...]}
                                    -> 200 {"uid", "listeners", "psk", "cipher_suites"}

The user API (userapi.py; every call with ``Authorization: Bearer <token>`` or a
client certificate from ``user_client_ca``)::

    POST   /v1/tunnels/inbound   InboundBody  -> 201 {"uid", "listeners", "endpoint"}
    POST   /v1/tunnels/outbound  OutboundBody -> 201 {"listeners", "endpoint"}
    GET    /v1/tunnels           -> 200 {"tunnels": [endpoint, ...]}  (the caller's own)
    GET    /v1/tunnels/<uid>     -> 200 {"tunnels": [...]}
    DELETE /v1/tunnels/<uid>     -> 200 {"released": n}

A failure is ``{"error": "<Name>", "message": "..."}``. The name crosses the
wire unchanged and alone decides the exception class on the other side
(:data:`ERRORS`); the HTTP status is only the status.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple, Type

from .errors import (
    AccessDenied,
    AlreadyExists,
    AuthUnavailable,
    InvalidArgument,
    NotFound,
    PeerRejected,
    PeerUnreachable,
    PortsExhausted,
    RelayFailed,
    ScistreamError,
    WrongListener,
)
from .model import (
    MAX_LIST_LEN,
    HostPort,
    IPAddress,
    parse_allowed_peer,
    parse_hostport,
    parse_hostport_list,
    parse_ip,
    parse_num_conn,
    parse_port_list,
    parse_uid,
)
from .relay import parse_ciphersuites, parse_psk

API_PREFIX = "/v1"
DEFAULT_PEER_PORT = 5000
#: Largest answer the client accepts; 1024 IPv6 listeners fit comfortably.
MAX_RESPONSE = 64 * 1024
#: journald MESSAGE_ID of a refused peer request (no or untrusted certificate, not
#: the endpoint's allowed peer); manager.MSG_CLAIM_REFUSED is the same id.
MSG_PEER_REFUSED = uuid.UUID("5a1f0c7e6b6d4f3e9a4b2d1c0e9f8a75")
_DIGITS = re.compile(r"[0-9]{1,12}")

#: Every error name the peer port sends: its HTTP status, and the class the
#: client raises for it. Names of the daemon's own failures come first; the
#: rest are the HTTP layer's (a peer that says them is not speaking our API).
ERRORS: Dict[str, Tuple[int, Type[ScistreamError]]] = {
    InvalidArgument.name: (400, InvalidArgument),
    AccessDenied.name: (403, AccessDenied),
    NotFound.name: (404, NotFound),
    PeerRejected.name: (409, PeerRejected),
    WrongListener.name: (409, WrongListener),
    AlreadyExists.name: (409, AlreadyExists),
    PortsExhausted.name: (503, PortsExhausted),
    PeerUnreachable.name: (502, PeerUnreachable),
    RelayFailed.name: (500, RelayFailed),
    AuthUnavailable.name: (503, AuthUnavailable),
    "UnknownPath": (404, PeerRejected),
    "MethodNotAllowed": (405, PeerRejected),
    "LengthRequired": (411, PeerRejected),
    "PayloadTooLarge": (413, PeerRejected),
    "HeaderTooLarge": (431, PeerRejected),
    "Failed": (500, PeerRejected),
    "Busy": (503, PeerUnreachable),
}
#: Names whose message is the daemon's own answer to the request (passed on as is).
DAEMON_ERRORS = frozenset({InvalidArgument.name, AccessDenied.name, NotFound.name,
                           PeerRejected.name, WrongListener.name, "Busy", AlreadyExists.name,
                           PortsExhausted.name, PeerUnreachable.name, RelayFailed.name,
                           AuthUnavailable.name})
REASONS = {200: "OK", 201: "Created", 400: "Bad Request", 401: "Unauthorized",
           403: "Forbidden", 404: "Not Found", 502: "Bad Gateway",
           405: "Method Not Allowed", 409: "Conflict", 411: "Length Required",
           413: "Payload Too Large", 431: "Request Header Fields Too Large",
           500: "Internal Server Error", 503: "Service Unavailable"}


def status_of(name: str) -> int:
    return ERRORS.get(name, (500, PeerRejected))[0]



def clean(text: object, limit: int = 200) -> str:
    """Untrusted text made safe for one log or message line: printable and short."""
    s = "".join(c if c.isprintable() else "?" for c in str(text))
    return s if len(s) <= limit else s[: limit - 3] + "..."


# -- paths --------------------------------------------------------------------


def health_path() -> str:
    return f"{API_PREFIX}/health"


def state_path(uid: str) -> str:
    return f"{API_PREFIX}/endpoints/{uid}"


def claim_path(uid: str) -> str:
    return f"{API_PREFIX}/endpoints/{uid}/claim"


def tunnels_path(what: str = "") -> str:
    """The user API: /v1/tunnels, /v1/tunnels/inbound, /v1/tunnels/outbound, /v1/tunnels/<uid>."""
    return f"{API_PREFIX}/tunnels" + (f"/{what}" if what else "")


#: route name -> the only method it answers ("user": the user API decides, user_route)
METHODS = {"health": "GET", "state": "GET", "claim": "POST"}
PATHS_HELP = ("this scistreamd peer port serves GET /v1/health, GET /v1/endpoints/<uid>, "
              "POST /v1/endpoints/<uid>/claim and the user API under /v1/tunnels")
#: user route -> the methods it answers
USER_METHODS = {"list": ("GET",), "inbound": ("POST",), "outbound": ("POST",),
                "tunnel": ("GET", "DELETE")}


def route(target: str) -> Tuple[str, str]:
    """(route, raw uid) of a request target; ("", "") for an unknown path."""
    parts = target.split("?", 1)[0].split("/")
    if parts == ["", "v1", "health"]:
        return "health", ""
    if len(parts) == 5 and parts[1:3] == ["v1", "endpoints"] and parts[4] == "claim":
        return "claim", parts[3]
    if len(parts) == 4 and parts[1:3] == ["v1", "endpoints"]:
        return "state", parts[3]
    if parts[1:3] == ["v1", "tunnels"] and len(parts) <= 4:
        return "user", ""
    return "", ""


def user_route(method: str, target: str) -> Tuple[str, str]:
    """(user route, raw uid) of a request under /v1/tunnels; Refusal for a wrong
    path or method."""
    parts = target.split("?", 1)[0].split("/")
    if parts == ["", "v1", "tunnels"]:
        name, raw = "list", ""
    elif len(parts) == 4 and parts[1:3] == ["v1", "tunnels"] and parts[3]:
        name, raw = (parts[3], "") if parts[3] in ("inbound", "outbound") else \
            ("tunnel", parts[3])
    else:
        raise Refusal("UnknownPath", f"no such API path: {PATHS_HELP}")
    allowed = USER_METHODS[name]
    if method not in allowed:
        raise Refusal("MethodNotAllowed", f"method not allowed here; use {' or '.join(allowed)}",
                      (("Allow", ", ".join(allowed)),))
    return name, raw


def parse_bearer(values: List[str]) -> str:
    """The token of the request's Authorization headers ("" if none);
    InvalidArgument for several or another scheme. The token is never echoed."""
    if not values:
        return ""
    if len(values) > 1:
        raise InvalidArgument("send one Authorization header, not several")
    scheme, _, token = values[0].strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer":
        raise InvalidArgument("the Authorization header must be 'Bearer <token>' (other "
                              "schemes are not accepted)")
    if not token or len(token) > 4096 or any(not (33 <= ord(c) <= 126) for c in token):
        raise InvalidArgument("the bearer token is empty, too long or has characters a token "
                              "cannot have: send 'Authorization: Bearer <token>'")
    return token


class Refusal(ScistreamError):
    """An error answer to send: its name (ERRORS gives the status unless ``status``
    says otherwise, e.g. 401 for a request without credentials), message, headers."""

    def __init__(self, name: str, message: str,
                 headers: Tuple[Tuple[str, str], ...] = (), status: int = 0) -> None:
        super().__init__(message)
        self.name, self.message, self.headers = name, message, headers
        self.status = status or status_of(name)

    def to_json(self) -> Dict[str, Any]:
        return ErrorDoc(self.name, self.message).to_json()


@dataclass(frozen=True)
class RequestHead:
    """An HTTP/1.x request head; ``rest``: the bytes after it (the body's start)."""

    method: str
    target: str
    headers: Tuple[Tuple[str, str], ...]  # (lower-case name, value)
    rest: bytes = b""

    def all(self, name: str) -> List[str]:
        return [v for k, v in self.headers if k == name]

    @classmethod
    def parse(cls, head: bytes, rest: bytes = b"") -> RequestHead:
        """Refusal for anything but a plain request line and header lines."""
        bad = InvalidArgument.name
        try:
            lines = head.decode("ascii").split("\r\n")
        except UnicodeDecodeError:
            raise Refusal(bad, "the request head is not ASCII") from None
        parts = lines[0].split(" ")
        if len(parts) != 3 or parts[2] not in ("HTTP/1.0", "HTTP/1.1") or \
                not parts[0].isalpha():
            raise Refusal(bad, "malformed request line: send HTTP/1.1")
        headers = []
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon or not name or name != name.strip():
                raise Refusal(bad, "malformed header line")
            headers.append((name.lower(), value.strip()))
        return cls(parts[0], parts[1], tuple(headers), rest)

    def body_length(self, max_body: int) -> int:
        """The declared body length; Refusal unless one plain Content-Length <= max_body."""
        if self.all("transfer-encoding"):
            raise Refusal("LengthRequired", "send the body with Content-Length; chunked "
                          "transfer encoding is not accepted")
        lengths = self.all("content-length")
        if not lengths:
            raise Refusal("LengthRequired", "send Content-Length with the JSON body (e.g. {})")
        if len(lengths) != 1 or not _DIGITS.fullmatch(lengths[0]):
            raise Refusal(InvalidArgument.name, "Content-Length is malformed")
        length = int(lengths[0])
        if length > max_body:
            raise Refusal("PayloadTooLarge", f"the request body has {length} bytes; at most "
                          f"{max_body} are accepted")
        return length


def response(status: int, doc: Dict[str, Any], headers: Tuple[Tuple[str, str], ...] = (),
             with_body: bool = True) -> bytes:
    """A whole HTTP/1.1 answer with a JSON body; the connection closes after it."""
    body = dumps(doc)
    head = [f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}", "Server: scistreamd",
            "Content-Type: application/json", f"Content-Length: {len(body)}",
            # A claim answer carries a key: no intermediary may keep it.
            "Cache-Control: no-store", "Connection: close"]
    head += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + (body if with_body else b"")


# -- documents -----------------------------------------------------------------


def dumps(doc: Dict[str, Any]) -> bytes:
    return (json.dumps(doc, separators=(",", ":")) + "\n").encode("utf-8")


def loads(raw: bytes) -> Any:
    """Parsed JSON; InvalidArgument for anything else (also absurd nesting)."""
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InvalidArgument("not JSON") from None


@dataclass(frozen=True)
class ClaimRequest:
    """What a claimant sends: the listeners it means to connect to (may be none)."""

    listeners: Tuple[HostPort, ...] = ()

    def to_json(self) -> Dict[str, Any]:
        return {"listeners": [str(h) for h in self.listeners]}

    @classmethod
    def from_json(cls, doc: Any) -> ClaimRequest:
        if not isinstance(doc, dict):
            raise InvalidArgument("the request body must be a JSON object, e.g. {}")
        unknown = set(doc) - {"listeners"}
        if unknown:
            raise InvalidArgument(f"unknown claim fields: {clean(', '.join(sorted(unknown)))}")
        return cls(parse_hostport_list(doc.get("listeners", []), "listeners", min_len=0))


@dataclass(frozen=True)
class PeerEndpoint:
    """A claim's answer: an inbound endpoint as the peer describes it, every field valid."""

    uid: str
    listeners: Tuple[HostPort, ...]
    psk: str = field(repr=False)  # never in logs or reprs
    cipher_suites: str

    def to_json(self) -> Dict[str, Any]:
        return {"uid": self.uid, "listeners": [str(h) for h in self.listeners],
                "psk": self.psk, "cipher_suites": self.cipher_suites}

    @classmethod
    def from_json(cls, doc: Any) -> PeerEndpoint:
        """Raises InvalidArgument saying what is wrong (the caller names the peer)."""
        if not isinstance(doc, dict):
            raise InvalidArgument("the answer is not a JSON object")
        missing = [k for k in ("uid", "listeners", "psk", "cipher_suites") if k not in doc]
        if missing:
            raise InvalidArgument(f"the answer lacks {', '.join(missing)}")
        try:
            uid = parse_uid(doc["uid"])
        except InvalidArgument:
            raise InvalidArgument("its uid is malformed") from None
        raw = doc["listeners"]
        if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_LIST_LEN:
            raise InvalidArgument(f"listeners must be a list of 1..{MAX_LIST_LEN} 'ip:port' "
                                  "strings")
        listeners = tuple(parse_hostport(item, "peer listener") for item in raw)
        try:
            psk = parse_psk(doc["psk"])
        except InvalidArgument:
            raise InvalidArgument("the key is not 64 lower-case hex characters") from None
        try:
            suites = parse_ciphersuites(doc["cipher_suites"])
        except InvalidArgument as e:
            raise InvalidArgument(f"cipher_suites: {clean(e)}") from None
        return cls(uid, listeners, psk, suites)


@dataclass(frozen=True)
class EndpointState:
    uid: str
    state: str

    def to_json(self) -> Dict[str, Any]:
        return {"uid": self.uid, "state": self.state}

    @classmethod
    def from_json(cls, doc: Any) -> EndpointState:
        state = doc.get("state") if isinstance(doc, dict) else None
        if not isinstance(state, str) or not state.isalpha() or len(state) > 32:
            raise InvalidArgument("no state in the answer")
        try:
            return cls(parse_uid(doc.get("uid")), state)
        except InvalidArgument:
            raise InvalidArgument("its uid is malformed") from None


@dataclass(frozen=True)
class ErrorDoc:
    name: str
    message: str

    def to_json(self) -> Dict[str, Any]:
        return {"error": self.name, "message": self.message}

    @classmethod
    def from_json(cls, doc: Any) -> ErrorDoc:
        """Whatever a peer sent, as two clean strings (empty when absent)."""
        name = doc.get("error") if isinstance(doc, dict) else None
        msg = doc.get("message") if isinstance(doc, dict) else None
        # Room for the peer's whole message: its refusals name the fix at the end.
        return cls(clean(name, 40) if isinstance(name, str) else "",
                   clean(msg, 480) if isinstance(msg, str) else "")


def error_for(peer: HostPort, status: int, err: ErrorDoc, what: str) -> ScistreamError:
    """The exception a non-200 answer to ``what`` (e.g. "the claim of <uid>") means.

    Its class follows the error name only; the daemon's own refusals carry
    their fix in the message, which is passed on whole.
    """
    said = f": {err.message}" if err.message else ""
    if err.name in DAEMON_ERRORS:
        return ERRORS[err.name][1](f"peer scistreamd at {peer} refused {what}{said}")
    what = f"HTTP {status}" + (f" {err.name}" if err.name else "")
    return PeerRejected(
        f"peer scistreamd at {peer} answered {what}{' (' + err.message + ')' if said else ''}; "
        f"is {peer} a scistreamd peer port of a compatible version? See its journal "
        "(journalctl -u scistreamd)")


# -- the user API's request bodies ------------------------------------------------


def _fields(doc: Any, what: str, required: Tuple[str, ...],
            optional: Tuple[str, ...]) -> Dict[str, Any]:
    if not isinstance(doc, dict):
        raise InvalidArgument(f"the {what} request body must be a JSON object")
    unknown = sorted(str(k) for k in doc if k not in required + optional)
    if unknown:
        raise InvalidArgument(f"unknown {what} request fields: {clean(', '.join(unknown))} "
                              f"(known: {', '.join(required + optional)})")
    missing = [k for k in required if k not in doc]
    if missing:
        raise InvalidArgument(f"the {what} request lacks {', '.join(missing)}")
    return doc


def _json_int(doc: Dict[str, Any], key: str) -> Any:
    value = doc[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidArgument(f"{key} must be a JSON integer")
    return value


def _json_ports(doc: Dict[str, Any], key: str, min_len: int) -> Tuple[int, ...]:
    value = doc.get(key, [])
    if not isinstance(value, list) or any(
            not isinstance(v, int) or isinstance(v, bool) for v in value):
        raise InvalidArgument(f"{key} must be a JSON array of port numbers")
    return parse_port_list(value, key, min_len=min_len)


@dataclass(frozen=True)
class InboundBody:
    """POST /v1/tunnels/inbound: the D-Bus InboundRequest's arguments."""

    remote_ip: IPAddress
    receiver_ports: Tuple[int, ...]
    num_conn: int
    allowed_peer: str = ""

    def to_json(self) -> Dict[str, Any]:
        doc = {"remote_ip": str(self.remote_ip), "receiver_ports": list(self.receiver_ports),
               "num_conn": self.num_conn}
        return {**doc, **({"allowed_peer": self.allowed_peer} if self.allowed_peer else {})}

    @classmethod
    def from_json(cls, doc: Any) -> InboundBody:
        d = _fields(doc, "inbound", ("remote_ip", "receiver_ports", "num_conn"),
                    ("allowed_peer",))
        if not isinstance(d["remote_ip"], str):
            raise InvalidArgument("remote_ip must be a JSON string")
        return cls(parse_ip(d["remote_ip"], "remote_ip"), _json_ports(d, "receiver_ports", 1),
                   parse_num_conn(_json_int(d, "num_conn"), MAX_LIST_LEN),
                   parse_allowed_peer(d.get("allowed_peer", ""), "allowed_peer"))


@dataclass(frozen=True)
class OutboundBody:
    """POST /v1/tunnels/outbound: the D-Bus OutboundRequest's arguments."""

    uid: str
    remote_listeners: Tuple[HostPort, ...]
    num_conn: int
    local_ports: Tuple[int, ...] = ()
    peer: HostPort | None = None
    trust_pem: str = field(default="", repr=False)

    def to_json(self) -> Dict[str, Any]:
        doc: Dict[str, Any] = {"uid": self.uid,
                               "remote_listeners": [str(h) for h in self.remote_listeners],
                               "num_conn": self.num_conn}
        if self.local_ports:
            doc["local_ports"] = list(self.local_ports)
        if self.peer is not None:
            doc["peer"] = str(self.peer)
        if self.trust_pem:
            doc["trust_pem"] = self.trust_pem
        return doc

    def options(self) -> Dict[str, Any]:
        """The D-Bus options dict of the same request."""
        opts: Dict[str, Any] = {}
        if self.peer is not None:
            opts["peer"] = str(self.peer)
        if self.trust_pem:
            opts["trust_pem"] = self.trust_pem
        return opts

    @classmethod
    def from_json(cls, doc: Any) -> OutboundBody:
        d = _fields(doc, "outbound", ("uid", "remote_listeners", "num_conn"),
                    ("local_ports", "peer", "trust_pem"))
        if not isinstance(d["remote_listeners"], list):
            raise InvalidArgument("remote_listeners must be a JSON array of 'ip:port' strings")
        peer = d.get("peer")
        trust = d.get("trust_pem", "")
        if not isinstance(trust, str):
            raise InvalidArgument("trust_pem must be a JSON string of PEM text")
        return cls(parse_uid(d["uid"]),
                   parse_hostport_list(d["remote_listeners"], "remote_listeners"),
                   parse_num_conn(_json_int(d, "num_conn"), MAX_LIST_LEN),
                   _json_ports(d, "local_ports", 0),
                   None if peer is None else parse_hostport(peer, "peer"), trust)
