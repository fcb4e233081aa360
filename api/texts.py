"""Text requests (`/generate/text/...` and the OpenAI-compatible API): validate against the
served text models, price, queue, report. The routes stay thin; the rules live here."""

from __future__ import annotations

import secrets
import time
import uuid

from sqlalchemy import select

from api import admission, known_models
from api.db import queue
from api.db.models import Generation, Request, User
from api.errors import HordeError
from api.images import SEED_SPACE, Context, check, seed_to_int
from api.auth import ANONYMOUS_USER_ID
from api.kudos import (
    REQUEST_TAX,
    TEXT_UPFRONT_CONTEXT,
    TEXT_UPFRONT_TOKENS,
    needs_upfront_text_kudos,
    text_cost,
)
from api.text_schemas import UNIMPLEMENTED_TEXT_PARAMS, TextGenerateRequest, TextGeneration, TextStatus
from models.catalog import ModelEntry

# The sampling parameters the engine takes (deployments/llm.py TextJob), by their horde names.
ENGINE_PARAMS = ("temperature", "top_p", "top_k", "typical", "min_p", "rep_pen", "rep_pen_range",
                 "stop_sequence")


def text_models(ctx: Context, names: list[str]) -> list[ModelEntry]:
    """The catalog entries of the served text models a request names (all served text models
    when it names none). The OpenAI-compatible API takes only these: its calls run on the
    cluster's own text deployment."""
    if not names:
        served = [m for m in ctx.catalog.models if m.family.kind == "text"]
        if not served:
            raise HordeError(400, "UnknownModel", "models: this cluster serves no text model")
        return served
    out = []
    for name in names:
        entry = ctx.catalog.get(name)
        if entry is None:
            raise HordeError(400, "UnknownModel", f"models: {name!r} is not served here")
        if entry.family.kind != "text":
            raise HordeError(400, "UnknownModel",
                             f"models: {name!r} is an image model: use /generate/async")
        out.append(entry)
    return out


def horde_text_models(ctx: Context, names: list[str], session=None) -> list[ModelEntry]:
    """The text models a horde request names: served ones, models of the AI Horde's reference
    (HTTP volunteers run them), or names a customizer's worker offers (api/known_models.py)."""
    if not names:
        return text_models(ctx, names)
    return known_models.resolve(ctx, names, "text", session)


def check_limits(models: list[ModelEntry], max_length: int, max_context_length: int,
                 length_field: str = "params.max_length",
                 context_field: str = "params.max_context_length") -> None:
    """Every model asked for must take the request's sizes: refuse rather than truncate."""
    for m in models:
        if m.max_length is not None and max_length > m.max_length:
            raise HordeError(400, "BadRequest", f"{length_field}: {m.name} generates at most "
                                                f"{m.max_length} tokens")
        if m.max_context_length is not None and max_context_length > m.max_context_length:
            raise HordeError(400, "BadRequest", f"{context_field}: {m.name} takes at most "
                                                f"{m.max_context_length} tokens of context")
    if max_length >= max_context_length:
        raise HordeError(400, "BadRequest",
                         f"{length_field}: must be below {context_field} ({max_context_length})")


def horde_request_warnings(body: TextGenerateRequest) -> list[dict[str, str]]:
    p = body.params
    warnings = [{"code": "UnsupportedParameter",
                 "message": f"params.{name}: not implemented by this cluster; generated without it"}
                for name in UNIMPLEMENTED_TEXT_PARAMS if getattr(p, name) is not None]
    warnings += [{"code": "UnknownParameter", "message": f"params.{name}: unknown; ignored"}
                 for name in (p.model_extra or {})]
    if body.softprompt:
        warnings.append({"code": "UnsupportedParameter",
                         "message": "softprompt: soft prompts are not supported; ignored"})
    return warnings


def engine_warnings(ctx: Context, body: TextGenerateRequest) -> list[dict[str, str]]:
    """Parameters the engine of a served model the request may run on cannot honour (vLLM:
    typical, rep_pen_range; ModelEntry.unsupported_text_params): it generates without them."""
    params = horde_params(body)
    return [{"code": "UnsupportedParameter",
             "message": f"params.{name}: not implemented by the {m.engine} engine of {m.name}; "
                        "generated without it there"}
            for m in ctx.catalog.models if m.family.kind == "text" and (not body.models or m.name in body.models)
            for name in m.unsupported_text_params(params)]


def horde_params(body: TextGenerateRequest) -> dict:
    """What a queued horde text request stores: the sizes and the engine's parameters."""
    p = body.params
    out = {"max_length": p.max_length, "max_context_length": p.max_context_length, "n": p.n}
    out.update({k: getattr(p, k) for k in ENGINE_PARAMS if getattr(p, k) is not None})
    return out


def seeds(seed: str | int | None, n: int) -> list[int]:
    base = secrets.randbelow(SEED_SPACE) if seed is None else seed_to_int(str(seed))
    return [(base + i) % SEED_SPACE for i in range(n)]


def submit(ctx: Context, session, user: User, *, prompt: str, params: dict, models: list[str],
           seed: str | int | None, requester: str, client_agent: str,
           workers: list[str] = (), worker_blacklist: bool = False, trusted_workers: bool = False,
           slow_workers: bool = True, extra_slow_workers: bool = False,
           chat: bool = False) -> Request:
    """Queue a text request. `params` holds max_length, max_context_length, n and the engine's
    sampling parameters (and `messages` for a chat); `chat` requests run only on the cluster's
    own text deployment, which renders the model's chat template (HTTP text workers take a
    plain prompt). Everything that can refuse it runs before the first write."""
    entries = text_models(ctx, models) if chat else horde_text_models(ctx, models, session)
    n, max_length, context = params["n"], params["max_length"], params["max_context_length"]
    check_limits(entries, max_length, context)
    kudos = text_cost(max_length=max_length, max_context_length=context, n=n)
    holds_upfront = _check_upfront(session, ctx, user, requester, kudos, n, max_length, context,
                                   slow_workers)
    admission.check_workers(session, list(workers))
    now = time.time()
    req = Request(
        id=str(uuid.uuid4()), kind="text", user_id=user.id, prompt=prompt, negative_prompt="",
        params=params, models=list(models), n=n, r2=False, nsfw=False, censor_nsfw=False,
        shared=False, kudos=kudos, cancelled=False, client_agent=client_agent, created_at=now,
        requester=requester, workers=list(workers), worker_blacklist=worker_blacklist,
        trusted_workers=trusted_workers, slow_workers=slow_workers,
        extra_slow_workers=extra_slow_workers,
    )
    session.add(req)
    session.flush()
    filters = queue.EntryFilters(
        user_id=user.id, kind="text", max_length=max_length, max_context_length=context,
        trusted_only=trusted_workers, slow_ok=slow_workers, extra_slow_ok=extra_slow_workers,
        upfront=holds_upfront,
        features=int(queue.Feature.CHAT) if chat else 0,
        target_mode=admission.target_mode(list(workers), worker_blacklist),
        target_workers=tuple(workers),
    )
    queue.enqueue(session, req, seeds(seed, n), list(models),
                  sort_key=now - admission.head_start(ctx, user), filters=filters,
                  reward=(kudos - REQUEST_TAX) / n, tax=REQUEST_TAX / n)
    return req


def _check_upfront(session, ctx: Context, user: User, requester: str, kudos: float, n: int,
                   max_length: int, context: int, slow_workers: bool) -> bool:
    """The waiting cap, and the upfront kudos a large text request needs (api/kudos.py
    needs_upfront_text_kudos): refused (403 KudosUpfront) for the anonymous user and for a
    user whose balance, less what its unfinished generations owe, does not cover it; the
    balance is locked first (as for images), so two requests cannot count the same kudos.
    Returns whether the request holds its kudos (workers that require upfront kudos take
    only those)."""
    anonymous = user.id == ANONYMOUS_USER_ID
    upfront = needs_upfront_text_kudos(max_length, context, slow_workers)
    refused = (f"params.max_length: a text request over {TEXT_UPFRONT_TOKENS} tokens, "
               f"{TEXT_UPFRONT_CONTEXT} tokens of context or with slow_workers false needs its "
               f"{kudos} kudos upfront")
    if upfront and anonymous:
        raise HordeError(403, "KudosUpfront", refused + ": register for an API key")
    balance = admission.lock_balance(session, user) if upfront else user.kudos
    owed = admission.check_capacity(ctx, session, user, requester, n)
    holds = not anonymous and balance - owed >= kudos
    if upfront and not holds:
        raise HordeError(403, "KudosUpfront",
                         refused + f"; you hold {round(balance, 2)}, of which {round(owed, 2)} "
                         "pay for your generations still queued")
    return holds


def submit_horde(ctx: Context, session, user: User, body: TextGenerateRequest, requester: str,
                 client_agent: str) -> tuple[Request, list[dict[str, str]]]:
    for name in ("webhook", "style", "extra_source_images"):
        if getattr(body, name):
            raise HordeError(400, "BadRequest", f"{name}: not supported by this cluster")
    req = submit(ctx, session, user, prompt=body.prompt, params=horde_params(body),
                 models=body.models, seed=body.params.seed, requester=requester,
                 client_agent=client_agent, workers=body.workers,
                 worker_blacklist=body.worker_blacklist, trusted_workers=body.trusted_workers,
                 slow_workers=body.slow_workers, extra_slow_workers=body.extra_slow_workers)
    return req, (horde_request_warnings(body) + engine_warnings(ctx, body)
                 + known_models.availability_warnings(ctx, session, list(body.models), "text"))


def price(ctx: Context, body: TextGenerateRequest) -> float:
    p = body.params
    check_limits(horde_text_models(ctx, body.models), p.max_length, p.max_context_length)
    return text_cost(max_length=p.max_length, max_context_length=p.max_context_length, n=p.n)


def status(ctx: Context, session, request_id: str) -> TextStatus:
    req, chk = check(ctx, session, request_id, kind="text")
    gens = session.execute(
        select(Generation).where(Generation.request_id == req.id, Generation.state == "done")
        .order_by(Generation.position)
    ).scalars().all()
    return TextStatus(**chk.model_dump(), generations=[
        TextGeneration(text=g.text or "", seed=g.seed, model=g.model or "",
                       state="censored" if g.censored else "ok", worker_id=g.worker_id or "",
                       worker_name=g.worker_name or "", gen_metadata=g.gen_metadata or [])
        for g in gens])
