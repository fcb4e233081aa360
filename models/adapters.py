"""LoRAs and textual inversions (TIs): the adapter catalog, request specs, and name resolution.

A job names adapters as the AI Horde does (`loras: [{name, model, clip, inject_trigger,
is_version}]`, `tis: [{name, inject_ti, strength}]`). Names resolve to one local
.safetensors file each:

- names in the catalog (`configs/adapters.yaml`, see `AdapterCatalog`) resolve through their
  source: a built-in tiny adapter (written once under the cache dir, then loaded from that file
  exactly like a downloaded one), a local file, a Hugging Face file, or a CivitAI id;
- other names go to CivitAI only when the catalog sets `allow_downloads` (ad-hoc names:
  model id, version id with `is_version`, or a model name to search for).

This module imports neither torch nor diffusers, so the API can call `check_request` to turn
unknown names into 400s cheaply. Loading adapters into a pipeline is in
`models/adapter_loading.py`; `apply_adapters` here only forwards to it.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Baseline = Literal["stable_diffusion_1", "stable_diffusion_xl"]
AdapterKind = Literal["lora", "ti"]
MAX_LORAS = 5  # per job, as on the AI Horde
MAX_TIS = 20
_NAME = Field(min_length=1, max_length=255)
_STRENGTH = Field(default=1.0, ge=-5.0, le=5.0)


# -- errors ----------------------------------------------------------------------------------

class AdapterError(Exception):
    """An adapter a job cannot use. `metadata` is the AI Horde gen_metadata value to report
    (`{"type": "lora"|"ti", "value": ..., "ref": name}`); strict horde clients know no others."""

    metadata = "download_failed"

    def __init__(self, name: str, reason: str = ""):
        super().__init__(f"{name}: {reason}" if reason else name)
        self.name, self.reason = name, reason


class AdapterNotFound(AdapterError):
    """Not in the catalog (and downloads are off), or CivitAI has no such adapter."""


class AdapterMismatch(AdapterError):
    """Made for another baseline (an SDXL LoRA on an SD 1.5 model), or another kind."""

    metadata = "baseline_mismatch"


class AdapterRefused(AdapterError):
    """Exists but is not used: NSFW on a SFW worker, too large, wrong hash, download failed."""


class AdapterLoadFailed(AdapterError):
    """The file is there but diffusers could not load it into the pipeline."""

    metadata = "parse_failed"


# -- catalog ---------------------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BuiltinSource(_Strict):
    kind: Literal["builtin"]
    path: str = Field(description="a name in models.tiny_adapters.BUILTIN_ADAPTERS")


class FileSource(_Strict):
    kind: Literal["file"]
    path: str

    @field_validator("path")
    @classmethod
    def _safetensors(cls, v: str) -> str:
        if not v.endswith(".safetensors"):
            raise ValueError("adapter files must be .safetensors (pickles can run code)")
        return v


class HuggingfaceSource(_Strict):
    kind: Literal["huggingface"]
    repo: str
    filename: str
    revision: str | None = None


class CivitaiSource(_Strict):
    kind: Literal["civitai"]
    id: int = Field(gt=0, description="model id, or version id when is_version")
    is_version: bool = False


Source = Annotated[Union[BuiltinSource, FileSource, HuggingfaceSource, CivitaiSource], Field(discriminator="kind")]


class AdapterEntry(_Strict):
    name: str = _NAME
    kind: AdapterKind
    baseline: Baseline
    source: Source
    triggers: list[str] = Field(default=[], max_length=64)  # trained words, for inject_trigger
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")
    nsfw: bool = False

    @field_validator("sha256")
    @classmethod
    def _lower(cls, v: str | None) -> str | None:
        return v.lower() if v else v


class AdapterCatalog(_Strict):
    adapters: list[AdapterEntry] = []
    allow_downloads: bool = False  # ad-hoc CivitAI names (not listed here) allowed
    cache_dir: str = "./data/adapters"
    cache_budget_bytes: int = Field(default=10 << 30, gt=0)  # 10 GiB of downloaded files
    max_file_bytes: int = Field(default=400 << 20, gt=0)  # 400 MiB per file
    civitai_url: str = "https://civitai.com"
    max_loras_per_pipeline: int = Field(default=8, ge=MAX_LORAS)  # LoRAs held in memory, LRU
    max_tis_per_pipeline: int = Field(default=32, ge=MAX_TIS)

    @model_validator(mode="after")
    def _unique(self) -> "AdapterCatalog":
        seen: set[tuple[str, str]] = set()
        for a in self.adapters:
            if (a.kind, a.name) in seen:
                raise ValueError(f"{a.kind} {a.name!r} listed twice")
            seen.add((a.kind, a.name))
        return self

    def get(self, kind: str, name: str, is_version: bool = False) -> AdapterEntry | None:
        """The entry called `name`, or the one whose CivitAI source has that id (so a request
        naming a listed CivitAI LoRA by its number still resolves locally)."""
        for a in self.adapters:
            if a.kind != kind:
                continue
            if a.name == name and not is_version:
                return a
            s = a.source
            if isinstance(s, CivitaiSource) and str(s.id) == name and s.is_version == is_version:
                return a
        return None


def load_adapter_catalog(path: str | Path) -> AdapterCatalog:
    with open(path) as f:
        return AdapterCatalog.model_validate(yaml.safe_load(f) or {})


# -- request specs ---------------------------------------------------------------------------

class LoraSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = _NAME
    model: float = _STRENGTH
    clip: float = _STRENGTH
    inject_trigger: str | None = Field(default=None, max_length=255)
    is_version: bool = False

    @model_validator(mode="after")
    def _version_is_number(self) -> "LoraSpec":
        if self.is_version and not (self.name.strip().isascii() and self.name.strip().isdigit()):
            raise ValueError("is_version needs a numeric name (a CivitAI model-version id)")
        return self


class TiSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = _NAME
    inject_ti: Literal["prompt", "negprompt"] | None = None
    strength: float = _STRENGTH


def check_request(catalog: AdapterCatalog, loras: list[Any], tis: list[Any], baseline: str) -> list[str]:
    """Problems with a request's adapters that need no download or torch to find: bad specs,
    too many, names neither listed nor downloadable, listed ones of another baseline. Empty
    when the request may go ahead (a download can still fail on the worker)."""
    problems: list[str] = []
    if len(loras) > MAX_LORAS:
        problems.append(f"at most {MAX_LORAS} loras per request, got {len(loras)}")
    if len(tis) > MAX_TIS:
        problems.append(f"at most {MAX_TIS} tis per request, got {len(tis)}")
    for kind, specs, model in (("lora", loras[:MAX_LORAS], LoraSpec), ("ti", tis[:MAX_TIS], TiSpec)):
        for i, raw in enumerate(specs):
            try:
                spec = raw if isinstance(raw, model) else model.model_validate(raw)
            except ValidationError as e:
                problems.append(f"{kind}s[{i}]: {e.errors()[0]['msg']}")
                continue
            is_version = getattr(spec, "is_version", False)
            entry = catalog.get(kind, spec.name, is_version)
            if entry is None:
                if not catalog.allow_downloads:
                    problems.append(f"{kind}s[{i}]: unknown {kind} {spec.name[:64]!r}")
            elif entry.baseline != baseline:
                problems.append(f"{kind}s[{i}]: {spec.name[:64]!r} is for {entry.baseline}, not {baseline}")
    return problems


# -- resolution ------------------------------------------------------------------------------

@dataclass(frozen=True)
class ResolvedAdapter:
    """One adapter file ready to load. `adapter_name` is stable per file content, so the same
    file reached through different names is loaded into a pipeline once."""

    name: str  # as requested
    kind: str
    path: Path
    sha256: str
    baseline: str | None
    triggers: list[str] = field(default_factory=list)
    entry: AdapterEntry | None = None

    @property
    def adapter_name(self) -> str:
        return f"{self.kind}_{self.sha256[:16]}"


def file_sha256(path: Path, _memo: dict = {}, _lock=threading.Lock()) -> str:
    """SHA-256 of a file, memoised by (path, size, mtime): a 400 MB LoRA is hashed once,
    not per job."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _lock:
        if key in _memo:
            return _memo[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    with _lock:
        if len(_memo) >= 4096:  # stale keys of replaced files; a worker holds far fewer adapters
            _memo.clear()
        _memo[key] = digest
    return digest


class AdapterResolver:
    """Turns requested names into local files (see the module docstring). One per worker
    process; thread-safe. `civitai` defaults to a client built from the catalog's settings,
    `token` being the optional CivitAI API key."""

    def __init__(self, catalog: AdapterCatalog, civitai: Any = None, token: str | None = None):
        self.catalog = catalog
        self.cache_dir = Path(catalog.cache_dir)
        self._civitai = civitai
        self._token = token
        self._lock = threading.Lock()

    @property
    def civitai(self):
        with self._lock:
            if self._civitai is None:
                from models.civitai import CivitaiClient

                self._civitai = CivitaiClient(
                    self.cache_dir / "civitai", base_url=self.catalog.civitai_url, token=self._token,
                    budget_bytes=self.catalog.cache_budget_bytes, max_file_bytes=self.catalog.max_file_bytes)
            return self._civitai

    def resolve(self, kind: AdapterKind, name: str, is_version: bool = False, baseline: str | None = None,
                nsfw_ok: bool = True) -> ResolvedAdapter:
        name = str(name)[:255]
        entry = self.catalog.get(kind, name, is_version)
        if entry is not None:
            if baseline and entry.baseline != baseline:
                raise AdapterMismatch(name, f"{entry.baseline} {kind}, the model is {baseline}")
            if entry.nsfw and not nsfw_ok:
                raise AdapterRefused(name, "NSFW adapter on a SFW worker")
            path, sha, triggers = self._local(entry)
            return ResolvedAdapter(name, kind, path, sha, entry.baseline, triggers, entry)
        if not self.catalog.allow_downloads:
            raise AdapterNotFound(name, f"no {kind} of that name in the catalog")
        return self._from_civitai(kind, name, is_version, baseline, nsfw_ok)

    def _local(self, entry: AdapterEntry) -> tuple[Path, str, list[str]]:
        s = entry.source
        triggers = list(entry.triggers)
        if isinstance(s, BuiltinSource):
            path = self.cache_dir / "builtin" / f"{s.path}.safetensors"
            if not path.exists():  # written once; afterwards it is an ordinary file
                from models.tiny_adapters import save_builtin

                try:
                    save_builtin(s.path, path)
                except KeyError as e:
                    raise AdapterNotFound(entry.name, str(e)) from None
        elif isinstance(s, FileSource):
            path = Path(s.path)
            if not path.is_file():
                raise AdapterNotFound(entry.name, f"{path} does not exist")
        elif isinstance(s, HuggingfaceSource):
            from huggingface_hub import hf_hub_download

            try:
                path = Path(hf_hub_download(s.repo, s.filename, revision=s.revision,
                                            cache_dir=str(self.cache_dir / "huggingface")))
            except Exception as e:  # network, 404, gated: the job reports download_failed
                raise AdapterRefused(entry.name, f"huggingface: {type(e).__name__}") from None
        else:
            info, path = self._civitai_fetch(entry.kind, str(s.id), s.is_version, entry.name)
            if entry.sha256 and entry.sha256 != info.sha256:
                raise AdapterRefused(entry.name, "CivitAI now serves another file than the catalog's sha256")
            return path, info.sha256, triggers or list(info.trained_words)
        if path.stat().st_size > self.catalog.max_file_bytes:
            raise AdapterRefused(entry.name, f"file over {self.catalog.max_file_bytes} bytes")
        sha = file_sha256(path)
        if entry.sha256 and sha != entry.sha256:
            raise AdapterRefused(entry.name, f"sha256 {sha} != catalog's {entry.sha256}")
        return path, sha, triggers

    def _civitai_fetch(self, kind: str, name: str, is_version: bool, shown: str):
        from models.civitai import CivitaiError, CivitaiNotFound

        try:
            return self.civitai.fetch(kind, name, is_version)
        except CivitaiNotFound as e:
            raise AdapterNotFound(shown, str(e)) from None
        except CivitaiError as e:
            raise AdapterRefused(shown, str(e)) from None

    def _from_civitai(self, kind: str, name: str, is_version: bool, baseline: str | None,
                      nsfw_ok: bool) -> ResolvedAdapter:
        from models.civitai import CivitaiError, CivitaiNotFound

        # Look before downloading, so a mismatched or NSFW file is never fetched.
        try:
            meta = self.civitai.fetch_meta(kind, name, is_version)
        except CivitaiNotFound as e:
            raise AdapterNotFound(name, str(e)) from None
        except CivitaiError as e:
            raise AdapterRefused(name, str(e)) from None
        if baseline and meta.baseline != baseline:
            raise AdapterMismatch(name, f"CivitAI base model {meta.base_model!r}, the model is {baseline}")
        if meta.nsfw and not nsfw_ok:
            raise AdapterRefused(name, "NSFW adapter on a SFW worker")
        info, path = self._civitai_fetch(kind, name, is_version, name)
        return ResolvedAdapter(name, kind, path, info.sha256, info.baseline, list(info.trained_words))


def apply_adapters(pipe, loras: list, tis: list, prompt: str, negative_prompt: str,
                   max_loras: int = 8, max_tis: int = 32) -> tuple[str, str]:
    """See `models.adapter_loading.apply_adapters` (imported here lazily: it needs torch).
    Pass the catalog's `max_loras_per_pipeline` / `max_tis_per_pipeline` as the limits."""
    from models.adapter_loading import apply_adapters as _apply

    return _apply(pipe, loras, tis, prompt, negative_prompt, max_loras=max_loras, max_tis=max_tis)
