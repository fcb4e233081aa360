"""`rayhorde models refresh`: download the AI Horde's published model reference files, read
them (published.py) and write the facts rayhorde uses in its own format (reference.py) into
the reference folder, with a manifest (`pinned.json`) of the sources. Both sources are
downloaded and read before anything is written, so a failed refresh (no network, a truncated
or malformed file) leaves the folder as it was. The same sources give the same bytes."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import httpx

from models.reference.published import parse_published
from models.reference.reference import (
    DATA_DIR,
    FILES,
    MANIFEST_FILE,
    PUBLISHED_URLS,
    ReferenceError,
    dump_models,
    read_models,
)

MAX_REFERENCE_BYTES = 64 * 1024 * 1024  # the text reference is about 1 MB today
TIMEOUT_SECONDS = 30.0
# What the manifest knows of a source beyond its URL and hash (its repository's commit,
# written by whoever pinned it): kept while the source's bytes are the same.
SOURCE_FACTS = ("commit", "committed")


def download(url: str, timeout: float = TIMEOUT_SECONDS) -> bytes:
    """The body at `url`, at most MAX_REFERENCE_BYTES; ReferenceError saying what failed."""
    try:
        with httpx.stream("GET", url, timeout=timeout, follow_redirects=True) as r:
            if r.status_code != 200:
                raise ReferenceError(f"{url}: HTTP {r.status_code}")
            data = bytearray()
            for chunk in r.iter_bytes():
                data += chunk
                if len(data) > MAX_REFERENCE_BYTES:
                    raise ReferenceError(f"{url}: larger than {MAX_REFERENCE_BYTES} bytes")
            return bytes(data)
    except httpx.HTTPError as e:
        raise ReferenceError(f"{url}: cannot download ({type(e).__name__}: {e})") from None


def refresh(dest: str | Path = DATA_DIR, urls: dict[str, str] | None = None,
            timeout: float = TIMEOUT_SECONDS) -> dict[str, dict]:
    """Download the image and text references from `urls` (default: where they are published)
    and write them into `dest` (write_reference). Returns the manifest; raises ReferenceError
    before writing anything when either cannot be downloaded or read."""
    urls = {**PUBLISHED_URLS, **(urls or {})}
    return write_reference(dest, {kind: (urls[kind], download(urls[kind], timeout))
                                  for kind in ("image", "text")})


def write_reference(dest: str | Path, sources: dict[str, tuple[str, bytes]]) -> dict[str, dict]:
    """The published image and text files in `sources` (kind: (url, bytes)) as rayhorde's files
    in `dest`, with the manifest: per kind, the file written, its SHA256 and model count, and
    the source's URL and SHA256."""
    dest = Path(dest)
    written: dict[str, bytes] = {}
    counts: dict[str, int] = {}
    for kind in ("image", "text"):
        url, data = sources[kind]
        try:
            written[kind] = dump_models(parse_published(kind, data).values())
            counts[kind] = len(read_models(kind, written[kind]))  # what is written reads back
        except ReferenceError as e:
            raise ReferenceError(f"{url}: {e}") from None
    manifest_path = dest / MANIFEST_FILE
    old = _old_manifest(manifest_path)
    manifest = {}
    for kind, (url, data) in sources.items():
        sha256 = hashlib.sha256(data).hexdigest()
        kept = {k: old[kind][k] for k in SOURCE_FACTS
                if old.get(kind, {}).get("sha256") == sha256 and k in old[kind]}
        manifest[kind] = {"file": FILES[kind], "models": counts[kind],
                          "file_sha256": hashlib.sha256(written[kind]).hexdigest(),
                          "url": url, "sha256": sha256, **kept}
    dest.mkdir(parents=True, exist_ok=True)
    for kind, data in written.items():
        _write_atomically(dest / FILES[kind], data)
    _write_atomically(manifest_path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return manifest


def _old_manifest(path: Path) -> dict:
    try:
        old = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return old if isinstance(old, dict) and all(isinstance(v, dict) for v in old.values()) else {}


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
