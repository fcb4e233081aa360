"""AI Horde v2 wire schemas of `/v2/filters` (as horde-sdk declares them: its strict mode
rejects any field it does not know, so answers carry exactly these)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

MAX_REGEX = 1000
MAX_DESCRIPTION = 1000
MAX_REPLACEMENT = 200
MAX_CHECKED_PROMPT = 10_000


class _In(BaseModel):
    # Clients built for the AI Horde may send fields we do not model: ignored.
    model_config = ConfigDict(extra="ignore")


class NewFilter(_In):
    """`PUT /v2/filters` (horde-sdk PutNewFilterRequest)."""

    regex: str = Field(min_length=1, max_length=MAX_REGEX)
    filter_type: int = Field(ge=10, le=29)
    description: str | None = Field("", max_length=MAX_DESCRIPTION)
    replacement: str | None = Field("", max_length=MAX_REPLACEMENT)


class FilterPatch(_In):
    """`PATCH /v2/filters/{id}` (horde-sdk PatchExistingFilter): what is given changes; an
    empty `replacement` removes it."""

    regex: str | None = Field(None, min_length=1, max_length=MAX_REGEX)
    filter_type: int | None = Field(None, ge=10, le=29)
    description: str | None = Field(None, max_length=MAX_DESCRIPTION)
    replacement: str | None = Field(None, max_length=MAX_REPLACEMENT)


class PromptCheck(_In):
    """`POST /v2/filters` (horde-sdk FilterPromptSuspicionRequest): no `filter_type` checks
    against every filter."""

    prompt: str = Field(max_length=MAX_CHECKED_PROMPT)
    filter_type: int | None = Field(None, ge=10, le=29)


class FilterDetails(BaseModel):
    id: str
    regex: str
    filter_type: int
    description: str
    replacement: str
    user: str  # "username#id" of the moderator who added or last changed it


class FilterRegex(BaseModel):
    filter_type: int
    regex: str


class FilterSuspicion(BaseModel):
    suspicion: int  # how many filters matched
    # What they matched, each text once: by filter type, then filter age, then position.
    matches: list[str]


class Deleted(BaseModel):
    message: str = "OK"
