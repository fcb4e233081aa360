"""Rate limits on the `limits` library: moving windows kept in memory (each API replica counts
on its own) or in Redis (one count across all replicas).

Who counts against which limit (api/routes/deps.py `rate_limited` decides): a call whose API key
belongs to a user counts against that user, wherever it comes from, and submits at the user's
tier (registered or trusted, the AI Horde's 90 and 300 a minute); any other call (no key, the
anonymous key, a key no user has) counts against its client address. A caller over a limit gets
429 `{message, rc: "TooManyRequests"}` with `Retry-After`. Subjects are a user id or a digest of
the address, so the limiter's store holds neither a key nor an address in the clear.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from limits import RateLimitItem, parse, storage, strategies

from api import metrics
from api.errors import HordeError


@lru_cache(maxsize=64)
def parse_limit(text: str) -> RateLimitItem:
    return parse(text)


def per_second(text: str) -> float:
    item = parse_limit(text)
    return item.amount / item.get_expiry()


def at_least(*limits: str) -> str:
    """The most generous of `limits`: a higher tier never gets less than the one below it
    (tests and benches that lift the anonymous limit lift every tier with it)."""
    return max(limits, key=per_second)


def address_subject(address: str) -> str:
    return "ip:" + hashlib.sha256(address.encode()).hexdigest()[:24]


def user_subject(user_id: int) -> str:
    return f"user:{user_id}"


@dataclass(frozen=True)
class Caller:
    """A user an API key belongs to, as the limiter needs it."""

    user_id: int
    trusted: bool


class CallerCache:
    """API key digest -> Caller (or None: no such user), each kept `ttl` seconds, at most
    `size` of them (the oldest go first). It spares the database a lookup on every call; the
    price is that a role change or a revoked key reaches the limiter up to `ttl` late (the
    routes themselves always authenticate against the database)."""

    def __init__(self, ttl: float = 60.0, size: int = 10_000):
        self.ttl, self.size = ttl, size
        self._entries: OrderedDict[str, tuple[float, Caller | None]] = OrderedDict()
        self._lock = threading.Lock()

    def cached(self, digest: str) -> bool:
        with self._lock:
            hit = self._entries.get(digest)
            return hit is not None and hit[0] > time.monotonic()

    def get(self, digest: str, load: Callable[[], Caller | None]) -> Caller | None:
        now = time.monotonic()
        with self._lock:
            hit = self._entries.get(digest)
            if hit is not None and hit[0] > now:
                return hit[1]
        caller = load()
        with self._lock:
            self._entries[digest] = (now + self.ttl, caller)
            self._entries.move_to_end(digest)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return caller


class RateLimiter:
    def __init__(self, storage_uri: str, limits: dict[str, str]):
        """`limits`: route group -> limit string ("60/minute")."""
        self.strategy = strategies.MovingWindowRateLimiter(storage.storage_from_string(storage_uri))
        # Counting in memory takes microseconds and never blocks: the routes count on the
        # event loop then; a network store (Redis) is counted from the thread pool.
        self.in_memory = storage_uri.startswith("memory://")
        self.limits = {group: parse_limit(text) for group, text in limits.items()}
        self.callers = CallerCache()

    def check(self, group: str, subject: str, limit: str | None = None) -> None:
        """Count one call of `group` against `subject` (`address_subject` or `user_subject`), at
        `limit` when given, else the group's own."""
        self.spend(group, subject, 1, limit, f"{group} requests")

    def spend(self, group: str, subject: str, cost: int, limit: str | None = None,
              what: str | None = None) -> None:
        """Count `cost` units of `group` (calls, or e.g. decoded source pixels) against
        `subject`; 429 when the window has no room for all of them (nothing is counted then)."""
        item = parse_limit(limit) if limit is not None else self.limits[group]
        if not self.strategy.hit(item, group, subject, cost=cost):
            reset_at, _ = self.strategy.get_window_stats(item, group, subject)
            retry = max(1, math.ceil(reset_at - time.time()))
            who = "user" if subject.startswith("user:") else "address"
            metrics.rate_limited(group)
            raise HordeError(429, "TooManyRequests",
                             f"too many {what or group} from this {who}: at most {item}; "
                             f"retry in {retry} s", headers={"Retry-After": str(retry)})
