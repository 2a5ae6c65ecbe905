#!/usr/bin/python3
"""A small, real OAuth 2.0 authorization server for the test bed, on Debian's
python3-authlib (1.2): the client credentials grant (RFC 6749 4.4) at
``/token``, token introspection (RFC 7662) at ``/introspect`` and revocation
(RFC 7009) at ``/revoke``, over HTTPS with the test's own CA.

Why authlib and not glewlwyd: glewlwyd needs a database, a web front end
configuration, signing keys and its admin API before it issues one token, and
its introspection answers carry neither Globus' ``identity_set`` nor an
audience a client asked for; authlib is the protocol engine alone (client
authentication, grants, the introspection and revocation endpoints), so the
server below is ~250 lines the test fully controls, run with the host's
/usr/bin/python3.

Tokens are random (not JWTs), issued to registered clients; each token
carries the scopes asked for (within the client's allowed scopes), an
audience (``audience=`` parameter, within the client's allowed audiences,
default all of them), a lifetime (``expires_in=`` parameter, at most the
default: short-lived tokens for expiry tests) and its client's identity
(``sub``, ``username``, and a Globus-like ``identity_set``, sent only when
the introspecting client asks ``include=identity_set``, as Globus does).
Only clients registered with ``"introspect": true`` (resource servers) may
introspect. ``GET /stats`` counts requests (the tests' cache checks);
``POST /bad/{html,json,500}`` answer like a broken introspection endpoint.

Usage: oauth_server.py --config FILE  (JSON: {"listen": "ip:port", "cert",
"key", "issuer", "expires_in", "clients": [{"client_id", "client_secret",
"scope", "audiences", "sub", "username", "identity_set", "introspect"}]})
"""

from __future__ import annotations

import argparse
import http.server
import json
import secrets
import ssl
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import parse_qsl

from authlib.oauth2 import AuthorizationServer, OAuth2Request
from authlib.oauth2.rfc6749 import ClientMixin, TokenMixin, grants
from authlib.oauth2.rfc6749.errors import InvalidRequestError, InvalidScopeError
from authlib.oauth2.rfc6750 import BearerTokenGenerator
from authlib.oauth2.rfc7009 import RevocationEndpoint
from authlib.oauth2.rfc7662 import IntrospectionEndpoint

MAX_BODY = 64 * 1024


class Client(ClientMixin):
    def __init__(self, doc: Dict[str, Any]) -> None:
        self.client_id: str = doc["client_id"]
        self.client_secret: str = doc["client_secret"]
        self.scopes: List[str] = doc.get("scope", "").split()
        self.audiences: List[str] = list(doc.get("audiences", []))
        self.sub: str = doc.get("sub", self.client_id)
        self.username: str = doc.get("username", "")
        self.identity_set: List[str] = list(doc.get("identity_set", [self.sub]))
        self.introspect: bool = bool(doc.get("introspect", False))

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> Optional[str]:
        return None

    def get_allowed_scope(self, scope: str) -> str:
        return " ".join(s for s in scope.split() if s in self.scopes)

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return False

    def check_client_secret(self, client_secret: str) -> bool:
        return secrets.compare_digest(client_secret.encode(), self.client_secret.encode())

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method == "client_secret_basic"

    def check_response_type(self, response_type: str) -> bool:
        return False

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type == "client_credentials"


class Token(TokenMixin):
    def __init__(self, access_token: str, client: Client, scope: str, audiences: List[str],
                 expires_in: int) -> None:
        self.access_token = access_token
        self.client = client
        self.scope = scope
        self.audiences = audiences
        self.issued_at = int(time.time())
        self.expires_in = expires_in
        self.revoked = False

    def check_client(self, client: Client) -> bool:
        return client.client_id == self.client.client_id

    def get_scope(self) -> str:
        return self.scope

    def get_expires_in(self) -> int:
        return self.expires_in

    def is_expired(self) -> bool:
        return time.time() >= self.issued_at + self.expires_in

    def is_revoked(self) -> bool:
        return self.revoked


class ClientCredentialsGrant(grants.ClientCredentialsGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic"]


class Introspection(IntrospectionEndpoint):
    def query_token(self, token_string: str, token_type_hint: Optional[str]) -> Optional[Token]:
        return self.server.tokens.get(token_string)

    def check_permission(self, token: Token, client: Client, request: OAuth2Request) -> bool:
        return client.introspect

    def introspect_token(self, token: Token) -> Dict[str, Any]:
        c = token.client
        doc = {"active": True, "client_id": c.client_id, "token_type": "Bearer",
               "scope": token.scope, "sub": c.sub, "username": c.username,
               "aud": token.audiences, "iss": self.server.issuer,
               "exp": token.issued_at + token.expires_in, "iat": token.issued_at,
               "nbf": token.issued_at}
        include = str(self.server.current_form.get("include", "")).split(",")
        if "identity_set" in include:
            doc["identity_set"] = c.identity_set
        return doc


class Revocation(RevocationEndpoint):
    def query_token(self, token_string: str, token_type_hint: Optional[str]) -> Optional[Token]:
        return self.server.tokens.get(token_string)

    def revoke_token(self, token: Token, request: OAuth2Request) -> None:
        token.revoked = True


class Server(AuthorizationServer):
    def __init__(self, clients: List[Client], issuer: str, expires_in: int) -> None:
        super().__init__()
        self.clients = {c.client_id: c for c in clients}
        self.issuer = issuer
        self.default_expires_in = expires_in
        self.tokens: Dict[str, Token] = {}
        self.stats = {"token": 0, "introspect": 0, "revoke": 0, "bad": 0}
        self.lock = threading.Lock()  # authlib's objects are not thread-safe
        self.current_form: Dict[str, str] = {}
        self.register_token_generator("default", BearerTokenGenerator(
            lambda **kw: secrets.token_urlsafe(32), expires_generator=expires_in))
        self.register_grant(ClientCredentialsGrant)
        self.register_endpoint(Introspection)
        self.register_endpoint(Revocation)

    def query_client(self, client_id: str) -> Optional[Client]:
        return self.clients.get(client_id)

    def save_token(self, token: Dict[str, Any], request: OAuth2Request) -> None:
        client: Client = request.client
        if not token.get("scope"):
            raise InvalidScopeError(description="none of the requested scopes is allowed")
        asked = str(request.data.get("audience", "")).split()
        if any(a not in client.audiences for a in asked):
            raise InvalidRequestError(description="audience not allowed for this client")
        try:
            lifetime = int(request.data.get("expires_in", self.default_expires_in))
        except ValueError:
            raise InvalidRequestError(description="expires_in must be an integer") from None
        lifetime = max(1, min(lifetime, self.default_expires_in))
        token["expires_in"] = lifetime
        self.tokens[token["access_token"]] = Token(
            token["access_token"], client, token["scope"], asked or list(client.audiences),
            lifetime)

    def create_oauth2_request(self, request: Tuple[str, str, Dict[str, str], Dict[str, str]]
                              ) -> OAuth2Request:
        method, uri, form, headers = request
        return OAuth2Request(method, uri, body=form, headers=headers)

    def handle_response(self, status: int, body: Any, headers: Any) -> Tuple[int, Any, Any]:
        return status, body, headers

    def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
        pass


class Handler(http.server.BaseHTTPRequestHandler):
    server_version = "scistream-test-oauth/1"
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: without TCP_NODELAY the body waits
    # for the client's delayed ACK of the headers (~40 ms per answer on a kept
    # connection), which production servers do not make their clients wait.
    disable_nagle_algorithm = True
    oauth: Server

    def log_message(self, fmt: str, *args: Any) -> None:  # requests, never tokens
        path = self.path.split("?")[0]
        sys.stderr.write(f"oauth: {self.command} {path}\n")

    def _send(self, status: int, body: bytes, ctype: str = "application/json",
              headers: Any = ()) -> None:
        self.send_response(status)
        sent = set()
        for k, v in (headers or []):
            if k.lower() != "content-type":
                self.send_header(k, v)
                sent.add(k.lower())
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        if "cache-control" not in sent:
            self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/stats":
            with self.oauth.lock:
                self._send(200, json.dumps(self.oauth.stats).encode())
        elif self.path == "/health":
            self._send(200, b'{"status": "ok"}')
        else:
            self._send(404, b'{"error": "not_found"}')

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self._send(413, b'{"error": "invalid_request"}')
            return
        raw = self.rfile.read(length).decode("utf-8", "replace")
        form = dict(parse_qsl(raw, keep_blank_values=True))
        path = self.path.split("?")[0]
        if path.startswith("/bad/"):
            with self.oauth.lock:
                self.oauth.stats["bad"] += 1
            kind = path[len("/bad/"):]
            if kind == "html":
                self._send(200, b"<html><body>Service Temporarily Unavailable</body></html>",
                           "text/html")
            elif kind == "json":
                self._send(200, b'{"ok": true, "note": "no active field"}')
            else:
                self._send(500, b'{"error": "server_error"}')
            return
        names = {"/token": "token", "/introspect": "introspection", "/revoke": "revocation"}
        if path not in names:
            self._send(404, b'{"error": "not_found"}')
            return
        headers = {k: v for k, v in self.headers.items()}
        req = ("POST", f"https://{self.headers.get('Host', 'localhost')}{self.path}", form,
               headers)
        with self.oauth.lock:
            self.oauth.stats[path[1:]] += 1
            self.oauth.current_form = form
            if path == "/token":
                status, body, hdrs = self.oauth.create_token_response(req)
            else:
                status, body, hdrs = self.oauth.create_endpoint_response(names[path], req)
        self._send(status, json.dumps(body).encode(), headers=hdrs)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    args = p.parse_args(argv)
    with open(args.config, encoding="utf-8") as f:
        conf = json.load(f)
    host, port = conf["listen"].rsplit(":", 1)
    oauth = Server([Client(c) for c in conf["clients"]], conf.get("issuer", "https://oauth"),
                   int(conf.get("expires_in", 3600)))
    handler = type("BoundHandler", (Handler,), {"oauth": oauth})
    httpd = http.server.ThreadingHTTPServer((host, int(port)), handler)
    httpd.daemon_threads = True
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(conf["cert"], conf["key"])
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    sys.stderr.write(f"oauth: listening on https://{host}:{port}\n")
    httpd.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
