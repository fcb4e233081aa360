"""Rate limits per API key and per client address, on the `limits` library: moving windows kept
in memory (each API replica counts on its own) or in Redis (one count across all replicas).

A caller over a limit gets 429 `{message, rc: "TooManyRequests"}` with `Retry-After`. Keys are
counted by a digest, never by the key itself, so not even the limiter's store holds a secret.
"""

from __future__ import annotations

import hashlib
import math
import time

from limits import parse, storage, strategies

from api.auth import ANONYMOUS_KEY
from api.errors import HordeError


class RateLimiter:
    def __init__(self, storage_uri: str, limits: dict[str, str]):
        """`limits`: route group -> limit string ("60/minute")."""
        self.strategy = strategies.MovingWindowRateLimiter(storage.storage_from_string(storage_uri))
        self.limits = {group: parse(text) for group, text in limits.items()}

    def check(self, group: str, apikey: str | None, client_ip: str) -> None:
        """Count one call of `group` against the key (unless anonymous) and the address."""
        item = self.limits[group]
        subjects = [("ip", client_ip)]
        if apikey and apikey != ANONYMOUS_KEY:
            subjects.append(("key", hashlib.sha256(apikey.encode()).hexdigest()[:24]))
        for kind, subject in subjects:
            if not self.strategy.hit(item, group, kind, subject):
                reset_at, _ = self.strategy.get_window_stats(item, group, kind, subject)
                retry = max(1, math.ceil(reset_at - time.time()))
                who = "API key" if kind == "key" else "address"
                raise HordeError(429, "TooManyRequests",
                                 f"too many {group} requests from this {who}: at most {item}; "
                                 f"retry in {retry} s", headers={"Retry-After": str(retry)})
