"""Entry points log readably (Flower's per-request HTTP lines and duplicate copies are kept out), at run.log_level."""

from __future__ import annotations

import argparse
import logging
import typing
from pathlib import Path

import pytest
from conftest import write_schema
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict

import cldlr.client.app as client_app
import cldlr.server.app as server_app
from cldlr.cli import main
from cldlr.cli_args import study_config
from cldlr.client.app import configure_site_logging
from cldlr.common.config import RunConfig, dump_config, load_config
from cldlr.common.data.schema import load_schema
from cldlr.common.errors import CldlrError, ConfigError
from cldlr.common.logs import LEVELS, configure_logging, level_number


def test_httpx_requests_are_quiet_and_flower_lines_are_not_repeated(caplog) -> None:
    flwr = logging.getLogger("flwr")
    old = flwr.propagate, logging.getLogger("httpx").level
    try:
        configure_logging(logging.INFO)
        assert logging.getLogger("httpx").getEffectiveLevel() == logging.WARNING
        assert not flwr.propagate
        with caplog.at_level(logging.INFO):
            logging.getLogger("httpx").info("HTTP Request: POST https://127.0.0.1:9092/v1/runtime/pull-messages")
            logging.getLogger("cldlr.centre").info("round 1: averaged")
        assert [r.name for r in caplog.records] == ["cldlr.centre"]
        configure_logging(logging.DEBUG)  # -v keeps httpx at WARNING too: its lines are never the point
        assert logging.getLogger("httpx").getEffectiveLevel() == logging.WARNING
    finally:
        flwr.propagate, _ = old
        logging.getLogger("httpx").setLevel(old[1])
        logging.getLogger().setLevel(logging.WARNING)  # configure_logging now sets the root level, also under pytest


@pytest.fixture()
def restore_logging():
    """Put back the root, httpx and flwr settings the tests below change."""
    root, httpx, flwr = logging.getLogger(), logging.getLogger("httpx"), logging.getLogger("flwr")
    saved = root.level, httpx.level, flwr.propagate
    yield
    root.setLevel(saved[0])
    httpx.setLevel(saved[1])
    flwr.propagate = saved[2]
    configure_site_logging.cache_clear()


def test_run_log_level_is_validated_and_matches_the_names_logging_knows() -> None:
    hint = typing.get_type_hints(RunConfig)["log_level"]
    assert typing.get_args(hint) == LEVELS
    assert load_config(None, ["run.log_level=WARNING"]).run.log_level == "WARNING"
    with pytest.raises(ConfigError, match="run.log_level: 'loud' is not one of"):
        load_config(None, ["run.log_level=loud"])
    assert level_number("debug") == logging.DEBUG and level_number(logging.ERROR) == logging.ERROR
    with pytest.raises(ConfigError, match="log level 'loud'"):
        configure_logging("loud")


def test_the_cli_applies_the_configs_level_and_its_own_flag_wins(restore_logging, tmp_path: Path, capsys) -> None:
    missing = ["--set", f"data.root={tmp_path / 'nowhere'}", "--set", f"run.output_dir={tmp_path / 'runs'}"]
    assert main(["simulate", "configs/paper.yaml", "--set", "run.log_level=ERROR", *missing]) == 2
    assert logging.getLogger().level == logging.ERROR and logging.getLogger("cldlr").getEffectiveLevel() == logging.ERROR
    assert main(["--log-level", "warning", "simulate", "configs/paper.yaml", "--set", "run.log_level=ERROR", *missing]) == 2
    assert logging.getLogger().level == logging.WARNING
    assert main(["-v", "simulate", "configs/paper.yaml", "--set", "run.log_level=ERROR", *missing]) == 2
    assert logging.getLogger().level == logging.DEBUG
    assert capsys.readouterr().err.count("data.schema is not set") == 3  # each run failed after the config was read
    args = argparse.Namespace(config=None, overrides=["run.log_level=ERROR"], log_level="INFO")
    assert study_config(args).run.log_level == "INFO"  # the flag travels with the config (e.g. to the ServerApp)


def test_the_server_app_logs_at_the_configs_level(restore_logging, monkeypatch, tmp_path: Path) -> None:
    seen: list[int] = []

    class Run:
        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        def run(self) -> None:
            seen.append(logging.getLogger("cldlr.centre").getEffectiveLevel())

    monkeypatch.setattr(server_app, "FederatedRun", Run)
    monkeypatch.setattr(server_app, "resolve_schema", lambda config: None)
    monkeypatch.delenv(server_app.ENV_KEY, raising=False)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config={"config": "configs/paper.yaml", "overrides": "run.log_level=WARNING", "run-dir": str(tmp_path)})
    server_app.main(None, context)
    assert seen == [logging.WARNING]


def _to_site(content: RecordDict, message_type: str) -> Message:
    """A message as the SuperNode hands it to the ClientApp (run 3, node 9)."""
    return Message(content, metadata=Metadata(run_id=3, message_id="m", src_node_id=1, dst_node_id=9, reply_to_message_id="",
                                              group_id="", created_at=0.0, ttl=60.0, message_type=message_type))


def test_the_client_app_logs_at_the_level_of_the_handshake_config(restore_logging, tmp_path: Path) -> None:
    schema_yaml = load_schema(write_schema(tmp_path / "schema.yaml")).to_yaml()
    context = Context(run_id=3, node_id=9, node_config={"data-path": str(tmp_path / "nowhere")}, state=RecordDict(),
                      run_config={})
    offer = ConfigRecord({"version": "0.0.0-other", "pipeline": "0", "schema-yaml": schema_yaml,
                          "config-yaml": dump_config(load_config(None, ["run.log_level=DEBUG"]))})
    with pytest.raises(CldlrError, match="site refuses the federation"):
        client_app.handshake(_to_site(RecordDict({"handshake": offer}), "query.handshake"), context)
    assert logging.getLogger("cldlr.site").getEffectiveLevel() == logging.DEBUG
    # a later message in a fresh process: the level comes from the handshake kept in the context
    context.state.config_records[client_app.STATE_KEY] = ConfigRecord({
        "config-yaml": dump_config(load_config(None, ["run.log_level=ERROR"])), "schema-yaml": schema_yaml,
        "folder": str(tmp_path / "nowhere")})
    with pytest.raises(CldlrError):
        client_app.finalize(_to_site(RecordDict(), "query.finalize"), context)
    assert logging.getLogger("cldlr.site").getEffectiveLevel() == logging.ERROR
