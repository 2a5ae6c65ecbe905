"""The peer port's wire format: paths, JSON documents, error names and statuses.

Both sides of the peer port use this module (peerserver, peerclient); it
knows nothing of sockets or TLS. API (JSON over HTTPS, one request per
connection)::

    GET  /v1/health                 -> 200 {"status": "ok"} (+ "version", ... for a
                                       verified client certificate)
    GET  /v1/endpoints/<uid>        -> 200 {"uid", "state", "key_generation",
                                       "target_reachable", "target_failures",
                                       "last_target_failure", "last_target_failure_at"}
                                       (key generation and target health may be absent
                                       from an older peer; see EndpointState)
    POST /v1/endpoints/<uid>/claim  {"listeners": [...]}
                                    -> 200 {"uid", "listeners", "psk", "cipher_suites",
                                            "key_generation"}

``key_generation`` (an integer >= 1) numbers the inbound endpoint's keys: a
re-arm, or a claim repeated by the same claimant before its relay first
connected (manager.claim), gives a new key and the next number. A claimant
records the number it got; when the state check later says another one, its
key is dead. Absent (a peer of an earlier version): 0, "unknown".

The user API under /v1/tunnels (userapi.py; every call with ``Authorization:
Bearer <token>`` or a client certificate from ``user_client_ca``) has its wire
format in userwire.py; its errors use the same documents and table.

A failure is ``{"error": "<Name>", "message": "..."}``. The name crosses the
wire unchanged and alone decides the exception class on the other side
(:data:`ERRORS`); the HTTP status is only the status.
"""

from __future__ import annotations

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
    parse_hostport,
    parse_hostport_list,
    parse_key_generation,
    parse_uid,
)
from .relay import parse_ciphersuites, parse_psk
from .wiretext import clean, dumps, loads  # noqa: F401  (the peer port's, too)

API_PREFIX = "/v1"
DEFAULT_PEER_PORT = 5000
#: Largest answer the client accepts; 1024 IPv6 listeners fit comfortably.
MAX_RESPONSE = 64 * 1024
#: journald MESSAGE_ID of a refused peer request (no or untrusted certificate, not
#: the endpoint's allowed peer); events.MSG_CLAIM_REFUSED is the same id.
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



# -- paths --------------------------------------------------------------------


def health_path() -> str:
    return f"{API_PREFIX}/health"


def state_path(uid: str) -> str:
    return f"{API_PREFIX}/endpoints/{uid}"


def claim_path(uid: str) -> str:
    return f"{API_PREFIX}/endpoints/{uid}/claim"


#: route name -> the only method it answers ("user": the user API decides, userwire.user_route)
METHODS = {"health": "GET", "state": "GET", "claim": "POST"}
PATHS_HELP = ("this scistreamd peer port serves GET /v1/health, GET /v1/endpoints/<uid>, "
              "POST /v1/endpoints/<uid>/claim and the user API under /v1/tunnels")
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
    #: the key's generation at the peer; 0: the peer did not say (older version).
    key_generation: int = 0

    def to_json(self) -> Dict[str, Any]:
        return {"uid": self.uid, "listeners": [str(h) for h in self.listeners],
                "psk": self.psk, "cipher_suites": self.cipher_suites,
                "key_generation": self.key_generation}

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
        return cls(uid, listeners, psk, suites, _generation_of(doc))


def _generation_of(doc: Dict[str, Any]) -> int:
    try:
        return parse_key_generation(doc.get("key_generation", 0))
    except InvalidArgument:
        raise InvalidArgument("its key_generation is not an integer in 0..2**32-1") from None


@dataclass(frozen=True)
class EndpointState:
    """The answer to a state check. ``health``: the inbound endpoint's target health
    (whether its server application accepts connections), parsed: target_reachable
    "yes"|"no"|"unknown", target_failures (int), last_target_failure (text, clean),
    last_target_failure_at (µs since the epoch, 0 = never); empty from a peer that
    predates it."""

    uid: str
    state: str
    #: see the module docstring; 0: the peer did not say.
    key_generation: int = 0
    health: Dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> Dict[str, Any]:
        return {"uid": self.uid, "state": self.state, "key_generation": self.key_generation,
                **self.health}

    @classmethod
    def from_json(cls, doc: Any) -> EndpointState:
        state = doc.get("state") if isinstance(doc, dict) else None
        if not isinstance(state, str) or not state.isalpha() or len(state) > 32:
            raise InvalidArgument("no state in the answer")
        try:
            uid = parse_uid(doc.get("uid"))
        except InvalidArgument:
            raise InvalidArgument("its uid is malformed") from None
        return cls(uid, state, _generation_of(doc), parse_target_health(doc))


def parse_target_health(doc: Dict[str, Any]) -> Dict[str, Any]:
    """The target health fields of a state answer, checked; {} if absent or malformed."""
    reachable = doc.get("target_reachable")
    failures = doc.get("target_failures", 0)
    text = doc.get("last_target_failure", "")
    at = doc.get("last_target_failure_at", 0)
    if (reachable not in ("yes", "no", "unknown") or not _small_int(failures)
            or not isinstance(text, str) or not _small_int(at)):
        return {}
    return {"target_reachable": reachable, "target_failures": failures,
            "last_target_failure": clean(text), "last_target_failure_at": at}


def _small_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2 ** 63


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
