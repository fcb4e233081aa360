"""API keys: generated once, shown once, stored as a salted SHA-256 digest."""

from __future__ import annotations

import hashlib
import secrets

ANONYMOUS_KEY = "0000000000"
ANONYMOUS_USER_ID = 0


def hash_api_key(key: str, salt: str) -> str:
    return hashlib.sha256(f"{salt}:{key}".encode()).hexdigest()


def new_api_key() -> str:
    """22 characters, like the AI Horde's own keys. Never starting with "-": volunteers pass
    keys on command lines (`rayhorde join --api-key KEY`), where one would read as an option."""
    while (key := secrets.token_urlsafe(16)).startswith("-"):
        pass
    return key


def node_key_digest(key: str) -> str:
    """What a volunteer's Ray node carries (as a label) to name its owner: a digest of the API
    key in its own domain, so the label neither is the key nor matches the stored hash.
    48 hex digits (192 bits): Ray label values hold at most 63 characters."""
    return hashlib.sha256(f"rayhorde-node:{key}".encode()).hexdigest()[:48]
