"""The image and text models the AI Horde knows (its model reference), as facts in rayhorde's
own files in `data/`: `image_models.json` and `text_models.json`, written by `rayhorde models
refresh` (refresh.py) from the reference's published files (published.py reads those), with
`pinned.json` saying where they came from. See data/README.md.

The reference says what each model is (baseline, inpainting, NSFW, requirements, files with
their SHA256, download sources, size); `configs/models.yaml` says which of them this cluster
runs itself, and how (models/catalog.py). Nothing here imports torch or the API.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from models.catalog import Family

DATA_DIR = Path(__file__).resolve().parent / "data"
FILES = {"image": "image_models.json", "text": "text_models.json"}
MANIFEST_FILE = "pinned.json"
# The first key of every file in rayhorde's format; a file without it (a published reference
# file, say) is refused.
FORMAT = "rayhorde-model-reference/1"
# Where `rayhorde models refresh` downloads the published files from (each repository's
# main branch).
PUBLISHED_URLS = {
    "image": "https://raw.githubusercontent.com/Haidra-Org/AI-Horde-image-model-reference/main/stable_diffusion.json",
    "text": "https://raw.githubusercontent.com/Haidra-Org/AI-Horde-text-model-reference/main/db.json",
}

# The baselines this cluster has a deployment for (normalised: see published.py).
BASELINE_FAMILY = {
    "stable_diffusion_1": Family.stable_diffusion_1,
    "stable_diffusion_xl": Family.stable_diffusion_xl,
    "stable_cascade": Family.stable_cascade,
}
# Baselines whose requests follow SD 1.5's rules (native 512 side, x1 price); every other
# baseline without a family here (Flux and the newer 1024-pixel models) follows SDXL's.
SD15_RULES_BASELINES = frozenset({"stable_diffusion_2", "stable_diffusion_2_512",
                                  "stable_diffusion_2_768"})


class ReferenceError(Exception):
    """A reference file that cannot be read or does not hold what the reference holds."""


class ModelFile(BaseModel):
    """A file of a model's checkpoint as the reference lists it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str = Field(min_length=1, max_length=500)
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    file_type: str | None = Field(default=None, max_length=50)

    @field_validator("sha256", mode="before")
    @classmethod
    def _lower(cls, v):
        return v.lower() if isinstance(v, str) else v


class HubFile(BaseModel):
    """A download that is a file of a Hugging Face repository (a `/resolve/` URL)."""

    model_config = ConfigDict(frozen=True)

    repo_id: str
    revision: str
    filename: str


class DownloadSource(BaseModel):
    """Where one file comes from: `url`, saved as `file_path/file_name`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    file_name: str = Field(min_length=1, max_length=300)
    file_path: str = Field(default="", max_length=300)
    url: str = Field(pattern=r"^https?://", max_length=2000)

    @field_validator("file_name", "file_path")
    @classmethod
    def _relative(cls, v: str) -> str:
        # A reference file names where downloads are saved: never outside the model's folder.
        parts = Path(v).parts
        if Path(v).is_absolute() or ".." in parts or "\\" in v:
            raise ValueError(f"{v!r}: must be a plain relative path")
        return v

    @property
    def relative_path(self) -> str:
        return str(Path(self.file_path) / self.file_name) if self.file_path else self.file_name

    @property
    def hub_file(self) -> HubFile | None:
        """huggingface.co/{repo}/resolve/{revision}/{path} as a repo file; None otherwise."""
        parts = urlsplit(self.url)
        if parts.hostname != "huggingface.co":
            return None
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", unquote(parts.path))
        return HubFile(repo_id=m[1], revision=m[2], filename=m[3]) if m else None


Names = tuple[str, ...]


class ReferenceRequirements(BaseModel):
    """A model's requirements (image models only; every one optional)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_steps: int | None = None
    max_steps: int | None = None
    cfg_scale: float | None = None
    min_cfg_scale: float | None = None
    max_cfg_scale: float | None = None
    clip_skip: int | None = None
    samplers: Names | None = Field(default=None, max_length=100)
    schedulers: Names | None = Field(default=None, max_length=100)


class ReferenceModel(BaseModel):
    """One model of the reference: the facts rayhorde uses, and no prose."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    type: Literal["image", "text"]
    # Image models: normalised (stable_diffusion_1, stable_diffusion_xl, stable_cascade,
    # flux_1, ...). Text models: the model it was fine-tuned from ("" when not given).
    baseline: str = Field(default="", max_length=200)
    inpainting: bool = False
    nsfw: bool = False
    version: str = Field(default="", max_length=100)
    style: str = Field(default="", max_length=100)
    requirements: ReferenceRequirements = ReferenceRequirements()
    files: tuple[ModelFile, ...] = Field(default=(), max_length=100)
    downloads: tuple[DownloadSource, ...] = Field(default=(), max_length=100)
    size_on_disk_bytes: int | None = Field(default=None, ge=0)
    # Image models: the request features it cannot do (hires_fix, inpainting, controlnet).
    features_not_supported: Names = Field(default=(), max_length=50)
    # Text models: parameter count and the Hugging Face page of its weights.
    parameters: int | None = Field(default=None, ge=0)
    url: str | None = Field(default=None, pattern=r"^https?://", max_length=2000)

    @property
    def family(self) -> Family | None:
        """The cluster's deployment family for its baseline; None: no deployment here runs it
        (only HTTP volunteers can)."""
        if self.type == "text":
            return Family.llm
        return BASELINE_FAMILY.get(self.baseline)

    @property
    def rules_family(self) -> Family:
        """The family whose rules (price, native size, workflows) a request for it follows:
        its own, else SD 1.5's for the SD 2 baselines and SDXL's for the rest."""
        if self.family is not None:
            return self.family
        return (Family.stable_diffusion_1 if self.baseline in SD15_RULES_BASELINES
                else Family.stable_diffusion_xl)

    def sha256_of(self, relative_path: str) -> str | None:
        """The SHA256 the reference gives for a downloaded file (matched by its name)."""
        name = Path(relative_path).name
        return next((f.sha256 for f in self.files if Path(f.path).name == name), None)

    @property
    def hub_repo(self) -> str | None:
        """Text models: the Hugging Face repo id of its `url`."""
        if not self.url:
            return None
        parts = urlsplit(self.url)
        m = re.fullmatch(r"/([^/]+/[^/]+?)/?", parts.path)
        return m[1] if parts.hostname == "huggingface.co" and m else None


def dump_models(models: Iterable[ReferenceModel]) -> bytes:
    """Models in rayhorde's format: one JSON object per line in name order, keys sorted, what
    equals its default left out; the same models give the same bytes."""
    lines = [json.dumps(m.model_dump(mode="json", exclude_defaults=True), sort_keys=True,
                        ensure_ascii=False, separators=(",", ":"))
             for m in sorted(models, key=lambda m: m.name)]
    return (f'{{"format": {json.dumps(FORMAT)}, "models": [\n' + ",\n".join(lines)
            + "\n]}\n").encode()


def read_models(kind: Literal["image", "text"], data: bytes) -> dict[str, ReferenceModel]:
    """The models of a file in rayhorde's format, by name; ReferenceError naming the first bad
    one (or saying the file is not in this format)."""
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReferenceError(f"not JSON: {e}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT or set(raw) != {"format", "models"} \
            or not isinstance(raw["models"], list):
        raise ReferenceError(f"not a {FORMAT} file (`rayhorde models refresh` writes one)")
    if not raw["models"]:
        raise ReferenceError("models: none")
    out: dict[str, ReferenceModel] = {}
    for i, record in enumerate(raw["models"]):
        what = record.get("name") if isinstance(record, dict) else None
        try:
            model = ReferenceModel.model_validate(record)
        except ValidationError as e:
            raise ReferenceError(f"models[{i}] ({what!r}): {_first_error(e)}") from None
        if model.type != kind:
            raise ReferenceError(f"models[{i}] ({what!r}): a {model.type} model in the {kind} file")
        if model.name in out:
            raise ReferenceError(f"models[{i}]: {model.name!r} twice")
        out[model.name] = model
    return out


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    return f"{'.'.join(str(p) for p in err['loc']) or 'record'}: {err['msg']}"


@dataclass(frozen=True)
class ModelReference:
    """The image and text models of the reference, by name."""

    image: dict[str, ReferenceModel]
    text: dict[str, ReferenceModel]

    def get(self, name: str, kind: str | None = None) -> ReferenceModel | None:
        if kind == "image":
            return self.image.get(name)
        if kind == "text":
            return self.text.get(name)
        return self.image.get(name) or self.text.get(name)

    def __len__(self) -> int:
        return len(self.image) + len(self.text)


def load_reference(folder: str | Path | None = None) -> ModelReference:
    """The reference in `folder` (default: the shipped copy in `data/`), parsed once per
    process and folder (and again when a file changes)."""
    folder = Path(folder) if folder is not None else DATA_DIR
    stamps = tuple(_stamp(folder / FILES[k]) for k in ("image", "text"))
    return _load(str(folder.resolve()), stamps)


def _stamp(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ReferenceError(f"{path}: missing; `rayhorde models refresh` writes it") from None
    return st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=4)
def _load(folder: str, _stamps: tuple) -> ModelReference:
    parsed = {}
    for kind in ("image", "text"):
        path = Path(folder) / FILES[kind]
        try:
            parsed[kind] = read_models(kind, path.read_bytes())
        except ReferenceError as e:
            raise ReferenceError(f"{path}: {e}") from None
    return ModelReference(image=parsed["image"], text=parsed["text"])
