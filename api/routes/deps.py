"""Per-request helpers shared by the routes: the context and the caller's identity."""

from __future__ import annotations

from fastapi import Request
from sqlalchemy import select

from api.auth import ANONYMOUS_KEY, ANONYMOUS_USER_ID, hash_api_key
from api.db.models import User
from api.errors import HordeError
from api.images import Context


def ctx_of(request: Request) -> Context:
    return request.app.state.ctx


def authenticate(ctx: Context, session, apikey: str | None) -> User:
    """The user behind an `apikey` header; no header means the anonymous user."""
    if apikey is None or apikey == ANONYMOUS_KEY:
        return session.get(User, ANONYMOUS_USER_ID)
    if not 10 <= len(apikey) <= 100:
        raise HordeError(401, "InvalidAPIKey", "apikey: malformed API key")
    user = session.execute(
        select(User).where(User.api_key_hash == hash_api_key(apikey, ctx.settings.key_salt))
    ).scalar_one_or_none()
    if user is None:
        raise HordeError(401, "InvalidAPIKey", "apikey: unknown API key")
    return user
