"""AI Horde v2 wire schemas of the worker protocol (`/generate/pop`, `/generate/submit`) and
of the worker and user records, as horde-sdk declares them (its strict mode rejects any field
it does not know, so answers carry exactly these)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from api.schemas import GenerationId, ModelName, SubmittedMetadata
from api.user_schemas import MAX_USER_ID

# A word of a worker's blacklist, a soft prompt's name.
ShortText = Annotated[str, Field(max_length=200)]
# Models and blacklist words one pop may offer: more than any real worker has (a volunteer
# offering every model on its disk offers a few hundred), fewer than would make a pop costly
# (its cost is linear in both: api/db/queue.py). Beyond them, a 400 naming the field.
MAX_POP_MODELS = 1000
MAX_BLACKLIST = 1000


def _alias(name: str) -> str:
    raw_id = name.rpartition("#")[2]
    if not (raw_id.isascii() and raw_id.isdigit() and int(raw_id) <= MAX_USER_ID):
        raise ValueError(f"{name!r} is not a username#id alias")
    return name


# A user as `name#id` (the alias /users shows).
PriorityUsername = Annotated[str, Field(max_length=110), AfterValidator(_alias)]


class _In(BaseModel):
    # Workers send fields we do not use (sampler contract versions and such): ignored.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class ImagePopInput(_In):
    name: str = Field(min_length=1, max_length=100)
    models: list[ModelName] = Field(min_length=1, max_length=MAX_POP_MODELS)
    # Any value from 3072^2 (the largest request) up means "every size"; the bound keeps the
    # number a number the database holds.
    max_pixels: int = Field(512 * 512, ge=64 * 64, le=2**31 - 1)
    amount: int = Field(1, ge=1, le=20)
    bridge_agent: str = Field("unknown:0:unknown", max_length=1000)
    nsfw: bool = False
    extra_slow_worker: bool = False
    priority_usernames: list[PriorityUsername] = Field(default_factory=list, max_length=50)
    require_upfront_kudos: bool = False
    threads: int = Field(1, ge=1, le=50)
    blacklist: list[ShortText] = Field(default_factory=list, max_length=MAX_BLACKLIST)
    allow_img2img: bool = True
    allow_painting: bool = False
    allow_unsafe_ipaddr: bool = True
    allow_post_processing: bool = True
    allow_controlnet: bool = False
    allow_sdxl_controlnet: bool = False
    allow_lora: bool = False
    limit_max_steps: bool = False


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
    # "R2", or the image as base64 (the body limit, 16 MiB by default, bounds it first).
    generation: str = Field("", max_length=24 * 1024 * 1024)
    state: Literal["ok", "censored", "faulted", "csam"] = "ok"
    # Stored as a 64-bit integer: refused here rather than failing after the image is stored.
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    censored: bool = False
    gen_metadata: SubmittedMetadata = Field(default_factory=list)


class JobSubmitResponse(BaseModel):
    reward: float


class WorkerKudosDetails(BaseModel):
    generated: float | None = None
    uptime: int | None = None


class WorkerDetails(BaseModel):
    type: Literal["image", "text", "interrogation"]
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
    max_pixels: int | None = None  # image workers
    megapixelsteps_generated: int | None = None
    # Text workers: the most tokens they generate, and of context they take; tokens made.
    max_length: int | None = None
    max_context_length: int | None = None
    tokens_generated: int | None = None
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
