"""Opaque, sortable-enough ids with a type prefix (job_…, usr_…)."""

from __future__ import annotations

import secrets

_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"


def new_id(prefix: str, length: int = 20) -> str:
    # One urandom read and base-36 digits of it: a batch mints 50,000 ids, and a
    # secrets.choice() per character cost ~45 µs an id. Two spare bytes keep the
    # modulo bias of each digit far below anything observable.
    n = int.from_bytes(secrets.token_bytes(length * 517 // 800 + 3), "big")
    chars = []
    for _ in range(length):
        n, digit = divmod(n, 36)
        chars.append(_ALPHABET[digit])
    return prefix + "_" + "".join(chars)
