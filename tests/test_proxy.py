"""The Fleet-only proxy with a real nginx process in front of a tiny local HTTPS server (about a second).

The upstream is a stand-in for the SuperLink: it serves TLS with the federation's server
certificate (as the SuperLink does) and records every request it receives. Through nginx, a
``POST /v1/fleet/...`` must arrive with its headers (SuperNode signatures) and a large body byte
for byte; any other path or method must be refused by nginx and never reach the upstream; and an
upstream whose certificate the federation CA did not sign must not be talked to. Skipped when
nginx is not installed (``make deploy-deps`` installs it).
"""

from __future__ import annotations

import hashlib
import http.client
import http.server
import os
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from deploy_harness import free_port, wait_for

from cldlr.common.deploy.pki import create_ca, create_server_cert
from cldlr.server.proxy import find_nginx, proxy_command

NGINX = find_nginx()
pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (`make deploy-deps` or apt-get install nginx)")
BODY_MB = 48  # > nginx's 1 MB default limit and > Flower's 5 MB object chunk
SIGNED = {"flwr-public-key": "cHVibGljLWtleQ==", "flwr-signature": "c2lnbmF0dXJl",
          "flwr-timestamp": "2026-01-01T00:00:00+00:00", "x_with_underscore": "kept"}


@dataclass
class Upstream:
    """An HTTPS server that records (method, path, headers, body sha256, body length) of each request."""

    port: int
    seen: list[tuple[str, str, dict[str, str], str, int]] = field(default_factory=list)
    server: http.server.ThreadingHTTPServer | None = None


def _serve(certs: Path) -> Upstream:
    upstream = Upstream(free_port())

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            length = int(self.headers.get("content-length", 0))
            digest, remaining = hashlib.sha256(), length
            while remaining:
                chunk = self.rfile.read(min(remaining, 1 << 20))
                digest.update(chunk)
                remaining -= len(chunk)
            upstream.seen.append(("POST", self.path, {k.lower(): v for k, v in self.headers.items()}, digest.hexdigest(),
                                  length))
            self.send_response(200)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        do_GET = do_POST  # noqa: N815 - would be recorded too, if nginx ever let one through

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", upstream.port), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs / "server.crt", certs / "server.key")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    upstream.server = server
    return upstream


@dataclass
class Proxy:
    """A running nginx made by ``cldlr deploy proxy``."""

    port: int
    process: subprocess.Popen[bytes]
    out: Path


def _start_proxy(certs: Path, upstream_port: int, out: Path) -> Proxy:
    port = free_port()
    command = proxy_command(certs, out, listen=f"127.0.0.1:{port}", superlink=f"127.0.0.1:{upstream_port}")
    process = subprocess.Popen(list(command.argv), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    error_log = out / "logs" / "error.log"

    def listening() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"nginx exited {process.returncode}: {error_log.read_text() if error_log.exists() else ''}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return False

    wait_for(listening, 20, "nginx to listen", poll=0.1)
    return Proxy(port, process, out)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("proxy-pki")
    create_ca(root / "ca")
    create_server_cert(root / "server", ca_dir=root / "ca", hosts=[])
    create_ca(root / "other-ca")
    create_server_cert(root / "other-server", ca_dir=root / "other-ca", hosts=[])
    return root


@pytest.fixture(scope="module")
def link(pki: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proxy, Upstream]]:
    upstream = _serve(pki / "server")
    proxy = _start_proxy(pki / "server", upstream.port, tmp_path_factory.mktemp("nginx"))
    try:
        yield proxy, upstream
    finally:
        proxy.process.terminate()
        proxy.process.wait(timeout=15)
        assert upstream.server is not None
        upstream.server.shutdown()


def _request(proxy: Proxy, ca: Path, method: str, path: str, body: bytes = b"",
             headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """One HTTPS request through the proxy, the path sent exactly as given (no client-side normalising)."""
    context = ssl.create_default_context(cafile=str(ca))
    connection = http.client.HTTPSConnection("127.0.0.1", proxy.port, context=context, timeout=60)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_fleet_calls_pass_with_their_headers_and_a_large_body(link: tuple[Proxy, Upstream], pki: Path) -> None:
    proxy, upstream = link
    body = os.urandom(BODY_MB << 20)
    status, reply = _request(proxy, pki / "ca" / "ca.crt", "POST", "/v1/fleet/push-object", body,
                             {**SIGNED, "content-type": "application/protobuf"})
    assert (status, reply) == (200, b"ok")
    method, path, headers, digest, length = upstream.seen[-1]
    assert (method, path, length, digest) == ("POST", "/v1/fleet/push-object", len(body), hashlib.sha256(body).hexdigest())
    assert {k: headers.get(k) for k in SIGNED} == SIGNED
    assert headers["content-type"] == "application/protobuf"


@pytest.mark.parametrize(("method", "path", "expected"), [
    ("POST", "/v1/control/start-run", 404),
    ("POST", "/v1/control/list-runs", 404),
    ("POST", "/v1/runtime/acquire-task", 404),
    ("POST", "/v1/fleet", 404),
    ("POST", "/v1/fleet/../control/start-run", 404),
    ("POST", "/v1/fleet/%2e%2e/control/start-run", 404),
    ("POST", "/health", 404),
    ("GET", "/v1/fleet/pull-messages", 403),
])
def test_everything_else_is_refused_and_never_reaches_the_superlink(link: tuple[Proxy, Upstream], pki: Path, method: str,
                                                                    path: str, expected: int) -> None:
    proxy, upstream = link
    before = len(upstream.seen)
    status, _ = _request(proxy, pki / "ca" / "ca.crt", method, path, b"x" * 10, SIGNED)
    assert status == expected
    assert len(upstream.seen) == before, upstream.seen[before:]


def test_an_upstream_the_federation_ca_did_not_sign_is_not_talked_to(pki: Path, tmp_path: Path) -> None:
    impostor = _serve(pki / "other-server")
    proxy = _start_proxy(pki / "server", impostor.port, tmp_path / "nginx")
    try:
        status, _ = _request(proxy, pki / "ca" / "ca.crt", "POST", "/v1/fleet/pull-messages", b"x", SIGNED)
        assert status == 502
        assert not impostor.seen
        assert "upstream SSL certificate verify error" in (tmp_path / "nginx" / "logs" / "error.log").read_text()
    finally:
        proxy.process.terminate()
        proxy.process.wait(timeout=15)
        assert impostor.server is not None
        impostor.server.shutdown()
