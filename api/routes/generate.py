"""Image generation routes (`/api/v2/generate/...`): parse, authenticate, delegate."""

from __future__ import annotations

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse

from api import images
from api.routes.deps import authenticate, ctx_of
from api.schemas import ImageGenerateRequest, RequestAsyncResponse, RequestStatusCheck, RequestStatusStable

router = APIRouter(tags=["generate"])


@router.post("/generate/async", status_code=202, response_model=RequestAsyncResponse,
             response_model_exclude_none=True)
def generate_async(body: ImageGenerateRequest, request: Request,
                   apikey: str | None = Header(None),
                   client_agent: str = Header("unknown:0:unknown")):
    ctx = ctx_of(request)
    if body.dry_run:
        with ctx.db.read() as session:
            authenticate(ctx, session, apikey)
            return JSONResponse({"kudos": images.price(ctx, body)}, status_code=200)
    with ctx.db.write() as session:
        user = authenticate(ctx, session, apikey)
        req = images.submit(ctx, user, body, client_agent, session)
    request.app.state.on_submit()
    return RequestAsyncResponse(id=req.id, kudos=req.kudos)


@router.get("/generate/check/{request_id}", response_model=RequestStatusCheck)
def generate_check(request_id: str, request: Request):
    ctx = ctx_of(request)
    with ctx.db.read() as session:
        return images.check(ctx, session, request_id)[1]


@router.get("/generate/status/{request_id}", response_model=RequestStatusStable)
def generate_status(request_id: str, request: Request):
    ctx = ctx_of(request)
    with ctx.db.read() as session:
        return images.status(ctx, session, request_id)


@router.delete("/generate/status/{request_id}", response_model=RequestStatusStable)
def generate_cancel(request_id: str, request: Request):
    ctx = ctx_of(request)
    with ctx.db.write() as session:
        return images.cancel(ctx, session, request_id)
