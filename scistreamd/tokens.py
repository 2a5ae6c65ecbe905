"""Bearer tokens of remote users, checked by OAuth 2.0 Token Introspection (RFC 7662).

:class:`TokenVerifier` is built once by the daemon from its configuration and
handed to the user API: ``await verifier.verify(token)`` gives the caller's
:class:`~scistreamd.identity.Identity` or raises AccessDenied (a
:class:`~scistreamd.introspection.TokenDenied`: invalid, expired, revoked,
wrong scope or audience, malformed, or no introspection configured) or
AuthUnavailable (the introspection server cannot be reached or answers
garbage). Nothing is granted in either failure (fail closed).

- The daemon authenticates to the introspection endpoint as a confidential
  client (HTTP Basic, RFC 6749 2.3.1) with a secret read once at start from a
  root-only file; the secret lives only in this process' memory.
- Answers are cached under the SHA-256 of the token (never the token): a
  positive one until the token's ``exp`` or ``token_cache_max_seconds``,
  whichever is sooner; a negative one ``token_negative_cache_seconds`` (a few
  seconds: a flood of bad tokens costs the server little, a token that was
  refused by mistake works again soon). AuthUnavailable is never cached.
- Concurrent checks of one token share one introspection request.
- Requests run on a small thread pool of their own (``requests`` blocks), with
  short timeouts, TLS verified against ``token_ca_file`` (or the system CAs),
  and no redirects (a redirect could carry the client credentials elsewhere).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import itertools
import logging
import os
import stat
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple, Union

from .errors import AuthUnavailable, ConfigError
from .identity import Identity
from .introspection import (
    MAX_ANSWER,
    Policy,
    TokenDenied,
    cache_until,
    check_token_syntax,
    judge,
    parse_response,
    token_key,
)

logger = logging.getLogger(__name__)

#: journald MESSAGE_ID of a refused bearer token (journalctl MESSAGE_ID=...).
MSG_TOKEN_DENIED = uuid.UUID("5a1f0c7e6b6d4f3e9a4b2d1c0e9f8a80")
#: journald MESSAGE_ID of a token that could not be checked (server down, garbage).
MSG_AUTH_UNAVAILABLE = uuid.UUID("5a1f0c7e6b6d4f3e9a4b2d1c0e9f8a81")
#: Most cached answers kept; beyond it the oldest go first.
MAX_CACHE_ENTRIES = 10000
#: Introspection requests in flight at once (threads of the verifier's own pool).
MAX_PARALLEL = 4
#: Largest client secret file.
MAX_SECRET = 4096
NO_USER_TOKENS = ("this daemon accepts no user tokens: its operator has not configured "
                  "token_introspection_url (see scistreamd.toml(5))")
UNAVAILABLE = ("this daemon cannot check bearer tokens right now (its token introspection "
               "server is unreachable or misbehaving); nothing was done: try again later")

#: (HTTP status, Content-Type, body) of one introspection request for a token.
Answer = Tuple[int, str, bytes]
Transport = Callable[[str], Answer]


@dataclass(frozen=True)
class TokenSettings:
    """What the verifier needs from the configuration."""

    url: str
    client_id: str
    policy: Policy = Policy()
    cache_max_seconds: float = 60.0
    negative_cache_seconds: float = 5.0
    ca_file: Optional[Path] = None
    timeout: float = 5.0


def read_client_secret(path: Path, key: str = "token_client_secret_file") -> str:
    """The client secret from ``path``; ConfigError unless the file is a regular
    file owned by root (or this process' user) that no one else may read."""
    def bad(problem: str) -> ConfigError:
        return ConfigError(str(path), key, problem)

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as err:
        raise bad(f"cannot open it ({err.strerror or err}): write the client secret there, "
                  "owned by root with mode 0600") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise bad("not a regular file: write the client secret into a file")
        if st.st_uid not in (0, os.geteuid()):
            raise bad(f"owned by uid {st.st_uid}: chown root it (the secret must be root's)")
        if st.st_mode & 0o077:
            raise bad(f"mode {stat.S_IMODE(st.st_mode):04o} lets others read the client "
                      "secret: chmod 0600 it (and get a new secret if others could read it)")
        raw = os.read(fd, MAX_SECRET + 1)
    finally:
        os.close(fd)
    if len(raw) > MAX_SECRET:
        raise bad(f"longer than {MAX_SECRET} bytes: the file must hold the client secret only")
    try:
        secret = raw.decode("utf-8").strip("\r\n")
    except UnicodeDecodeError:
        raise bad("not UTF-8 text: write the client secret as text") from None
    if not secret or not secret.isprintable() or "\n" in secret:
        raise bad("empty, or not one line of printable text: write the client secret alone "
                  "on one line")
    return secret


def basic_auth(client_id: str, secret: str) -> str:
    """The HTTP Basic Authorization header value of the client credentials.

    Sent as they are, like globus-sdk and ``requests`` do: RFC 6749 2.3.1 asks
    for form-urlencoding them first, but servers that skip the decoding
    (Globus Auth's clients never encode, authlib does not decode) would then
    refuse a secret with '+', '/' or '='. Unreserved characters read the same
    either way; a client id cannot hold ':' (config.py refuses it).
    """
    pair = f"{client_id}:{secret}"
    return "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")


class RequestsTransport:
    """Introspection over HTTPS with ``requests``: one session per pool thread."""

    def __init__(self, settings: TokenSettings, secret: str) -> None:
        self._url = settings.url
        self._auth = basic_auth(settings.client_id, secret)
        self._verify: Union[bool, str] = str(settings.ca_file) if settings.ca_file else True
        # (connect, read): short, a user waits for this.
        self._timeout = (min(settings.timeout, 3.0), settings.timeout)
        self._local = threading.local()

    def __repr__(self) -> str:  # never the header
        return f"RequestsTransport({self._url!r})"

    def _session(self):  # type: ignore[no-untyped-def]
        import requests

        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.trust_env = False  # no proxies or .netrc from the environment
            self._local.session = session
        return session

    def __call__(self, token: str) -> Answer:
        import requests
        import urllib3

        try:
            with self._session().post(
                self._url, data={"token": token, "token_type_hint": "access_token",
                      # Globus Auth adds identity_set only when asked.
                      "include": "identity_set"},
                headers={"Authorization": self._auth, "Accept": "application/json"},
                timeout=self._timeout, verify=self._verify, allow_redirects=False,
                stream=True,
            ) as resp:
                body = resp.raw.read(MAX_ANSWER + 1, decode_content=True)
                return resp.status_code, resp.headers.get("Content-Type", ""), body
        except requests.exceptions.SSLError:
            raise AuthUnavailable(f"TLS with the token introspection server {self._url} failed "
                                  "(certificate not trusted? see token_ca_file)") from None
        except requests.exceptions.Timeout:
            raise AuthUnavailable(f"the token introspection server {self._url} did not answer "
                                  "in time") from None
        # urllib3's own errors come unwrapped from resp.raw.read (a broken
        # chunked or compressed body); all of them mean no answer.
        except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, OSError,
                ValueError) as err:
            raise AuthUnavailable(f"cannot reach the token introspection server {self._url} "
                                  f"({type(err).__name__})") from None

    def close(self) -> None:
        session = getattr(self._local, "session", None)
        if session is not None:
            session.close()


@dataclass(frozen=True)
class _Entry:
    until: float
    identity: Optional[Identity] = None
    denial: Optional[Tuple[str, str, str]] = None  # reason, message, subject


class TokenVerifier:
    """Checks bearer tokens; see the module docstring. ``settings`` None: no user
    tokens are accepted (every token is refused by name)."""

    def __init__(self, settings: Optional[TokenSettings], *, client_secret: str = "",
                 transport: Optional[Transport] = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self._clock = clock
        self._transport: Optional[Transport] = None
        if settings is not None:
            self._transport = transport or RequestsTransport(settings, client_secret)
        self._cache: Dict[bytes, _Entry] = {}
        self._inflight: Dict[bytes, asyncio.Future] = {}
        self._pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
        #: Introspection requests sent, and answers served from the cache.
        self.introspections = 0
        self.cache_hits = 0

    @classmethod
    def from_config(cls, cfg) -> TokenVerifier:  # type: ignore[no-untyped-def]
        """The daemon's verifier (cfg: config.Config); reads and checks the secret file."""
        if not cfg.token_introspection_url:
            return cls(None)
        settings = TokenSettings(
            url=cfg.token_introspection_url, client_id=cfg.token_client_id,
            policy=Policy(required_scopes=cfg.token_required_scope,
                          audience=cfg.token_audience),
            cache_max_seconds=cfg.token_cache_max_seconds,
            negative_cache_seconds=cfg.token_negative_cache_seconds,
            ca_file=cfg.token_ca_file, timeout=cfg.token_timeout)
        secret = read_client_secret(cfg.token_client_secret_file)
        if not settings.policy.audience:
            logger.warning("token_audience is not set: any active token of %s with the "
                           "required scopes is accepted, including tokens meant for other "
                           "services; set token_audience to this daemon's client id",
                           settings.url)
        return cls(settings, client_secret=secret)

    @property
    def enabled(self) -> bool:
        return self.settings is not None

    async def verify(self, token: str) -> Identity:
        """The identity of ``token``; TokenDenied (AccessDenied) or AuthUnavailable."""
        try:
            return await self._verify(token)
        except TokenDenied as denied:
            self._log_denial(denied, token)
            raise

    async def _verify(self, token: str) -> Identity:
        if self.settings is None:
            raise TokenDenied("no_user_tokens", NO_USER_TOKENS)
        check_token_syntax(token)
        key = token_key(token)
        entry = self._cached(key)
        if entry is None:
            task = self._inflight.get(key)
            if task is None:
                task = asyncio.ensure_future(self._introspect(key, token))
                self._inflight[key] = task
                task.add_done_callback(lambda t, k=key: self._done(k, t))
            # shield: a caller that gives up does not cancel the others' answer.
            entry = await asyncio.shield(task)
        else:
            self.cache_hits += 1
        if entry.identity is not None:
            return entry.identity
        assert entry.denial is not None
        raise TokenDenied(*entry.denial)

    def _done(self, key: bytes, task: asyncio.Future) -> None:
        self._inflight.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved: callers that all gave up leave no asyncio warning

    def _cached(self, key: bytes) -> Optional[_Entry]:
        entry = self._cache.get(key)
        if entry is None:
            return None
        if entry.until <= self._clock():
            del self._cache[key]
            return None
        return entry

    async def _introspect(self, key: bytes, token: str) -> _Entry:
        assert self.settings is not None and self._transport is not None
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                MAX_PARALLEL, thread_name_prefix="introspect")
        loop = asyncio.get_running_loop()
        self.introspections += 1
        try:
            status, ctype, body = await loop.run_in_executor(self._pool, self._transport, token)
            intro = parse_response(status, ctype, body)
        except AuthUnavailable as err:
            logger.error("a bearer token could not be checked: %s", err, extra={
                "MESSAGE_ID": MSG_AUTH_UNAVAILABLE.hex})
            raise AuthUnavailable(UNAVAILABLE) from None
        now = self._clock()
        try:
            identity = judge(intro, self.settings.policy, now)
        except TokenDenied as denied:
            entry = _Entry(now + self.settings.negative_cache_seconds,
                           denial=(denied.reason, str(denied), denied.subject))
        else:
            entry = _Entry(cache_until(intro, now, self.settings.cache_max_seconds),
                           identity=identity)
        if entry.until > now:
            self._store(key, entry, now)
        return entry

    def _store(self, key: bytes, entry: _Entry, now: float) -> None:
        if len(self._cache) >= MAX_CACHE_ENTRIES:
            for k in [k for k, e in self._cache.items() if e.until <= now]:
                del self._cache[k]
            # Still nearly full (a flood of distinct tokens): the oldest tenth goes,
            # so the next full scan is MAX_CACHE_ENTRIES / 10 insertions away.
            keep = MAX_CACHE_ENTRIES - MAX_CACHE_ENTRIES // 10 - 1
            if len(self._cache) > keep:
                for k in list(itertools.islice(self._cache, len(self._cache) - keep)):
                    del self._cache[k]
        self._cache[key] = entry

    def _log_denial(self, denied: TokenDenied, token: str) -> None:
        who = f" of {denied.subject}" if denied.subject else ""
        extra = {"MESSAGE_ID": MSG_TOKEN_DENIED.hex, "SCISTREAM_DENIAL_REASON": denied.reason}
        if denied.subject:
            extra["SCISTREAM_IDENTITY"] = f"token:{denied.subject}"
        if isinstance(token, str) and token:
            # A short digest lets an operator tie repeated refusals together; it
            # reveals nothing of the token.
            extra["SCISTREAM_TOKEN_SHA256"] = token_key(token).hex()[:12]
        logger.warning("bearer token%s refused (%s): %s", who, denied.reason, denied,
                       extra=extra)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        close = getattr(self._transport, "close", None)
        if close is not None:
            close()
