"""Atomic file writes (a reader never sees a half-written file, a crash never leaves one) and JSON values.

:func:`jsonable` is the one coercion from what the pipeline produces (NumPy scalars and arrays,
tuples, paths) to plain JSON values; reports, the ledger, the bundle and the secure-sum wire all
use it, so a value is written the same way wherever it goes.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path, PurePath
from typing import Any

import numpy as np

_NATIVE = (str, int, float, bool, type(None))  # what json.dumps writes by itself (also as keys)


def _key(key: Any) -> Any:
    if isinstance(key, np.generic):
        key = key.item()
    return key if isinstance(key, _NATIVE) else str(key)


def jsonable(obj: Any, *, finite: bool = False, strict: bool = False) -> Any:
    """``obj`` as plain JSON values, so ``json.dumps`` needs no ``default=`` hook.

    Mappings become dicts (keys ``json`` cannot write become strings); lists, tuples, sets and
    arrays become lists (sets sorted, so the text is reproducible); NumPy scalars become Python
    numbers; paths become strings. ``finite`` turns NaN and infinities into ``None`` (for files
    read back with ``allow_nan=False``, like the bundle's ``bundle.json``). Anything else becomes
    ``str(obj)``, or raises ``TypeError`` when ``strict`` (the secure-sum wire, where a stray
    object is a bug to name, not text to send).
    """
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return None if finite and not math.isfinite(value) else value
    if isinstance(obj, _NATIVE):
        return obj
    if isinstance(obj, np.generic):
        return jsonable(obj.item(), finite=finite, strict=strict)
    if isinstance(obj, Mapping):
        return {_key(k): jsonable(v, finite=finite, strict=strict) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        obj = obj.tolist()
    if isinstance(obj, (set, frozenset)):
        try:
            obj = sorted(obj)
        except TypeError:  # mixed types
            obj = sorted(obj, key=repr)
    if isinstance(obj, (list, tuple)):
        return [jsonable(v, finite=finite, strict=strict) for v in obj]
    if isinstance(obj, PurePath):
        return str(obj)
    if strict:
        raise TypeError(f"{type(obj).__name__} is not JSON serialisable")
    return str(obj)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Text variant of :func:`atomic_write_bytes` (UTF-8)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically (through :func:`jsonable`)."""
    return atomic_write_text(path, json.dumps(jsonable(obj), indent=2, sort_keys=False) + "\n")


@contextmanager
def exclusive_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive lock on ``<path>.lock`` (processes on one machine take turns at a read-modify-write)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    For writers that insist on a file name (``torch.save``, ``safetensors``, ``savefig``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix or ".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextmanager
def atomic_directory(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Build a whole folder under a temporary name, then rename it into place.

    If the block raises, the temporary folder is removed and ``path`` is untouched. An existing
    ``path`` is an error unless ``overwrite`` is set (then it is replaced only on success).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another output folder or remove it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_yaml(path: str | os.PathLike[str], error: type[Exception], hint: str = "") -> Any:
    """Parse a YAML file, raising ``error`` that names the file when it is missing or malformed."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise error(f"{path} does not exist{'; ' + hint if hint else ''}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML ({exc})") from exc
