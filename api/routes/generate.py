"""Image generation routes (`/api/v2/generate/...`): parse, authenticate, delegate."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Header, Request

from api import images
from api.routes.deps import accept_request, ctx_of, in_read_session, rate_limited
from api.schemas import ImageGenerateRequest, RequestAsyncResponse, RequestStatusCheck, RequestStatusStable

router = APIRouter(tags=["generate"])
poll_limit = Depends(rate_limited("poll"))


@router.post("/generate/async", status_code=202, response_model=RequestAsyncResponse,
             response_model_exclude_none=True, dependencies=[Depends(rate_limited("submit"))])
async def generate_async(body: ImageGenerateRequest, request: Request,
                         apikey: str | None = Header(None)):
    return await accept_request(
        request, body, apikey, images.price,
        lambda ctx, session, user, body, requester, agent, stored:
            images.submit(ctx, user, body, agent, requester, session, stored),
        prepare=images.prepare)


@router.get("/generate/check/{request_id}", response_model=RequestStatusCheck,
            dependencies=[poll_limit])
async def generate_check(request_id: str, request: Request):
    return await in_read_session(request,
                                 lambda ctx, session: images.check(ctx, session, request_id)[1])


@router.get("/generate/status/{request_id}", response_model=RequestStatusStable,
            dependencies=[poll_limit])
async def generate_status(request_id: str, request: Request):
    return await in_read_session(request,
                                 lambda ctx, session: images.status(ctx, session, request_id))


@router.delete("/generate/status/{request_id}", response_model=RequestStatusStable,
               dependencies=[poll_limit])
def generate_cancel(request_id: str, request: Request):
    ctx = ctx_of(request)
    with ctx.db.write() as session:
        return images.cancel(ctx, session, request_id)
