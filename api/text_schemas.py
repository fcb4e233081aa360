"""AI Horde v2 wire schemas of text generation (KoboldAI-style parameters), as horde-sdk
declares them, and the OpenAI-compatible requests."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from api.schemas import (
    GenerationId,
    ModelName,
    RequestModels,
    RequestStatusCheck,
    StoredMetadata,
    SubmittedMetadata,
    WorkerId,
)
from api.worker_schemas import MAX_BLACKLIST, MAX_POP_MODELS, PopMessage, PriorityUsername, ShortText


class _In(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


# Stop sequences: every one is checked against the text as it grows, for each request of a
# batch, so both their number and their length are bounded. The AI Horde documents no limit;
# 32 of 128 characters leaves room for every chat template's turn markers.
MAX_STOP_SEQUENCES = 32
StopSequence = Annotated[str, Field(min_length=1, max_length=128)]
# A seed as horde text clients send it: a string (hashed unless ASCII digits) or a number.
TextSeed = Annotated[str, Field(max_length=256)] | Annotated[int, Field(ge=-(2**63), lt=2**63)]
# A prompt, in characters (the body limit, 16 MiB by default, also bounds it).
MAX_PROMPT_CHARS = 1_000_000
# The AI Horde's limits on a text request (horde/apis/models/kobold_v2.py): tokens to
# generate and of context. A served model's catalog entry may lower them (texts.check_limits).
MAX_TEXT_LENGTH = 4096
MAX_TEXT_CONTEXT = 1_048_576
# What a text worker may declare it takes: past any request's size (a worker may take more
# than is ever asked), bounded so the number stays a number.
MAX_WORKER_LENGTH = 65_536


def few_extras(model: BaseModel, limit: int = 50) -> None:
    """Models that accept unknown fields (to name them in warnings or refuse them by name)
    still take only a few, with short names."""
    extra = model.model_extra or {}
    if len(extra) > limit or any(len(name) > 100 for name in extra):
        raise PydanticCustomError("too_many_fields",
                                  "at most {limit} unknown fields, named in at most 100 characters",
                                  {"limit": limit})


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
    max_length: int = Field(80, ge=16, le=MAX_TEXT_LENGTH)
    max_context_length: int = Field(1024, ge=80, le=MAX_TEXT_CONTEXT)
    temperature: float | None = Field(None, ge=0, le=5)
    top_p: float | None = Field(None, ge=0.001, le=1)
    top_k: int | None = Field(None, ge=0, le=100)
    typical: float | None = Field(None, ge=0, le=1)
    min_p: float | None = Field(None, ge=0, le=1)
    rep_pen: float | None = Field(None, ge=1, le=3)
    rep_pen_range: int | None = Field(None, ge=0, le=4096)
    stop_sequence: list[StopSequence] | None = Field(None, max_length=MAX_STOP_SEQUENCES)
    seed: TextSeed | None = None
    # Not implemented (see UNIMPLEMENTED_TEXT_PARAMS), validated with the horde's limits.
    tfs: float | None = Field(None, ge=0, le=1)
    top_a: float | None = Field(None, ge=0, le=1)
    rep_pen_slope: float | None = Field(None, ge=0, le=10)
    sampler_order: list[Annotated[int, Field(ge=0, le=100)]] | None = Field(None, max_length=16)
    smoothing_factor: float | None = Field(None, ge=0, le=10)
    dynatemp_range: float | None = Field(None, ge=0, le=5)
    dynatemp_exponent: float | None = Field(None, ge=0, le=5)
    singleline: bool | None = None
    frmtadsnsp: bool | None = None
    frmtrmblln: bool | None = None
    frmtrmspch: bool | None = None
    frmttriminc: bool | None = None
    use_default_badwordsids: bool | None = None

    @model_validator(mode="after")
    def _few_unknown(self) -> "TextParams":
        few_extras(self)
        return self


class TextGenerateRequest(_In):
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    params: TextParams = Field(default_factory=TextParams)
    models: RequestModels = Field(default_factory=list)
    trusted_workers: bool = False
    slow_workers: bool = True
    extra_slow_workers: bool = False
    workers: list[WorkerId] = Field(default_factory=list, max_length=5)
    worker_blacklist: bool = False
    dry_run: bool = False
    softprompt: str | None = Field(None, max_length=1000)
    proxied_account: str | None = Field(None, max_length=100)
    disable_batching: bool = False
    allow_downgrade: bool = False
    # Not supported here: refused with a 400 naming them when set.
    webhook: str | None = Field(None, max_length=1024)
    style: str | None = Field(None, max_length=100)
    extra_source_images: list[dict[str, Any]] | None = Field(None, max_length=5)


class TextGeneration(BaseModel):
    """horde-sdk's GenerationKobold: no `id` key (its strict mode refuses one)."""

    text: str
    seed: int
    model: str
    state: Literal["ok", "censored", "faulted"]
    worker_id: str
    worker_name: str
    gen_metadata: StoredMetadata = Field(default_factory=list)


class TextStatus(RequestStatusCheck):
    generations: list[TextGeneration]


class TextPopInput(_In):
    name: str = Field(min_length=1, max_length=100)
    models: list[ModelName] = Field(min_length=1, max_length=MAX_POP_MODELS)
    max_length: int = Field(512, ge=1, le=MAX_WORKER_LENGTH)
    max_context_length: int = Field(2048, ge=1, le=MAX_TEXT_CONTEXT)
    amount: int = Field(1, ge=1, le=20)
    bridge_agent: str = Field("unknown:0:unknown", max_length=1000)
    nsfw: bool = False
    threads: int = Field(1, ge=1, le=50)
    extra_slow_worker: bool = False
    priority_usernames: list[PriorityUsername] = Field(default_factory=list, max_length=50)
    require_upfront_kudos: bool = False
    blacklist: list[ShortText] = Field(default_factory=list, max_length=MAX_BLACKLIST)
    softprompts: list[ShortText] | None = Field(None, max_length=100)


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
    generation: str = Field("", max_length=MAX_PROMPT_CHARS)
    state: Literal["ok", "censored", "faulted", "csam"] = "ok"
    gen_metadata: SubmittedMetadata = Field(default_factory=list)


# ---------------------------------------------------------------- OpenAI-compatible


def _listed(stop: Any) -> Any:
    return [stop] if isinstance(stop, str) else stop


# OpenAI's `stop`: a string or up to 4 (OpenAI's own limit), always read as a list.
OpenAIStop = Annotated[
    Annotated[list[StopSequence], Field(max_length=4)] | None,
    BeforeValidator(_listed, json_schema_input_type=(
        StopSequence | Annotated[list[StopSequence], Field(max_length=4)] | None))]


class _OpenAIIn(BaseModel):
    # OpenAI clients send only what the caller set; a parameter we do not implement is
    # refused by name (see openai_api.NEUTRAL) rather than ignored.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: ModelName
    max_tokens: int | None = Field(None, ge=1, le=MAX_TEXT_LENGTH)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TEXT_LENGTH)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=20)
    stop: OpenAIStop = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stream: bool = False
    stream_options: dict[str, Any] | None = Field(None, max_length=8)
    user: str | None = Field(None, max_length=256)
    # rayhorde/KoboldAI extensions, as vLLM and llama.cpp accept them.
    top_k: int | None = Field(None, ge=0, le=100)
    min_p: float | None = Field(None, ge=0, le=1)
    typical_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, ge=1, le=3)

    @model_validator(mode="after")
    def _few_unknown(self) -> "_OpenAIIn":
        few_extras(self)
        return self


class CompletionRequest(_OpenAIIn):
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_PROMPT_CHARS)


class ChatCompletionRequest(_OpenAIIn):
    messages: list[ChatMessage] = Field(min_length=1, max_length=500)

    @model_validator(mode="after")
    def _bounded_conversation(self) -> "ChatCompletionRequest":
        if sum(len(m.content) for m in self.messages) > MAX_PROMPT_CHARS:
            raise ChatTooLong()
        return self


class ChatTooLong(ValueError):
    """Named `messages` in the answer (api/errors.py reads `field`), like a prompt too long."""

    field = "messages"

    def __init__(self):
        super().__init__(f"at most {MAX_PROMPT_CHARS} characters in all messages together")
