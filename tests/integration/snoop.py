"""What a local user can learn about tunnels: runs inside a test-bed host, as that user.

    python3 snoop.py watch [--signals-only]
                                subscribe to every signal on the system bus and
                                collect, over and over, everything the user can
                                read that once carried tunnel uids; driven by
                                lines on stdin: "sync" (answer "SYNCED" after two
                                full rounds that began after it), "dump" (one JSON
                                line: everything so far), "stop" (dump and exit).
    python3 snoop.py claim HOST PORT   read candidate uids (one a line) from stdin,
                                claim each from the peer port at HOST:PORT; one
                                JSON line: {uid: HTTP status or error}, and the
                                uids whose claim returned a key.

No test-bed or project imports: the user runs it as any local program would.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import ssl
import subprocess
import sys
import threading
from typing import Dict, List, Set

BUS_NAME = "org.scistream.Tunnel1"
#: Paths whose introspection the user asks for (dbus-next lists every exported
#: path containing the asked one as a child).
INTROSPECT_PATHS = ["/", "/org/scistream/Tunnel1", "/org/scistream/Tunnel1/endpoint",
                    "/endpoint", "/Tunnel1/endpoint", "/e"]
#: Where run-time files are; /run/testbed is the test bed's own (its source tree).
WALK_ROOTS = ["/run", "/var/lib/scistream", "/etc/scistream", "/tmp", "/var/tmp"]
SKIP = ("/run/testbed", "/run/log/journal/")
MAX_FILE = 256 * 1024


class Collector:
    def __init__(self) -> None:
        self.seen: Set[str] = set()
        self.signals: List[dict] = []
        self.bus_notes: Dict[str, str] = {}
        self.owners: Set[str] = set()
        self.rounds = 0
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)

    def add(self, what: str, text: str) -> None:
        with self.lock:
            self.seen.add(f"{what}\t{text}")

    # ---- everything readable, one round
    def run(self, cmd: List[str]) -> None:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            self.add(" ".join(cmd), out.stdout + out.stderr)
        except (OSError, subprocess.TimeoutExpired) as e:
            self.add(" ".join(cmd), f"ERROR {e}")

    def read(self, path: str) -> None:
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_FILE)
            self.add(path, data.replace(b"\0", b" ").decode("utf-8", "replace"))
        except OSError as e:
            self.add(path, f"ERROR {e.strerror}")

    def one_round(self) -> None:
        self.run(["systemctl", "list-units", "--all", "--plain", "--no-legend", "--no-pager"])
        units = subprocess.run(["systemctl", "list-units", "--all", "--plain", "--no-legend",
                                "--no-pager", "scistream*"], capture_output=True,
                               text=True).stdout.split()
        for unit in [u for u in units if u.startswith("scistream")]:
            self.run(["systemctl", "show", "--all", "--no-pager", unit])
            self.run(["systemctl", "status", "--no-pager", "-n", "20", unit])
            self.run(["systemctl", "cat", "--no-pager", unit])
        self.run(["ps", "-eo", "pid,user,cgroup,args"])
        self.run(["journalctl", "-n", "200", "--no-pager"])
        self.run(["busctl", "tree", "--list", BUS_NAME])
        for path in INTROSPECT_PATHS:
            self.run(["busctl", "introspect", "--xml-interface", BUS_NAME, path])
        for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
            for name in ("cgroup", "cmdline", "environ", "mountinfo", "comm"):
                self.read(f"/proc/{pid}/{name}")
        for root in WALK_ROOTS:
            for dirpath, dirnames, filenames in os.walk(root, onerror=lambda e: self.add(
                    "walk", f"ERROR {e.filename}: {e.strerror}")):
                if dirpath.startswith(SKIP[0]):
                    dirnames[:] = []
                    continue
                self.add("dir", dirpath + "\t" + " ".join(sorted(dirnames + filenames)))
                for name in filenames:
                    path = os.path.join(dirpath, name)
                    if os.path.islink(path):
                        self.add(path, "-> " + os.readlink(path))
                    elif not path.startswith(SKIP[1]) and os.path.isfile(path):
                        self.read(path)

    def poll_forever(self, stop: threading.Event, signals_only: bool) -> None:
        while not stop.is_set():
            if signals_only:
                stop.wait(0.2)
            else:
                self.one_round()
            with self.cond:
                self.rounds += 1
                self.cond.notify_all()

    def dump(self) -> str:
        with self.lock:
            return json.dumps({"seen": sorted(self.seen), "signals": self.signals,
                               "bus": self.bus_notes, "owners": sorted(self.owners),
                               "rounds": self.rounds})


async def subscribe(col: Collector, ready: threading.Event) -> None:
    from dbus_next import BusType, Message, MessageType
    from dbus_next.aio import MessageBus

    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()

    async def call(member: str, sig: str, body: list) -> str:
        reply = await bus.call(Message(destination="org.freedesktop.DBus",
                                       path="/org/freedesktop/DBus",
                                       interface="org.freedesktop.DBus", member=member,
                                       signature=sig, body=body))
        if reply.message_type == MessageType.ERROR:
            return f"{reply.error_name}: {reply.body}"
        return f"OK {reply.body}"

    def handler(msg: Message) -> None:
        if msg.message_type == MessageType.SIGNAL:
            with col.lock:
                col.signals.append({"sender": msg.sender, "path": msg.path,
                                    "interface": msg.interface, "member": msg.member,
                                    "body": repr(msg.body)})
                if (msg.member == "NameOwnerChanged" and msg.body
                        and msg.body[0] == BUS_NAME and msg.body[2]):
                    col.owners.add(msg.body[2])
        return None

    bus.add_message_handler(handler)
    col.bus_notes["AddMatch"] = await call("AddMatch", "s", ["type='signal'"])
    col.bus_notes["AddMatch eavesdrop"] = await call("AddMatch", "s",
                                                     ["type='signal',eavesdrop='true'"])
    col.bus_notes["AddMatch eavesdrop all"] = await call("AddMatch", "s", ["eavesdrop='true'"])
    owner = await call("GetNameOwner", "s", [BUS_NAME])
    col.bus_notes["GetNameOwner"] = owner
    if owner.startswith("OK"):
        col.owners.add(owner.split("'")[1])
    # A monitor connection gets everything if the bus lets it: it must not.
    mon = await MessageBus(bus_type=BusType.SYSTEM).connect()
    reply = await mon.call(Message(destination="org.freedesktop.DBus",
                                   path="/org/freedesktop/DBus",
                                   interface="org.freedesktop.DBus.Monitoring",
                                   member="BecomeMonitor", signature="asu", body=[[], 0]))
    col.bus_notes["BecomeMonitor"] = (reply.error_name if reply.message_type ==
                                      MessageType.ERROR else "OK")
    if reply.message_type != MessageType.ERROR:
        mon.add_message_handler(handler)
    ready.set()
    await asyncio.Event().wait()


def watch(signals_only: bool) -> int:
    col = Collector()
    ready = threading.Event()
    threading.Thread(target=lambda: asyncio.run(subscribe(col, ready)), daemon=True).start()
    if not ready.wait(30):
        print("subscription did not complete", flush=True)
        return 1
    stop = threading.Event()
    poller = threading.Thread(target=col.poll_forever, args=(stop, signals_only),
                              daemon=True)
    poller.start()
    print("READY", flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "sync":
            with col.cond:
                target = col.rounds + 2
                col.cond.wait_for(lambda t=target: col.rounds >= t, timeout=300)
            print("SYNCED", flush=True)
        elif cmd == "dump":
            print(col.dump(), flush=True)
        elif cmd == "stop":
            break
    stop.set()
    poller.join(timeout=120)
    print(col.dump(), flush=True)
    return 0


def claim(host: str, port: int) -> int:
    """Try each candidate as a thief would: no certificate check, no client cert."""
    import http.client

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    results: Dict[str, object] = {}
    keys: List[str] = []
    for uid in [x.strip() for x in sys.stdin if x.strip()]:
        conn = http.client.HTTPSConnection(host, port, timeout=30, context=ctx)
        try:
            conn.request("POST", f"/v1/endpoints/{uid}/claim", body="{}",
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            body = resp.read().decode("utf-8", "replace")
            results[uid] = resp.status
            if resp.status == 200 and '"psk"' in body:
                keys.append(uid)
        except (OSError, ssl.SSLError, http.client.HTTPException) as e:
            results[uid] = f"{type(e).__name__}: {e}"
        finally:
            conn.close()
    print(json.dumps({"results": results, "keys": keys}), flush=True)
    return 0


UID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
HEX32_RE = re.compile(r"(?<![0-9a-fA-F])[0-9a-fA-F]{32}(?![0-9a-fA-F])")


def candidates(text: str) -> List[str]:
    """Every uid-shaped string in ``text`` (also 32 hex digits, written as a uid)."""
    found = {m.lower() for m in UID_RE.findall(text)}
    for h in HEX32_RE.findall(text):
        h = h.lower()
        found.add(f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}")
    return sorted(found)


if __name__ == "__main__":
    if sys.argv[1:2] == ["watch"]:
        sys.exit(watch("--signals-only" in sys.argv))
    if sys.argv[1:2] == ["claim"]:
        sys.exit(claim(sys.argv[2], int(sys.argv[3])))
    print(__doc__, file=sys.stderr)
    sys.exit(2)
