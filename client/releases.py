"""The site's release ledger: no sum is answered twice over different contributors (no differencing).

A secure sum hides a site's vector among the others' only once: if a centre gets the same sum
over sites {A, B, C} and then over {A, B}, the difference is C's vector. ``STATE/releases.json``
remembers, per run and SuperNode, which contributor set (the SecAgg+ neighbours this site
exchanged keys with) each release went to. A release is named twice — by its task and the hash of
the centre's payload, and by its task and the hash of the site's *answer* (so a payload padded
with an unused key still names the same release). The same release over the same set again is a
retry and answered; over any other set it is refused.

The file is rewritten atomically under an exclusive lock: in simulation several virtual sites
share one state folder.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from cldlr.client.policy import PolicyRefusal
from cldlr.common.errors import CldlrError
from cldlr.common.io import atomic_write_json, exclusive_lock, jsonable

RELEASES_FILE = "releases.json"
FORMAT = 1


def payload_digest(payload: Mapping[str, Any]) -> str:
    """SHA-256 of the payload's canonical JSON (sorted keys, numpy as lists)."""
    text = json.dumps(jsonable(dict(payload)), sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def answer_digest(vector: np.ndarray) -> str:
    """SHA-256 of the site's unscaled answer (float64 bytes)."""
    return hashlib.sha256(np.ascontiguousarray(vector, dtype=np.float64).tobytes()).hexdigest()


def release_names(task: str, payload: Mapping[str, Any], vector: np.ndarray) -> list[str]:
    """The two names of one release: by request and by answer."""
    return [f"{task}:payload:{payload_digest(payload)}", f"{task}:answer:{answer_digest(vector)}"]


class ReleaseLedger:
    """``STATE/releases.json``: release name → the contributor set it went to, per run and node."""

    def __init__(self, state_dir: str | Path) -> None:
        self.path = Path(state_dir) / RELEASES_FILE

    @contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        with exclusive_lock(self.path):
            yield self.read()

    def read(self) -> dict[str, Any]:
        """The whole ledger (empty when the site has released nothing yet)."""
        if not self.path.is_file():
            return {"format": FORMAT, "runs": {}}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise CldlrError(f"{self.path}: the release ledger is not valid JSON ({exc}); restore it from the "
                             "site's backup — without it the site cannot tell a retry from a differencing attack") from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CldlrError(f"{self.path}: not a release ledger of format {FORMAT}")
        return data

    def claim(self, *, run: int, node: int, names: Iterable[str], contributors: Iterable[int]) -> None:
        """Record that the named releases go to ``contributors``; refuse one that went to another set before."""
        group, names = sorted({int(c) for c in contributors}), list(names)
        with self._locked() as data:
            seen = data["runs"].setdefault(f"{run}/{node}", {})
            for name in names:
                before = seen.get(name)
                if before is not None and before != group:
                    raise PolicyRefusal("the same sum again over other sites",
                                        f"run {run}: {name} went to nodes {before}, now asked over {group}")
            changed = False
            for name in names:
                changed |= seen.get(name) != group
                seen[name] = group
            if changed:
                atomic_write_json(self.path, data)


__all__ = ["RELEASES_FILE", "ReleaseLedger", "answer_digest", "payload_digest", "release_names"]
