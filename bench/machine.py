"""What the numbers were measured on: CPU, kernel, versions, and how busy the machine was."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional


def _first_line(cmd: List[str], stream: str = "stdout") -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable ({e})"
    text = getattr(proc, stream) or proc.stdout or proc.stderr
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else ""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags() -> List[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                # The ones that decide TLS speed: AES-NI, carry-less multiply, SHA, wide vectors.
                return sorted(flags & {"aes", "vaes", "pclmulqdq", "vpclmulqdq", "sha_ni",
                                       "avx2", "avx512f"})
    except OSError:
        pass
    return []


def _stunnel() -> Dict[str, str]:
    try:
        proc = subprocess.run(["stunnel4", "-version"], capture_output=True, text=True,
                              timeout=10)
        text = proc.stdout + proc.stderr
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"version": f"unavailable ({e})"}
    out: Dict[str, str] = {}
    m = re.search(r"stunnel (\S+)", text)
    out["version"] = m.group(1) if m else "unknown"
    m = re.search(r"Compiled with (OpenSSL [^\n]+)", text)
    out["compiled_with"] = m.group(1).strip() if m else ""
    m = re.search(r"Running\s+with (OpenSSL [^\n]+)", text)
    out["running_with"] = m.group(1).strip() if m else ""
    return out


def loadavg() -> List[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


class CpuSampler:
    """Machine-wide CPU use between start() and stop(): how much others ran meanwhile."""

    def __init__(self) -> None:
        self._start: Optional[List[int]] = None

    @staticmethod
    def _read() -> List[int]:
        line = Path("/proc/stat").read_text().splitlines()[0]
        return [int(x) for x in line.split()[1:]]

    def start(self) -> None:
        self._start = self._read()

    def stop(self) -> Dict[str, float]:
        if self._start is None:
            return {}
        end = self._read()
        d = [b - a for a, b in zip(self._start, end)]
        total = sum(d) or 1
        idle = d[3] + (d[4] if len(d) > 4 else 0)
        steal = d[7] if len(d) > 7 else 0
        return {"busy_fraction": round(1 - idle / total, 3),
                "steal_fraction": round(steal / total, 3)}


def other_testbeds(own: str) -> List[str]:
    """Names of other test beds that are up now (their record names a live PID 1)."""
    found: List[str] = []
    for record in Path("/var/tmp").glob("*/testbed.json"):
        name = record.parent.name
        if name == own:
            continue
        try:
            hosts = json.loads(record.read_text())
        except (OSError, ValueError):
            continue
        if any(h.get("pid1") and Path(f"/proc/{h['pid1']}").exists() for h in hosts):
            found.append(name)
    return sorted(found)


def machine_info(testbed_name: str) -> Dict[str, Any]:
    mem_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    return {
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cores": os.cpu_count(),
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "os": _first_line(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "python": sys.version.split()[0],
        "stunnel": _stunnel(),
        "openssl": _first_line(["openssl", "version"]),
        "iperf3": _first_line(["iperf3", "--version"]),
        "systemd": _first_line(["systemctl", "--version"]),
        "hostname": platform.node(),
        "testbed": testbed_name,
        "loadavg_start": loadavg(),
        "other_testbeds_start": other_testbeds(testbed_name),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
