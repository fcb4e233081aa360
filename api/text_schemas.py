"""AI Horde v2 wire schemas of text generation (KoboldAI-style parameters), as horde-sdk
declares them, and the OpenAI-compatible requests."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from api.schemas import GenerationId, RequestStatusCheck, WorkerId
from api.worker_schemas import PopMessage


class _In(BaseModel):
    model_config = ConfigDict(extra="ignore")


# Horde text parameters this cluster does not implement: accepted, and named in the answer's
# `warnings` (the request runs without them), never silently dropped.
UNIMPLEMENTED_TEXT_PARAMS = (
    "tfs", "top_a", "rep_pen_slope", "sampler_order", "smoothing_factor", "dynatemp_range",
    "dynatemp_exponent", "singleline", "frmtadsnsp", "frmtrmblln", "frmtrmspch", "frmttriminc",
    "use_default_badwordsids",
)


class TextParams(_In):
    """KoboldAI-style parameters with the AI Horde's limits."""

    model_config = ConfigDict(extra="allow")  # unknown ones are reported in `warnings`

    n: int = Field(1, ge=1, le=20)
    max_length: int = Field(80, ge=16, le=16384)
    max_context_length: int = Field(1024, ge=80, le=1048576)
    temperature: float | None = Field(None, ge=0, le=5)
    top_p: float | None = Field(None, ge=0.001, le=1)
    top_k: int | None = Field(None, ge=0, le=100)
    typical: float | None = Field(None, ge=0, le=1)
    min_p: float | None = Field(None, ge=0, le=1)
    rep_pen: float | None = Field(None, ge=1, le=3)
    rep_pen_range: int | None = Field(None, ge=0, le=4096)
    stop_sequence: list[str] | None = Field(None, max_length=32)
    seed: str | int | None = None
    # Not implemented (see UNIMPLEMENTED_TEXT_PARAMS), validated with the horde's limits.
    tfs: float | None = Field(None, ge=0, le=1)
    top_a: float | None = Field(None, ge=0, le=1)
    rep_pen_slope: float | None = Field(None, ge=0, le=10)
    sampler_order: list[int] | None = None
    smoothing_factor: float | None = Field(None, ge=0, le=10)
    dynatemp_range: float | None = Field(None, ge=0, le=5)
    dynatemp_exponent: float | None = Field(None, ge=0, le=5)
    singleline: bool | None = None
    frmtadsnsp: bool | None = None
    frmtrmblln: bool | None = None
    frmtrmspch: bool | None = None
    frmttriminc: bool | None = None
    use_default_badwordsids: bool | None = None

    @field_validator("stop_sequence")
    @classmethod
    def _non_empty(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and any(not s for s in v):
            raise ValueError("stop sequences must not be empty")
        return v


class TextGenerateRequest(_In):
    prompt: str = Field(min_length=1, max_length=1_000_000)
    params: TextParams = Field(default_factory=TextParams)
    models: list[str] = Field(default_factory=list)
    trusted_workers: bool = False
    slow_workers: bool = True
    extra_slow_workers: bool = False
    workers: list[WorkerId] = Field(default_factory=list, max_length=5)
    worker_blacklist: bool = False
    dry_run: bool = False
    softprompt: str | None = None
    proxied_account: str | None = None
    disable_batching: bool = False
    allow_downgrade: bool = False
    # Not supported here: refused with a 400 naming them when set.
    webhook: str | None = None
    style: str | None = None
    extra_source_images: list[dict[str, Any]] | None = None


class TextGeneration(BaseModel):
    """horde-sdk's GenerationKobold: no `id` key (its strict mode refuses one)."""

    text: str
    seed: int
    model: str
    state: Literal["ok", "censored", "faulted"]
    worker_id: str
    worker_name: str
    gen_metadata: list[dict[str, Any]] = Field(default_factory=list)


class TextStatus(RequestStatusCheck):
    generations: list[TextGeneration]


class TextPopInput(_In):
    name: str = Field(min_length=1, max_length=100)
    models: list[str] = Field(min_length=1, max_length=1000)
    max_length: int = Field(512, ge=1, le=1_000_000)
    max_context_length: int = Field(2048, ge=1, le=100_000_000)
    amount: int = Field(1, ge=1, le=20)
    bridge_agent: str = Field("unknown:0:unknown", max_length=1000)
    nsfw: bool = False
    threads: int = Field(1, ge=1, le=50)
    extra_slow_worker: bool = False
    priority_usernames: list[str] = Field(default_factory=list, max_length=50)
    require_upfront_kudos: bool = False
    blacklist: list[str] = Field(default_factory=list, max_length=200)
    softprompts: list[str] | None = None


class TextPopResponse(BaseModel):
    payload: dict[str, Any]
    ids: list[str]
    id: str | None = None
    skipped: dict[str, int] = Field(default_factory=dict)
    softprompt: str | None = None
    model: str | None = None
    ttl: int | None = None
    messages: list[PopMessage] | None = None


class TextSubmitInput(_In):
    id: GenerationId
    generation: str = ""
    state: Literal["ok", "censored", "faulted", "csam"] = "ok"
    gen_metadata: list[dict[str, Any]] = Field(default_factory=list, max_length=50)


# ---------------------------------------------------------------- OpenAI-compatible


class _OpenAIIn(BaseModel):
    # OpenAI clients send only what the caller set; a parameter we do not implement is
    # refused by name (see openai_api.UNSUPPORTED) rather than ignored.
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1, le=16384)
    max_completion_tokens: int | None = Field(None, ge=1, le=16384)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=20)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None
    # rayhorde/KoboldAI extensions, as vLLM and llama.cpp accept them.
    top_k: int | None = Field(None, ge=0, le=100)
    min_p: float | None = Field(None, ge=0, le=1)
    typical_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, ge=1, le=3)


class CompletionRequest(_OpenAIIn):
    prompt: str = Field(min_length=1, max_length=1_000_000)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(_OpenAIIn):
    messages: list[ChatMessage] = Field(min_length=1, max_length=500)
