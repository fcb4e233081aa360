"""Prompt filter routes (`/api/v2/filters...`), for moderators only: parse, authenticate,
delegate to api/filters/store.py."""

from __future__ import annotations

from fastapi import APIRouter, Header, Query, Request

from api.db.models import User
from api.errors import HordeError
from api.filters import store
from api.filters.protocol import (
    MAX_REGEX,
    Deleted,
    FilterDetails,
    FilterPatch,
    FilterRegex,
    FilterSuspicion,
    NewFilter,
    PromptCheck,
)
from api.routes.deps import ctx_of, registered

router = APIRouter(tags=["filters"])
FILTER_TYPE = Query(None, ge=10, le=29)


def _moderator(ctx, session, apikey: str | None) -> User:
    user = registered(ctx, session, apikey, "prompt filters")
    if not user.moderator:
        raise HordeError(403, "NotModerator", "apikey: prompt filters need a moderator's key")
    return user


@router.get("/filters", response_model=list[FilterDetails])
def list_filters(request: Request, filter_type: int | None = FILTER_TYPE,
                 contains: str | None = Query(None, max_length=MAX_REGEX),
                 apikey: str | None = Header(None)):
    ctx = ctx_of(request)
    with ctx.db.read() as session:
        _moderator(ctx, session, apikey)
        return store.list_filters(session, filter_type, contains)


@router.put("/filters", status_code=201, response_model=FilterDetails)
def add_filter(body: NewFilter, request: Request, apikey: str | None = Header(None)):
    ctx = ctx_of(request)
    with ctx.db.read() as session:  # before probing the regex: strangers get 401/403 first
        _moderator(ctx, session, apikey)
    store.validate_regex(body.regex)
    with ctx.db.write() as session:
        out = store.add_filter(session, _moderator(ctx, session, apikey), body)
    store.cache_of(ctx).refresh()  # this replica at once; the others within a poll
    return out


@router.post("/filters", response_model=FilterSuspicion)
def check_prompt(body: PromptCheck, request: Request, apikey: str | None = Header(None)):
    ctx = ctx_of(request)
    with ctx.db.read() as session:
        _moderator(ctx, session, apikey)
    cache = store.cache_of(ctx)
    cache.refresh()  # what was just changed anywhere, not what the last poll saw
    return store.check_prompt(cache.current(), body.prompt, body.filter_type)


@router.get("/filters/regex", response_model=list[FilterRegex])
def combined_regexes(request: Request, filter_type: int | None = FILTER_TYPE,
                     apikey: str | None = Header(None)):
    ctx = ctx_of(request)
    with ctx.db.read() as session:
        _moderator(ctx, session, apikey)
        return store.combined_regexes(session, filter_type)


@router.get("/filters/{filter_id}", response_model=FilterDetails)
def get_filter(filter_id: str, request: Request, apikey: str | None = Header(None)):
    ctx = ctx_of(request)
    with ctx.db.read() as session:
        _moderator(ctx, session, apikey)
        return store.get_filter(session, filter_id)


@router.patch("/filters/{filter_id}", response_model=FilterDetails)
def change_filter(filter_id: str, body: FilterPatch, request: Request,
                  apikey: str | None = Header(None)):
    ctx = ctx_of(request)
    with ctx.db.read() as session:
        _moderator(ctx, session, apikey)
    if body.regex is not None:
        store.validate_regex(body.regex)
    with ctx.db.write() as session:
        out = store.change_filter(session, _moderator(ctx, session, apikey), filter_id, body)
    store.cache_of(ctx).refresh()
    return out


@router.delete("/filters/{filter_id}", response_model=Deleted)
def delete_filter(filter_id: str, request: Request, apikey: str | None = Header(None)):
    ctx = ctx_of(request)
    with ctx.db.write() as session:
        _moderator(ctx, session, apikey)
        store.delete_filter(session, filter_id)
    store.cache_of(ctx).refresh()
    return Deleted()
