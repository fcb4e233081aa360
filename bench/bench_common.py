"""Helpers the benchmarks share."""

from __future__ import annotations

import time


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
