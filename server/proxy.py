"""The centre's front door for the hospitals: an nginx config that forwards the SuperLink's Fleet API and nothing else.

Flower 1.41 serves its Fleet API (SuperNodes), its Control API (the ``flwr`` CLI: submit runs,
register nodes) and its Runtime API on ONE port, and the open-source Control API has no
authentication: whoever reaches the port can submit a run whose code every SuperNode executes.
So the SuperLink listens on 127.0.0.1 and a well-kept reverse proxy (nginx, from the
distribution's packages) faces the hospitals. It terminates TLS with the federation's server
certificate, forwards only ``POST /v1/fleet/*`` (every call a SuperNode makes) to the SuperLink
over TLS checked against the federation CA, passes request headers unchanged (a SuperNode signs
each request in its ``flwr-public-key`` / ``flwr-signature`` / ``flwr-timestamp`` headers) and
streams large bodies (model weights travel in 5 MB chunks, up to ``max_body`` per request), and
answers anything else with 404 (another method on a Fleet path: 403). The ``flwr`` CLI is used
on the SuperLink host itself, against 127.0.0.1.

Like every ``cldlr deploy`` command this only writes the config and builds the command line;
nginx runs in the foreground (``daemon off``) with its pid file, logs and temp folders inside
the output folder, so it needs no system service and no write access outside that folder.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

from cldlr.common.deploy.launch import Command, check_address, existing_file, is_loopback
from cldlr.common.deploy.pki import CA_CERT, SERVER_CERT, SERVER_KEY
from cldlr.common.errors import CldlrError
from cldlr.common.io import atomic_write_text

log = logging.getLogger(__name__)

FLEET_PREFIX = "/v1/fleet/"
CONFIG_NAME = "nginx.conf"
DEFAULT_MAX_BODY = "512m"
DEFAULT_TIMEOUT_S = 300
TEMP_FOLDERS = {"client_body": "body", "proxy": "proxy", "fastcgi": "fastcgi", "uwsgi": "uwsgi", "scgi": "scgi"}
INSTALL_HINT = "install it from the distribution's packages (Debian/Ubuntu: `apt-get install nginx`)"

TEMPLATE = """\
# Written by `cldlr deploy proxy` (see docs/DEPLOY.md): the hospitals' only way in to the SuperLink.
# Only POST {fleet}* (all a SuperNode calls) is forwarded; the Control API (/v1/control/*, no
# authentication in Flower 1.41), the Runtime API and every other path are refused here.
worker_processes 1;
pid {pid};
error_log {error_log} warn;
{user}
events {{
    worker_connections 1024;
}}

http {{
    access_log {access_log};
    {temp_paths}
    server_tokens off;

    upstream superlink {{
        server {superlink};
        keepalive 16;
    }}

    server {{
        listen {listen} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;

        client_max_body_size {max_body};
        client_body_timeout {timeout}s;
        send_timeout {timeout}s;
        underscores_in_headers on;

        location {fleet} {{
            limit_except POST {{
                deny all;
            }}
            proxy_pass https://superlink;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_request_buffering off;
            proxy_buffering off;
            proxy_connect_timeout 10s;
            proxy_send_timeout {timeout}s;
            proxy_read_timeout {timeout}s;
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {ca};
            proxy_ssl_verify_depth 2;
            proxy_ssl_name {tls_name};
            proxy_ssl_server_name on;
            proxy_ssl_protocols TLSv1.2 TLSv1.3;
            proxy_ssl_session_reuse on;
        }}

        location = {fleet_bare} {{
            return 404;
        }}

        location / {{
            return 404;
        }}
    }}
}}
"""


def _quoted(path: Path) -> str:
    """``path`` as an nginx string; characters nginx would read as syntax or variables are refused."""
    text = str(path)
    bad = sorted({c for c in text if c in '"\\$;{}\n\'' or c.isspace() and c != " "})
    if bad:
        raise CldlrError(f"path {text!r} contains {''.join(bad)!r}, which nginx's config syntax cannot carry "
                         "literally; use a folder without those characters")
    return f'"{text}"'


def _endpoint(address: str, what: str) -> tuple[str, str]:
    """(``host:port`` as nginx writes it, bare host) for a ``HOST:PORT`` option."""
    host, port = check_address(address, what)
    return (f"[{host}]:{port}" if ":" in host else f"{host}:{port}"), host


def upstream_tls_name(host: str) -> str:
    """The name nginx checks in the SuperLink's certificate (nginx verifies names, not IP addresses).

    ``cldlr certs server`` always puts ``localhost`` in it, so a loopback SuperLink is checked as
    ``localhost``; a SuperLink elsewhere must be given by a name its certificate lists.
    """
    if is_loopback(host):
        return "localhost"
    if re.fullmatch(r"[0-9.]+|[0-9a-fA-F:]+", host):
        raise CldlrError(f"--superlink {host}: give the SuperLink as 127.0.0.1:PORT (the proxy runs on the SuperLink host) "
                         "or by a DNS name listed in its certificate; nginx cannot check a certificate for an IP address")
    return host


def render_config(certs: str | os.PathLike[str], out: str | os.PathLike[str], *, listen: str, superlink: str,
                  max_body: str = DEFAULT_MAX_BODY, timeout_s: int = DEFAULT_TIMEOUT_S, user: str | None = None) -> str:
    """The nginx config text (nothing written): TLS in front, ``POST /v1/fleet/*`` to ``superlink``, the rest refused."""
    folder = Path(certs).expanduser().resolve()
    hint = f"issue them with `cldlr certs server {folder} --ca-dir CA_DIR --host <name the hospitals dial>`"
    ca, cert, key = (existing_file(folder / name, name, hint) for name in (CA_CERT, SERVER_CERT, SERVER_KEY))
    listen_at, _ = _endpoint(listen, "--listen")
    upstream, upstream_host = _endpoint(superlink, "--superlink")
    if not re.fullmatch(r"[1-9][0-9]*[kKmMgG]?", max_body):
        raise CldlrError(f"--max-body {max_body!r}: give a size like 512m (bytes, or with a k/m/g suffix)")
    if timeout_s < 1:
        raise CldlrError(f"--timeout {timeout_s}: give the seconds a slow upload may stall, >= 1")
    if user is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", user):
        raise CldlrError(f"--user {user!r}: give a system user name for nginx's worker processes")
    base = Path(out).expanduser().resolve()
    return TEMPLATE.format(
        fleet=FLEET_PREFIX, fleet_bare=FLEET_PREFIX.rstrip("/"), pid=_quoted(base / "nginx.pid"),
        error_log=_quoted(base / "logs" / "error.log"), access_log=_quoted(base / "logs" / "access.log"),
        temp_paths="\n    ".join(f"{kind}_temp_path {_quoted(base / 'tmp' / name)};" for kind, name in TEMP_FOLDERS.items()),
        user=f"user {user};" if user else "# (no `user`: as root nginx runs its workers as `nobody`; see --user)",
        superlink=upstream, listen=listen_at, cert=_quoted(cert), key=_quoted(key), ca=_quoted(ca),
        max_body=max_body, timeout=timeout_s, tls_name=upstream_tls_name(upstream_host),
    )


def find_nginx() -> str | None:
    """The nginx executable: on PATH, else Debian's /usr/sbin/nginx (not on a normal user's PATH)."""
    found = shutil.which("nginx")
    if found is None and Path("/usr/sbin/nginx").is_file():
        found = "/usr/sbin/nginx"
    return found


def proxy_command(certs: str | os.PathLike[str], out: str | os.PathLike[str], *, listen: str, superlink: str,
                  max_body: str = DEFAULT_MAX_BODY, timeout_s: int = DEFAULT_TIMEOUT_S, user: str | None = None,
                  nginx: str | None = None) -> Command:
    """Write ``out/nginx.conf`` (plus its ``logs/`` and ``tmp/``) and return the foreground nginx command.

    ``nginx`` is the executable (default: :func:`find_nginx`; when none is installed the printed
    command says plain ``nginx`` and a warning says how to install it).
    """
    text = render_config(certs, out, listen=listen, superlink=superlink, max_body=max_body, timeout_s=timeout_s,
                         user=user)
    base = Path(out).expanduser().resolve()
    for folder in (base / "logs", *(base / "tmp" / name for name in TEMP_FOLDERS.values())):
        folder.mkdir(parents=True, exist_ok=True)
    config = base / CONFIG_NAME
    atomic_write_text(config, text)
    log.info("nginx config written to %s", config)
    program = nginx or find_nginx()
    if program is None:
        log.warning("nginx is not installed here: %s", INSTALL_HINT)
        program = "nginx"
    return Command((program, "-p", str(base), "-e", str(base / "logs" / "error.log"), "-c", str(config),
                    "-g", "daemon off;"))


__all__ = ["CONFIG_NAME", "DEFAULT_MAX_BODY", "DEFAULT_TIMEOUT_S", "FLEET_PREFIX", "INSTALL_HINT", "find_nginx",
           "proxy_command", "render_config", "upstream_tls_name"]
