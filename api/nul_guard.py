"""Refuse NUL characters in a request's path, query or JSON body with 400 naming where they
are (`prompt: NUL characters are not allowed`). PostgreSQL text cannot hold a NUL, so any
string carrying one would otherwise fail at the database as a 500, on every route that stores
or looks up a client's string; one check at the ASGI boundary covers them all.

Bodies that are not JSON (a worker's image upload) pass untouched: only a JSON document can
carry a NUL as the `\\u0000` escape (a raw NUL byte makes it invalid JSON, refused anyway).
"""

from __future__ import annotations

import json
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Message, Receive, Scope, Send

NUL = "\x00"


def _in_json(node, path: str = "") -> str | None:
    """The dotted path of the first string (or key) holding a NUL, if any."""
    if isinstance(node, str):
        return (path or "body") if NUL in node else None
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        return None
    for key, value in items:
        here = f"{path}.{key}" if path else str(key)
        if isinstance(key, str) and NUL in key:
            return here
        found = _in_json(value, here)
        if found:
            return found
    return None


def _in_url(scope: Scope) -> str | None:
    if b"%00" in scope.get("raw_path", b"") or NUL in scope["path"]:
        return "path"
    query = scope.get("query_string", b"")
    if b"%00" in query or b"\x00" in query:
        for key, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
            if NUL in key or NUL in value:
                return key.replace(NUL, "") or "query"
        return "query"
    return None


def _in_body(body: bytes) -> str | None:
    if b"\\u0000" not in body:  # the cheap test; almost every body stops here
        return None
    try:
        return _in_json(json.loads(body))
    except (ValueError, RecursionError):
        return None  # not JSON: the route decides what to make of it


class RefuseNul:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        where = _in_url(scope)
        headers = dict(scope.get("headers") or [])
        content_type = headers.get(b"content-type", b"application/json")
        if where is not None:
            return await self._refuse(scope, send, where)
        if b"json" not in content_type.lower():
            return await self.app(scope, receive, send)
        messages: list[Message] = []
        while True:  # the whole body (BodySizeLimit, outside this, bounds it)
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        where = _in_body(b"".join(m.get("body", b"") for m in messages))
        if where is not None:
            return await self._refuse(scope, send, where)

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(scope: Scope, send: Send, where: str) -> None:
        where = where.replace(NUL, "")
        message = f"{where}: NUL characters are not allowed"
        if scope["path"].startswith("/v1/"):  # the OpenAI routes answer in OpenAI's shape
            answer = {"error": {"message": message, "type": "invalid_request_error",
                                "param": where, "code": "BadRequest"}}
        else:
            answer = {"message": message, "rc": "BadRequest"}
        body = json.dumps(answer).encode()
        await send({"type": "http.response.start", "status": 400,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
