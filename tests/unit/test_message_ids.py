"""Every journal MESSAGE_ID of the daemon means one thing (parallel work once gave two
events the same id), and each is documented in scistreamd(8) or scistreamd.toml(5)."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFINITION = re.compile(r'^(MSG_\w+)\s*=\s*uuid\.UUID\("([0-9a-f]{32})"\)', re.M)
#: Names that are one event on purpose: a refused claim, logged by the peer port
#: or by the manager (manager.py says so).
SAME_EVENT = {frozenset({"MSG_CLAIM_REFUSED", "MSG_PEER_REFUSED"})}


def _ids() -> dict:
    names = defaultdict(set)
    for path in sorted((ROOT / "scistreamd").rglob("*.py")):
        for name, hexid in DEFINITION.findall(path.read_text()):
            names[hexid].add(name)
    return names


def test_each_message_id_names_one_event() -> None:
    ids = _ids()
    assert len(ids) >= 10, ids  # the pattern still finds the definitions
    clashes = {h: sorted(n) for h, n in ids.items()
               if len(n) > 1 and frozenset(n) not in SAME_EVENT}
    assert not clashes, f"MESSAGE_IDs used for different events: {clashes}"


def test_each_message_id_is_documented() -> None:
    docs = "".join((ROOT / "docs/man" / p).read_text()
                   for p in ("scistreamd.8", "scistreamd.toml.5", "scistreamctl.1"))
    docs += (ROOT / "README.md").read_text()
    missing = sorted(h for h in _ids() if h not in docs and f"…{h[-4:]}" not in docs
                     and f"...{h[-4:]}" not in docs)
    assert not missing, f"MESSAGE_IDs documented nowhere: {missing}"
