"""One exception root: every exception scistreamd defines is a ScistreamError,
and each still maps to the same D-Bus name and CLI exit code."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import pkgutil

import pytest
from dbus_next import DBusError

import scistreamd
from scistreamd import dbus_api
from scistreamd.ctl.errors import CtlError, error_from_exception
from scistreamd.errors import BY_DBUS_NAME, ConfigError, InvalidArgument, ScistreamError
from scistreamd.systemd import SystemdError

#: Left to the peer-port rewrite (issue 12 item 1), which removes the thread bridge.
NOT_YET = {"scistreamd.peer._HandlerTimeout"}


def _defined_exceptions():
    for info in pkgutil.walk_packages(scistreamd.__path__, "scistreamd."):
        if info.name.endswith("__main__"):
            continue
        mod = importlib.import_module(info.name)
        for _, obj in inspect.getmembers(mod, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__ == mod.__name__:
                yield f"{obj.__module__}.{obj.__qualname__}", obj


def test_every_exception_of_scistreamd_is_a_scistream_error() -> None:
    found = dict(_defined_exceptions())
    assert "scistreamd.errors.ConfigError" in found and "scistreamd.systemd.SystemdError" in found
    stray = [n for n, cls in found.items()
             if not issubclass(cls, ScistreamError) and n not in NOT_YET]
    assert stray == []


def test_dbus_names_and_exit_codes_are_unchanged() -> None:
    assert {name: cls.exit_code for name, cls in BY_DBUS_NAME.items()} == {
        f"org.scistream.Tunnel1.Error.{n}": code for n, code in [
            ("InvalidArgument", 2), ("NotFound", 3), ("AlreadyExists", 4),
            ("PortsExhausted", 5), ("PeerUnreachable", 6), ("PeerRejected", 7),
            ("RelayFailed", 8), ("AccessDenied", 9), ("WrongListener", 11),
            ("AuthUnavailable", 12)]}
    failed = "org.scistream.Tunnel1.Error.Failed"
    assert ConfigError.dbus_name() == SystemdError.dbus_name() == failed


def test_config_error_forms() -> None:
    assert str(ConfigError("/etc/x.toml", "peer_port", "not a port")) == \
        "/etc/x.toml: peer_port: not a port"
    assert str(ConfigError("/etc/x.toml", "", "not valid TOML")) == "/etc/x.toml: not valid TOML"
    assert str(ConfigError("group scistream-relay does not exist")) == \
        "group scistream-relay does not exist"


def test_cli_maps_a_client_side_error_as_before() -> None:
    err = error_from_exception(InvalidArgument("bad port"))
    assert (err.exit_code, err.name, err.message) == (2, "InvalidArgument", "bad port")
    err = error_from_exception(ConfigError("x"))
    assert (err.exit_code, err.name) == (1, "Failed")
    ctl = CtlError("daemon down", 10, "DaemonUnreachable")
    assert isinstance(ctl, ScistreamError)
    assert (ctl.exit_code, ctl.name) == (10, "DaemonUnreachable")


def _reply_of(exc: BaseException) -> DBusError:
    async def fails() -> None:
        raise exc

    with pytest.raises(DBusError) as info:
        asyncio.run(dbus_api._dbus_errors(fails)())
    return info.value


def test_daemon_maps_named_errors_by_name_and_internal_ones_generically() -> None:
    named = _reply_of(InvalidArgument("port 0 is not a port"))
    assert (named.type, named.text) == ("org.scistream.Tunnel1.Error.InvalidArgument",
                                        "port 0 is not a port")
    for internal in (SystemdError("org.freedesktop.systemd1.NoSuchUnit", "unit x not found"),
                     ConfigError("group scistream-relay does not exist"), RuntimeError("bug")):
        reply = _reply_of(internal)
        assert (reply.type, reply.text) == (dbus_api.INTERNAL_ERROR, dbus_api.INTERNAL_TEXT)
