"""usercert: the verdicts on a certificate are kept (one parse and signature check per
certificate, not per connection) and stay those of a fresh check."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, List

import pytest
from cryptography.hazmat.primitives import serialization

from scistreamd import certs, usercert
from scistreamd.identity import Identity
from scistreamd.usercert import UserCertMatcher


def _der(pair: certs.KeyPair) -> bytes:
    return pair.cert.public_bytes(serialization.Encoding.DER)


@pytest.fixture()
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    user_ca, peer_ca = certs.make_ca("users"), certs.make_ca("peers")
    (tmp_path / "users.pem").write_bytes(user_ca.cert_pem())
    (tmp_path / "peers.pem").write_bytes(peer_ca.cert_pem())
    checks: List[bytes] = []
    real = usercert.issued_by

    def counting(der: bytes, cas: Any) -> bool:
        checks.append(der)
        return real(der, cas)

    monkeypatch.setattr(usercert, "issued_by", counting)
    m = UserCertMatcher(tmp_path / "users.pem", tmp_path / "peers.pem")
    return m, user_ca, peer_ca, checks


def test_verdicts_are_kept_per_certificate(setup: Any) -> None:
    m, user_ca, peer_ca, checks = setup
    robot = _der(certs.make_host_cert("cn", [], ["robot.example.org"], issuer=user_ca))
    gateway = _der(certs.make_host_cert("gw", [], ["gw.example.org"], issuer=peer_ca))
    for _ in range(3):
        assert m.identity_of(robot) == Identity("cert", "robot.example.org")
        assert not m.peer_ca_issued(robot)
        assert m.identity_of(gateway) is None
        assert m.peer_ca_issued(gateway)
    assert len(checks) == 4  # each certificate checked once against each CA list
    # Another certificate with the same name but another key is judged on its own.
    impostor = _der(certs.make_host_cert("cn", [], ["robot.example.org"],
                                         issuer=certs.make_ca("users")))
    assert m.identity_of(impostor) is None


def test_kept_verdicts_are_bounded(setup: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    m, user_ca, _peer_ca, _checks = setup
    monkeypatch.setattr(usercert, "_KEPT", 3)
    m = UserCertMatcher(m.ca_file, None)  # its memory's size is set when it is made
    ders = [_der(certs.make_host_cert("cn", [], [f"r{i}.example.org"], issuer=user_ca))
            for i in range(5)]
    for d in ders:
        m.identity_of(d)
    assert list(m._identities) == ders[2:]


def test_unusable_identity_is_logged_on_every_connection(
        setup: Any, caplog: pytest.LogCaptureFixture) -> None:
    m, user_ca, _peer_ca, checks = setup
    nameless = _der(certs.make_host_cert("", [], [], issuer=user_ca))
    with caplog.at_level(logging.WARNING, logger="scistreamd.usercert"):
        assert m.identity_of(nameless) is None
        assert m.identity_of(nameless) is None
    assert len(checks) == 1
    assert sum("names no usable identity" in r.getMessage() for r in caplog.records) == 2
