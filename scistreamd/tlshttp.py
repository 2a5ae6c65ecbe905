"""What both HTTPS clients of the peer port share (peerclient: daemon to daemon;
userclient: a user to a daemon): a requests adapter that trusts exactly the
given SSLContext, and the walk through the exceptions requests nests.

Kept apart from peerclient so the CLI's remote mode does not import the
daemon's asyncio machinery with it.
"""

from __future__ import annotations

import ssl
import time
from typing import Any, Iterator, List, Optional, Set

from requests.adapters import HTTPAdapter

from .errors import ScistreamError


class TrustOnlyAdapter(HTTPAdapter):
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


def causes(exc: BaseException) -> Iterator[BaseException]:
    """exc and everything it wraps (requests/urllib3 nest errors in args/reason)."""
    seen: Set[int] = set()
    stack: List[Optional[BaseException]] = [exc]
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


class BodyTooLarge(ScistreamError):
    """An answer over the caller's limit (the caller names it in its own error)."""


class BodyTooSlow(ScistreamError):
    """No whole answer within the caller's deadline."""


def read_bounded(resp: Any, limit: int, seconds: float, chunk: int = 16384) -> bytes:
    """The body of a streamed ``requests`` response: at most ``limit`` bytes, whole
    within ``seconds`` (a peer that trickles its answer must not hold a thread).
    Raises BodyTooLarge or BodyTooSlow; the caller turns them into its named error."""
    declared = (resp.headers.get("Content-Length") or "").strip()
    if declared.isdigit() and len(declared) < 20 and int(declared) > limit:
        raise BodyTooLarge(f"a {declared}-byte body")
    deadline = time.monotonic() + seconds
    chunks: List[bytes] = []
    size = 0
    for piece in resp.iter_content(chunk):
        size += len(piece)
        if size > limit:
            raise BodyTooLarge(f"more than {limit} bytes")
        chunks.append(piece)
        if time.monotonic() > deadline:
            raise BodyTooSlow(f"no complete answer within {seconds:g} s")
    return b"".join(chunks)
