"""The named failures of scistreamd.

Every failure a caller can see is one of these. The D-Bus layer sends them as
``org.scistream.Tunnel1.Error.<Name>``; scistreamctl maps each name back to a
plain-language line and a distinct exit code. Pure: imports nothing from D-Bus.
"""

from __future__ import annotations

from . import ERROR_PREFIX

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:  # annotations only: importing typing costs every CLI start ~3 ms
    from typing import ClassVar, Dict, Type


class ScistreamError(Exception):
    """The root of every exception scistreamd raises; ``str(err)`` is the message a
    user sees, ``name`` its D-Bus error name (after ERROR_PREFIX)."""

    name: ClassVar[str] = "Failed"
    exit_code: ClassVar[int] = 1
    #: A failure of this host (systemd, the configuration), not of the caller's
    #: request: a D-Bus caller or peer gets the generic internal error and the
    #: journal gets this message.
    internal: ClassVar[bool] = False

    @classmethod
    def dbus_name(cls) -> str:
        return f"{ERROR_PREFIX}.{cls.name}"


class InvalidArgument(ScistreamError):
    name = "InvalidArgument"
    exit_code = 2


class NotFound(ScistreamError):
    name = "NotFound"
    exit_code = 3


class AlreadyExists(ScistreamError):
    name = "AlreadyExists"
    exit_code = 4


class PortsExhausted(ScistreamError):
    name = "PortsExhausted"
    exit_code = 5


class PeerUnreachable(ScistreamError):
    name = "PeerUnreachable"
    exit_code = 6


class PeerRejected(ScistreamError):
    name = "PeerRejected"
    exit_code = 7


class RelayFailed(ScistreamError):
    name = "RelayFailed"
    exit_code = 8


class AccessDenied(ScistreamError):
    name = "AccessDenied"
    exit_code = 9


class WrongListener(ScistreamError):
    """An outbound request named a listener the inbound endpoint does not have.

    Nothing was claimed: the same request with the right listeners works.
    """

    name = "WrongListener"
    exit_code = 11


class AuthUnavailable(ScistreamError):
    """A bearer token could not be checked: the token introspection endpoint did
    not answer, or answered something that is not an RFC 7662 answer.

    Not AccessDenied: the caller's token may well be good, and another token
    would not help; retrying later may (HTTP 503 on the peer port). Either way
    nothing is granted (fail closed).
    """

    name = "AuthUnavailable"
    exit_code = 12


class ConfigError(ScistreamError):
    """A bad configuration (file, key and problem), or a host set-up problem
    named by ``path`` alone (a whole message, e.g. a missing system group)."""

    internal = True

    def __init__(self, path: str, key: str = "", problem: str = "") -> None:
        self.path = path
        self.key = key
        self.problem = problem
        super().__init__(": ".join(part for part in (path, key, problem) if part))


#: D-Bus error name -> class, for clients that turn a reply back into an exception.
BY_DBUS_NAME: Dict[str, Type[ScistreamError]] = {
    cls.dbus_name(): cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        PortsExhausted,
        PeerUnreachable,
        PeerRejected,
        RelayFailed,
        AccessDenied,
        WrongListener,
        AuthUnavailable,
    )
}
