"""Wire schemas of alchemy (`/v2/interrogate/*`), as horde-sdk declares them (its strict mode
rejects any field it does not know, so answers carry exactly these), and the forms' rules:
names, prices, result shapes. Written once here; the routes, the store, the cluster's alchemy
loop and `rayhorde worker` import them."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator

from api.schemas import SourceField
from api.worker_schemas import PriorityUsername
from models.postprocess.registry import POST_PROCESSORS

# Forms that answer with data, not an image; post-processors answer with an image.
CLIP_FORMS = ("caption", "interrogation", "nsfw")
FORMS = (*CLIP_FORMS, *POST_PROCESSORS)
FormName = Literal["caption", "interrogation", "nsfw", "GFPGAN", "CodeFormers",
                   "RealESRGAN_x4plus", "RealESRGAN_x2plus", "RealESRGAN_x4plus_anime_6B",
                   "NMKD_Siax", "4x_AnimeSharp", "strip_background"]
INTERROGATION_CATEGORIES = ("tags", "sites", "artists", "flavors", "mediums", "movements",
                            "techniques")
# The per-form payload keys horde-sdk's pop model knows (ModelInterrogationFormPayloadStable);
# forwarded to the worker that runs the form, so nothing else may pass.
PAYLOAD_KEYS = ("control_type", "additionalProp1", "additionalProp2", "additionalProp3")
TILE = 512 * 512
FORM_TTL = 150  # seconds a claimed form may take before it returns to the queue
MAX_RESULT_TEXT = 5000


def tiles(width: int, height: int) -> int:
    """512x512 tiles a post-processor works through (what `max_tiles` bounds)."""
    return max(1, math.ceil(width * height / TILE))


def form_kudos(name: str, width: int, height: int) -> float:
    """The AI Horde's alchemy prices: 1 per form, 3 for interrogation, tiles x 3 for a
    post-processor."""
    if name in POST_PROCESSORS:
        return 3.0 * tiles(width, height)
    return 3.0 if name == "interrogation" else 1.0


class _In(BaseModel):
    model_config = ConfigDict(extra="ignore")


class FormPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    control_type: str | None = Field(None, max_length=32)
    additionalProp1: str | None = Field(None, max_length=256)
    additionalProp2: str | None = Field(None, max_length=256)
    additionalProp3: str | None = Field(None, max_length=256)


class AlchemyFormRequest(_In):
    name: FormName
    payload: FormPayload | None = None


class AlchemyRequest(_In):
    forms: list[AlchemyFormRequest] = Field(min_length=1, max_length=len(FORMS))
    source_image: SourceField
    trusted_workers: bool = False
    slow_workers: bool = True
    extra_slow_workers: bool = False
    webhook: str | None = None

    @field_validator("forms")
    @classmethod
    def _unique(cls, v: list[AlchemyFormRequest]) -> list[AlchemyFormRequest]:
        names = [f.name for f in v]
        if len(set(names)) != len(names):
            raise ValueError("each form may be asked for once")
        return v

    @model_validator(mode="after")
    def _unsupported(self) -> "AlchemyRequest":
        from api.schemas import UnsupportedField

        if self.webhook:
            raise UnsupportedField("webhook")
        return self


class AlchemyAsyncResponse(BaseModel):
    id: str
    message: str | None = None


class AlchemyFormStatus(BaseModel):
    form: str
    state: Literal["waiting", "processing", "done", "faulted", "cancelled"]
    result: dict[str, Any] | None = None


class AlchemyStatus(BaseModel):
    state: Literal["waiting", "processing", "done", "faulted", "cancelled", "partial"]
    forms: list[AlchemyFormStatus]


class AlchemyPopInput(_In):
    name: str = Field(min_length=1, max_length=100)
    forms: list[FormName] = Field(min_length=1, max_length=len(FORMS))
    amount: int = Field(1, ge=1, le=20)
    bridge_agent: str = Field("unknown:0:unknown", max_length=1000)
    threads: int = Field(1, ge=1, le=50)
    max_tiles: int = Field(16, ge=1, le=256)
    priority_usernames: list[PriorityUsername] = Field(default_factory=list, max_length=50)


class PoppedForm(BaseModel):
    id: str
    form: str
    payload: dict[str, str] | None = None
    source_image: str | None = None
    r2_upload: str | None = None


class AlchemySkipped(BaseModel):
    untrusted: int | None = None
    worker_id: int | None = None
    bridge_version: int | None = None


class AlchemyPopResponse(BaseModel):
    forms: list[PoppedForm]
    skipped: AlchemySkipped = Field(default_factory=AlchemySkipped)


class InterrogationItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(max_length=200)
    confidence: float = Field(ge=-100, le=100)


Items = Annotated[list[InterrogationItem], Field(max_length=50)]


class InterrogationDetails(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tags: Items
    sites: Items
    artists: Items
    flavors: Items
    mediums: Items
    movements: Items
    techniques: Items


class CaptionResult(BaseModel):
    model_config = ConfigDict(extra="forbid")
    caption: str = Field(max_length=MAX_RESULT_TEXT)


class NsfwResult(BaseModel):
    model_config = ConfigDict(extra="forbid")
    nsfw: StrictBool


class InterrogationResult(BaseModel):
    model_config = ConfigDict(extra="forbid")
    interrogation: InterrogationDetails


RESULT_MODELS: dict[str, type[BaseModel]] = {
    "caption": CaptionResult, "nsfw": NsfwResult, "interrogation": InterrogationResult}


class AlchemySubmitInput(_In):
    id: str = Field(min_length=1, max_length=64)
    # caption/nsfw/interrogation: {"caption": ...} and so on (checked against the form in
    # api/alchemy/store.py); post-processors: "R2" after uploading, or base64 WebP.
    result: dict[str, Any] | str = Field(union_mode="left_to_right")
    state: Literal["ok", "faulted", "csam"] = "ok"

    @field_validator("result")
    @classmethod
    def _bounded(cls, v):
        if isinstance(v, str) and len(v) > 24 * 1024 * 1024:
            raise ValueError("too long")
        if isinstance(v, dict) and len(v) > 4:
            raise ValueError("at most one result key")
        return v


class AlchemySubmitResponse(BaseModel):
    reward: float
