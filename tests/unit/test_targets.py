"""Unit tests of scistreamd.targets: rule syntax and the target policy."""

from __future__ import annotations

from ipaddress import ip_address

import pytest

from scistreamd.errors import InvalidArgument
from scistreamd.targets import (
    DEFAULT_TARGET_RULES,
    parse_target_rule,
    parse_target_rules,
    target_refusal,
)


def rules(*texts: str):
    return parse_target_rules(list(texts))


def allowed(rs, ip: str, port: int) -> bool:
    return target_refusal(rs, ip_address(ip), port) is None


@pytest.mark.parametrize("ip", ["192.168.150.1", "10.1.2.3", "8.8.8.8", "2001:db8::1",
                                "fd00::5", "::ffff:192.168.150.1"])
def test_default_allows_ordinary_targets(ip: str) -> None:
    assert allowed(DEFAULT_TARGET_RULES, ip, 5300)


@pytest.mark.parametrize("ip, kind", [("127.0.0.1", "loopback"), ("127.1.2.3", "loopback"),
                                      ("::1", "loopback"), ("::ffff:127.0.0.1", "loopback"),
                                      ("169.254.1.1", "link-local"), ("fe80::1", "link-local"),
                                      ("::ffff:169.254.0.9", "link-local")])
def test_default_refuses_loopback_and_link_local(ip: str, kind: str) -> None:
    why = target_refusal(DEFAULT_TARGET_RULES, ip_address(ip), 5300)
    assert why is not None and f"{kind} targets are allowed only by a rule" in why
    assert "allowed_targets" in why


def test_a_rule_that_names_loopback_opens_it() -> None:
    rs = rules("0.0.0.0/0", "::/0", "127.0.0.1 5300", "::1")
    assert allowed(rs, "127.0.0.1", 5300)
    assert allowed(rs, "::ffff:127.0.0.1", 5300)
    assert allowed(rs, "::1", 22)
    assert not allowed(rs, "127.0.0.2", 5300)  # not named
    assert not allowed(rs, "169.254.1.1", 5300)
    assert allowed(rules("127.0.0.0/8"), "127.9.9.9", 1)
    assert allowed(rules("169.254.0.0/16 80"), "169.254.3.3", 80)
    # A wide rule that merely contains loopback does not name it.
    assert not allowed(rules("0.0.0.0/0", "120.0.0.0/5"), "127.0.0.1", 5300)


def test_ports_of_a_rule() -> None:
    rs = rules("10.0.0.0/8 5000-6000,7000", "192.168.150.0/24")
    assert allowed(rs, "10.2.3.4", 5000) and allowed(rs, "10.2.3.4", 6000)
    assert allowed(rs, "10.2.3.4", 7000)
    assert allowed(rs, "192.168.150.9", 22)
    why = target_refusal(rs, ip_address("10.2.3.4"), 6001)
    assert why is not None and 'rule "10.0.0.0/8 5000-6000,7000"' in why and "port 6001" in why
    why = target_refusal(rs, ip_address("172.16.0.1"), 5000)
    assert why is not None and "no rule of allowed_targets covers it" in why
    assert '"10.0.0.0/8 5000-6000,7000", "192.168.150.0/24"' in why


def test_a_later_rule_may_allow_what_an_earlier_one_does_not() -> None:
    rs = rules("10.0.0.0/8 5000", "10.1.0.0/16 6000")
    assert allowed(rs, "10.1.2.3", 6000) and allowed(rs, "10.1.2.3", 5000)
    assert not allowed(rs, "10.2.0.1", 6000)


def test_families_do_not_mix() -> None:
    assert not allowed(rules("0.0.0.0/0"), "2001:db8::1", 1)
    assert not allowed(rules("::/0"), "10.0.0.1", 1)
    assert target_refusal(rules(), ip_address("10.0.0.1"), 1) is not None  # [] refuses all


def test_ipv6_message_brackets_the_address() -> None:
    why = target_refusal(rules("fd00::/8 443"), ip_address("fd00::1"), 80)
    assert why is not None and "[fd00::1]:80" in why


def test_rule_text_is_normalised_whitespace() -> None:
    assert parse_target_rule("  10.0.0.0/8\t 22 ").text == "10.0.0.0/8 22"
    assert parse_target_rule("::1").network.prefixlen == 128


@pytest.mark.parametrize("bad", ["", "10.0.0.0/33", "10.0.0.0/8 0", "10.0.0.0/8 1,,2",
                                 "10.0.0.0/8 -5", "300.0.0.0/8", "10.0.0.0/8 5-4",
                                 "fe80::/10%eth0", "a" * 300, None, 5])
def test_bad_rules(bad: object) -> None:
    with pytest.raises(InvalidArgument):
        parse_target_rule(bad)
