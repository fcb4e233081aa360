"""Downloading model weights with a progress bar: single files by URL (resumed from a `.part`
file with an HTTP Range request), Hugging Face files and repositories through huggingface_hub
(which shows its own bars and resumes its own partial files), each file checked against the
SHA256 the model reference gives, where it gives one."""

from __future__ import annotations

import hashlib
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import httpx
from tqdm import tqdm

CHUNK_BYTES = 1024 * 1024
TIMEOUT_SECONDS = 60.0


class PullError(Exception):
    """A download that failed or a file that is not what the reference says; the message says
    which and what to do."""


def file_sha256(path: Path, progress: bool = True) -> str:
    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f, _bar(size, f"checking {path.name}", progress) as bar:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _bar(total: int | None, desc: str, progress: bool, initial: int = 0) -> tqdm:
    return tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True,
                unit_divisor=1024, file=sys.stderr, disable=not progress, leave=True)


def verify(path: Path, sha256: str | None, progress: bool = True) -> None:
    """Check `path` against `sha256` (when given); a file that does not match is removed."""
    if sha256 is None:
        return
    actual = file_sha256(path, progress)
    if actual != sha256.lower():
        path.unlink()
        raise PullError(f"{path.name}: its SHA256 is {actual}, the model reference says "
                        f"{sha256.lower()}; the file was removed (run the command again to "
                        "download it afresh)")


def download_url(url: str, dest: Path, sha256: str | None = None, progress: bool = True,
                 timeout: float = TIMEOUT_SECONDS, headers: dict | None = None) -> Path:
    """Download `url` to `dest`. Bytes arrive in `dest.part`; an interrupted download is
    resumed from where the part ends (a server that ignores Range sends it all again), and
    only a complete, verified file is renamed to `dest`."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    # Byte offsets are the file's own: no compression on the way.
    request_headers = {"Accept-Encoding": "identity", **(headers or {})}
    if offset:
        request_headers["Range"] = f"bytes={offset}-"
    try:
        with httpx.stream("GET", url, headers=request_headers, timeout=timeout,
                          follow_redirects=True) as r:
            if r.status_code == 416 and offset:
                # Nothing after the part's end: it is complete when the server says so.
                if r.headers.get("content-range", "") != f"bytes */{offset}":
                    part.unlink()
                    raise PullError(f"{url}: the partial download does not fit the file on the "
                                    "server any more; it was removed: run the command again")
                total = offset
            elif r.status_code in (200, 206):
                if r.status_code == 206 and not r.headers.get("content-range", "").startswith(
                        f"bytes {offset}-"):
                    raise PullError(f"{url}: the server resumed from the wrong place "
                                    f"({r.headers.get('content-range')!r})")
                if r.status_code == 200:
                    offset = 0  # the server sends the whole file
                length = r.headers.get("content-length")
                total = offset + int(length) if length and length.isdigit() else None
                with open(part, "ab" if offset else "wb") as f, \
                        _bar(total, dest.name, progress, offset) as bar:
                    for chunk in r.iter_bytes():  # as received: a cut keeps what came
                        f.write(chunk)
                        bar.update(len(chunk))
            else:
                raise PullError(f"{url}: HTTP {r.status_code}")
    except httpx.HTTPError as e:
        have = part.stat().st_size if part.exists() else 0
        raise PullError(f"{url}: interrupted after {have} bytes ({type(e).__name__}); run the "
                        "command again to resume") from None
    have = part.stat().st_size
    if total is not None and have != total:
        raise PullError(f"{url}: interrupted after {have} of {total} bytes; run the command "
                        "again to resume")
    verify(part, sha256, progress)
    os.replace(part, dest)
    return dest


def download_hub_file(repo_id: str, filename: str, revision: str, dest: Path,
                      sha256: str | None = None) -> Path:
    """A file of a Hugging Face repository, saved as `dest` and checked against `sha256`."""
    from huggingface_hub import hf_hub_download

    dest.parent.mkdir(parents=True, exist_ok=True)
    with hub_errors(f"{repo_id}/{filename}"):
        path = Path(hf_hub_download(repo_id, filename, revision=revision, local_dir=dest.parent))
    if path != dest:  # a file in a folder of the repository, saved under the reference's name
        os.replace(path, dest)
        for folder in path.parents:  # the repository's folders it leaves empty
            if folder == dest.parent or any(folder.iterdir()):
                break
            folder.rmdir()
    verify(dest, sha256)
    return dest


def download_hub_repo(repo_id: str, local_dir: Path | None = None,
                      allow_patterns: list[str] | None = None) -> Path:
    """A Hugging Face repository (the files matching `allow_patterns`): into `local_dir`, or
    into the Hugging Face cache (where `from_pretrained` finds it) when None."""
    from huggingface_hub import snapshot_download

    with hub_errors(repo_id):
        return Path(snapshot_download(repo_id, local_dir=local_dir, allow_patterns=allow_patterns))


@contextmanager
def hub_errors(what: str):
    """Errors of huggingface_hub (and of the disk) as a PullError naming `what`."""
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        yield
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        raise PullError(f"{what}: {type(e).__name__}: {e}; run the command again to resume") \
            from None
