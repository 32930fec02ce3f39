"""The site's own audit log: every message the site sends, written at the site before it is sent.

The centre's ``ledger.jsonl`` says what the centre *received*; a hospital's privacy officer must
not depend on it. ``STATE/audit.jsonl`` is written by the SuperNode's ClientApp itself, one JSON
line per outgoing reply, *before* the reply is handed to Flower: run, message type (task), phase,
every record's key, kind, array shapes and bytes, whether the payload travels masked (SecAgg+) or
in plaintext, and the policy's decision (``sent`` or ``refused: <reason>``). Values never appear.
``cldlr audit STATE_DIR`` summarises what left the site per run.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cldlr.common.errors import CldlrError

AUDIT_FILE = "audit.jsonl"


@dataclass(frozen=True)
class RecordSummary:
    """One record of an outgoing message: key, kind, shapes of its arrays or keys of its entries, bytes."""

    key: str
    kind: str  # "arrays", "metrics" or "config"
    entries: dict[str, list[int] | str] = field(default_factory=dict)  # array name → shape; other entry → type
    nbytes: int = 0


@dataclass(frozen=True)
class AuditEntry:
    """What the site sent (or refused to send) in answer to one message."""

    run: int
    node: int
    message_type: str
    phase: str
    secure: bool
    decision: str
    records: tuple[RecordSummary, ...] = ()
    time: float = field(default_factory=time.time)

    @property
    def nbytes(self) -> int:
        """Bytes of every record of the reply."""
        return sum(r.nbytes for r in self.records)


class AuditLog:
    """Append-only ``audit.jsonl`` in the site's state folder (flushed and fsynced per line)."""

    def __init__(self, state_dir: str | Path) -> None:
        self.path = Path(state_dir) / AUDIT_FILE

    def write(self, entry: AuditEntry) -> None:
        """Append one line; returns only once it is on disk, so nothing is sent unlogged."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({**asdict(entry), "nbytes": entry.nbytes}, sort_keys=True) + "\n"
        with open(self.path, "a", encoding="utf-8") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())


def read_audit(state_dir: str | Path) -> Iterator[dict[str, Any]]:
    """Every line of the site's audit log, naming the line of a corrupt one."""
    path = Path(state_dir) / AUDIT_FILE
    if not path.is_file():
        raise CldlrError(f"{path}: no audit log (is this the site's state folder, folders.state of its policy?)")
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise CldlrError(f"{path}:{number}: not a JSON line ({exc})") from exc


def summarize_audit(state_dir: str | Path) -> str:
    """``cldlr audit STATE_DIR``: per run, messages and bytes sent masked and in plaintext, and refusals."""
    runs: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for entry in read_audit(state_dir):
        runs[int(entry["run"])].append(entry)
    lines = [f"{Path(state_dir) / AUDIT_FILE}: {sum(map(len, runs.values()))} message(s) in {len(runs)} run(s)"]
    for run, entries in sorted(runs.items()):
        sent = [e for e in entries if e["decision"] == "sent"]
        refused = [e for e in entries if e["decision"] != "sent"]
        masked_bytes = sum(e["nbytes"] for e in sent if e["secure"])
        plain_bytes = sum(e["nbytes"] for e in sent if not e["secure"])
        lines.append(f"run {run}: {len(sent)} sent ({masked_bytes} bytes masked by SecAgg+, {plain_bytes} bytes plaintext), "
                     f"{len(refused)} refused")
        phases = Counter(f"{e['phase']} ({'secure' if e['secure'] else 'plaintext'})" for e in sent)
        lines += [f"  {count:4d} × {phase}" for phase, count in sorted(phases.items())]
        plain = [r for e in sent if not e["secure"] for r in e["records"]]
        plain_keys = sorted({f"{r['key']}.{name}" for r in plain for name in r["entries"]})
        if plain_keys:
            lines.append("  plaintext fields: " + ", ".join(plain_keys))
        lines += [f"  refused {e['message_type']}: {e['decision']}" for e in refused]
    return "\n".join(lines)
