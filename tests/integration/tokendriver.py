#!/usr/bin/python3
"""Runs inside a test-bed host: TokenVerifiers built from configurations, and an
OAuth client of the test OAuth server (tests/oauth_server.py), driven by JSON
lines on stdin (one answer line each on stdout, "READY" first).

Requests ({"op": ...}):
  new      {"name", "config": {scistreamd.toml keys}} -> {"ok": true} | {"error", "message"}
  verify   {"name", "token", "n": 1, "parallel": false}
           -> {"results": [{"identity": {...}} | {"error", "reason", "message"}]}
  issue    {"url", "ca", "client_id", "client_secret", "scope", "audience"?, "expires_in"?}
           -> {"status", "token"?, "body"}
  revoke   {"url", "ca", "client_id", "client_secret", "token"} -> {"status"}
  usertime {"url", "ca", "tokens": [...]} -> {"ms": [...]}: one GET per token, each timed
  stats    {"url", "ca"} -> the server's counters
  counts   {"name"} -> {"introspections", "cache_hits"}
  user     {"method", "url", "ca", "token"?, "body"?} -> {"status", "body"}: one user API
           call (Authorization: Bearer <token> when a token is given)
  timing   {"name", "token", "n"} -> {"p50_us", "p95_us", "introspections"}: cached checks

The verifiers log to the host's journal (SYSLOG_IDENTIFIER=tokendriver), as
the daemon does, so the tests read the denial lines where operators would.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import sys
import time
from typing import Any, Dict

import requests

from scistreamd.config import config_from_mapping
from scistreamd.errors import ScistreamError
from scistreamd.tokens import TokenVerifier


def _journal_logging() -> None:
    from systemd.journal import JournalHandler

    root = logging.getLogger()
    root.handlers[:] = [JournalHandler(SYSLOG_IDENTIFIER="tokendriver")]
    root.setLevel(logging.INFO)


async def _verify(v: TokenVerifier, token: str, n: int, parallel: bool) -> list:
    async def one() -> Dict[str, Any]:
        try:
            ident = await v.verify(token)
        except ScistreamError as err:
            return {"error": err.name, "reason": getattr(err, "reason", ""),
                    "subject": getattr(err, "subject", ""), "message": str(err)}
        return {"identity": dataclasses.asdict(ident), "owner": ident.owner}

    if parallel:
        return list(await asyncio.gather(*(one() for _ in range(n))))
    return [await one() for _ in range(n)]


async def _timing(v: TokenVerifier, token: str, n: int) -> Dict[str, Any]:
    await v.verify(token)
    before = v.introspections
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        await v.verify(token)
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"p50_us": times[len(times) // 2] * 1e6, "p95_us": times[int(len(times) * 0.95)] * 1e6,
            "introspections": v.introspections - before}


async def main() -> int:
    _journal_logging()
    verifiers: Dict[str, TokenVerifier] = {}
    loop = asyncio.get_running_loop()
    print("READY", flush=True)
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        req = json.loads(line)
        op = req["op"]
        out: Dict[str, Any]
        try:
            if op == "new":
                try:
                    verifiers[req["name"]] = TokenVerifier.from_config(
                        config_from_mapping(req["config"], "<test>"))
                    out = {"ok": True}
                except ScistreamError as err:
                    out = {"error": type(err).__name__, "message": str(err)}
            elif op == "verify":
                out = {"results": await _verify(verifiers[req["name"]], req["token"],
                                                req.get("n", 1), req.get("parallel", False))}
            elif op == "counts":
                v = verifiers[req["name"]]
                out = {"introspections": v.introspections, "cache_hits": v.cache_hits}
            elif op == "timing":
                out = await _timing(verifiers[req["name"]], req["token"], req.get("n", 1000))
            elif op in ("issue", "revoke"):
                data = {"grant_type": "client_credentials", "scope": req.get("scope", "")}
                for key in ("audience", "expires_in"):
                    if req.get(key) is not None:
                        data[key] = str(req[key])
                if op == "revoke":
                    data = {"token": req["token"]}
                resp = requests.post(f"{req['url']}/{'token' if op == 'issue' else 'revoke'}",
                                     data=data, auth=(req["client_id"], req["client_secret"]),
                                     verify=req["ca"], timeout=10)
                out = {"status": resp.status_code, "body": resp.json()}
                out["token"] = out["body"].get("access_token", "")
            elif op == "user":
                headers = {}
                if req.get("token") is not None:
                    headers["Authorization"] = f"Bearer {req['token']}"
                resp = requests.request(req["method"], req["url"], json=req.get("body"),
                                        headers=headers, verify=req["ca"], timeout=60)
                try:
                    body = resp.json()
                except ValueError:
                    body = resp.text
                out = {"status": resp.status_code, "body": body}
            elif op == "usertime":
                ms = []
                for token in req["tokens"]:
                    t0 = time.perf_counter()
                    resp = requests.get(req["url"], headers={"Authorization": f"Bearer {token}"},
                                        verify=req["ca"], timeout=60)
                    ms.append((time.perf_counter() - t0) * 1000)
                    if resp.status_code != 200:
                        raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:200]}")
                out = {"ms": ms}
            elif op == "stats":
                out = requests.get(f"{req['url']}/stats", verify=req["ca"], timeout=10).json()
            else:
                out = {"error": "UnknownOp", "message": op}
        except Exception as err:  # the test reads it; the driver keeps going
            out = {"error": "DriverError", "message": f"{type(err).__name__}: {err}"}
        print(json.dumps(out), flush=True)
    for v in verifiers.values():
        v.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
