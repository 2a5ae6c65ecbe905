"""The user API's wire format (/v1/tunnels on the peer port): its routes, the
bearer token of a request, and the request bodies parsed into typed values
(unknown fields refused by name). Pure; the peer port's own documents and the
one error-name table are in peerwire.py.

    GET    /v1/tunnels                   -> 200 {"tunnels": [endpoint json, ...]} (yours)
    POST   /v1/tunnels/inbound  {"remote_ip", "receiver_ports", "num_conn", "allowed_peer"?}
                                         -> 201 {"uid", "listeners", "endpoint"}
           ?early=1: answered once the endpoint exists, its relay still starting
           (endpoint "state": "starting"; its key may be claimed meanwhile)
    POST   /v1/tunnels/outbound {"uid", "remote_listeners", "local_ports"?, "num_conn",
                                 "peer"?, "trust_pem"?} -> 201 {"listeners", "endpoint"}
    GET    /v1/tunnels/<uid>             -> 200 {"tunnels": [...]}
           ?wait=1: after an early start is over; its failure by name if it failed
    DELETE /v1/tunnels/<uid>             -> 200 {"released": n}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, List, Tuple

from .errors import InvalidArgument
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
from .peerwire import API_PREFIX, PATHS_HELP, Refusal, clean


def tunnels_path(what: str = "") -> str:
    """The user API: /v1/tunnels, /v1/tunnels/inbound, /v1/tunnels/outbound, /v1/tunnels/<uid>."""
    return f"{API_PREFIX}/tunnels" + (f"/{what}" if what else "")


#: user route -> the methods it answers
USER_METHODS = {"list": ("GET",), "inbound": ("POST",), "outbound": ("POST",),
                "tunnel": ("GET", "DELETE")}


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


#: user route and method -> the query flags it takes (each "1" or "0"; others refused)
USER_FLAGS = {("inbound", "POST"): ("early",), ("tunnel", "GET"): ("wait",)}


def user_flags(name: str, method: str, target: str) -> FrozenSet[str]:
    """The query flags set to 1 in a request to user route ``name``; InvalidArgument for
    a parameter the route does not take, a repeated one or a value other than 0/1."""
    query = target.partition("?")[2]
    if not query:
        return frozenset()
    known = USER_FLAGS.get((name, method), ())
    seen: Dict[str, bool] = {}
    for item in query.split("&"):
        key, eq, value = item.partition("=")
        if key not in known:
            raise InvalidArgument(f"unknown query parameter {clean(key[:40])!r} for {method} "
                                  f"on this path (known: {', '.join(known) or 'none'})")
        if key in seen or not eq or value not in ("0", "1"):
            raise InvalidArgument(f"query parameter {key} must be given once, as {key}=1 or "
                                  f"{key}=0")
        seen[key] = value == "1"
    return frozenset(k for k, on in seen.items() if on)


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
        return {**doc, **self.options()}

    def options(self) -> Dict[str, Any]:
        """The D-Bus options dict of the same request."""
        return {"allowed_peer": self.allowed_peer} if self.allowed_peer else {}

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
