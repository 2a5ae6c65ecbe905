"""scistreamd.values: HostPort keeps the frozen dataclass's value semantics, and model
re-exports the very parsers (the daemon and scistreamctl parse alike)."""

from __future__ import annotations

import copy
import pickle
from ipaddress import ip_address

import pytest

from scistreamd import model, values
from scistreamd.errors import InvalidArgument
from scistreamd.values import HostPort, parse_hostport


def test_hostport_is_a_value() -> None:
    a = parse_hostport("192.0.2.1:5100", "x")
    b = HostPort(host=ip_address("192.0.2.1"), port=5100)
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != HostPort(ip_address("192.0.2.1"), 5101)
    assert a != ("192.0.2.1", 5100) and a != "192.0.2.1:5100"
    assert repr(a) == "HostPort(host=IPv4Address('192.0.2.1'), port=5100)"
    assert str(a) == "192.0.2.1:5100" and str(parse_hostport("[::1]:80", "x")) == "[::1]:80"
    assert copy.copy(a) == a and copy.deepcopy(a) == a and pickle.loads(pickle.dumps(a)) == a


def test_hostport_is_immutable_and_checked() -> None:
    a = HostPort(ip_address("192.0.2.1"), 5100)
    with pytest.raises(AttributeError):
        a.port = 1  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del a.host
    with pytest.raises(InvalidArgument, match="IP address object"):
        HostPort("192.0.2.1", 5100)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="1..65535"):
        HostPort(ip_address("192.0.2.1"), True)


def test_model_reexports_the_same_parsers() -> None:
    for name in ("HostPort", "parse_ip", "parse_port", "parse_hostport", "parse_uid",
                 "parse_num_conn", "split_list", "parse_port_list", "parse_hostport_list",
                 "parse_allowed_peer", "MAX_LIST_LEN"):
        assert getattr(model, name) is getattr(values, name), name


def test_values_imports_no_dataclasses() -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, scistreamd.values; "
            "print(sorted(m for m in ('dataclasses', 'scistreamd.model') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2])))
    assert res.stdout.strip() == "[]"
