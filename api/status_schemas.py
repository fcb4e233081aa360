"""AI Horde v2 wire schemas of `/status/news` and `/stats/...` (as horde-sdk declares them: its
strict mode rejects any field it does not know, so answers carry exactly these)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


def _iso_date(value: str) -> str:
    dt.date.fromisoformat(value)  # YYYY-MM-DD: what news is sorted by
    return value


class Newspiece(BaseModel):
    """One item of configs/news.yaml, as `/status/news` answers it."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key in the operator's file is an error

    date_published: Annotated[str, AfterValidator(_iso_date)]
    newspiece: str = Field(min_length=1, max_length=10_000)
    title: str | None = Field(None, max_length=500)
    importance: str = Field("Information", max_length=50)
    tags: list[str] = Field(default_factory=list, max_length=50)
    more_info_urls: list[str] = Field(default_factory=list, max_length=50)


class ModelStats(BaseModel):
    """`/stats/img/models` and `/stats/text/models`: finished generations per model name."""

    day: dict[str, int]
    month: dict[str, int]
    total: dict[str, int]


class ImagePeriod(BaseModel):
    images: int
    ps: int  # pixelsteps


class ImageTotals(BaseModel):
    minute: ImagePeriod
    hour: ImagePeriod
    day: ImagePeriod
    month: ImagePeriod
    total: ImagePeriod


class TextPeriod(BaseModel):
    requests: int  # generations finished
    tokens: int  # tokens generated


class TextTotals(BaseModel):
    minute: TextPeriod
    hour: TextPeriod
    day: TextPeriod
    month: TextPeriod
    total: TextPeriod
