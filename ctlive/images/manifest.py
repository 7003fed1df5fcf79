"""The manifest of a dump directory: per file its size and digest (for pages files, a
digest over the per-page XXH64 hashes)."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Any

import attrs

from ctlive.errors import StorageError, map_os_errors
from ctlive.images import pagediff
from ctlive.images.criu_format import PAGE_SIZE
from ctlive.images.layout import DEFAULT_WINDOW_PAGES, MappedFile, pagemaps, pages_files

__all__ = [
    "Manifest",
    "bytes_digest",
    "hash_file_pages",
    "manifest",
    "pages_digest",
]


@attrs.frozen
class Manifest:
    """The expected content of a dump directory: per file, size and digest; for
    pages files the digest is over the per-page XXH64 hashes."""

    files: dict[str, dict[str, Any]]

    def to_json(self) -> bytes:
        """Canonical JSON."""
        return json.dumps(self.files, sort_keys=True, separators=(",", ":")).encode()


def hash_file_pages(path: pathlib.Path) -> bytes:
    """Per-page XXH64 hashes of a pages file, window by window (bounded RSS)."""
    m = MappedFile(path)
    try:
        total = m.size // PAGE_SIZE
        out = bytearray()
        for start in range(0, total, DEFAULT_WINDOW_PAGES):
            count = min(DEFAULT_WINDOW_PAGES, total - start)
            view = memoryview(m.buf)[start * PAGE_SIZE : (start + count) * PAGE_SIZE]
            out += pagediff.page_hashes(view).tobytes()
            view.release()
            m.drop(start, count)
        return bytes(out)
    finally:
        m.close()


def pages_digest(size: int, hashes: bytes) -> dict[str, Any]:
    """Manifest entry of a pages file of ``size`` bytes, from its per-page hashes."""
    return {"size": size, "page_hashes": hashlib.blake2b(hashes).hexdigest()}


def bytes_digest(data: bytes) -> dict[str, Any]:
    """Manifest entry of any other file, from its content."""
    return {"size": len(data), "blake2b": hashlib.blake2b(data).hexdigest()}


def _file_digest(path: pathlib.Path, pages: bool,
                 hashes: dict[str, bytes] | None = None) -> dict[str, Any]:
    size = path.stat().st_size
    if pages and size % PAGE_SIZE == 0 and size:
        h = hashes.get(path.name) if hashes is not None else None
        if h is None:
            h = hash_file_pages(path)
            if hashes is not None:
                hashes[path.name] = h
        return pages_digest(size, h)
    d = hashlib.blake2b()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            d.update(chunk)
    return {"size": size, "blake2b": d.hexdigest()}


def manifest(d: str | os.PathLike[str], hashes: dict[str, bytes] | None = None) -> Manifest:
    """The manifest of a dump directory. ``hashes`` (pages file -> per-page hashes)
    supplies hashes known to be current and receives the ones computed."""
    with map_os_errors(StorageError, f"reading {d}"):
        root = pathlib.Path(d)
        pages = pages_files(pagemaps(root))
        files = {}
        for p in sorted(root.iterdir()):
            if p.is_file() and not p.name.endswith(".log"):
                files[p.name] = _file_digest(p, p.name in pages, hashes)
        return Manifest(files)
