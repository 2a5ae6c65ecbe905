"""OAuth 2.0 Token Introspection (RFC 7662) answers, parsed and judged.

An introspection server's answer is external input: it is parsed into an
:class:`Introspection` before anything looks at it. Generic RFC 7662 answers
and Globus Auth's (``identity_set``, ``aud`` as a list) are both accepted.
:func:`judge` applies the daemon's policy (required scopes, audience, times)
and gives an :class:`~scistreamd.identity.Identity` or a :class:`TokenDenied`
naming the reason. Pure: no I/O, the clock is an argument.

Which failure is which (fail closed either way):

- the token is bad (inactive, expired, revoked, unknown, wrong scope or
  audience, malformed): :class:`TokenDenied`, an AccessDenied;
- the answer is not an introspection answer (not HTTP 200, not a JSON
  object, ``active`` not a boolean, a field of the wrong type): AuthUnavailable,
  because the caller's token may be good and a retry later may work.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Tuple

from .errors import AccessDenied, AuthUnavailable
from .identity import Identity

#: Largest answer read from the introspection server.
MAX_ANSWER = 64 * 1024
#: Longest bearer token accepted (Globus tokens are ~70 characters; JWTs a few KiB).
MAX_TOKEN = 8192
#: Limits on the answer's strings and lists (a subject, a scope, an identity).
MAX_FIELD = 512
MAX_ITEMS = 256
#: Clock skew tolerated between this host and the introspection server (seconds).
LEEWAY = 30.0
# RFC 6750 b64token, the bearer token syntax.
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
# RFC 6749 scope-token: printable ASCII except space, '"' and '\'.
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
# A NumericDate beyond year 5138 is a unit mistake (milliseconds), not a time.
_MAX_TIME = 1e11

#: Reasons of a denial: short names for the journal (SCISTREAM_DENIAL_REASON).
REASONS = ("no_user_tokens", "malformed", "inactive", "expired", "not_yet_valid",
           "no_subject", "bad_subject", "scope", "audience")
#: What identity.Identity accepts as a name (subject, username, group, scope).
_NAME = re.compile(r"[^\s]{1,255}")


class TokenDenied(AccessDenied):
    """A token refused: ``reason`` one of REASONS, ``subject`` the token's ``sub``
    when the introspection server named one. The message never holds the token."""

    def __init__(self, reason: str, message: str, subject: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.subject = subject


@dataclass(frozen=True)
class Introspection:
    """One parsed answer. Times are seconds since the epoch (None: not given)."""

    active: bool
    sub: str = ""
    username: str = ""
    scopes: Tuple[str, ...] = ()
    audiences: Tuple[str, ...] = ()
    exp: Optional[float] = None
    nbf: Optional[float] = None
    iat: Optional[float] = None
    client_id: str = ""
    token_type: str = ""
    iss: str = ""
    identity_set: Tuple[str, ...] = ()


@dataclass(frozen=True)
class Policy:
    """What a token must carry: every scope of ``required_scopes`` and, when
    ``audience`` is set, that audience among its ``aud``."""

    required_scopes: Tuple[str, ...] = ()
    audience: str = ""


def token_key(token: str) -> bytes:
    """The cache key of a token: its SHA-256, so no table ever holds a token."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def check_token_syntax(token: str) -> str:
    """``token`` if it looks like a bearer token (RFC 6750), else TokenDenied.

    A malformed token is refused without asking the introspection server.
    """
    if not isinstance(token, str) or not token:
        raise TokenDenied("malformed", "no bearer token: send 'Authorization: Bearer <token>'")
    if len(token) > MAX_TOKEN or not _B64TOKEN.fullmatch(token):
        raise TokenDenied("malformed", "the bearer token is malformed (not RFC 6750 token "
                          f"characters, or longer than {MAX_TOKEN}): send the access token "
                          "the authorization server issued, unchanged")
    return token


def _unavailable(problem: str) -> AuthUnavailable:
    return AuthUnavailable(f"the token introspection server answered {problem}")


def _text(doc: Mapping[str, Any], key: str) -> str:
    value = doc.get(key)
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > MAX_FIELD or not value.isprintable():
        raise _unavailable(f"a bad {key!r} (expected a printable string of at most "
                           f"{MAX_FIELD} characters)")
    return value


def _time(doc: Mapping[str, Any], key: str) -> Optional[float]:
    value = doc.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not (isinstance(value, int) or math.isfinite(value)) or not 0 <= value < _MAX_TIME:
        raise _unavailable(f"a bad {key!r} (expected seconds since the epoch)")
    return float(value)


def _scopes(doc: Mapping[str, Any]) -> Tuple[str, ...]:
    value = doc.get("scope")
    if value is None:
        return ()
    if not isinstance(value, str) or len(value) > MAX_FIELD * 8:
        raise _unavailable("a bad 'scope' (expected a space-separated string)")
    scopes = value.split()
    if len(scopes) > MAX_ITEMS or not all(_SCOPE_TOKEN.fullmatch(s) for s in scopes):
        raise _unavailable("a bad 'scope' (not RFC 6749 scope tokens)")
    return tuple(dict.fromkeys(scopes))


def _strings(doc: Mapping[str, Any], key: str, *, single: bool,
             subkey: str = "") -> Tuple[str, ...]:
    """A string list (or one string when ``single``); with ``subkey``, items may
    also be objects carrying that key (Globus' identity_set_detail form)."""
    value = doc.get(key)
    if value is None:
        return ()
    if single and isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or len(value) > MAX_ITEMS:
        raise _unavailable(f"a bad {key!r} (expected a list of at most {MAX_ITEMS} strings)")
    out = []
    for item in value:
        if subkey and isinstance(item, dict):
            item = item.get(subkey)
        if not isinstance(item, str) or not item or len(item) > MAX_FIELD or \
                not item.isprintable():
            raise _unavailable(f"a bad {key!r} (expected a list of printable strings)")
        out.append(item)
    return tuple(dict.fromkeys(out))


def parse_answer(doc: object) -> Introspection:
    """An introspection answer (the decoded JSON) parsed; AuthUnavailable if it is none."""
    if not isinstance(doc, dict):
        raise _unavailable("JSON that is not an object")
    active = doc.get("active")
    if not isinstance(active, bool):
        raise _unavailable("no boolean 'active' (not an RFC 7662 answer)")
    if not active:
        # Nothing else in an inactive answer matters (RFC 7662 2.2).
        return Introspection(active=False)
    return Introspection(
        active=True,
        sub=_text(doc, "sub"),
        username=_text(doc, "username"),
        scopes=_scopes(doc),
        audiences=_strings(doc, "aud", single=True),
        exp=_time(doc, "exp"),
        nbf=_time(doc, "nbf"),
        iat=_time(doc, "iat"),
        client_id=_text(doc, "client_id"),
        token_type=_text(doc, "token_type"),
        iss=_text(doc, "iss"),
        identity_set=_strings(doc, "identity_set", single=False, subkey="sub"),
    )


def parse_response(status: int, content_type: str, body: bytes) -> Introspection:
    """An HTTP answer of the introspection endpoint parsed; AuthUnavailable if it
    is not a successful RFC 7662 answer (its problem named, for the journal)."""
    if status in (401, 403):
        raise AuthUnavailable(
            f"the token introspection server refused this daemon's client credentials "
            f"(HTTP {status}): check token_client_id and token_client_secret_file")
    if status != 200:
        raise _unavailable(f"HTTP {status} instead of 200")
    mime = content_type.split(";", 1)[0].strip().lower()
    if mime != "application/json" and not mime.endswith("+json"):
        raise _unavailable(f"{mime or 'no content type'!r:.60} instead of application/json")
    if len(body) > MAX_ANSWER:
        raise _unavailable(f"more than {MAX_ANSWER} bytes")
    try:
        doc = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _unavailable("something that is not JSON") from None
    return parse_answer(doc)


def judge(intro: Introspection, policy: Policy, now: float) -> Identity:
    """The identity a token stands for under ``policy``, or TokenDenied naming why."""
    if not intro.active:
        raise TokenDenied("inactive", "the token is not active (expired, revoked or not "
                          "issued for this server): get a new token")
    sub = intro.sub
    if intro.exp is not None and intro.exp <= now - LEEWAY:
        raise TokenDenied("expired", "the token has expired: get a new token", sub)
    if intro.nbf is not None and intro.nbf > now + LEEWAY:
        raise TokenDenied("not_yet_valid", "the token is not valid yet (nbf in the future): "
                          "check the clocks, or use the token later", sub)
    if not sub:
        raise TokenDenied("no_subject", "the token names no subject ('sub'), so it cannot "
                          "own tunnels: use a token issued to a user or a client identity")
    missing = [s for s in policy.required_scopes if s not in intro.scopes]
    if missing:
        raise TokenDenied("scope", f"the token lacks the scope {' '.join(missing)!r:.200} "
                          "this daemon requires: get a token with that scope", sub)
    if policy.audience and policy.audience not in intro.audiences:
        raise TokenDenied("audience", f"the token is not meant for this daemon (its audience "
                          f"does not include {policy.audience!r:.100}): get a token for it", sub)
    if not _usable(sub):
        raise TokenDenied("bad_subject", "the token's subject cannot name an owner here "
                          "(spaces, or longer than 255 characters): use a token of another "
                          "identity")
    # A username or group that cannot be a name is left out: that only takes
    # away what a rule could grant by it.
    return Identity(kind="token", subject=sub,
                    username=intro.username if _usable(intro.username) else "",
                    groups=tuple(g for g in intro.identity_set if _usable(g)),
                    scopes=tuple(s for s in intro.scopes if _usable(s)))


def _usable(name: str) -> bool:
    return bool(_NAME.fullmatch(name)) and name.isprintable()


def cache_until(intro: Introspection, now: float, max_seconds: float) -> float:
    """Until when a positive answer may be reused: its ``exp`` or ``now +
    max_seconds``, whichever is sooner."""
    until = now + max_seconds
    if intro.exp is not None:
        until = min(until, intro.exp)
    return until
