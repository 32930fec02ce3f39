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
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path, PurePath
from typing import Any

import numpy as np

from cldlr.common.errors import CldlrError

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
    """Build a whole folder under a temporary name beside ``path``, then rename it into place.

    If the block raises, the temporary folder is removed and ``path`` is untouched. An existing
    ``path`` is an error unless ``overwrite`` is set; then it is replaced only on success, by
    renames: the old folder is moved aside, the new one moved in, and only then the old one is
    removed (a crash in between leaves either folder whole under ``path``, never a mix or nothing).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another output folder or remove it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield tmp
        if path.exists() or path.is_symlink():
            aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, aside / path.name)  # the old folder aside, on the same file system
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(aside / path.name, path)  # put the old folder back
                shutil.rmtree(aside, ignore_errors=True)
                raise
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def contained_path(root: str | os.PathLike[str], *parts: str) -> Path:
    """``root/parts…``, resolved, or :class:`CldlrError` when it would leave ``root``.

    Every path built from data (an id as a file name, a site name as a folder) goes through here,
    so ``..``, an absolute name or a symbolic link cannot make a read or a write land elsewhere.
    """
    base = Path(root).resolve()
    target = base.joinpath(*parts).resolve()
    if target == base or not target.is_relative_to(base):
        raise CldlrError(f"{'/'.join(parts)!r} would leave {root}: a name taken from the data must be a plain "
                         "file name inside its folder (letters, digits, '.', '_', '-')")
    return target


def check_output_apart(output: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str] | None]) -> Path:
    """Refuse an output that is, contains or lies inside any input (a site, a bundle, a config or key file).

    Replacing such an output (``--force``) would delete the input, and writing inside an input
    changes it; the check compares resolved paths, so links and ``..`` are seen through.
    """
    out = Path(output).resolve()
    for given in inputs:
        if given is None:
            continue
        source = Path(given).resolve()
        if out == source:
            raise CldlrError(f"output {output} is the input {given}; choose an output folder apart from every input")
        if source.is_relative_to(out):
            raise CldlrError(f"output {output} contains the input {given}; replacing it would delete the input: "
                             "choose an output folder apart from every input")
        if out.is_relative_to(source):
            raise CldlrError(f"output {output} lies inside the input {given}; writing there would change the input: "
                             "choose an output folder apart from every input")
    return out


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
