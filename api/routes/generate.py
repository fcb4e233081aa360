"""Image generation routes (`/api/v2/generate/...`): parse, authenticate, delegate."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from api import images
from api.routes.deps import authenticate, client_agent, client_ip, ctx_of, rate_limited, requester_of
from api.schemas import ImageGenerateRequest, RequestAsyncResponse, RequestStatusCheck, RequestStatusStable

router = APIRouter(tags=["generate"])
poll_limit = Depends(rate_limited("poll"))


@router.post("/generate/async", status_code=202, response_model=RequestAsyncResponse,
             response_model_exclude_none=True, dependencies=[Depends(rate_limited("submit"))])
async def generate_async(body: ImageGenerateRequest, request: Request,
                         apikey: str | None = Header(None)):
    ctx = ctx_of(request)
    if body.dry_run:
        kudos = await run_in_threadpool(_price, ctx, body, apikey)
        return JSONResponse({"kudos": kudos}, status_code=200)
    req, warnings = await run_in_threadpool(_submit, ctx, body, apikey, client_agent(request),
                                            client_ip(request))
    # On the event loop, after the commit: Serve handles must be called from the loop.
    request.app.state.on_submit()
    return RequestAsyncResponse(id=req.id, kudos=req.kudos, warnings=warnings or None)


def _price(ctx, body: ImageGenerateRequest, apikey: str | None) -> float:
    with ctx.db.read() as session:
        authenticate(ctx, session, apikey)
        return images.price(ctx, body)


def _submit(ctx, body: ImageGenerateRequest, apikey: str | None, agent: str, ip: str):
    with ctx.db.write() as session:
        user = authenticate(ctx, session, apikey)
        return images.submit(ctx, user, body, agent, requester_of(user, ip), session)


@router.get("/generate/check/{request_id}", response_model=RequestStatusCheck,
            dependencies=[poll_limit])
def generate_check(request_id: str, request: Request):
    ctx = ctx_of(request)
    with ctx.db.read() as session:
        return images.check(ctx, session, request_id)[1]


@router.get("/generate/status/{request_id}", response_model=RequestStatusStable,
            dependencies=[poll_limit])
def generate_status(request_id: str, request: Request):
    ctx = ctx_of(request)
    with ctx.db.read() as session:
        return images.status(ctx, session, request_id)


@router.delete("/generate/status/{request_id}", response_model=RequestStatusStable,
               dependencies=[poll_limit])
def generate_cancel(request_id: str, request: Request):
    ctx = ctx_of(request)
    with ctx.db.write() as session:
        return images.cancel(ctx, session, request_id)
