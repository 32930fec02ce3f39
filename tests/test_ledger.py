"""The centre survives error replies whose reason Flower left empty (``Error.reason`` is optional)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from unittest.mock import Mock

import pytest
from conftest import TINY_SCHEMA
from flwr.app import Context, Error, Message, MessageType, Metadata
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from cldlr.common.config import Config
from cldlr.common.data.schema import schema_from_dict
from cldlr.common.errors import CldlrError
from cldlr.server.ledger import Ledger, LedgerGrid, describe_message, error_reason
from cldlr.server.orchestrator import FederatedRun


@pytest.fixture
def flower_task() -> Iterator[None]:
    """Flower stamps every message it builds with the task of its process (a ServerApp's runtime sets it)."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None


def error_reply(node: int, reason: str | None) -> Message:
    metadata = Metadata(run_id=1, message_id="", src_node_id=node, dst_node_id=0, reply_to_message_id="", group_id="",
                        created_at=0.0, ttl=60.0, message_type=MessageType.TRAIN)
    return Message(Error(code=0, reason=reason), metadata=metadata)


def fake_grid(replies: list[Message], nodes: list[int]) -> Mock:
    grid = Mock(spec=Grid)
    grid.get_node_ids.return_value = nodes
    grid.send_and_receive.return_value = replies
    return grid


def ledger_lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize(("reason", "expected"), [(None, "no reason given"), ("  \n", "no reason given"),
                                                  ("boom\n", "boom")])
def test_error_reason_is_never_empty(reason: str | None, expected: str) -> None:
    assert error_reason(error_reply(2, reason)) == expected
    assert describe_message(error_reply(2, reason))["error"] == expected


def test_the_ledger_records_an_error_reply_without_a_reason(tmp_path: Path) -> None:
    grid = LedgerGrid(fake_grid([error_reply(2, None)], [2]), Ledger(tmp_path / "ledger.jsonl"))
    (reply,) = grid.send_and_receive([])
    assert reply.has_error()
    (entry,) = ledger_lines(tmp_path / "ledger.jsonl")
    assert entry["node"] == 2 and entry["error"] == "no reason given"


def test_a_site_refusing_without_a_reason_is_logged_and_the_study_stops_by_name(flower_task: None,
                                                                               tmp_path: Path) -> None:
    config = Config().replace(**{"federation.num_sites": 1, "federation.min_sites": 1})
    run = FederatedRun(fake_grid([error_reply(2, None)], [2]), Mock(spec=Context), config,
                       schema_from_dict(TINY_SCHEMA), tmp_path, connect_timeout_s=1.0)
    with pytest.raises(CldlrError, match="only 0 site"):
        run.handshake()
    refused = [e for e in ledger_lines(tmp_path / "ledger.jsonl") if e.get("event") == "site-refused"]
    assert len(refused) == 1 and refused[0]["reason"] == "no reason given"


def test_the_phases_after_the_handshake_need_it_to_have_run(tmp_path: Path) -> None:
    grid = LedgerGrid(fake_grid([], [1, 2]), Ledger(tmp_path / "ledger.jsonl"))
    with pytest.raises(CldlrError, match="handshake has to run first"):
        grid.joined  # noqa: B018 - the property is what is tested
    grid.members = {2}
    assert grid.joined == {2} and list(grid.get_node_ids()) == [2]
