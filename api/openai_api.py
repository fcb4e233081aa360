"""The OpenAI-compatible text API (`/v1/models`, `/v1/completions`, `/v1/chat/completions`) on
the same queue, priority and kudos as the horde's text API: a call queues a text request and
waits for it; with `stream: true` its text arrives as server-sent events while the cluster's
own LLM replicas generate it (the dispatcher's `follow` stream), or in one piece when an HTTP
worker did the work."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable

from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from api import images, texts
from api.db.models import Generation, User
from api.errors import HordeError
from api.images import Context
from api.text_schemas import ChatCompletionRequest, CompletionRequest

# OpenAI parameters this API does not implement; refused by name unless given at their neutral
# value (what OpenAI itself does when they are left out).
NEUTRAL = {"presence_penalty": 0, "frequency_penalty": 0, "logprobs": False, "echo": False,
           "best_of": 1, "logit_bias": {}, "top_logprobs": 0, "parallel_tool_calls": True,
           "tool_choice": "none", "tools": [], "suffix": "", "response_format": {"type": "text"}}
ENDED = ("done", "faulted", "cancelled")
DEFAULT_CONTEXT = 4096  # for a model whose catalog entry gives no max_context_length
WAIT_SECONDS = 600.0  # how long a call waits for its text before giving up (504)
log = logging.getLogger("rayhorde.api")


def check_unsupported(body) -> None:
    for name, value in (body.model_extra or {}).items():
        if value is None or (name in NEUTRAL and value == NEUTRAL[name]):
            continue
        raise HordeError(400, "UnsupportedParameter", f"{name}: not supported by this API")


def request_params(ctx: Context, body) -> dict:
    """The stored text params of an OpenAI call: OpenAI's sampling semantics (plain sampling
    at temperature 1 unless told otherwise), sizes from the call and the model's context."""
    check_unsupported(body)
    if body.stream and body.n > 1:
        raise HordeError(400, "BadRequest", "n: streaming gives one choice; ask for n=1")
    entry = texts.text_models(ctx, [body.model])[0]
    context = entry.max_context_length or DEFAULT_CONTEXT
    default_length = 16 if isinstance(body, CompletionRequest) else min(entry.max_length or 512, context // 2)
    max_length = body.max_completion_tokens or body.max_tokens or default_length
    stop = body.stop  # a list of at most 4 bounded strings (text_schemas.OpenAIStop)
    params = {
        "n": body.n, "max_length": max_length, "max_context_length": context,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": 1.0 if body.top_p is None else body.top_p, "top_k": body.top_k or 0,
        "min_p": body.min_p or 0.0, "typical": 1.0 if body.typical_p is None else body.typical_p,
        "rep_pen": body.repetition_penalty or 1.0, "rep_pen_range": 0,
    }
    if stop:
        params["stop_sequence"] = stop
    texts.check_limits([entry], max_length, context, length_field="max_tokens",
                       context_field="model")
    return params


def queue_call(ctx: Context, user_id: int, body, requester: str, agent: str) -> str:
    params = request_params(ctx, body)
    chat = isinstance(body, ChatCompletionRequest)
    if chat:
        params["messages"] = [m.model_dump() for m in body.messages]
        prompt = body.messages[-1].content
    else:
        prompt = body.prompt
    with ctx.db.write() as session:
        user = session.get(User, user_id)
        req = texts.submit(ctx, session, user, prompt=prompt, params=params, models=[body.model],
                           seed=body.seed, requester=requester, client_agent=agent, chat=chat)
        return req.id


def _generations(ctx: Context, request_id: str) -> list[Generation]:
    with ctx.db.read() as session:
        return list(session.execute(select(Generation).where(Generation.request_id == request_id)
                                    .order_by(Generation.position)).scalars())


def _cancel(ctx: Context, request_id: str) -> None:
    with ctx.db.write() as session:
        images.cancel_request(session, request_id, "text")


async def wait_ended(ctx: Context, request_id: str, timeout: float = WAIT_SECONDS) -> list[Generation]:
    """Poll until every generation of the request has ended; give up (cancelling the rest)
    after `timeout`."""
    deadline, pause = time.monotonic() + timeout, 0.05
    while True:
        gens = await run_in_threadpool(_generations, ctx, request_id)
        if all(g.state in ENDED for g in gens):
            return gens
        if time.monotonic() > deadline:
            await run_in_threadpool(_cancel, ctx, request_id)
            raise HordeError(504, "Timeout", f"model: no text within {int(timeout)} s; cancelled")
        await asyncio.sleep(pause)
        pause = min(pause * 1.5, 0.5)


def _check_succeeded(gens: list[Generation]) -> None:
    failed = [g for g in gens if g.state != "done"]
    if failed:
        raise HordeError(502, "GenerationFailed",
                         f"model: generation {failed[0].state}: {failed[0].fault_reason or ''}".strip())


def usage(gens: list[Generation]) -> dict:
    prompt = max((g.prompt_tokens or 0) for g in gens)
    completion = sum(g.completion_tokens or 0 for g in gens)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def completion_answer(request_id: str, model: str, gens: list[Generation], chat: bool) -> dict:
    _check_succeeded(gens)
    created = int(time.time())
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": g.text or ""},
                    "finish_reason": g.finish_reason or "stop", "logprobs": None}
                   for i, g in enumerate(gens)]
        return {"id": f"chatcmpl-{request_id}", "object": "chat.completion", "created": created,
                "model": model, "choices": choices, "usage": usage(gens)}
    choices = [{"index": i, "text": g.text or "", "finish_reason": g.finish_reason or "stop",
                "logprobs": None} for i, g in enumerate(gens)]
    return {"id": f"cmpl-{request_id}", "object": "text_completion", "created": created,
            "model": model, "choices": choices, "usage": usage(gens)}


# Clean-ups of streams whose client went away, running to their end on their own (see
# _in_background); held here so that they are not garbage-collected half-way.
_cleanups: set[asyncio.Task] = set()


def _in_background(work) -> None:
    """Run `work` to its end even though its caller is being cancelled: a client that goes
    away cancels the response (Starlette cancels its task group, Serve the request), and any
    await in the caller's `finally` would be cancelled with it."""
    task = asyncio.get_running_loop().create_task(work)
    _cleanups.add(task)
    task.add_done_callback(_cleanups.discard)


async def _abandon(ctx: Context, request_id: str, stop_following: Callable[[], None]) -> None:
    """The client went away: cancel the request (a result that still arrives records and
    bills nothing), then stop following its text. The dispatcher, finding the generation
    cancelled, stops generating it."""
    try:
        await run_in_threadpool(_cancel, ctx, request_id)
    except Exception:
        log.exception("could not cancel request %s after its client went away", request_id)
    finally:
        stop_following()


async def stream_events(ctx: Context, follow: Callable | None, wake: Callable[[], None],
                        request_id: str, model: str, chat: bool,
                        include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events for a streamed call (one choice): the text as the dispatcher's LLM
    replica produces it, then whatever of the recorded text has not been sent (all of it when
    an HTTP worker did the work), the finish reason, and `[DONE]`. The dispatcher is woken
    (`wake`) only once the stream is subscribed, so the first tokens are not missed. When the
    client goes away first, the request is cancelled and the dispatcher's stream stopped."""
    created = int(time.time())
    ident = f"chatcmpl-{request_id}" if chat else f"cmpl-{request_id}"

    def chunk(text: str | None, finish: str | None = None, first: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": text or ""} if first else (
                {"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            obj = "text_completion"
        body = {"id": ident, "object": obj, "created": created, "model": model,
                "choices": [choice]}
        if include_usage:
            body["usage"] = None
        return f"data: {json.dumps(body)}\n\n"

    follower = pump_task = None

    def stop_following() -> None:
        if pump_task is not None:
            pump_task.cancel()
        if follower is not None and hasattr(follower, "cancel"):
            follower.cancel()  # a Serve stream: ends the dispatcher's follow() too

    sent = ""
    finished = False
    try:
        gen_id = (await run_in_threadpool(_generations, ctx, request_id))[0].id
        yield chunk("", first=True)
        if follow is not None:
            deltas: asyncio.Queue = asyncio.Queue()
            subscribed = asyncio.Event()
            follower = follow(gen_id)

            async def pump():
                try:
                    async for delta in follower:  # None first: not followed (see follow())
                        subscribed.set()
                        await deltas.put(delta)
                except Exception:
                    log.warning("following generation %s failed", gen_id, exc_info=True)
                await deltas.put(None)

            pump_task = asyncio.create_task(pump())
            # asyncio.timeout, not wait_for: on 3.11 that can swallow a cancellation (the
            # client going away) that comes as the awaited item does.
            try:
                async with asyncio.timeout(5):
                    await subscribed.wait()
            except TimeoutError:
                pass  # the dispatcher did not answer: the record below still gives the text
            wake()
            while True:
                try:
                    async with asyncio.timeout(0.5):
                        delta = await deltas.get()
                except TimeoutError:  # maybe it ran elsewhere: look at the record
                    if all(g.state in ENDED for g in await run_in_threadpool(
                            _generations, ctx, request_id)):
                        break
                    continue
                if delta is None:
                    break
                if delta:
                    sent += delta
                    yield chunk(delta)
        else:
            wake()
        gens = await wait_ended(ctx, request_id)
        finished = True
        _check_succeeded(gens)
        final = gens[0].text or ""
        rest = final[len(sent):] if final.startswith(sent) else final
        if rest:
            yield chunk(rest)
        yield chunk(None, finish=gens[0].finish_reason or "stop")
        if include_usage:
            body = {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion",
                    "created": created, "model": model, "choices": [], "usage": usage(gens)}
            yield f"data: {json.dumps(body)}\n\n"
    except HordeError as e:
        yield f"data: {json.dumps({'error': {'message': e.message, 'code': e.rc}})}\n\n"
    finally:
        # No await here: when the client went away this runs inside a cancelled task.
        if finished:
            stop_following()
        else:
            _in_background(_abandon(ctx, request_id, stop_following))
    yield "data: [DONE]\n\n"


def models_list(ctx: Context) -> dict:
    return {"object": "list", "data": [
        {"id": m.name, "object": "model", "created": 0, "owned_by": "rayhorde"}
        for m in ctx.catalog.models if m.family.kind == "text"]}
