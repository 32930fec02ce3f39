"""The deployment defaults against a hostile centre, with real processes (about a minute).

A SuperLink on 127.0.0.1, the Fleet-only nginx proxy in front of it, and two hospitals whose
SuperNodes dial the proxy and run ``--isolation process`` with their FAB gate beside them:

* through the proxy the Control API is refused (a raw HTTPS call and ``flwr ls`` alike), while the
  centre's ``flwr`` on 127.0.0.1 works;
* the centre submits a FAB of its own whose ClientApp writes a marker file: the hospital whose
  policy approves that FAB's hash runs it (the marker appears: the check is not vacuous), the
  hospital whose policy pins only the cldlr FAB refuses it before any of its code is unpacked
  (no marker, nothing installed, the centre gets Flower's INVALID_FAB error).
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO
from deploy_harness import CONNECTION, NGINX_MISSING, Federation, descendants, free_port, run_cli, wait_for, write_policy

from cldlr.client.deploy import supernode_command
from cldlr.client.fab_gate import fab_sha256
from cldlr.common.deploy.launch import flower_command, key_values
from cldlr.server.deploy import write_connection
from cldlr.simulations.phantom import generate_phantom

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600),
              pytest.mark.skipif(NGINX_MISSING is not None, reason=str(NGINX_MISSING))]
SITES = ("approver", "pinned")
MARKER = "CENTRE-CODE-RAN"
ROGUE_PYPROJECT = """\
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "rogue"
version = "1.0.0"

[tool.flwr.app]
publisher = "centre"

[tool.flwr.app.components]
serverapp = "rogue.server_app:app"
clientapp = "rogue.client_app:app"

[tool.flwr.app.config]
result = ""
"""
ROGUE_SERVER = '''\
import json, time
from pathlib import Path
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    deadline, nodes = time.monotonic() + 60, []
    while len(nodes) < 2 and time.monotonic() < deadline:
        nodes = list(grid.get_node_ids())
        time.sleep(1)
    asks = [Message(RecordDict({"q": ConfigRecord({"x": 1})}), dst_node_id=n, message_type="query") for n in nodes]
    replies = {str(r.metadata.src_node_id): ([r.error.code, r.error.reason] if r.has_error() else "ok")
               for r in grid.send_and_receive(asks, timeout=180)}
    Path(str(context.run_config["result"])).write_text(json.dumps(replies))
'''
ROGUE_CLIENT = f'''\
from pathlib import Path
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    (Path(str(context.node_config["state-dir"])) / "{MARKER}").write_text("the centre's own code ran at this site")
    return Message(RecordDict({{"r": ConfigRecord({{"ran": 1}})}}), reply_to=msg)
'''


def _rogue_app(folder: Path) -> Path:
    (folder / "rogue").mkdir(parents=True)
    (folder / "pyproject.toml").write_text(ROGUE_PYPROJECT)
    (folder / "rogue" / "__init__.py").write_text("")
    (folder / "rogue" / "server_app.py").write_text(ROGUE_SERVER)
    (folder / "rogue" / "client_app.py").write_text(ROGUE_CLIENT)
    return folder


@pytest.fixture(scope="module")
def pinned(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    fed = Federation(tmp_path_factory.mktemp("pinning"))
    root = fed.root
    try:
        fed.make_pki(SITES)
        generate_phantom(root / "data", sites=1, images_per_site=6, image_size=48, seed=2)
        rogue = _rogue_app(root / "rogue-app")
        approved = {"approver": [fab_sha256(REPO), fab_sha256(rogue)], "pinned": [fab_sha256(REPO)]}
        fed.start_superlink()
        fed.start_proxy()
        for site in SITES:
            fed.register(site)
            state = root / f"state-{site}"
            state.mkdir()
            policy = write_policy(root / f"policy-{site}.yaml", approved=approved[site],
                                  schema=root / "data" / "schema.yaml", state=state)
            fed.start_site(site, supernode_command(fed.fleet_address, root / "ca" / "ca.crt", fed.node_key(site),
                                                   root / "data" / "site-1", port=free_port(), state_dir=state,
                                                   policy=policy, validate=False), policy)
        wait_for(lambda: fed.online() == 2, 90, "both SuperNodes online through the proxy")
        yield fed
    finally:
        fed.close()


def test_the_control_api_is_refused_through_the_proxy_while_the_centre_cli_works(pinned: Federation) -> None:
    fed = pinned
    context = ssl.create_default_context(cafile=str(fed.root / "ca" / "ca.crt"))
    for path in ("/v1/control/list-runs", "/v1/control/start-run", "/v1/runtime/acquire-task"):
        request = urllib.request.Request(f"https://{fed.fleet_address}{path}", data=b"", method="POST",
                                         headers={"content-type": "application/protobuf"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, context=context, timeout=30)  # noqa: S310 - https to the test's own proxy
        assert refused.value.code == 404, path
    write_connection("via-proxy", fed.fleet_address, fed.root / "ca" / "ca.crt", home=fed.cli_home)
    outside = _json(run_cli(flower_command("flwr", ["ls", "via-proxy", "--format", "json"]), home=fed.cli_home).stdout)
    assert outside["success"] is False and "404 Not Found" in outside["error-message"], outside
    inside = _json(run_cli(flower_command("flwr", ["ls", CONNECTION, "--format", "json"]), home=fed.cli_home).stdout)
    assert inside["success"] is True and "runs" in inside, inside
    access = (fed.root / "proxy" / "logs" / "access.log").read_text()
    assert '"POST /v1/fleet/pull-messages HTTP/1.1" 200' in access  # the SuperNodes really came through nginx
    assert '"POST /v1/control/list-runs HTTP/1.1" 404' in access


def test_a_fab_the_site_did_not_approve_is_refused_before_its_code_runs(pinned: Federation) -> None:
    fed, root = pinned, pinned.root
    result = root / "rogue-result.json"
    submitted = run_cli(flower_command("flwr", ["run", str(root / "rogue-app"), CONNECTION, "--run-config",
                                                key_values({"result": str(result)})]), home=fed.cli_home, cwd=root)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    replies = json.loads(wait_for(lambda: result.is_file() and result.read_text(), 240, "the rogue ServerApp's replies"))
    assert (root / "state-approver" / MARKER).is_file(), fed.procs["approver"].log()[-3000:]  # approved: it runs
    assert not (root / "state-pinned" / MARKER).exists()
    refusals = [r for r in replies.values() if r != "ok"]
    assert len(replies) == 2 and len(refusals) == 1, replies
    code, reason = refusals[0]
    assert code == 7 and "refused by the site" in reason and fab_sha256(root / "rogue-app") in reason  # INVALID_FAB
    log = fed.procs["pinned"].log()
    assert "REFUSED before any of its code ran" in log and "rogue" not in _installed_apps(root / "home-pinned-gate")
    assert "rogue" in _installed_apps(root / "home-approver-gate")


def _json(text: str) -> dict[str, object]:
    """The JSON ``flwr ... --format json`` prints last."""
    return dict(json.loads(text[text.find("{"):]))


def _installed_apps(flwr_home: Path) -> str:
    """What ``flwr-clientapp`` unpacked under this FLWR_HOME (it installs each FAB it runs there)."""
    apps = flwr_home / "apps"
    return " ".join(str(p.relative_to(apps)) for p in apps.rglob("*")) if apps.is_dir() else ""


def test_a_hospital_stops_on_one_sigterm_to_each_of_its_services(pinned: Federation) -> None:
    for name in ("approver", "approver-gate"):
        proc = pinned.procs[name]
        tree = [proc.pid, *descendants(proc.pid)]
        listing = {p: Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ")[:120] for p in tree
                   if Path(f"/proc/{p}/cmdline").exists()}
        assert proc.stop(), f"{name} left processes behind: {listing}"
