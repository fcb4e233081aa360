"""Helpers the benchmarks share."""

from __future__ import annotations

import json
import time
from contextlib import asynccontextmanager


from api.db import queue
from api.db.models import Request
from api.db.session import Database

PARAMS = {"width": 512, "height": 512, "steps": 30, "cfg_scale": 5, "sampler_name": "k_euler",
          "karras": True, "clip_skip": 1, "tiling": False, "hires_fix": False,
          "post_processing": []}
# Benchmarks measure the API, not its limits: no rate limits, no per-requester cap, and workers
# that claim without submitting (as the pop benchmark's do) are not put into maintenance.
UNLIMITED = {"rate_limit_submit": "1000000/minute", "rate_limit_poll": "1000000/minute",
             "rate_limit_pop": "1000000/minute", "max_waiting_per_user": 10**9,
             "max_consecutive_drops": 10**9,
             "max_workers_per_user": 10**9}  # pop_latency.py pops as 16 workers of one user


class Reply:
    """An answer read whole: what the load clients look at."""

    __slots__ = ("status_code", "content")

    def __init__(self, status_code: int, content: bytes):
        self.status_code, self.content = status_code, content

    def json(self):
        return json.loads(self.content)

    @property
    def text(self) -> str:
        return self.content.decode(errors="replace")


class Http:
    """The benches' HTTP clients: aiohttp, whose client costs a fraction of httpx's CPU per
    call. The clients share the machine with the API they measure: with 200 connections httpx
    kept bench/load.py's core busy while the API idled, so the bench measured itself."""

    def __init__(self, session):
        self.session = session

    async def call(self, method: str, url: str, headers: dict | None = None, json_body=None,
                   content: bytes | None = None) -> Reply:
        async with self.session.request(method, url, headers=headers, json=json_body,
                                        data=content) as r:
            return Reply(r.status, await r.read())

    def get(self, url, headers=None):
        return self.call("GET", url, headers)

    def post(self, url, headers=None, json=None):
        return self.call("POST", url, headers, json_body=json)

    def put(self, url, content: bytes, headers=None):
        return self.call("PUT", url, headers, content=content)


@asynccontextmanager
async def http_client(connections: int, headers: dict | None = None, timeout: float = 60):
    """An Http over one aiohttp session of `connections` connections."""
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections),
                                     headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        yield Http(session)


def pct(xs: list[float], p: float) -> float:
    """The p-quantile (0..1) of `xs`, nearest rank."""
    return sorted(xs)[min(len(xs) - 1, int(len(xs) * p))]


def fill(db: Database, waiting: int, model: str = "tiny-sd15", batch: int = 5000) -> None:
    """`waiting` generations in requests of 20 (anonymous, consecutive seeds), head starts
    spread over a few minutes as real kudos balances spread them."""
    made = 0
    while made < waiting:
        with db.write() as s:
            for _ in range(max(1, min(batch, waiting - made) // 20)):
                n = min(20, waiting - made)
                now = time.time()
                req = Request(kind="image", user_id=0, prompt="p", n=n, models=[model],
                              params=PARAMS, kudos=n + 1.0, created_at=now, requester="u:0")
                s.add(req)
                s.flush()
                queue.enqueue(s, req, list(range(n)), [model], sort_key=now - made % 97,
                              filters=queue.EntryFilters(
                                  user_id=0, steps=PARAMS["steps"], pixels=512 * 512,
                                  megapixelsteps=512 * 512 * PARAMS["steps"] / 1e6),
                              reward=1.0, tax=1.0 / n)
                made += n
                if made >= waiting:
                    break
