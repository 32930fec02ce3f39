"""``cldlr deploy`` helpers and the Flower app definition, checked against flwr's own parsers (fast).

Real processes are in tests/test_deployment.py; here every printed command is parsed back the way
Flower parses it, so a quoting or flag mistake shows up without starting anything.
"""

from __future__ import annotations

import io
import shlex
import tomllib
import zipfile
from pathlib import Path

import pytest
from conftest import REPO, write_schema, write_site
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from flwr.cli.build import build_fab_from_disk
from flwr.common.config import parse_config_args, validate_config

from cldlr.cli import main
from cldlr.client.deploy import check_site, supernode_command
from cldlr.common.deploy.launch import key_values, toml_string
from cldlr.common.deploy.pki import create_ca, create_node_keys, create_server_cert
from cldlr.common.errors import CldlrError, ContractError
from cldlr.server.deploy import app_dir, register_command, run_command, superlink_command, write_connection


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
