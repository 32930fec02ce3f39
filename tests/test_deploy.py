"""``cldlr deploy`` helpers and the Flower app definition, checked against flwr's own parsers (fast).

Real processes are in tests/test_deployment.py; here every printed command is parsed back the way
Flower parses it, so a quoting or flag mistake shows up without starting anything.
"""

from __future__ import annotations

import io
import shlex
import shutil
import tomllib
import zipfile
from pathlib import Path

import pytest
from conftest import REPO, write_schema, write_site
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from deploy_harness import write_policy
from flwr.cli.build import build_fab_from_disk
from flwr.common.config import parse_config_args, validate_config

from cldlr.cli import main
from cldlr.client.deploy import check_site, clientapp_command, supernode_command
from cldlr.client.fab_gate import fab_sha256
from cldlr.common.deploy.launch import key_values, toml_string
from cldlr.common.deploy.pki import create_ca, create_node_keys, create_server_cert
from cldlr.common.errors import CldlrError, ConfigError, ContractError
from cldlr.server.deploy import (
    CONTROL_API_NOTE,
    LOOPBACK_NOTE,
    app_dir,
    control_api_notes,
    register_command,
    run_command,
    superlink_command,
    write_connection,
)
from cldlr.server.proxy import proxy_command, render_config


def _option(argv: tuple[str, ...], flag: str) -> str:
    return argv[argv.index(flag) + 1]


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    create_ca(tmp_path / "ca")
    create_server_cert(tmp_path / "server", ca_dir=tmp_path / "ca", hosts=[])
    create_node_keys(tmp_path / "keys", name="hospital-a")
    return tmp_path


@pytest.fixture
def site(tmp_path: Path) -> Path:
    write_schema(tmp_path / "schema.yaml")
    return write_site(tmp_path / "site-a", n_patients=4, images_per_patient=1, size=32)


def test_superlink_command_has_tls_auth_and_no_runtime_installs(pki: Path) -> None:
    argv = superlink_command(pki / "server", port=9123, database=pki / "db.sqlite").argv
    assert argv[0] == "flower-superlink"
    assert {"--enable-supernode-auth", "--disable-runtime-dependency-installation"} <= set(argv)
    assert "--insecure" not in argv
    for flag, name in (("--ssl-ca-certfile", "ca.crt"), ("--ssl-certfile", "server.crt"), ("--ssl-keyfile", "server.key")):
        assert _option(argv, flag) == str((pki / "server" / name).resolve())
    assert _option(argv, "--port") == "9123" and _option(argv, "--database") == str((pki / "db.sqlite").resolve())
    with pytest.raises(CldlrError, match="cldlr certs server"):
        superlink_command(pki / "ca")


def test_connection_is_added_without_losing_others_and_never_clobbered(pki: Path) -> None:
    home = pki / "flwr-home"
    path = write_connection("centre", "10.0.0.5:9092", pki / "ca" / "ca.crt", home=home)
    first = tomllib.loads(path.read_text())
    assert first["superlink"]["centre"] == {"address": "10.0.0.5:9092",
                                            "root-certificates": str((pki / "ca" / "ca.crt").resolve())}
    assert first["superlink"]["local"]["address"] == ":local:"  # flwr's own simulation connection stays
    write_connection("centre", "10.0.0.5:9092", pki / "ca" / "ca.crt", home=home)  # same again: no-op
    assert not (home / "config.toml.bak").exists()
    with pytest.raises(CldlrError, match="already has a different connection"):
        write_connection("centre", "10.0.0.6:9092", pki / "ca" / "ca.crt", home=home)
    write_connection("centre", "10.0.0.6:9092", pki / "ca" / "ca.crt", home=home, force=True, make_default=True)
    after = tomllib.loads(path.read_text())
    assert after["superlink"]["centre"]["address"] == "10.0.0.6:9092" and after["superlink"]["default"] == "centre"
    assert tomllib.loads((home / "config.toml.bak").read_text()) == first
    with pytest.raises(CldlrError, match="HOST:PORT"):
        write_connection("other", "https://10.0.0.5:9092", pki / "ca" / "ca.crt", home=home)
    with pytest.raises(CldlrError, match="not a PEM certificate"):
        write_connection("other", "10.0.0.5:9092", pki / "keys" / "supernode-hospital-a.pub", home=home)


def test_register_takes_only_ecdsa_keys_and_names_the_site(pki: Path) -> None:
    argv = register_command(pki / "keys" / "supernode-hospital-a.pub", "centre").argv
    assert argv[:3] == ("flwr", "supernode", "register") and argv[4] == "centre"
    assert _option(argv, "--name") == "hospital-a"
    ed = ed25519.Ed25519PrivateKey.generate().public_key()
    (pki / "ed.pub").write_bytes(ed.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    with pytest.raises(CldlrError, match="only ECDSA"):
        register_command(pki / "ed.pub", "centre")


def test_supernode_node_config_round_trips_through_flowers_parser(pki: Path, site: Path, tmp_path: Path) -> None:
    command = supernode_command("127.0.0.1:9092", pki / "ca" / "ca.crt", pki / "keys" / "supernode-hospital-a.key", site,
                                port=9100, site_name="Hospital A", state_dir=tmp_path / "state")
    argv = command.argv
    assert argv[0] == "flower-supernode" and "--insecure" not in argv
    assert _option(argv, "--root-certificates") == str((pki / "ca" / "ca.crt").resolve())
    assert parse_config_args([_option(argv, "--node-config")]) == {
        "data-path": str(site.resolve()), "site-name": "Hospital A",
        "schema-path": str((tmp_path / "schema.yaml").resolve()), "state-dir": str((tmp_path / "state").resolve())}
    assert shlex.split(command.text())[-len(argv):] == list(argv)  # the printed line is the argv


def test_supernode_refuses_an_invalid_site_with_its_report(pki: Path, site: Path) -> None:
    victim = sorted((site / "masks").iterdir())[0]
    victim.unlink()
    with pytest.raises(ContractError) as caught:
        supernode_command("127.0.0.1:9092", pki / "ca" / "ca.crt", pki / "keys" / "supernode-hospital-a.key", site)
    assert victim.stem in caught.value.report.format_text()
    with pytest.raises(CldlrError, match="ECDSA|OpenSSH"):
        supernode_command("127.0.0.1:9092", pki / "ca" / "ca.crt", pki / "server" / "server.key", site, validate=False)


def test_contract_only_check_without_a_schema(tmp_path: Path) -> None:
    site = write_site(tmp_path / "lonely", n_patients=3, images_per_patient=1, size=32)
    assert check_site(site).ok  # no schema in or beside the site: ids, labels, images, masks only


def test_run_config_round_trips_and_paths_become_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    study = tmp_path / "study.yaml"
    study.write_text("model: {backbone: tiny, weights: none}\n")
    monkeypatch.chdir(tmp_path)
    argv = run_command("centre", "study.yaml", overrides=["train.epochs=2", "run.name=a study"],
                       run_dir="runs/s1", resume=True).argv
    assert argv[:4] == ("flwr", "run", str(REPO), "centre") and argv[-1] == "--stream"
    parsed = parse_config_args([_option(argv, "--run-config")])
    assert parsed == {"config": str(study), "overrides": "train.epochs=2 'run.name=a study'",
                      "run-dir": str(tmp_path / "runs" / "s1"), "resume": True}
    assert shlex.split(parsed["overrides"]) == ["train.epochs=2", "run.name=a study"]  # as the ServerApp splits it
    with pytest.raises(CldlrError, match="mixes single and double quotes"):
        run_command("centre", study, overrides=["run.name=it's a study"])
    with pytest.raises(CldlrError, match="--resume needs --run-dir"):
        run_command("centre", study, resume=True)
    with pytest.raises(CldlrError):
        run_command("centre", study, overrides=["no.such_key=1"])


def test_toml_strings_refuse_what_flower_cannot_carry() -> None:
    assert parse_config_args([key_values({"p": 'a "quoted" path', "q": "it's", "n": 3, "b": False})]) == {
        "p": 'a "quoted" path', "q": "it's", "n": 3, "b": False}
    with pytest.raises(CldlrError, match="mixes single and double quotes"):
        toml_string("it's \"both\"", "data-path")


def test_fab_carries_only_the_shims_and_is_valid() -> None:
    folder = app_dir()
    assert folder == REPO
    config = tomllib.loads((folder / "pyproject.toml").read_text())
    valid, errors, _ = validate_config(config, check_module=True, project_dir=folder)
    assert valid, errors
    names = set(zipfile.ZipFile(io.BytesIO(build_fab_from_disk(folder))).namelist())
    assert names == {"pyproject.toml", ".info/CONTENT", "flwr_app/__init__.py", "flwr_app/server_app.py",
                     "flwr_app/client_app.py"}
    assert set(config["tool"]["flwr"]["app"]["config"]) == {"config", "overrides", "run-dir", "resume"}


def test_cli_prints_the_command_and_writes_the_connection(pki: Path, capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLWR_HOME", str(pki / "home"))
    assert main(["deploy", "superlink", "--certs", str(pki / "server"), "--port", "9200"]) == 0
    out = capsys.readouterr().out
    assert "NO authentication" in out and "--enable-supernode-auth" in out.splitlines()[-1]
    assert main(["deploy", "connection", "--name", "c1", "--address", "127.0.0.1:9200", "--ca", str(pki / "ca" / "ca.crt")]) == 0
    assert "c1" in tomllib.loads((pki / "home" / "config.toml").read_text())["superlink"]


# -- the centre's defaults: SuperLink on loopback, hospitals through the Fleet-only proxy ------------
def test_superlink_listens_on_loopback_unless_told_and_then_warns(pki: Path, caplog: pytest.LogCaptureFixture) -> None:
    argv = superlink_command(pki / "server").argv
    assert _option(argv, "--host") == "127.0.0.1"
    assert control_api_notes("127.0.0.1") == [LOOPBACK_NOTE] and "cldlr deploy proxy" in LOOPBACK_NOTE
    assert not [r for r in caplog.records if r.levelname == "WARNING" and "EXPOSES" in r.getMessage()]
    argv = superlink_command(pki / "server", host="0.0.0.0").argv
    assert _option(argv, "--host") == "0.0.0.0"
    assert [r for r in caplog.records if r.levelname == "WARNING" and "EXPOSES the Control API" in r.getMessage()]
    assert "EXPOSES" in control_api_notes("10.0.0.5")[0] and CONTROL_API_NOTE in control_api_notes("10.0.0.5")


def _nginx_directives(text: str) -> dict[str, list[str]]:
    """``directive -> [values]`` of a flat reading of an nginx config (enough to check what it says)."""
    found: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if line and line != "}":
            name, _, value = line.rstrip(";{").strip().partition(" ")
            found.setdefault(name + ("{" if line.endswith("{") else ""), []).append(value.strip())
    return found


def test_proxy_config_forwards_only_the_fleet_api_over_verified_tls(pki: Path, tmp_path: Path) -> None:
    command = proxy_command(pki / "server", tmp_path / "proxy", listen="0.0.0.0:9092", superlink="127.0.0.1:9093",
                            nginx="/usr/sbin/nginx")
    conf = tmp_path / "proxy" / "nginx.conf"
    base = tmp_path / "proxy"
    assert command.argv == ("/usr/sbin/nginx", "-p", str(base), "-e", str(base / "logs" / "error.log"), "-c", str(conf),
                            "-g", "daemon off;")
    assert shlex.split(command.text()) == list(command.argv)
    d = _nginx_directives(conf.read_text())
    server = pki / "server"
    assert d["listen"] == ["0.0.0.0:9092 ssl"] and d["server"] == ["127.0.0.1:9093"]
    assert d["ssl_certificate"] == [f'"{server / "server.crt"}"'] and d["ssl_certificate_key"] == [f'"{server / "server.key"}"']
    assert d["location{"] == ["/v1/fleet/", "= /v1/fleet", "/"] and d["return"] == ["404", "404"]
    assert d["proxy_pass"] == ["https://superlink"] and d["limit_except{"] == ["POST"] and d["deny"] == ["all"]
    assert d["proxy_ssl_verify"] == ["on"] and d["proxy_ssl_trusted_certificate"] == [f'"{server / "ca.crt"}"']
    assert d["proxy_ssl_name"] == ["localhost"]  # always in `cldlr certs server`'s SANs; nginx checks names, not IPs
    assert d["client_max_body_size"] == ["512m"] and d["proxy_request_buffering"] == ["off"]
    assert d["underscores_in_headers"] == ["on"] and "proxy_hide_header" not in d
    assert d["pid"] == [f'"{tmp_path / "proxy" / "nginx.pid"}"'] and "user" not in d
    for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        assert (tmp_path / "proxy" / "tmp" / name).is_dir()
    assert all(str(tmp_path / "proxy") in v[0] for k, v in d.items() if k.endswith("_temp_path") or k.endswith("_log"))
    again = _nginx_directives(render_config(pki / "server", tmp_path / "p2", listen="[::]:9092", superlink="superlink.lan:9093",
                                            max_body="2g", timeout_s=60, user="www-data"))
    assert again["listen"] == ["[::]:9092 ssl"] and again["proxy_ssl_name"] == ["superlink.lan"]
    assert again["client_max_body_size"] == ["2g"] and again["proxy_read_timeout"] == ["60s"] and again["user"] == ["www-data"]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"listen": "https://0.0.0.0:9092"}, "without a scheme"),
    ({"superlink": "10.0.0.5:9093"}, "IP address"),
    ({"max_body": "lots"}, "--max-body"),
    ({"timeout_s": 0}, "--timeout"),
    ({"user": "root; evil"}, "--user"),
])
def test_proxy_refuses_what_it_cannot_configure(pki: Path, tmp_path: Path, kwargs: dict[str, object], match: str) -> None:
    settings: dict[str, object] = {"listen": "0.0.0.0:9092", "superlink": "127.0.0.1:9093", **kwargs}
    with pytest.raises(CldlrError, match=match):
        render_config(pki / "server", tmp_path, **settings)  # type: ignore[arg-type]


def test_proxy_needs_the_server_certificate_and_a_plain_output_path(pki: Path, tmp_path: Path) -> None:
    with pytest.raises(CldlrError, match="cldlr certs server"):
        render_config(pki / "ca", tmp_path, listen="0.0.0.0:9092", superlink="127.0.0.1:9093")
    with pytest.raises(CldlrError, match="nginx's config syntax"):
        render_config(pki / "server", tmp_path / "a$b", listen="0.0.0.0:9092", superlink="127.0.0.1:9093")


def test_cli_proxy_prints_the_nginx_command_and_writes_the_config(pki: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "front"
    assert main(["deploy", "proxy", str(out), "--certs", str(pki / "server"), "--listen", "0.0.0.0:9092",
                 "--superlink", "127.0.0.1:9093", "--max-body", "1g"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert "only POST /v1/fleet/*" in printed[0]
    argv = shlex.split(printed[-1])
    assert argv[-2:] == ["-g", "daemon off;"] and argv[argv.index("-c") + 1] == str(out / "nginx.conf")
    assert "client_max_body_size 1g;" in (out / "nginx.conf").read_text()


# -- the hospital's code gate: a --policy SuperNode runs process-isolated, the gate beside it
def test_supernode_with_a_policy_runs_process_isolated_and_names_the_policy(pki: Path, site: Path, tmp_path: Path) -> None:
    policy = write_policy(tmp_path / "site-policy.yaml", approved=[fab_sha256(REPO)], schema=tmp_path / "schema.yaml",
                          state=tmp_path / "state")
    argv = supernode_command("127.0.0.1:9092", pki / "ca" / "ca.crt", pki / "keys" / "supernode-hospital-a.key", site,
                             port=9100, policy=policy).argv
    assert _option(argv, "--isolation") == "process"
    assert parse_config_args([_option(argv, "--node-config")])["policy"] == str(policy.resolve())
    plain = supernode_command("127.0.0.1:9092", pki / "ca" / "ca.crt", pki / "keys" / "supernode-hospital-a.key", site).argv
    assert "--isolation" not in plain and "policy" not in parse_config_args([_option(plain, "--node-config")])
    gate = clientapp_command(policy, port=9100)
    assert gate.argv[1:] == ("-m", "cldlr.client.fab_gate", "--policy", str(policy.resolve()),
                             "--runtime-api-address", "127.0.0.1:9100")
    assert shutil.which("flwr-clientapp", path=gate.environ()["PATH"])  # the gate starts Flower's ClientApp by name
    policy.write_text(policy.read_text().replace(fab_sha256(REPO), "not-a-hash"))
    with pytest.raises(ConfigError, match="approved_fabs entry 'not-a-hash'"):
        clientapp_command(policy)
    with pytest.raises(CldlrError, match="site policy"):
        clientapp_command(tmp_path / "missing.yaml")
