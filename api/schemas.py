"""AI Horde v2 wire schemas (pydantic), kept apart from the ORM models.

Field names, defaults and limits are the AI Horde's (shared/horde-facts.md). Features this
cluster does not run yet (post-processing, the QR-code workflow, tiling, ...) are
accepted at their neutral values and rejected with a 400 naming the field when a request asks
for them, rather than being silently ignored.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from models.adapters import MAX_LORAS, MAX_TIS, LoraSpec, TiSpec
from models.catalog import Family
from models.postprocess.registry import PostProcessorName
from models.workflows import ControlType

SAMPLERS = (
    "k_lms", "k_heun", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a", "k_dpm_fast",
    "k_dpm_adaptive", "k_dpmpp_2s_a", "k_dpmpp_2m", "dpmsolver", "k_dpmpp_sde", "DDIM", "lcm",
)
SamplerName = Literal[
    "k_lms", "k_heun", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a", "k_dpm_fast",
    "k_dpm_adaptive", "k_dpmpp_2s_a", "k_dpmpp_2m", "dpmsolver", "k_dpmpp_sde", "DDIM", "lcm",
]
Side = Annotated[int, Field(ge=64, le=3072, multiple_of=64)]


def _uuid_of(what: str) -> AfterValidator:
    def canonical(v: str) -> str:
        try:
            return str(uuid.UUID(v))
        except ValueError:
            raise ValueError(f"{v!r} is not a {what} id") from None
    return AfterValidator(canonical)


WorkerId = Annotated[str, _uuid_of("worker")]
GenerationId = Annotated[str, _uuid_of("generation")]

# A model's name as requests and workers give it (Generation.model holds 200 characters).
ModelName = Annotated[str, Field(min_length=1, max_length=200)]
# Models one request may name. The AI Horde documents no number; each name is one queue row
# per image, and a real request names a few variants of one family.
MAX_REQUEST_MODELS = 100


def _each_once(names: list[str]) -> list[str]:
    """Refused rather than de-duplicated: a repeated name is a client's mistake to see."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise PydanticCustomError("duplicate_model", "duplicate model name {name}",
                                      {"name": repr(name)})
        seen.add(name)
    return names


RequestModels = Annotated[list[ModelName], Field(max_length=MAX_REQUEST_MODELS),
                          AfterValidator(_each_once)]


class _In(BaseModel):
    # Clients built for the AI Horde send fields we do not model yet; they are ignored only
    # when they are absent from this schema entirely. Known-but-unsupported ones are checked.
    # NaN and infinities are refused by every number field (JSON as Python parses it has them).
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class ExtraText(_In):
    """The AI Horde's extra_texts entry (the qr_code workflow's settings by reference)."""

    text: str = Field(max_length=2000)
    reference: str = Field(min_length=1, max_length=64)


# `params.special`: the AI Horde's free-form extras, kept to a few scalar entries.
SpecialValue = Annotated[str, Field(max_length=1000)] | int | float | bool | None


class ImageParams(_In):
    sampler_name: SamplerName = "k_euler_a"
    cfg_scale: float = Field(5.0, ge=0, le=100)
    denoising_strength: float | None = Field(None, ge=0.01, le=1)
    hires_fix_denoising_strength: float | None = Field(None, ge=0.01, le=1)
    seed: str | None = Field(None, max_length=256)
    height: Side = 512
    width: Side = 512
    seed_variation: int | None = Field(None, ge=1, le=1000)
    post_processing: list[PostProcessorName] = Field(default_factory=list, max_length=8)
    karras: bool = True
    tiling: bool = False
    hires_fix: bool = False
    clip_skip: int = Field(1, ge=1, le=12)
    control_type: ControlType | None = None
    image_is_control: bool = False
    return_control_map: bool = False
    control_strength: float | None = Field(None, ge=0, le=5)
    facefixer_strength: float | None = Field(None, ge=0, le=1)
    loras: list[LoraSpec] = Field(default_factory=list, max_length=MAX_LORAS)
    tis: list[TiSpec] = Field(default_factory=list, max_length=MAX_TIS)
    special: dict[Annotated[str, Field(max_length=100)], SpecialValue] = Field(
        default_factory=dict, max_length=20)
    extra_texts: list[ExtraText] = Field(default_factory=list, max_length=20)
    workflow: Literal["qr_code"] | None = None
    transparent: bool = False
    steps: int = Field(30, ge=1, le=500)
    n: int = Field(1, ge=1, le=20)

    @field_validator("post_processing")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("post-processors must be unique")
        return v


# (field, value that means "not asked for") for features that later workflows implement.
NOT_YET_SUPPORTED_PARAMS = {"tiling": False}
# A source image or mask: base64 (the body limit bounds it too) or an http(s) URL.
SourceField = Annotated[str, Field(min_length=1, max_length=24 * 1024 * 1024)]


class ExtraSourceImage(_In):
    """One more image prompt of a remix (Stable Cascade), with its strength."""

    image: SourceField
    strength: float = Field(1.0, ge=0, le=5)


class ImageGenerateRequest(_In):
    prompt: str = Field(min_length=1, max_length=50_000)
    params: ImageParams = Field(default_factory=ImageParams)
    nsfw: bool = False
    trusted_workers: bool = False
    slow_workers: bool = True
    extra_slow_workers: bool = False
    censor_nsfw: bool = False
    workers: list[WorkerId] = Field(default_factory=list, max_length=5)
    worker_blacklist: bool = False
    models: RequestModels = Field(default_factory=list)
    source_image: SourceField | None = None
    source_processing: Literal["img2img", "inpainting", "outpainting", "remix"] = "img2img"
    source_mask: SourceField | None = None
    extra_source_images: list[ExtraSourceImage] | None = Field(None, max_length=5)
    r2: bool = True
    shared: bool = False
    replacement_filter: bool = True
    dry_run: bool = False
    proxied_account: str | None = Field(None, max_length=100)
    disable_batching: bool = False
    allow_downgrade: bool = False
    webhook: str | None = Field(None, max_length=1024)
    style: str | None = Field(None, max_length=100)

    @model_validator(mode="after")
    def _reject_unsupported(self) -> "ImageGenerateRequest":
        for name, neutral in NOT_YET_SUPPORTED_PARAMS.items():
            if getattr(self.params, name) != neutral:
                raise UnsupportedField(f"params.{name}")
        for name in ("webhook", "style"):
            if getattr(self, name):
                raise UnsupportedField(name)
        return self

    def split_prompt(self) -> tuple[str, str]:
        """`###` separates the positive prompt from the negative one."""
        positive, _, negative = self.prompt.partition("###")
        return positive.strip(), negative.strip()


class UnsupportedField(ValueError):
    def __init__(self, field: str):
        super().__init__(f"{field} is not supported by this cluster yet")
        self.field = field


# ---------------------------------------------------------------------------- responses


class RequestAsyncResponse(BaseModel):
    id: str
    kudos: float
    message: str | None = None
    warnings: list[dict[str, str]] | None = None


class DryRunResponse(BaseModel):
    kudos: float


class RequestStatusCheck(BaseModel):
    finished: int
    processing: int
    restarted: int
    waiting: int
    done: bool
    faulted: bool
    wait_time: int
    queue_position: int
    kudos: float
    is_possible: bool


# gen_metadata entries (horde-sdk's GenMetadataEntry): the types and values strict horde
# clients know (shared/horde-facts.md); any other breaks them.
MetadataType = Literal["lora", "ti", "censorship", "source_image", "source_mask",
                       "extra_source_images", "batch_index", "information", "aesthetic_score"]
MetadataValue = Literal["download_failed", "parse_failed", "baseline_mismatch", "csam", "nsfw",
                        "see_ref"]


class GenerationMetadata(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: MetadataType
    value: MetadataValue
    ref: str | None = Field(None, max_length=255)


def _as_stored(entry: GenerationMetadata) -> dict:
    return entry.model_dump(exclude_none=True)


# What a worker submits: checked entries, kept as the plain dicts the database stores.
SubmittedMetadata = Annotated[
    list[Annotated[GenerationMetadata, AfterValidator(_as_stored)]], Field(max_length=50)]


def _readable(entries: Any) -> list:
    """The stored entries a strict client can read. Rows from before entries were checked at
    submit may hold anything: such entries are left out rather than failing the answer (and
    every later one) for good."""
    out = []
    for entry in entries if isinstance(entries, list) else ():
        try:
            out.append(GenerationMetadata.model_validate(entry))
        except ValidationError:
            continue
    return out


StoredMetadata = Annotated[list[GenerationMetadata], BeforeValidator(_readable)]


class ImageGeneration(BaseModel):
    worker_id: str
    worker_name: str
    model: str
    state: Literal["ok", "censored", "faulted", "csam"]
    img: str
    seed: str
    id: str
    censored: bool
    gen_metadata: StoredMetadata = []


class RequestStatusStable(RequestStatusCheck):
    generations: list[ImageGeneration]
    shared: bool


class Heartbeat(BaseModel):
    message: str = "OK"
    version: str


class ActiveModel(BaseModel):
    name: str
    count: int
    performance: float
    queued: float
    jobs: float
    eta: int
    type: Literal["image", "text"]


FAMILY_BASELINE = {
    Family.stable_diffusion_1: "stable_diffusion_1",
    Family.stable_diffusion_xl: "stable_diffusion_xl",
    Family.stable_cascade: "stable_cascade",
}
