"""AI Horde v2 wire schemas of `/v2/sharedkeys` (as horde-sdk declares them: `SharedKeyInput`
in, `SharedKeyDetails` out; its strict mode rejects any field it does not know)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

UNLIMITED = -1
MAX_KUDOS = 50_000_000  # the AI Horde's bounds, all of them
MAX_IMAGE_PIXELS = 4_194_304
MAX_IMAGE_STEPS = 500
MAX_TEXT_TOKENS = 500
MAX_EXPIRY_DAYS = 36_500  # the AI Horde sets none; a hundred years keeps dates representable


def _expiry(days: int | None) -> int | None:
    if days is not None and days != UNLIMITED and days < 1:
        raise ValueError("-1 (never expires) or a number of days from 1")
    return days


class _In(BaseModel):
    # Clients built for the AI Horde may send fields we do not model: ignored.
    model_config = ConfigDict(extra="ignore")


class SharedKeyInput(_In):
    """`PUT /v2/sharedkeys` (horde-sdk SharedKeyCreateRequest)."""

    kudos: int = Field(5000, ge=UNLIMITED, le=MAX_KUDOS)
    expiry: int = Field(UNLIMITED, ge=UNLIMITED, le=MAX_EXPIRY_DAYS)
    name: str | None = Field(None, min_length=3, max_length=255)
    max_image_pixels: int = Field(UNLIMITED, ge=UNLIMITED, le=MAX_IMAGE_PIXELS)
    max_image_steps: int = Field(UNLIMITED, ge=UNLIMITED, le=MAX_IMAGE_STEPS)
    max_text_tokens: int = Field(UNLIMITED, ge=UNLIMITED, le=MAX_TEXT_TOKENS)

    _check_expiry = field_validator("expiry")(_expiry)


class SharedKeyPatch(_In):
    """`PATCH /v2/sharedkeys/{id}` (horde-sdk SharedKeyModifyRequest): what is given changes;
    `expiry` counts its days from now."""

    kudos: int | None = Field(None, ge=UNLIMITED, le=MAX_KUDOS)
    expiry: int | None = Field(None, ge=UNLIMITED, le=MAX_EXPIRY_DAYS)
    name: str | None = Field(None, min_length=3, max_length=255)
    max_image_pixels: int | None = Field(None, ge=UNLIMITED, le=MAX_IMAGE_PIXELS)
    max_image_steps: int | None = Field(None, ge=UNLIMITED, le=MAX_IMAGE_STEPS)
    max_text_tokens: int | None = Field(None, ge=UNLIMITED, le=MAX_TEXT_TOKENS)

    _check_expiry = field_validator("expiry")(_expiry)


class SharedKeyDetails(BaseModel):
    id: str  # the key itself (see api/sharedkeys/__init__.py)
    username: str  # its owner, as name#id
    name: str  # "" when it has none
    kudos: int  # what it may still spend, rounded to a whole kudos; -1: no limit
    expiry: str | None = None  # RFC 822, as the AI Horde; absent: never
    utilized: int  # kudos spent through it, rounded
    max_image_pixels: int
    max_image_steps: int
    max_text_tokens: int


class Deleted(BaseModel):
    message: str = "OK"
