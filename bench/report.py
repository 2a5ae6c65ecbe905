"""Turning results into the JSON files, a markdown table and a figure."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional

from . import latency, tokens

PATH_LABELS = {
    "direct": "direct (no relay)",
    "stunnel_pair": "stunnel pair, TLS 1.3 AES-128-GCM PSK",
    "upstream_config": "upstream SciStream 1.2.1 config",
    "scistreamd": "scistreamd (scistreamctl tunnel)",
}
OP_LABELS = {"inbound": "inbound-request", "outbound": "outbound-request",
             "release": "release (inbound side)", "release_outbound": "release (outbound side)"}
CLI_GOALS = {"inbound": 150, "outbound": 250, "release": 100}
DBUS_GOALS = {"inbound": 80, "outbound": 150, "release": 50}
SCALE_GOALS = {"daemon_rss_mb": 80, "list_ms": 100, "readopt_s": 5}


def _paired_ratio(results: Dict[str, Any], a: str, b: str, p: str) -> Optional[float]:
    """Median over repetitions of a/b, each pair measured back to back in one repetition."""
    try:
        xs = results["throughput_detail"][a][p]["runs_gbps"]
        ys = results["throughput_detail"][b][p]["runs_gbps"]
    except (KeyError, TypeError):
        return None
    ratios = [x / y for x, y in zip(xs, ys) if x and y]
    return round(statistics.median(ratios), 3) if ratios else None


def _paired_cpu_ratio(results: Dict[str, Any], other: str, p: str) -> Optional[float]:
    """Median over repetitions of scistreamd's relay CPU/GB over ``other``'s, each
    pair measured back to back in one repetition."""
    try:
        xs = results["throughput_detail"]["scistreamd"][p]["cpu_s_per_gb"]["samples"]
        ys = results["throughput_detail"][other][p]["cpu_s_per_gb"]["samples"]
    except (KeyError, TypeError):
        return None
    ratios = [x / y for x, y in zip(xs, ys) if x and y]
    return round(statistics.median(ratios), 3) if ratios and len(xs) == len(ys) else None


def goals(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    out: List[Dict[str, Any]] = []
    tp = results.get("throughput") or {}
    for other, p, want in (("stunnel_pair", "p1", 1.0), ("stunnel_pair", "p4", 1.0),
                           ("upstream_config", "p4", 1.4)):
        sci = (tp.get("scistreamd") or {}).get(p)
        base = (tp.get(other) or {}).get(p)
        if sci is None or not base:
            continue
        ratio = round(sci / base, 3)
        paired = _paired_ratio(results, "scistreamd", other, p)
        out.append({"goal": f"throughput scistreamd / {other} at {p.upper()} >= {want}",
                    "value": ratio, "paired_median_ratio": paired,
                    "met": ratio >= want})
    out += ratio_goals(results)
    # The set-up goals of the first issues, in ms: absolute times moved 1.85x between
    # two machines of this kind, so the goals are now ratios (ratio_goals); these
    # stay in the list for reference, neither met nor missed.
    for key, table in (("setup_ms", CLI_GOALS), ("dbus_ms", DBUS_GOALS)):
        for op, want in table.items():
            s = (results.get(key) or {}).get(op)
            if s:
                out.append({"goal": f"{key}.{op} p50 <= {want} ms", "value": s["p50"],
                            "met": s["p50"] <= want, "reference": True})
    out += latency.goals(results)
    out += tokens.goals(results)
    from .observe import goals as observe_goals

    out += observe_goals(results)
    out += tunnel_goals(results)
    rows = [r for r in results.get("scale") or [] if r.get("n") == 1000]
    if "scale" not in results:
        pass
    elif rows:
        for k, want in SCALE_GOALS.items():
            v = rows[0].get(k)
            out.append({"goal": f"scale N=1000 {k} <= {want}", "value": v,
                        "met": v is not None and v <= want})
    else:
        out.append({"goal": "scale at N=1000", "value": None, "met": False,
                    "detail": "not measured (see scale_notes)"})
    return out


#: The brief's goals, each a ratio of two figures of the same run.
CPU_PER_GB_GOALS = (("stunnel_pair", 1.0), ("upstream_config", 0.7))
DBUS_SETUP_VS_PLAIN_UNIT = 2.0
CLI_VS_BARE_INTERPRETER = 2.5


def ratio_goals(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Relay CPU per GB against the hand-made pair and upstream; the D-Bus inbound
    set-up against a plain transient unit's start-to-listen (systemd's floor); the
    CLI's own start (``--version``) against a bare interpreter's."""
    out: List[Dict[str, Any]] = []
    cpu = results.get("cpu_s_per_gb") or {}
    sci = cpu.get("scistreamd") or {}
    for other, want in CPU_PER_GB_GOALS:
        base = cpu.get(other) or {}
        for p in ("p1", "p4"):
            if sci.get(p) and base.get(p):
                ratio = round(sci[p] / base[p], 3)
                out.append({"goal": f"relay CPU/GB scistreamd / {other} at {p.upper()} "
                                    f"<= {want}", "value": ratio, "met": ratio <= want,
                            "paired_median_ratio": _paired_cpu_ratio(results, other, p),
                            "detail": f"{sci[p]} / {base[p]} s/GB"})
    for what, a, b, want in (
            ("D-Bus inbound set-up p50 / a plain transient unit's start-to-listen p50",
             (results.get("dbus_ms") or {}).get("inbound"),
             (results.get("systemd_floor_ms") or {}).get("start_to_listen_ms"),
             DBUS_SETUP_VS_PLAIN_UNIT),
            ("scistreamctl --version p50 / a bare interpreter start p50",
             (results.get("cli_breakdown") or {}).get("ctl_version_ms"),
             (results.get("cli_breakdown") or {}).get("python_bare_ms"),
             CLI_VS_BARE_INTERPRETER)):
        if isinstance(a, dict) and isinstance(b, dict) and a.get("p50") and b.get("p50"):
            ratio = round(a["p50"] / b["p50"], 2)
            out.append({"goal": f"{what} <= {want}", "value": ratio, "met": ratio <= want,
                        "detail": f"{a['p50']} / {b['p50']} ms"})
    return out


#: Issue 14: the one-command tunnel with a warm token, p50 (ms).
TUNNEL_GOAL_MS = 300


def tunnel_goals(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Issue 14's goal, with the ratio to the guide's two commands of the same run beside
    it (this machine's speed drifts: the ratio says more than the absolute figure)."""
    t = results.get("tunnel_command_ms") or {}
    warm, guide = t.get("token_warm_tunnel"), t.get("guide_two_commands_tunnel")
    if not warm:
        return []
    item: Dict[str, Any] = {"goal": f"one-command tunnel, warm token, p50 <= {TUNNEL_GOAL_MS} ms",
                            "value": warm["p50"], "met": warm["p50"] <= TUNNEL_GOAL_MS}
    if guide and guide.get("p50"):
        item["detail"] = (f"{warm['p50'] / guide['p50']:.2f}x the guide's two commands of "
                          f"the same run ({guide['p50']} ms)")
    return [item]


def tunnel_table(results: Dict[str, Any]) -> List[str]:
    t = results.get("tunnel_command_ms") or {}
    if not t:
        return []
    lines = ["", "### One-command tunnel (issue 14), ms", "",
             "| view | create p50 | create p95 | release p50 |", "|---|---|---|---|"]
    for view in ("cli_remote", "cli_mixed", "token_warm", "token_cold", "guide_two_commands",
                 "library"):
        c, r = t.get(f"{view}_tunnel"), t.get(f"{view}_release")
        if c:
            lines.append(f"| {view} | {c['p50']} | {c['p95']} | {r['p50'] if r else '–'} |")
    return lines


def write_json(results: Dict[str, Any], directory: Path, prefix: str, stamp: str) -> List[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2, sort_keys=False) + "\n"
    paths = [directory / f"{prefix}latest.json", directory / f"{prefix}{stamp}.json"]
    for p in paths:
        tmp = p.with_suffix(".json.tmp")
        tmp.write_text(text)
        os.replace(tmp, p)
    return paths


def _fmt(s: Optional[Dict[str, Any]], digits: int = 2) -> str:
    if not s:
        return "–"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def markdown(results: Dict[str, Any]) -> str:
    m = results.get("machine", {})
    lines: List[str] = []
    st = m.get("stunnel", {})
    lines.append(f"Measured {m.get('started_at', '?')} on {m.get('cpu_model', '?')}, "
                 f"{m.get('cores', '?')} cores, {m.get('memory_gb', '?')} GB, kernel "
                 f"{m.get('kernel', '?')}, Python {m.get('python', '?')}, stunnel "
                 f"{st.get('version', '?')} ({st.get('running_with', '?')}), "
                 f"{m.get('systemd', '?')}.")
    if m.get("noisy"):
        lines.append(f"**Noisy run:** {m['noisy']}")
    dp = results.get("dataplane_config")
    if dp:
        lines += ["", f"### Throughput: iperf3 -t {dp['iperf_seconds']:g}, "
                      f"{dp['direction']}, {dp['repetitions']} repetitions",
                  "", "Gbit/s and relay CPU seconds per GB (both relays), "
                      "median (min–max). P4 = " + dp["p4_shape"] + ".", "",
                  "| path | P1 Gbit/s | P4 Gbit/s | CPU s/GB P1 | CPU s/GB P4 | negotiated |",
                  "|---|---|---|---|---|---|"]
        for name, d in results.get("throughput_detail", {}).items():
            if d.get("broken"):
                lines.append(f"| {PATH_LABELS.get(name, name)} | – | – | – | – | "
                             f"not measured: {d['broken']} |")
                continue
            lines.append(
                f"| {PATH_LABELS.get(name, name)} | {_fmt(d['p1']['gbps'])} | "
                f"{_fmt(d['p4']['gbps'])} | {_fmt(d['p1']['cpu_s_per_gb'])} | "
                f"{_fmt(d['p4']['cpu_s_per_gb'])} | {d.get('negotiated') or '–'} |")
    lines += latency.markdown(results)
    if results.get("setup_ms"):
        cp = results.get("controlplane_config", {})
        lines += ["", f"### Setup latency: {cp.get('runs')} runs each, ms",
                  "", "CLI = the guide's scistreamctl command, fork to exit; D-Bus = the "
                      "method call alone from a connected client.", "",
                  "| operation | CLI p50 | CLI p95 | D-Bus p50 | D-Bus p95 "
                  "| goal p50 CLI / D-Bus |",
                  "|---|---|---|---|---|---|"]
        for op, label in OP_LABELS.items():
            c = results["setup_ms"].get(op)
            d = (results.get("dbus_ms") or {}).get(op)
            goal = (f"{CLI_GOALS[op]} / {DBUS_GOALS[op]}" if op in CLI_GOALS else "–")
            lines.append(f"| {label} | {c['p50']:.0f} | {c['p95']:.0f} | "
                         f"{d['p50']:.0f} | {d['p95']:.0f} | {goal} |" if c and d else
                         f"| {label} | – | – | – | – | {goal} |")
        b = results.get("cli_breakdown") or {}
        if b:
            def med(k: str) -> str:
                s = b.get(k)
                return f"{s['median']:.0f}" if s else "–"
            lines += ["", f"CLI start-up (median ms): python3 -c pass {med('python_bare_ms')}, "
                          f"python3 -I -S {med('python_isolated_no_site_ms')}, "
                          f"scistreamctl --version {med('ctl_version_ms')}, import ctl + model "
                          f"+ bus client {med('ctl_import_plus_busclient_ms')}, "
                          f"scistreamctl list {med('ctl_list_ms')}."]
            top = b.get("importtime_top") or []
            if top:
                lines.append("Slowest imports (cumulative ms): " + ", ".join(
                    f"{t['module']} {t['cumulative_ms']:.0f}" for t in top[:6]) + ".")
    from .relaymodes import markdown as relaymodes_markdown

    lines += relaymodes_markdown(results)
    lines += tokens.markdown(results)
    from .observe import markdown as observe_markdown

    lines += observe_markdown(results)
    if results.get("scale") is not None and "scale_config" in results:
        lines += ["", "### Scale: inbound endpoints on server1", "",
                  "| N | daemon RSS MB | relays RSS MB (PSS) | ListEndpoints ms | "
                  "create batch s | restart to READY s |", "|---|---|---|---|---|---|"]
        for r in results["scale"]:
            ra = f"{r['readopt_s']:.2f}" if r.get("readopt_s") is not None else "failed"
            lines.append(f"| {r['n']} | {r['daemon_rss_mb']:.1f} | {r['relays_rss_mb']:.0f} "
                         f"({r.get('relays_pss_mb', 0):.0f}) | {r['list_ms']:.1f} | "
                         f"{r['create_s']:.1f} ({r['batch']} new) | {ra} |")
        for note in results.get("scale_notes") or []:
            lines.append(f"- {note}")
    lines += tunnel_table(results)
    g = results.get("goals") or []
    if g:
        lines += ["", "### Goals", ""]
        for item in g:
            mark = "met" if item["met"] else "MISSED"
            if item.get("reference"):
                mark = "reference, absolute ms (" + ("under" if item["met"] else "over") + ")"
            extra = (f", paired-run median {item['paired_median_ratio']}"
                     if item.get("paired_median_ratio") is not None else "")
            if item.get("detail"):
                extra += f"; {item['detail']}"
            lines.append(f"- {mark}: {item['goal']} (measured {item['value']}{extra})")
    for note in results.get("notes") or []:
        lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


def plot(results: Dict[str, Any], out: Path) -> Optional[Path]:
    """throughput bars, CPU per GB, setup-latency distributions, scale; Agg backend."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(14, 10))
    m = results.get("machine", {})
    fig.suptitle(f"scistreamd benchmark {m.get('started_at', '')} — {m.get('cpu_model', '')}, "
                 f"{m.get('cores', '')} cores, kernel {m.get('kernel', '')}, stunnel "
                 f"{m.get('stunnel', {}).get('version', '')}"
                 + ("\nNOISY: " + m["noisy"] if m.get("noisy") else ""), fontsize=10)

    detail = results.get("throughput_detail") or {}
    names = [n for n in detail if not detail[n].get("broken")]

    def bars(ax: Any, key: str, ylabel: str, title: str) -> None:
        width = 0.38
        for j, p in enumerate(("p1", "p4")):
            meds, lo, hi, xs = [], [], [], []
            for i, n in enumerate(names):
                s = detail[n][p].get(key)
                if not s:
                    continue
                xs.append(i + (j - 0.5) * width)
                meds.append(s["median"])
                lo.append(s["median"] - s["min"])
                hi.append(s["max"] - s["median"])
            if xs:
                ax.bar(xs, meds, width, yerr=[lo, hi], capsize=4, label=p.upper())
                for x, v in zip(xs, meds):
                    ax.annotate(f"{v:.2f}", (x, v), ha="center", va="bottom", fontsize=8,
                                xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([n.replace("_", "\n") for n in names])
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.legend()

    dp = results.get("dataplane_config") or {}
    if names:
        bars(axes[0][0], "gbps", "Gbit/s", f"Throughput, median with min–max "
             f"({dp.get('repetitions')} × iperf3 -t {dp.get('iperf_seconds')})")
        bars(axes[0][1], "cpu_s_per_gb", "relay CPU s per GB",
             "Relay CPU per GB (both relays), lower is better")
    else:
        axes[0][0].set_axis_off()
        axes[0][1].set_axis_off()

    ax = axes[1][0]
    data, labels = [], []
    for op in ("inbound", "outbound", "release"):
        for kind, key in (("CLI", "setup_ms"), ("D-Bus", "dbus_ms")):
            s = (results.get(key) or {}).get(op)
            if s:
                data.append(s["samples"])
                labels.append(f"{op}\n{kind}")
    if data:
        ax.boxplot(data, whis=(0, 100))
        for i, vals in enumerate(data, start=1):
            ax.scatter([i] * len(vals), vals, s=8, alpha=0.5)
        ax.set_xticks(range(1, len(labels) + 1))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylabel("ms (log scale)")
        # Log scale: a few slow outliers on a busy machine would flatten every box.
        ax.set_yscale("log")
        ax.set_title("Setup latency distributions (box = quartiles, whiskers = min/max)",
                     fontsize=10)
    else:
        ax.set_axis_off()

    ax = axes[1][1]
    rows = results.get("scale") or []
    if rows:
        ns = [r["n"] for r in rows]
        ax.plot(ns, [r["daemon_rss_mb"] for r in rows], "o-", label="daemon RSS MB")
        ax.plot(ns, [r["list_ms"] for r in rows], "s-", label="ListEndpoints ms")
        ax.plot(ns, [r["create_s"] for r in rows], "^-", label="create batch s")
        ra = [(r["n"], r["readopt_s"]) for r in rows if r.get("readopt_s") is not None]
        if ra:
            ax.plot([x for x, _ in ra], [y for _, y in ra], "d-", label="restart to READY s")
        ax.set_xlabel("inbound endpoints on one host")
        ax.set_yscale("log")  # MB, ms and s of very different sizes on one axis
        ax2 = ax.twinx()
        ax2.plot(ns, [r["relays_rss_mb"] for r in rows], "k--", label="relays RSS MB (right)")
        ax2.set_ylabel("relays RSS MB")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=8)
        ax.set_title("Scale", fontsize=10)
    else:
        ax.set_axis_off()
    fig.tight_layout()
    tmp = out.with_suffix(".png.tmp")
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    os.replace(tmp, out)
    return out
