"""bench/report.py's goal list: the brief's ratio goals from figures of one run, and
the old absolute set-up goals kept for reference only."""

from __future__ import annotations

from typing import Any, Dict

from bench import report


def _summary(*samples: float) -> Dict[str, Any]:
    s = sorted(samples)
    return {"p50": s[len(s) // 2], "median": s[len(s) // 2], "samples": list(samples),
            "n": len(samples)}


def _results() -> Dict[str, Any]:
    cpu = {"scistreamd": (2.0, 3.0, 2.6), "stunnel_pair": (2.5, 2.8, 2.5),
           "upstream_config": (4.0, 3.9, 3.0)}
    return {
        "cpu_s_per_gb": {k: {"p1": _summary(*v)["median"], "p4": None} for k, v in cpu.items()},
        "throughput_detail": {k: {"p1": {"cpu_s_per_gb": _summary(*v)}} for k, v in cpu.items()},
        "dbus_ms": {"inbound": {"p50": 90.0, "p95": 99.0}},
        "systemd_floor_ms": {"start_to_listen_ms": {"p50": 50.0}},
        "cli_breakdown": {"ctl_version_ms": _summary(60.0), "python_bare_ms": _summary(20.0)},
        "setup_ms": {"inbound": {"p50": 170.0, "p95": 180.0}},
    }


def test_ratio_goals_are_figures_of_the_same_run() -> None:
    got = {g["goal"]: g for g in report.ratio_goals(_results())}
    pair = got["relay CPU/GB scistreamd / stunnel_pair at P1 <= 1.0"]
    # medians 2.6 / 2.5; per repetition 0.8, 1.07, 1.04
    assert (pair["value"], pair["met"], pair["paired_median_ratio"]) == (1.04, False, 1.04)
    up = got["relay CPU/GB scistreamd / upstream_config at P1 <= 0.7"]
    assert (up["value"], up["met"]) == (round(2.6 / 3.9, 3), True)
    assert not any("P4" in g for g in got)  # not measured: no verdict
    dbus = got["D-Bus inbound set-up p50 / a plain transient unit's start-to-listen p50 <= 2.0"]
    assert (dbus["value"], dbus["met"]) == (1.8, True)
    cli = got["scistreamctl --version p50 / a bare interpreter start p50 <= 2.5"]
    assert (cli["value"], cli["met"]) == (3.0, False)


def test_absolute_setup_goals_are_reference_only() -> None:
    res = _results()
    res["goals"] = report.goals(res)
    ref = [g for g in res["goals"] if g.get("reference")]
    assert [(g["goal"], g["met"]) for g in ref] == [("setup_ms.inbound p50 <= 150 ms", False),
                                                    ("dbus_ms.inbound p50 <= 80 ms", False)]
    text = report.markdown(res)
    assert "reference, absolute ms (over): setup_ms.inbound p50 <= 150 ms" in text
    assert "MISSED: scistreamctl --version p50 / a bare interpreter start p50 <= 2.5" in text
