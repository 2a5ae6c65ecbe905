"""Where scistreamctl's remote mode finds a user's token, and how it shows one.

A token is a bearer secret: whoever has it is the user at the remote daemon.
So it is read only from places other local users cannot read (a file of mode
0600 or stricter owned by the caller, or the caller's environment), never
from the command line, and never printed: the guide's ``access_token``
column shows a redacted form (a short hash prefix) that lets a user tell
which token was used and nothing more.

Order: ``--token-file PATH``, then ``$SCISTREAM_TOKEN``, then the per-user
file ``$XDG_CONFIG_HOME/scistream/token`` (default ``~/.config/scistream/token``).
No token anywhere is not an error here: a client certificate may be the
identity, and the daemon refuses by name when there is neither.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from typing import Mapping, NamedTuple, Optional

from ..errors import InvalidArgument

TOKEN_ENV = "SCISTREAM_TOKEN"
#: What the access_token column shows without a token (upstream's word for it).
NO_TOKEN = "INVALID_TOKEN"
#: Longest token accepted (Globus access tokens are ~70 characters; JWTs a few KiB).
MAX_TOKEN = 16384
#: RFC 6750 b64token: the only characters a Bearer credential may have.
_B64TOKEN = re.compile(r"[A-Za-z0-9._~+/-]+=*")


class Token(NamedTuple):
    """A bearer token and where it came from (for messages; never the value).
    (Not a dataclass: importing dataclasses cost every remote command ~5 ms.)"""

    value: str
    source: str

    def __repr__(self) -> str:  # never the value
        return f"Token(source={self.source!r})"

    def redacted(self) -> str:
        return redact(self.value)


def redact(token: Optional[str]) -> str:
    """The access_token column: INVALID_TOKEN without a token, else ``REDACTED:<8 hex>``
    (the start of the token's SHA-256: identifies it, reveals nothing of it)."""
    if not token:
        return NO_TOKEN
    import hashlib

    return "REDACTED:" + hashlib.sha256(token.encode("ascii")).hexdigest()[:8]


def parse_token(text: str, source: str) -> Token:
    """A token from ``source``'s text (surrounding white space ignored), else InvalidArgument."""
    value = text.strip()
    if not value:
        raise InvalidArgument(f"{source} is empty: put the access token in it (one line)")
    if len(value) > MAX_TOKEN:
        raise InvalidArgument(f"{source} holds {len(value)} characters, more than a token "
                              f"has (at most {MAX_TOKEN}): give only the access token")
    if not _B64TOKEN.fullmatch(value):
        # Never echo the text: it may be a real token with a stray character.
        raise InvalidArgument(f"{source} is not an access token (a token has only letters, "
                              "digits and -._~+/ and no spaces or line breaks inside): put "
                              "only the token in it")
    return Token(value, source)


def user_token_path(environ: Optional[Mapping[str, str]] = None) -> str:
    """$XDG_CONFIG_HOME/scistream/token, or ~/.config/scistream/token (XDG rule: a
    relative XDG_CONFIG_HOME is ignored)."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_CONFIG_HOME", "")
    if not os.path.isabs(base):
        home = env.get("HOME") or os.path.expanduser("~")
        base = os.path.join(home, ".config")
    return os.path.join(base, "scistream", "token")


def read_token_file(path: str, what: str, *, missing_ok: bool = False) -> Optional[Token]:
    """The token in ``path``; refused (InvalidArgument) unless only its owner, the
    caller, can read it. ``missing_ok``: a missing file is no token."""
    source = f"{what} {path}"
    try:
        # O_NOFOLLOW|O_NONBLOCK: no symlink games, no hanging on a FIFO.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        if missing_ok:
            return None
        raise InvalidArgument(f"cannot read {source}: no such file; give the file that "
                              "holds your access token") from None
    except OSError as err:
        why = ("it is a symbolic link, which is not followed" if err.errno == errno.ELOOP
               else err.strerror or str(err))
        raise InvalidArgument(f"cannot read {source}: {why}: give a regular file you own, "
                              "mode 0600") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidArgument(f"{source} is not a regular file: put the token in a file "
                                  "of mode 0600")
        if st.st_mode & 0o077:
            raise InvalidArgument(
                f"{source} is readable or writable by others (mode "
                f"{stat.S_IMODE(st.st_mode):04o}): anyone who can read it can act as you; "
                f"run 'chmod 600 {path}' (and get a new token if others may have read it)")
        if st.st_uid != os.geteuid():
            raise InvalidArgument(f"{source} belongs to uid {st.st_uid}, not to you (uid "
                                  f"{os.geteuid()}): use a token file of your own, mode 0600")
        data = os.read(fd, MAX_TOKEN + 2)
    finally:
        os.close(fd)
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        text = "\0"  # refused by parse_token, without echoing anything
    return parse_token(text, source)


def find_token(token_file: Optional[str],
               environ: Optional[Mapping[str, str]] = None) -> Optional[Token]:
    """The caller's token: --token-file, else $SCISTREAM_TOKEN, else the per-user file;
    None when there is none."""
    env = os.environ if environ is None else environ
    if token_file:
        return read_token_file(token_file, "--token-file")
    if env.get(TOKEN_ENV):
        return parse_token(env[TOKEN_ENV], f"${TOKEN_ENV}")
    return read_token_file(user_token_path(env), "the token file", missing_ok=True)
