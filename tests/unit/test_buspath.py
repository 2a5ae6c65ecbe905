"""Unit tests of scistreamd.buspath: endpoint and unit object paths (moved from test_model)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scistreamd import ENDPOINT_PATH_PREFIX
from scistreamd.buspath import (
    endpoint_object_path,
    escape_object_path_component,
    parse_endpoint_object_path,
    unescape_object_path_component,
    unit_object_path,
)
from scistreamd.errors import InvalidArgument
from scistreamd.model import Role

UID = "bd9f1a7e-04d7-11f0-b44c-946dae415862"  # the guide's (UUID1) uid


# --- object paths ------------------------------------------------------------


@pytest.mark.parametrize(
    "raw,escaped",
    [
        ("", "_"),
        ("abcXYZ", "abcXYZ"),
        ("a1", "a1"),
        ("1a", "_31a"),
        ("a-b", "a_2db"),
        ("a_b", "a_5fb"),
        ("a.b/c", "a_2eb_2fc"),
        ("ä", "_c3_a4"),
        ("foo.service", "foo_2eservice"),
    ],
)
def test_escape_object_path_component_matches_systemd(raw: str, escaped: str) -> None:
    assert escape_object_path_component(raw) == escaped
    assert unescape_object_path_component(escaped) == raw


@given(st.text())
def test_escape_roundtrip_and_charset(s: str) -> None:
    esc = escape_object_path_component(s)
    assert esc and all(c.isascii() and (c.isalnum() or c == "_") for c in esc)
    assert unescape_object_path_component(esc) == s


@pytest.mark.parametrize("bad", ["_", "_4", "_zz", "a-b", "_C3_A4", "a b", "_ff"])
def test_unescape_rejects_malformed(bad: str) -> None:
    if bad == "_":
        assert unescape_object_path_component(bad) == ""
        return
    with pytest.raises(InvalidArgument):
        unescape_object_path_component(bad)


def test_endpoint_object_path() -> None:
    path = endpoint_object_path(UID, Role.INBOUND)
    assert path == (ENDPOINT_PATH_PREFIX + "/bd9f1a7e_2d04d7_2d11f0_2db44c_2d946dae415862_inbound")
    assert path.startswith("/org/scistream/Tunnel1/endpoint/")
    digit_first = "0" + UID[1:]
    assert endpoint_object_path(digit_first, Role.OUTBOUND).endswith(
        "/_30d9f1a7e_2d04d7_2d11f0_2db44c_2d946dae415862_outbound"
    )
    assert parse_endpoint_object_path(path) == (UID, Role.INBOUND)
    assert parse_endpoint_object_path(endpoint_object_path(digit_first, Role.OUTBOUND)) == (
        digit_first,
        Role.OUTBOUND,
    )


@pytest.mark.parametrize(
    "bad",
    [
        "/org/scistream/Tunnel1",
        ENDPOINT_PATH_PREFIX + "/abc_inbound",
        ENDPOINT_PATH_PREFIX + "/bd9f1a7e_2d04d7_2d11f0_2db44c_2d946dae415862_sideways",
        None,
    ],
)
def test_parse_endpoint_object_path_rejects(bad: object) -> None:
    with pytest.raises(InvalidArgument):
        parse_endpoint_object_path(bad)


def test_unit_object_path_is_systemds() -> None:
    assert unit_object_path("scistream-inbound-0123456789abcdef.service") == (
        "/org/freedesktop/systemd1/unit/scistream_2dinbound_2d0123456789abcdef_2eservice")
    assert unit_object_path("dbus.service") == "/org/freedesktop/systemd1/unit/dbus_2eservice"
