"""OpenAI-compatible routes under /v1 (api/openai_api.py has the rules). Auth: `Authorization:
Bearer KEY` or the horde's `apikey` header; no key is the anonymous user."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from api import openai_api
from api.routes.deps import authenticate, client_agent, client_ip, ctx_of, rate_limited, requester_of
from api.text_schemas import ChatCompletionRequest, CompletionRequest

router = APIRouter(prefix="/v1", tags=["openai"])


def api_key(apikey: str | None = Header(None), authorization: str | None = Header(None)) -> str | None:
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return apikey


@router.get("/models")
def list_models(request: Request):
    return openai_api.models_list(ctx_of(request))


async def _call(request: Request, body, key: str | None, chat: bool):
    ctx = ctx_of(request)

    def queue_it():
        with ctx.db.read() as session:
            user = authenticate(ctx, session, key)
        return openai_api.queue_call(ctx, user.id, body, requester_of(user, client_ip(request)),
                                     client_agent(request))

    request_id = await run_in_threadpool(queue_it)
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        events = openai_api.stream_events(ctx, request.app.state.follow, request.app.state.on_submit,
                                          request_id, body.model, chat, include_usage)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    request.app.state.on_submit()
    gens = await openai_api.wait_ended(ctx, request_id)
    return openai_api.completion_answer(request_id, body.model, gens, chat)


@router.post("/completions", dependencies=[Depends(rate_limited("submit"))])
async def completions(body: CompletionRequest, request: Request, key: str | None = Depends(api_key)):
    return await _call(request, body, key, chat=False)


@router.post("/chat/completions", dependencies=[Depends(rate_limited("submit"))])
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           key: str | None = Depends(api_key)):
    return await _call(request, body, key, chat=True)
