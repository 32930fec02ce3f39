"""A model bundle's layout and its manifest: which files a bundle holds, their sha256 and size.

``hashes.json`` is the manifest: the bundle format and version, and for each of
``backbone.safetensors``, ``fusion.safetensors`` and ``bundle.json`` its sha256 and size, plus a
digest of all that (the bundle id). Its text is canonical, so a manifest that was edited by hand
or written by anything else is noticed. A manifest alone proves only that nothing was damaged —
anyone can recompute it — so the centre signs it (``signature.json``, see
:mod:`cldlr.common.bundle.signing`). A bundle holds exactly these files: a missing or an extra
one is an error, never a warning.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cldlr.common.errors import CldlrError

FORMAT = "cldlr-bundle"
FORMAT_VERSION = 2  # 2: the manifest records sizes and the format, and the bundle is signed
BACKBONE_FILE = "backbone.safetensors"
FUSION_FILE = "fusion.safetensors"
META_FILE = "bundle.json"
HASHES_FILE = "hashes.json"
SIGNATURE_FILE = "signature.json"
HASHED_FILES = (BACKBONE_FILE, FUSION_FILE, META_FILE)
BUNDLE_FILES = (*HASHED_FILES, HASHES_FILE, SIGNATURE_FILE)
MAX_FILE_SIZE = 1 << 40  # 1 TiB: a manifest that claims more is not a cldlr bundle


class BundleError(CldlrError):
    """A model bundle is missing, damaged, edited, unsigned, untrusted or from an incompatible cldlr version."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def manifest_text(files: Mapping[str, tuple[str, int]]) -> str:
    """Canonical ``hashes.json`` for ``{name: (sha256, size)}``: format, files and their digest (the bundle id)."""
    body = {"format": FORMAT, "format_version": FORMAT_VERSION,
            "files": {name: {"sha256": sha, "size": size} for name, (sha, size) in sorted(files.items())}}
    digest = hashlib.sha256(_canonical(body)).hexdigest()
    return json.dumps({"algorithm": "sha256", "digest": digest, **body}, indent=2, sort_keys=True) + "\n"


def manifest_of(folder: Path) -> str:
    """The manifest of the bundle files in ``folder`` as they are now (what an exporter writes)."""
    return manifest_text({name: (sha256_file(folder / name), (folder / name).stat().st_size) for name in HASHED_FILES})


@dataclass(frozen=True)
class Manifest:
    """A parsed, canonical manifest: its exact bytes (what the signature covers) and the bundle id."""

    text: bytes
    bundle_id: str
    files: dict[str, tuple[str, int]]


def _parse_manifest(path: Path) -> Manifest:
    where = path / HASHES_FILE
    damaged = BundleError(f"{where}: damaged or edited (not the canonical manifest of {', '.join(HASHED_FILES)}: "
                          "sha256, size and digest); do not use this bundle — export it again")
    try:
        raw = where.read_bytes()
        doc = json.loads(raw.decode("utf-8"))
        entries = doc["files"]
        files = {str(n): (str(e["sha256"]), e["size"]) for n, e in entries.items()}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        raise damaged from None
    if doc.get("format") == FORMAT and doc.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{where}: bundle format v{doc.get('format_version')!r}; this cldlr reads {FORMAT} "
                          f"v{FORMAT_VERSION} — export the bundle again with this version")
    for name, (_, size) in files.items():
        if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= MAX_FILE_SIZE:
            raise BundleError(f"{where}: files.{name}.size must be a positive whole number of bytes, got {size!r}")
    if set(files) != set(HASHED_FILES) or manifest_text(files).encode() != raw:
        raise damaged
    return Manifest(raw, str(doc["digest"]), files)


def check_files(path: str | Path) -> Manifest:
    """Every file present, none extra, each of the size and sha256 the manifest says; returns the manifest.

    ``signature.json`` is the one file the manifest does not list (it signs the manifest); whether
    it must be there is the signature check's business.
    """
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"{path}: no such model bundle folder (export one with a study run: <run>/model)")
    if not (path / HASHES_FILE).is_file():
        raise BundleError(f"{path / HASHES_FILE}: missing; the bundle is incomplete — export it again")
    manifest = _parse_manifest(path)
    for name in HASHED_FILES:
        if not (path / name).is_file():
            raise BundleError(f"{path / name}: missing from the bundle; export it again")
    extra = sorted(p.name for p in path.iterdir() if p.name not in BUNDLE_FILES or not p.is_file())
    if extra:
        raise BundleError(f"{path / extra[0]}: not part of the bundle (extra: {', '.join(extra)}); a bundle holds only "
                          f"{', '.join(BUNDLE_FILES)} — do not use a bundle someone added files to; export it again")
    for name, (sha, size) in manifest.files.items():
        file = path / name
        if file.stat().st_size != size or sha256_file(file) != sha:
            raise BundleError(f"{file}: size or sha256 does not match {HASHES_FILE}; the file was modified or "
                              "damaged — do not use this bundle, export it again")
    return manifest


__all__ = ["BACKBONE_FILE", "BUNDLE_FILES", "BundleError", "FORMAT", "FORMAT_VERSION",
           "FUSION_FILE", "HASHED_FILES", "HASHES_FILE", "META_FILE", "Manifest", "SIGNATURE_FILE", "check_files",
           "manifest_of", "manifest_text", "sha256_file"]
