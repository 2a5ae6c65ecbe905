"""The test bed's OAuth 2.0 set-up, shared by tests/integration/test_tokens.py and
bench/tokens.py: tests/oauth_server.py as a unit on server2 (HTTPS, a CA made
here), the daemon's client secret and the CA on server1, and
tests/integration/tokendriver.py (TokenVerifiers and an OAuth client inside a
host, driven by JSON lines)."""

from __future__ import annotations

import ipaddress
import json
import secrets
import subprocess
import uuid
from typing import Any, Dict, Optional

from scistreamd import certs

DRIVER = "/run/testbed/src/tests/integration/tokendriver.py"
OAUTH_SERVER = "/run/testbed/src/tests/oauth_server.py"
OAUTH_UNIT = "sstest-oauth.service"
OAUTH_DIR = "/etc/scistream-oauth"  # on server2
OAUTH_PORT = 8443
OAUTH = f"https://192.168.150.2:{OAUTH_PORT}"
OAUTH_CA = "/etc/scistream/oauth-ca.crt"  # on server1
SECRET_FILE = "/etc/scistream/token-client-secret"  # on server1
DAEMON_CLIENT = "scistreamd-server1"
SCOPE = "tunnels"


def put(host, path: str, text: str, mode: str = "0600") -> None:
    """Write a root-owned file inside ``host`` (umask first: never readable by others)."""
    host.run(["sh", "-c", f'umask 077; mkdir -p "$(dirname {path})"; cat > {path}; '
                          f"chmod {mode} {path}"], input=text)


class Driver:
    """tokendriver.py inside a host: one process, JSON lines."""

    def __init__(self, host) -> None:
        self.proc = subprocess.Popen(
            host.nsenter() + ["env", "PYTHONPATH=/run/testbed/src", "PYTHONDONTWRITEBYTECODE=1",
                              "/usr/bin/python3", DRIVER],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            bufsize=1)
        first = self.proc.stdout.readline().strip()
        assert first == "READY", f"tokendriver did not start: {first!r} {self._stderr()}"

    def _stderr(self) -> str:
        if self.proc.poll() is None:
            return ""
        return self.proc.stderr.read()

    def ask(self, **req: Any) -> Dict[str, Any]:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"tokendriver ended: {self._stderr()}"
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class OAuth:
    """The OAuth server on server2 and its registered clients."""

    def __init__(self, bed, driver: Driver) -> None:
        self.s1, self.s2 = bed["server1"], bed["server2"]
        self.driver = driver
        self.daemon_secret = secrets.token_urlsafe(24)
        #: A Globus-like group id that only carol's identity_set holds.
        self.group = str(uuid.uuid4())
        self.users: Dict[str, Dict[str, Any]] = {}
        for name in ("alice", "bob", "carol"):
            sub = str(uuid.uuid4())
            self.users[name] = {"client_id": f"{name}-robot",
                                "client_secret": secrets.token_urlsafe(24), "sub": sub,
                                "username": f"{name}@facility.test",
                                "identity_set": [sub, str(uuid.uuid4())]}
        self.users["carol"]["identity_set"].append(self.group)
        self.alice = self.users["alice"]
        ca = certs.make_ca("scistreamd test OAuth CA")
        pair = certs.make_host_cert("oauth", [ipaddress.ip_address("192.168.150.2")], issuer=ca)
        self.ca_pem = ca.cert_pem().decode()
        conf = {
            "listen": f"192.168.150.2:{OAUTH_PORT}", "issuer": OAUTH, "expires_in": 3600,
            "cert": f"{OAUTH_DIR}/server.crt", "key": f"{OAUTH_DIR}/server.key",
            "clients": [
                {"client_id": DAEMON_CLIENT, "client_secret": self.daemon_secret,
                 "introspect": True},
            ] + [{"client_id": u["client_id"], "client_secret": u["client_secret"],
                  "scope": f"{SCOPE} other", "audiences": [DAEMON_CLIENT, "other-service"],
                  "sub": u["sub"], "username": u["username"], "identity_set": u["identity_set"]}
                 for u in self.users.values()]}
        put(self.s2, f"{OAUTH_DIR}/server.crt", pair.cert_pem().decode(), "0644")
        put(self.s2, f"{OAUTH_DIR}/server.key", pair.key_pem().decode())
        put(self.s2, f"{OAUTH_DIR}/conf.json", json.dumps(conf))
        put(self.s1, OAUTH_CA, self.ca_pem, "0644")
        put(self.s1, SECRET_FILE, self.daemon_secret + "\n")

    def start(self) -> None:
        self.s2.run(["systemd-run", f"--unit={OAUTH_UNIT}", "--collect", "--quiet",
                     "-p", "Restart=no", "/usr/bin/python3", OAUTH_SERVER,
                     "--config", f"{OAUTH_DIR}/conf.json"])
        wait_listening(self.s2, OAUTH_PORT)

    def stop(self) -> None:
        self.s2.run(["systemctl", "stop", OAUTH_UNIT], check=False)

    def remove(self) -> None:
        """Stop the server and remove every file the constructor wrote."""
        self.stop()
        self.s1.run(["rm", "-f", OAUTH_CA, SECRET_FILE])
        self.s2.run(["rm", "-rf", OAUTH_DIR])

    def issue(self, scope: str = SCOPE, audience: Optional[str] = DAEMON_CLIENT,
              expires_in: Optional[int] = None, who: str = "alice") -> str:
        user = self.users[who]
        out = self.driver.ask(op="issue", url=OAUTH, ca=OAUTH_CA, scope=scope,
                              audience=audience, expires_in=expires_in,
                              client_id=user["client_id"], client_secret=user["client_secret"])
        assert out.get("status") == 200 and out["token"], out
        return out["token"]

    def revoke(self, token: str) -> None:
        out = self.driver.ask(op="revoke", url=OAUTH, ca=OAUTH_CA, token=token,
                              client_id=self.alice["client_id"],
                              client_secret=self.alice["client_secret"])
        assert out.get("status") == 200, out

    def stats(self) -> Dict[str, int]:
        out = self.driver.ask(op="stats", url=OAUTH, ca=OAUTH_CA)
        assert "introspect" in out, out
        return out

def config(**over: Any) -> Dict[str, Any]:
    """The verifier's scistreamd.toml keys (as server1's daemon would have them)."""
    base = {"token_introspection_url": f"{OAUTH}/introspect", "token_client_id": DAEMON_CLIENT,
            "token_client_secret_file": SECRET_FILE, "token_required_scope": SCOPE,
            "token_audience": DAEMON_CLIENT, "token_ca_file": OAUTH_CA,
            "token_negative_cache_seconds": 2, "token_timeout": 5}
    base.update(over)
    return base




def journal_entries(host, msg_id: uuid.UUID) -> list:
    """The journal entries of ``host`` with this MESSAGE_ID, oldest first, as dicts."""
    host.run(["journalctl", "--sync"], check=False)
    out = host.run(["journalctl", "--no-pager", "-o", "json",
                    f"MESSAGE_ID={msg_id.hex}"]).stdout
    return [json.loads(x) for x in out.splitlines() if x.strip()]


def wait_listening(host, port: int) -> None:
    host.run(["sh", "-c", f"for i in $(seq 200); do ss -Htln 'sport = :{port}' | grep -q . "
                          f"&& exit 0; sleep 0.05; done; echo 'nothing listens on {port}' >&2; "
                          "exit 1"])
