"""AI Horde v2 wire schemas of the worker protocol (`/generate/pop`, `/generate/submit`) and
of the worker and user records, as horde-sdk declares them (its strict mode rejects any field
it does not know, so answers carry exactly these)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from api.schemas import GenerationId


class _In(BaseModel):
    # Workers send fields we do not use (sampler contract versions and such): ignored.
    model_config = ConfigDict(extra="ignore")


class ImagePopInput(_In):
    name: str = Field(min_length=1, max_length=100)
    models: list[str] = Field(min_length=1, max_length=1000)
    max_pixels: int = Field(512 * 512, ge=64 * 64)
    amount: int = Field(1, ge=1, le=20)
    bridge_agent: str = Field("unknown:0:unknown", max_length=1000)
    nsfw: bool = False
    extra_slow_worker: bool = False
    priority_usernames: list[str] = Field(default_factory=list, max_length=50)
    require_upfront_kudos: bool = False
    threads: int = Field(1, ge=1, le=50)
    blacklist: list[str] = Field(default_factory=list, max_length=200)
    allow_img2img: bool = True
    allow_painting: bool = False
    allow_unsafe_ipaddr: bool = True
    allow_post_processing: bool = True
    allow_controlnet: bool = False
    allow_sdxl_controlnet: bool = False
    allow_lora: bool = False
    limit_max_steps: bool = False

    @field_validator("priority_usernames")
    @classmethod
    def _alias_ids(cls, v: list[str]) -> list[str]:
        for name in v:
            if not name.rpartition("#")[2].isdigit():
                raise ValueError(f"{name!r} is not a username#id alias")
        return v


class PopMessage(BaseModel):
    message: str
    worker_id: str | None = None
    origin: str | None = None


class ImagePopResponse(BaseModel):
    """`payload` and `ids` are always present (horde-sdk requires them even when empty)."""

    payload: dict[str, Any]
    ids: list[str]
    id: str | None = None
    skipped: dict[str, int] = Field(default_factory=dict)
    model: str | None = None
    shared: bool | None = None
    source_image: str | None = None
    source_processing: str | None = None
    source_mask: str | None = None
    extra_source_images: list[dict] | None = None
    r2_upload: str | None = None
    r2_uploads: list[str] | None = None
    ttl: int | None = None
    messages: list[PopMessage] | None = None


class JobSubmitInput(_In):
    id: GenerationId
    generation: str = ""
    state: Literal["ok", "censored", "faulted", "csam"] = "ok"
    seed: int | None = Field(None, ge=0)
    censored: bool = False
    gen_metadata: list[dict[str, Any]] = Field(default_factory=list, max_length=50)


class JobSubmitResponse(BaseModel):
    reward: float


class WorkerKudosDetails(BaseModel):
    generated: float | None = None
    uptime: int | None = None


class WorkerDetails(BaseModel):
    type: Literal["image", "text"]
    name: str
    id: str
    maintenance_mode: bool
    bridge_agent: str
    online: bool
    paused: bool = False
    nsfw: bool
    trusted: bool
    flagged: bool
    img2img: bool | None = None
    painting: bool | None = None
    post_processing: bool | None = Field(None, serialization_alias="post-processing")
    lora: bool | None = None
    controlnet: bool | None = None
    sdxl_controlnet: bool | None = None
    requests_fulfilled: int
    kudos_rewards: float
    kudos_details: WorkerKudosDetails
    performance: str
    threads: int
    uptime: int
    uncompleted_jobs: int
    max_pixels: int | None = None
    megapixelsteps_generated: int | None = None
    info: str | None = None
    owner: str | None = None
    models: list[str]


class WorkerModify(_In):
    maintenance: bool | None = None
    maintenance_msg: str | None = Field(None, max_length=500)
    info: str | None = Field(None, max_length=1000)
    name: str | None = Field(None, min_length=5, max_length=100)


class WorkerModifyResponse(BaseModel):
    maintenance: bool | None = None
    info: str | None = None
    name: str | None = None
