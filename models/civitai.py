"""A small client for CivitAI's public REST API, and the disk cache of the files it fetches.

The AI Horde names LoRAs and textual inversions by CivitAI model id, model-version id or
model name; the worker turns such a name into one file:

    GET /api/v1/models/{id}            -> {id, name, type, nsfw, modelVersions: [newest first]}
    GET /api/v1/model-versions/{id}    -> {id, modelId, baseModel, trainedWords, files,
                                           model: {name, type, nsfw}}
    GET /api/v1/models?query=NAME&types=LORA|TextualInversion -> {items: [model...], metadata}

Each version's `files[]` entry has `name`, `type` ("Model" for the weights), `sizeKB`,
`primary`, `hashes.SHA256` (upper-case hex) and `downloadUrl`. We take the version's primary
.safetensors file (never a pickle), refuse it above `max_file_bytes` both from its declared
size and while streaming it, and keep it only if its SHA-256 matches.

Cache layout under `cache_dir`:
    files/<sha256>.safetensors   content-addressed; mtime = last use (LRU eviction)
    meta/<key>.json              what a model id / version id / name resolved to
A version id always means the same file, so its record never expires; a model id or a name
can move to a newer version, so their records are trusted for `meta_ttl_s` only. A lookup
whose record and file are both present makes no HTTP call at all.

The optional API token goes in an `Authorization: Bearer` header (httpx drops it when a
download redirects to another host, i.e. the CDN) and is never logged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import httpx

log = logging.getLogger(__name__)

Kind = Literal["lora", "ti"]

# CivitAI model types accepted per adapter kind, and the one to search with.
MODEL_TYPES: dict[str, tuple[str, ...]] = {"lora": ("LORA", "LoCon", "DoRA"), "ti": ("TextualInversion",)}
SEARCH_TYPE = {"lora": "LORA", "ti": "TextualInversion"}

# CivitAI `baseModel` -> the horde baseline whose pipelines can load it (None: neither).
_SD1 = ("SD 1.4", "SD 1.5", "SD 1.5 LCM", "SD 1.5 Hyper")
_SDXL = ("SDXL 0.9", "SDXL 1.0", "SDXL 1.0 LCM", "SDXL Turbo", "SDXL Lightning", "SDXL Hyper",
         "Pony", "Illustrious", "NoobAI")
BASELINES: dict[str, str] = {**{b: "stable_diffusion_1" for b in _SD1},
                             **{b: "stable_diffusion_xl" for b in _SDXL}}

MAX_JSON_BYTES = 8 << 20  # a model with hundreds of versions is ~1 MB; anything more is not an answer
MAX_TRIGGERS = 32  # trained words kept per version, each cut to MAX_TEXT characters
MAX_TEXT = 255
_CHUNK = 1 << 20
_SHA = re.compile(r"^[0-9a-f]{64}$")


class CivitaiError(Exception):
    """The API could not give a usable file (network, HTTP error, unexpected answer)."""


class CivitaiNotFound(CivitaiError):
    """No model / version / search result of the wanted kind."""


class CivitaiRefused(CivitaiError):
    """A file we will not use: too large, no safetensors, no or wrong SHA-256."""


def baseline_of(base_model: str) -> str | None:
    return BASELINES.get(base_model)


@dataclass(frozen=True)
class CivitaiFile:
    """One version's primary .safetensors file, as the API describes it."""

    kind: str
    model_id: int
    version_id: int
    model_name: str
    file_name: str
    download_url: str
    sha256: str  # lower-case hex
    size_bytes: int
    base_model: str
    nsfw: bool
    trained_words: tuple[str, ...] = field(default_factory=tuple)

    @property
    def baseline(self) -> str | None:
        return baseline_of(self.base_model)


def _text(value: object, limit: int = MAX_TEXT) -> str:
    return str(value or "")[:limit]


def _pick_file(kind: str, version: dict, model: dict) -> CivitaiFile:
    """The version's primary .safetensors weights file (the first .safetensors one when none
    is marked primary)."""
    files = [f for f in version.get("files") or [] if isinstance(f, dict)
             and f.get("type", "Model") == "Model"
             and (str(f.get("name", "")).endswith(".safetensors")
                  or (f.get("metadata") or {}).get("format") == "SafeTensor")]
    if not files:
        raise CivitaiRefused(f"version {version.get('id')} has no .safetensors file")
    f = next((f for f in files if f.get("primary")), files[0])
    sha = str((f.get("hashes") or {}).get("SHA256", "")).lower()
    if not _SHA.match(sha):
        raise CivitaiRefused(f"version {version.get('id')}: no SHA256 published for {f.get('name')!r}")
    url = str(f.get("downloadUrl") or version.get("downloadUrl") or "")
    if not url.startswith(("https://", "http://")):
        raise CivitaiRefused(f"version {version.get('id')}: no download URL")
    words = [_text(w) for w in (version.get("trainedWords") or [])[:MAX_TRIGGERS] if str(w).strip()]
    try:
        return CivitaiFile(
            kind=kind, model_id=int(version.get("modelId") or model.get("id")), version_id=int(version["id"]),
            model_name=_text(model.get("name")), file_name=_text(f.get("name")), download_url=url,
            sha256=sha, size_bytes=int(float(f.get("sizeKB") or 0) * 1024), base_model=_text(version.get("baseModel"), 64),
            nsfw=bool(model.get("nsfw", False)), trained_words=tuple(words))
    except (KeyError, TypeError, ValueError) as e:
        raise CivitaiError(f"unexpected model-version answer: {e}") from None


class CivitaiClient:
    """Resolve CivitAI names to cached, verified files. Thread-safe: two threads wanting the
    same file download it once."""

    def __init__(self, cache_dir: str | Path, *, base_url: str = "https://civitai.com",
                 budget_bytes: int = 10 << 30, max_file_bytes: int = 400 << 20, token: str | None = None,
                 timeout: float = 30.0, meta_ttl_s: float = 24 * 3600, transport: httpx.BaseTransport | None = None):
        self.root = Path(cache_dir)
        self.files_dir, self.meta_dir = self.root / "files", self.root / "meta"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.meta_dir.mkdir(parents=True, exist_ok=True)
        self.budget_bytes, self.max_file_bytes, self.meta_ttl_s = budget_bytes, max_file_bytes, meta_ttl_s
        headers = {"User-Agent": "rayhorde-worker"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        # Every call has a connect and a per-read timeout; a stalled download fails, not hangs.
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, follow_redirects=True,
                                 timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)), transport=transport)
        self._lock = threading.Lock()
        self._file_locks: dict[str, threading.Lock] = {}

    def close(self) -> None:
        self.http.close()

    # -- API -------------------------------------------------------------------------------

    def _get_json(self, path: str, params: dict | None = None) -> dict:
        try:
            with self.http.stream("GET", path, params=params) as r:
                if r.status_code == 404:
                    raise CivitaiNotFound(f"{path}: not found")
                if r.status_code != 200:
                    raise CivitaiError(f"{path}: HTTP {r.status_code}")
                body = bytearray()
                for chunk in r.iter_bytes():
                    body += chunk
                    if len(body) > MAX_JSON_BYTES:
                        raise CivitaiError(f"{path}: answer over {MAX_JSON_BYTES} bytes")
            data = json.loads(body)
        except httpx.HTTPError as e:
            raise CivitaiError(f"{path}: {type(e).__name__}") from None
        except ValueError:
            raise CivitaiError(f"{path}: not JSON") from None
        if not isinstance(data, dict):
            raise CivitaiError(f"{path}: not a JSON object")
        return data

    def _check_type(self, kind: str, model: dict, what: str) -> None:
        if model.get("type") not in MODEL_TYPES[kind]:
            raise CivitaiNotFound(f"{what} is a {model.get('type')!r}, not a {kind}")

    def lookup(self, kind: Kind, name: str | int, is_version: bool = False) -> CivitaiFile:
        """Ask the API which file `name` means: a version id (`is_version`), else a model id
        (all digits) or a model name (search; an exact, case-insensitive name match wins over
        the search's first result). The model's newest version is used."""
        name = str(name).strip()[:MAX_TEXT]
        numeric = name.isascii() and name.isdigit()  # "²".isdigit() is True, int("²") fails
        if is_version:
            if not numeric:
                raise CivitaiNotFound(f"version ids are numbers, not {name!r}")
            v = self._get_json(f"/api/v1/model-versions/{int(name)}")
            model = v.get("model") or {}
            self._check_type(kind, model, f"version {name}")
            return _pick_file(kind, v, model)
        if numeric:
            model = self._get_json(f"/api/v1/models/{int(name)}")
            self._check_type(kind, model, f"model {name}")
        else:
            found = self._get_json("/api/v1/models", {"query": name, "types": SEARCH_TYPE[kind], "limit": 20})
            items = [m for m in (found.get("items") or [])[:100]
                     if isinstance(m, dict) and m.get("type") in MODEL_TYPES[kind]]
            if not items:
                raise CivitaiNotFound(f"no {kind} named {name!r}")
            model = next((m for m in items if str(m.get("name", "")).lower() == name.lower()), items[0])
        versions = [v for v in (model.get("modelVersions") or []) if isinstance(v, dict)]
        if not versions:
            raise CivitaiNotFound(f"model {model.get('id')} has no versions")
        return _pick_file(kind, versions[0], model)

    # -- cache -----------------------------------------------------------------------------

    def _meta_path(self, kind: str, name: str, is_version: bool) -> Path:
        if is_version:
            key = f"{kind}-v{int(name)}"
        elif name.isascii() and name.isdigit():
            key = f"{kind}-m{int(name)}"
        else:
            key = f"{kind}-q{hashlib.sha1(name.lower().encode()).hexdigest()[:20]}"
        return self.meta_dir / f"{key}.json"

    def _read_meta(self, path: Path, expires: bool) -> CivitaiFile | None:
        try:
            rec = json.loads(path.read_text())
            if expires and time.time() - rec.pop("fetched_at", 0) > self.meta_ttl_s:
                return None
            rec.pop("fetched_at", None)
            rec["trained_words"] = tuple(rec.get("trained_words", ()))
            return CivitaiFile(**rec)
        except (OSError, ValueError, TypeError):
            return None

    def _write_meta(self, path: Path, info: CivitaiFile) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.meta_dir, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({**asdict(info), "fetched_at": time.time()}, f)
        os.replace(tmp, path)

    def file_path(self, sha256: str) -> Path:
        return self.files_dir / f"{sha256}.safetensors"

    def fetch_meta(self, kind: Kind, name: str | int, is_version: bool = False) -> CivitaiFile:
        """What `name` means, from the cache's record when it is fresh, else from the API
        (and then recorded). Downloads nothing."""
        name = str(name).strip()[:MAX_TEXT]
        if is_version and not (name.isascii() and name.isdigit()):
            raise CivitaiNotFound(f"version ids are numbers, not {name!r}")
        meta = self._meta_path(kind, name, is_version)
        info = self._read_meta(meta, expires=not is_version)
        if info is None:
            info = self.lookup(kind, name, is_version)
            self._write_meta(meta, info)
            self._write_meta(self._meta_path(kind, str(info.version_id), True), info)
        return info

    def fetch(self, kind: Kind, name: str | int, is_version: bool = False) -> tuple[CivitaiFile, Path]:
        """The file `name` means, from the cache when we have it (marked as just used), else
        looked up and downloaded."""
        info = self.fetch_meta(kind, name, is_version)
        return info, self.download(info)

    def download(self, info: CivitaiFile) -> Path:
        """`info`'s file in the cache: touched if present, else streamed to a temporary file,
        checked (size, SHA-256) and renamed into place."""
        if info.size_bytes > self.max_file_bytes:
            raise CivitaiRefused(f"{info.file_name}: {info.size_bytes} bytes declared, limit {self.max_file_bytes}")
        with self._lock:
            lock = self._file_locks.setdefault(info.sha256, threading.Lock())
        with lock:
            path = self.file_path(info.sha256)
            if path.exists():
                os.utime(path)
                return path
            self.evict(incoming=info.size_bytes, keep=set())
            self._stream(info, path)
            os.utime(path)
            self.evict(incoming=0, keep={path})
            return path

    def _stream(self, info: CivitaiFile, path: Path) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.files_dir, prefix=".dl-", suffix=".part")
        digest, size = hashlib.sha256(), 0
        try:
            with os.fdopen(fd, "wb") as out, self.http.stream("GET", info.download_url) as r:
                if r.status_code in (401, 403):
                    raise CivitaiError(f"{info.file_name}: HTTP {r.status_code} (the file may need an API token)")
                if r.status_code != 200:
                    raise CivitaiError(f"{info.file_name}: HTTP {r.status_code}")
                declared = r.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > self.max_file_bytes:
                    raise CivitaiRefused(f"{info.file_name}: {declared} bytes sent, limit {self.max_file_bytes}")
                for chunk in r.iter_bytes(_CHUNK):
                    size += len(chunk)
                    if size > self.max_file_bytes:
                        raise CivitaiRefused(f"{info.file_name}: over {self.max_file_bytes} bytes")
                    digest.update(chunk)
                    out.write(chunk)
            if digest.hexdigest() != info.sha256:
                raise CivitaiRefused(f"{info.file_name}: SHA256 {digest.hexdigest()} != published {info.sha256}")
            os.replace(tmp, path)
            log.info("civitai: downloaded %s (version %d, %d bytes)", info.file_name, info.version_id, size)
        except httpx.HTTPError as e:
            raise CivitaiError(f"{info.file_name}: download failed ({type(e).__name__})") from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def cached_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files_dir.glob("*.safetensors"))

    def evict(self, incoming: int = 0, keep: set[Path] = frozenset()) -> list[Path]:
        """Delete least recently used files until the cache plus `incoming` bytes fits the
        budget (never those in `keep`). Returns what was deleted."""
        files = []
        for p in self.files_dir.glob("*.safetensors"):
            try:
                st = p.stat()
            except FileNotFoundError:  # another process evicted it meanwhile
                continue
            files.append((st.st_mtime, st.st_size, p))
        total = sum(s for _, s, _ in files) + incoming
        gone = []
        for _, size, p in sorted(files, key=lambda f: f[0]):
            if total <= self.budget_bytes:
                break
            if p in keep:
                continue
            p.unlink(missing_ok=True)
            total -= size
            gone.append(p)
            log.info("civitai: evicted %s (%d bytes)", p.name, size)
        if total > self.budget_bytes and incoming:
            raise CivitaiRefused(f"{incoming} bytes do not fit the {self.budget_bytes}-byte adapter cache")
        return gone
