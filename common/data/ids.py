"""The one rule for ids that become file names: ``image_id``, ``patient_id``, site and run names.

An id from a site's ``clinical.csv`` is reused as a file name (``images/<image_id>.png``, a predict
overlay, a reader-packet page), so an id like ``../../elsewhere/victim``, ``/etc/passwd`` or
``scan[1]*`` would read or write outside the folder it belongs to, or be taken as a glob pattern.
Ids are therefore restricted to a small set that is a plain file name on every system, cannot
start a spreadsheet formula and cannot be mistaken for an option: letters, digits, ``.``, ``_``
and ``-``, beginning with a letter or a digit, at most :data:`MAX_ID_LENGTH` characters.
"""

from __future__ import annotations

import re

from cldlr.common.errors import ContractError

#: Longest id accepted (file systems allow 255 bytes per name; the extension and suffixes need room).
MAX_ID_LENGTH = 128
#: The rule as the one sentence every message quotes.
ID_RULE = (f"letters, digits, '.', '_' and '-' only, beginning with a letter or a digit, "
           f"at most {MAX_ID_LENGTH} characters")
_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_UNSAFE_RUN = re.compile(r"[^A-Za-z0-9._-]+")


def is_safe_id(value: str) -> bool:
    """Whether ``value`` follows the id rule (:data:`ID_RULE`) exactly, with no surrounding space."""
    return len(value) <= MAX_ID_LENGTH and _SAFE.fullmatch(value) is not None


def suggest_id(value: str) -> str:
    """A safe id close to ``value`` (``scan (12)`` → ``scan_12``), for the fix of a message and for importers."""
    text = _UNSAFE_RUN.sub("_", value).lstrip("._-")[:MAX_ID_LENGTH].rstrip("._-")
    return text or "id"


def id_error(what: str, value: str) -> str:
    """The one message for an unsafe id: the rule, and the fix (with a suggested replacement)."""
    return (f"{what} {value[:60]!r}{'…' if len(value) > 60 else ''} is not a safe id ({ID_RULE}); "
            f"rename it, e.g. to {suggest_id(value)!r}")


def check_id(value: str, what: str = "id") -> str:
    """``value`` unchanged when it is a safe id; otherwise :class:`ContractError` with :func:`id_error`'s message."""
    if not is_safe_id(value):
        raise ContractError(id_error(what, value))
    return value


__all__ = ["ID_RULE", "MAX_ID_LENGTH", "check_id", "id_error", "is_safe_id", "suggest_id"]
