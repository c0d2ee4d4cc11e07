"""API keys: random, shown once, stored only as a SHA-256 hash.

Keys carry 256 bits of randomness, so a fast hash is safe here (no dictionary to
attack) and lets every token request look a key up by its hash in one query.
"""

from __future__ import annotations

import hashlib
import secrets

KEY_PREFIX = "sk_"


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def display_prefix(key: str) -> str:
    return key[:10]
