"""recent.Recent: the bounded memory behind the daemon's per-uid, per-peer and
per-certificate memories and caches."""

from __future__ import annotations

from typing import List

import pytest

from scistreamd.recent import Recent


def test_put_keeps_the_newest_and_drops_the_oldest() -> None:
    r: Recent[str, int] = Recent(3)
    for i, k in enumerate("abcd"):
        r.put(k, i)
    assert list(r) == ["b", "c", "d"] and len(r) == 3 and "a" not in r
    r.put("b", 9)  # stored again: the newest
    r.put("e", 4)
    assert list(r) == ["d", "b", "e"] and r.get("b") == 9


def test_looking_does_not_refresh_but_get_or_make_does() -> None:
    r: Recent[str, int] = Recent(2)
    r.put("a", 1)
    r.put("b", 2)
    assert "a" in r and r.get("a") == 1
    r.put("c", 3)
    assert list(r) == ["b", "c"]  # "a" was only looked at
    made: List[str] = []
    assert r.get_or_make("b", lambda: made.append("b") or 0) == 2  # kept: not made
    r.put("d", 4)
    assert list(r) == ["b", "d"] and made == []  # "b" was used: "c" went


def test_get_or_make_keeps_what_it_made_but_not_a_failure() -> None:
    r: Recent[str, int] = Recent(2)
    assert r.get_or_make("a", lambda: 7) == 7 and r.get("a") == 7

    def fail() -> int:
        raise ValueError("unloadable")

    with pytest.raises(ValueError):
        r.get_or_make("x", fail)
    assert "x" not in r and list(r) == ["a"]
