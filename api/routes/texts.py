"""Text generation routes of the AI Horde API (`/generate/text/...`): requests and the text
worker protocol."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Header, Request
from starlette.concurrency import run_in_threadpool

from api import images, texts, workers
from api.routes.deps import (accept_request, ctx_of, in_read_session, rate_limited, registered,
                             worker_submit)
from api.schemas import RequestAsyncResponse
from api.text_schemas import TextGenerateRequest, TextPopInput, TextPopResponse, TextStatus, TextSubmitInput
from api.worker_schemas import JobSubmitResponse

router = APIRouter(tags=["text"])


@router.post("/generate/text/async", status_code=202, response_model=RequestAsyncResponse,
             response_model_exclude_none=True, dependencies=[Depends(rate_limited("submit"))])
async def text_async(body: TextGenerateRequest, request: Request, apikey: str | None = Header(None)):
    return await accept_request(
        request, body, apikey, texts.price,
        lambda ctx, session, user, body, requester, agent, _prepared:
            texts.submit_horde(ctx, session, user, body, requester, agent))


@router.get("/generate/text/status/{request_id}", response_model=TextStatus,
            dependencies=[Depends(rate_limited("poll"))])
async def text_status(request_id: str, request: Request):
    return await in_read_session(request,
                                 lambda ctx, session: texts.status(ctx, session, request_id))


@router.delete("/generate/text/status/{request_id}", response_model=TextStatus,
               dependencies=[Depends(rate_limited("poll"))])
def text_cancel(request_id: str, request: Request):
    ctx = ctx_of(request)
    with ctx.db.write() as session:
        images.cancel_request(session, request_id, "text")
        return texts.status(ctx, session, request_id)


@router.post("/generate/text/pop", response_model=TextPopResponse, response_model_exclude_none=True,
             dependencies=[Depends(rate_limited("pop"))])
async def text_pop(body: TextPopInput, request: Request, apikey: str | None = Header(None)):
    ctx = ctx_of(request)
    return await run_in_threadpool(
        workers.pop_text, ctx, lambda session: registered(ctx, session, apikey, "a worker"),
        body)


@router.post("/generate/text/submit", response_model=JobSubmitResponse,
             dependencies=[Depends(rate_limited("pop"))])
async def text_submit(body: TextSubmitInput, request: Request, apikey: str | None = Header(None)):
    return await worker_submit(request, apikey, workers.submit_text, body)
