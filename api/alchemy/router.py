"""Alchemy routes of the AI Horde API (`/interrogate/...`): requests and the alchemy worker
protocol. Thin: the rules are in api/alchemy/service.py."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Header, Request
from starlette.concurrency import run_in_threadpool

from api.alchemy import service
from api.alchemy.protocol import (
    AlchemyAsyncResponse,
    AlchemyPopInput,
    AlchemyPopResponse,
    AlchemyRequest,
    AlchemyStatus,
    AlchemySubmitInput,
    AlchemySubmitResponse,
)
from api.routes.deps import (
    authenticate,
    client_agent,
    client_ip,
    ctx_of,
    pixel_budget,
    rate_limited,
    registered,
    requester_of,
)

router = APIRouter(tags=["interrogate"])


@router.post("/interrogate/async", status_code=202, response_model=AlchemyAsyncResponse,
             response_model_exclude_none=True, dependencies=[Depends(rate_limited("submit"))])
async def interrogate_async(body: AlchemyRequest, request: Request, apikey: str | None = Header(None)):
    ctx = ctx_of(request)
    agent, ip = client_agent(request), client_ip(request)

    def queued():
        with ctx.db.read() as session:
            caller = authenticate(ctx, session, apikey)  # a bad key is refused before any fetch
        service.check_forms(body, service.served_forms(ctx))  # before the source is fetched
        stored = service.prepare(ctx, body, pixel_budget(ctx, caller, ip))
        try:
            with ctx.db.write() as session:
                user = authenticate(ctx, session, apikey)
                return service.submit(ctx, session, user, body, requester_of(user, ip), agent,
                                      stored)
        except BaseException:
            stored.delete(ctx.storage)
            raise

    interrogation = await run_in_threadpool(queued)
    request.app.state.on_submit()
    return AlchemyAsyncResponse(id=interrogation.id)


@router.get("/interrogate/status/{interrogation_id}", response_model=AlchemyStatus,
            response_model_exclude_none=True, dependencies=[Depends(rate_limited("poll"))])
def interrogate_status(interrogation_id: str, request: Request):
    ctx = ctx_of(request)
    with ctx.db.read() as session:
        return service.status(ctx, session, interrogation_id)


@router.delete("/interrogate/status/{interrogation_id}", response_model=AlchemyStatus,
               response_model_exclude_none=True, dependencies=[Depends(rate_limited("poll"))])
def interrogate_cancel(interrogation_id: str, request: Request):
    ctx = ctx_of(request)
    with ctx.db.write() as session:
        return service.cancel(ctx, session, interrogation_id)


@router.post("/interrogate/pop", response_model=AlchemyPopResponse,
             response_model_exclude_none=True, dependencies=[Depends(rate_limited("pop"))])
def interrogate_pop(body: AlchemyPopInput, request: Request, apikey: str | None = Header(None)):
    ctx = ctx_of(request)
    with ctx.db.read() as session:
        user = registered(ctx, session, apikey, "a worker")
    return service.pop(ctx, user, body)


@router.post("/interrogate/submit", response_model=AlchemySubmitResponse,
             dependencies=[Depends(rate_limited("pop"))])
def interrogate_submit(body: AlchemySubmitInput, request: Request, apikey: str | None = Header(None)):
    ctx = ctx_of(request)
    with ctx.db.read() as session:
        user = registered(ctx, session, apikey, "a worker")
    return AlchemySubmitResponse(reward=round(service.submit_result(ctx, user, body), 2))
