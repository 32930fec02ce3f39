"""The privacy ledger: a line in ``ledger.jsonl`` for every message that left a site.

The centre wraps its :class:`~flwr.serverapp.Grid` so that every reply it receives — FedAvg
weights, SecAgg+ key shares and masked vectors, handshakes, failures — is recorded with its
phase, round, record keys, array shapes, dtypes, bytes and whether it was protected by SecAgg+.
Values are never written, only their shapes: the ledger is safe to publish with the report, and
a test reads it back to prove that no message carried a per-image array or a clinical value.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import Message
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.serverapp import Grid

from cldlr.common.errors import CldlrError
from cldlr.common.io import jsonable


def error_reason(msg: Message) -> str:
    """The reason an error reply gives, never empty: Flower's ``Error.reason`` is optional."""
    return (msg.error.reason or "").strip() or "no reason given"


def describe_message(msg: Message) -> dict[str, Any]:
    """Keys, shapes and sizes of a reply's records — never their values."""
    content = msg.content if not msg.has_error() else None
    entry: dict[str, Any] = {
        "node": int(msg.metadata.src_node_id),
        "message_type": msg.metadata.message_type,
        "error": error_reason(msg)[:200] if msg.has_error() else None,
        "arrays": {}, "metrics": {}, "configs": {},
        "secure": False,
    }
    if content is None:
        return entry
    for name, arrays in content.array_records.items():
        entry["arrays"][name] = {k: {"shape": list(a.shape), "dtype": str(a.dtype), "bytes": len(a.data)}
                                 for k, a in arrays.items()}
    for name, metrics in content.metric_records.items():
        entry["metrics"][name] = sorted(metrics.keys())
    for name, configs in content.config_records.items():
        entry["configs"][name] = {k: _shape_of(v) for k, v in configs.items()}
        if name == RECORD_KEY_CONFIGS:  # Flower's SecAgg+ stages
            entry["secure"] = True
    entry["bytes"] = sum(a["bytes"] for r in entry["arrays"].values() for a in r.values()) + sum(
        c.get("bytes", 0) for r in entry["configs"].values() for c in r.values())
    return entry


def _shape_of(value: Any) -> dict[str, Any]:
    if isinstance(value, (bytes, str)):
        return {"type": type(value).__name__, "bytes": len(value)}
    if isinstance(value, list):
        size = sum(len(v) if isinstance(v, (bytes, str)) else 8 for v in value)
        return {"type": "list", "length": len(value), "bytes": size}
    return {"type": type(value).__name__, "bytes": 8}


class Ledger:
    """Append-only JSON-lines file; the phase and round are set by the ServerApp as it goes."""

    def __init__(self, path: Path, node_names: dict[int, str] | None = None) -> None:
        self.path = path
        self.phase = "start"
        self.round = 0
        self.node_names = node_names if node_names is not None else {}
        self._lock = threading.Lock()

    def record(self, entry: dict[str, Any]) -> None:
        """Append one line, stamped with the time, phase, round and sender's site name (safe across threads)."""
        entry = {"time": round(time.time(), 3), "phase": self.phase, "round": self.round,
                 "site": self.node_names.get(entry.get("node", -1)), **entry}
        with self._lock, open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(jsonable(entry)) + "\n")
            handle.flush()

    def event(self, kind: str, **details: Any) -> None:
        """A centre-side event (a site rejected, dropped, a round skipped) — for the audit trail."""
        self.record({"event": kind, **details})


def _name_dead_senders(sent: list[Message], replies: list[Message]) -> None:
    """Flower 1.41 answers for a SuperNode that stopped heartbeating with an error whose sender is
    the SuperLink itself (node 1); put back the node the message was for, so the strategy, the
    secure sums and the ledger say which site dropped. (No public setter: set like Flower does.)
    """
    destination = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}
    for reply in replies:
        if reply.has_error() and reply.metadata.src_node_id == SUPERLINK_NODE_ID:
            node = destination.get(reply.metadata.reply_to_message_id)
            if node is not None:
                reply.metadata.__dict__["_src_node_id"] = node


class LedgerGrid(Grid):
    """A Grid that records every reply it hands to the ServerApp (delegates everything else)."""

    def __init__(self, inner: Grid, ledger: Ledger) -> None:
        self._inner = inner
        self.ledger = ledger
        self.members: set[int] | None = None  # after the handshake: only the sites that joined

    @property
    def joined(self) -> set[int]:
        """The sites that joined at the handshake (minus those dropped since): every later phase works with these."""
        if self.members is None:
            raise CldlrError("no site has joined the federation yet: the handshake has to run first")
        return self.members

    def set_run(self, run: Any) -> None:  # pragma: no cover - the inner grid is already set up
        """The run belongs to the wrapped grid, which Flower has already set up."""
        self._inner.set_run(run)

    @property
    def run(self) -> Any:
        """The wrapped grid's run (its id stamps every message)."""
        return self._inner.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        """A message built by the wrapped grid, so it carries that grid's run."""
        return self._inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        """Connected nodes; after the handshake only those that joined, so a late SuperNode never takes part."""
        nodes = list(self._inner.get_node_ids())
        return nodes if self.members is None else [n for n in nodes if n in self.members]

    def get_nodes(self) -> Iterable[Any]:
        """Connected nodes as Flower's node records, filtered like :meth:`get_node_ids`."""
        nodes = list(self._inner.get_nodes())
        return nodes if self.members is None else [n for n in nodes if n.node_id in self.members]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Sent unchanged: the ledger records what leaves a site, not what the centre sends."""
        return self._inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies, each written to the ledger before the ServerApp sees it."""
        replies = list(self._inner.pull_messages(message_ids))
        for msg in replies:
            self.ledger.record(describe_message(msg))
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Like :meth:`pull_messages`, after naming the site behind each reply the SuperLink sent for a dead node."""
        sent = list(messages)
        replies = list(self._inner.send_and_receive(sent, timeout=timeout))
        _name_dead_senders(sent, replies)
        for msg in replies:
            self.ledger.record(describe_message(msg))
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)
