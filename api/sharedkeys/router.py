"""Shared key routes (`/api/v2/sharedkeys...`): parse, authenticate, delegate to
api/sharedkeys/service.py. Requests paid through a shared key are admitted by
api/routes/deps.py (accept_request)."""

from __future__ import annotations

from fastapi import APIRouter, Header, Path, Request

from api.routes.deps import ctx_of, registered
from api.sharedkeys import service
from api.sharedkeys.protocol import Deleted, SharedKeyDetails, SharedKeyInput, SharedKeyPatch

router = APIRouter(tags=["sharedkeys"])
KeyPath = Path(max_length=100, description="the shared key (its id, as the creation returned it)")


@router.put("/sharedkeys", response_model=SharedKeyDetails, response_model_exclude_none=True)
def create_key(body: SharedKeyInput, request: Request, apikey: str | None = Header(None)):
    ctx = ctx_of(request)
    with ctx.db.write() as session:
        owner = registered(ctx, session, apikey, "a shared key")
        return service.create(ctx, session, owner, body)


@router.get("/sharedkeys/{sharedkey_id}", response_model=SharedKeyDetails,
            response_model_exclude_none=True)
def get_key(request: Request, sharedkey_id: str = KeyPath):
    ctx = ctx_of(request)
    with ctx.db.read() as session:
        return service.read(ctx, session, sharedkey_id)


@router.patch("/sharedkeys/{sharedkey_id}", response_model=SharedKeyDetails,
              response_model_exclude_none=True)
def change_key(body: SharedKeyPatch, request: Request, sharedkey_id: str = KeyPath,
               apikey: str | None = Header(None)):
    ctx = ctx_of(request)
    with ctx.db.write() as session:
        owner = registered(ctx, session, apikey, "changing a shared key")
        return service.change(ctx, session, owner, sharedkey_id, body)


@router.delete("/sharedkeys/{sharedkey_id}", response_model=Deleted)
def delete_key(request: Request, sharedkey_id: str = KeyPath, apikey: str | None = Header(None)):
    ctx = ctx_of(request)
    with ctx.db.write() as session:
        owner = registered(ctx, session, apikey, "deleting a shared key")
        service.remove(ctx, session, owner, sharedkey_id)
    return Deleted()
