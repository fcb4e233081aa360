"""API keys: generated once, shown once, stored as a salted SHA-256 digest."""

from __future__ import annotations

import hashlib
import secrets

ANONYMOUS_KEY = "0000000000"
ANONYMOUS_USER_ID = 0


def hash_api_key(key: str, salt: str) -> str:
    return hashlib.sha256(f"{salt}:{key}".encode()).hexdigest()


def new_api_key() -> str:
    # 22 characters, like the AI Horde's own keys.
    return secrets.token_urlsafe(16)
