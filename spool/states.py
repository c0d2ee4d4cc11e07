"""The job state machine of API.md, in one place.

queued → running → succeeded | failed | canceled; queued → expired | canceled;
running → canceling → canceled. A running job whose worker died goes back to
queued (retried) until attempts run out.
"""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    CANCELING = "canceling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    EXPIRED = "expired"


TERMINAL = frozenset({Status.SUCCEEDED, Status.FAILED, Status.CANCELED, Status.EXPIRED})
ACTIVE = frozenset({Status.RUNNING, Status.CANCELING})
RETRYABLE = frozenset({Status.FAILED, Status.CANCELED, Status.EXPIRED})

TRANSITIONS: dict[Status, frozenset[Status]] = {
    Status.QUEUED: frozenset({Status.RUNNING, Status.CANCELED, Status.EXPIRED, Status.FAILED}),
    Status.RUNNING: frozenset(
        {Status.SUCCEEDED, Status.FAILED, Status.CANCELING, Status.CANCELED, Status.QUEUED}
    ),
    Status.CANCELING: frozenset({Status.CANCELED, Status.SUCCEEDED, Status.FAILED}),
    Status.SUCCEEDED: frozenset(),
    Status.FAILED: frozenset(),
    Status.CANCELED: frozenset(),
    Status.EXPIRED: frozenset(),
}


class InvalidTransition(ValueError):
    pass


def can_transition(src: str, dst: str) -> bool:
    return Status(dst) in TRANSITIONS[Status(src)]


def check_transition(src: str, dst: str) -> None:
    if not can_transition(src, dst):
        raise InvalidTransition(f"a {src} job cannot become {dst}")


def is_terminal(status: str) -> bool:
    return Status(status) in TERMINAL


# Priorities: the Redis transport pops lower numbers first (0 is served first).
PRIORITIES: dict[str, int] = {"high": 0, "normal": 3, "low": 6}
