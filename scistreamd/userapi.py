"""The user API on the peer port (/v1/tunnels): the manager's second face, for remote users.

The same manager as D-Bus (one manager, two faces): the same validation and
named errors; what this module adds is who asks (authentication), whether
they may (userrules.py) and whose endpoints they see (Owner).

Authentication, in this order:

1. ``Authorization: Bearer <token>``: the TokenVerifier (tokens.py) turns it
   into an identity or refuses (AccessDenied; AuthUnavailable when it cannot
   ask). Without a verifier a token is refused by name.
2. else a client certificate that chained to ``user_client_ca``: identity
   ``cert:<name>`` (usercert.py).
3. else: 401 AccessDenied (upstream's INVALID_TOKEN case).

A remote identity lists, inspects and releases only endpoints it owns; any
other uid is NotFound with the same message as a uid that does not exist, so
existence does not leak. Every refusal of an authenticated identity is a
journal line with MESSAGE_ID :data:`MSG_USER_REFUSED`, SCISTREAM_IDENTITY and
the reason, which names the rule.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any, Awaitable, Callable, Dict, List, Optional, Protocol, Sequence, Tuple

from .endpoint_json import endpoint_json, endpoint_properties
from .errors import AccessDenied, InvalidArgument, NotFound, ScistreamError
from .identity import Identity
from .manager import Manager
from .model import Endpoint, State, parse_uid
from .peerwire import (
    RequestHead,
    loads,
)
from .userrules import (
    UserRule,
    inbound_refusal,
    limit_refusal,
    no_rule_refusal,
    outbound_refusal,
    rule_for,
)
from .userwire import InboundBody, OutboundBody, parse_bearer, user_flags, user_route

logger = logging.getLogger(__name__)

#: journald MESSAGE_ID of a refused user API request (authenticated or not).
MSG_USER_REFUSED = uuid.UUID("5a1f0c7e6b6d4f3e9a4b2d1c0e9f8a76")
#: journald MESSAGE_ID of a user API request that changed something.
MSG_USER_REQUEST = uuid.UUID("5a1f0c7e6b6d4f3e9a4b2d1c0e9f8a77")
_WWW_AUTH = (("WWW-Authenticate", 'Bearer realm="scistream"'),)
class TokenVerifier(Protocol):
    """tokens.TokenVerifier: a bearer token to an identity, or AccessDenied /
    AuthUnavailable (never a traceback, never the token in a message)."""

    async def verify(self, token: str) -> Identity: ...


class UserRequests(Protocol):
    """What the peer server asks of the user API (UserApi.answer): ``body()`` reads
    the request body; ``cert``: the identity of a client certificate from
    user_client_ca, or None. (status, JSON document), or a ScistreamError whose
    name goes to the client (``http_status``/``http_headers`` when not the table's)."""

    async def answer(self, req: RequestHead, body: Callable[[], Awaitable[bytes]],
                     cert: Optional[Identity], source: str) -> Tuple[int, Dict[str, Any]]: ...


class NoCredentials(AccessDenied):
    """AccessDenied for a request with neither token nor user certificate: HTTP 401."""

    http_status = 401
    http_headers = _WWW_AUTH


class UserApi:
    """Answers /v1/tunnels requests (peerserver.UserRequests)."""

    def __init__(self, manager: Manager, rules: Sequence[UserRule],
                 verifier: Optional[TokenVerifier] = None, *, certs: bool = False) -> None:
        """``certs``: whether user client certificates are configured (for messages)."""
        self._m = manager
        self._rules = tuple(rules)
        self._verifier = verifier
        self._certs = certs
        #: per owner: creations run one at a time, so a limit cannot be raced past.
        self._owner_locks: Dict[str, asyncio.Lock] = {}

    # -- who asks -------------------------------------------------------------------

    async def authenticate(self, req: RequestHead, cert: Optional[Identity],
                           source: str) -> Identity:
        try:
            token = parse_bearer(req.all("authorization"))
        except InvalidArgument as e:
            self._refused(None, source, str(e))
            raise NoCredentials(str(e)) from None
        if token:
            if self._verifier is None:
                why = ("this gateway accepts no bearer tokens (no token introspection is "
                       "configured)" + ("; use a client certificate from its user_client_ca"
                                        if self._certs else ""))
                self._refused(None, source, why)
                raise NoCredentials(why)
            try:
                return await self._verifier.verify(token)
            except AccessDenied as e:
                self._refused(None, source, f"token refused: {e}")
                raise NoCredentials(str(e)) from None
            except ScistreamError as e:  # e.g. AuthUnavailable: fail closed, by name
                self._refused(None, source, f"token not checked: {e}")
                raise
        if cert is not None:
            return cert
        why = ("no credentials: send 'Authorization: Bearer <token>'" +
               (" or a client certificate from this gateway's user_client_ca"
                if self._certs else "") + " (INVALID_TOKEN)")
        self._refused(None, source, why, level=logging.INFO)
        raise NoCredentials(why)

    def _refused(self, ident: Optional[Identity], source: str, why: str,
                 level: int = logging.WARNING) -> None:
        who = str(ident) if ident is not None else "an unauthenticated client"
        logger.log(level, "user API: refused %s from %s: %s", who, source, why,
                   extra={"MESSAGE_ID": MSG_USER_REFUSED.hex,
                          "SCISTREAM_IDENTITY": ident.owner if ident else "",
                          "SCISTREAM_SOURCE": source})

    def _deny(self, ident: Identity, source: str, why: Optional[str]) -> None:
        if why:
            self._refused(ident, source, why)
            raise AccessDenied(why)

    # -- the API ----------------------------------------------------------------------

    async def answer(self, req: RequestHead, body: Callable[[], Awaitable[bytes]],
                     cert: Optional[Identity], source: str) -> Tuple[int, Dict[str, Any]]:
        name, raw_uid = user_route(req.method, req.target)
        flags = user_flags(name, req.method, req.target)
        ident = await self.authenticate(req, cert, source)  # before the body is read
        if rule_for(self._rules, ident) is None:  # the default: may do nothing at all
            self._deny(ident, source, no_rule_refusal(ident))
        if name == "list":
            return 200, {"tunnels": [self._json(ep) for ep in self._own(ident)]}
        if name == "tunnel":
            if "wait" in flags:  # the early start's failure, if it failed (then no endpoint)
                await self._m.settled(raw_uid, ident.owner)
            eps = self._owned(ident, raw_uid)
            if req.method == "GET":
                return 200, {"tunnels": [self._json(ep) for ep in eps]}
            released = 0
            for ep in eps:
                released += len(await self._m.release(ep.uid, ep.role))
            self._log(ident, source, "released %s (%d endpoint(s))", eps[0].uid, released)
            return 200, {"released": released}
        doc = loads(await body())
        if name == "inbound":
            inb = InboundBody.from_json(doc)
            self._deny(ident, source, inbound_refusal(
                self._rules, ident, [(inb.remote_ip, p) for p in inb.receiver_ports]))
            options = inb.options()
            if "early" in flags:
                options["early"] = True
            async with self._owner_lock(ident):
                self._check_limit(ident, source)
                ep = await self._m.inbound_request(
                    inb.remote_ip, list(inb.receiver_ports), inb.num_conn, options,
                    owner=ident.owner)
            self._log(ident, source, "created inbound endpoint %s%s", ep.uid,
                      " (its relay starting)" if ep.state is State.STARTING else "")
            return 201, {"uid": ep.uid, "listeners": [str(h) for h in ep.listeners],
                         "endpoint": self._json(ep)}
        out = OutboundBody.from_json(doc)
        # Where this gateway will connect: the peer daemon (the manager's default:
        # the first listener's host) and the remote listeners.
        peer = out.peer.host if out.peer else out.remote_listeners[0].host
        self._deny(ident, source, outbound_refusal(
            self._rules, ident, [peer] + [h.host for h in out.remote_listeners]))
        async with self._owner_lock(ident):
            self._check_limit(ident, source)
            ep = await self._m.outbound_request(
                out.uid, list(out.remote_listeners), list(out.local_ports), out.num_conn,
                out.options(), owner=ident.owner)
        self._log(ident, source, "created outbound endpoint %s", ep.uid)
        return 201, {"listeners": [str(h) for h in ep.listeners], "endpoint": self._json(ep)}

    def _log(self, ident: Identity, source: str, text: str, *args: Any) -> None:
        logger.info("user API: %s from %s: " + text, ident, source, *args,
                    extra={"MESSAGE_ID": MSG_USER_REQUEST.hex,
                           "SCISTREAM_IDENTITY": ident.owner, "SCISTREAM_SOURCE": source})

    def _owner_lock(self, ident: Identity) -> asyncio.Lock:
        lock = self._owner_locks.get(ident.owner)
        if lock is None:
            if len(self._owner_locks) > 4096:  # only idle ones are dropped
                self._owner_locks = {k: v for k, v in self._owner_locks.items() if v.locked()}
            lock = self._owner_locks[ident.owner] = asyncio.Lock()
        return lock

    def _check_limit(self, ident: Identity, source: str) -> None:
        self._deny(ident, source, limit_refusal(self._rules, ident, len(self._own(ident))))

    def _own(self, ident: Identity) -> List[Endpoint]:
        return [ep for ep in self._m.list() if ep.owner == ident.owner]

    def _owned(self, ident: Identity, raw_uid: str) -> List[Endpoint]:
        """The caller's endpoints of a uid; NotFound alike for others' and unknown uids."""
        uid = parse_uid(raw_uid)
        eps = [ep for ep in self._own(ident) if ep.uid == uid]
        if not eps:
            raise NotFound(f"no endpoint with uid {uid} of yours on this host: GET "
                           "/v1/tunnels lists yours")
        return eps

    def _json(self, ep: Endpoint) -> Dict[str, Any]:
        return endpoint_json(endpoint_properties(ep, self._m.traffic(ep)))
