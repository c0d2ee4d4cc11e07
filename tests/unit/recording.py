"""A JobContext for driving backends directly: it records what a backend reports."""

from __future__ import annotations

from typing import Any

from workers.backends.base import JobCanceled, JobTimedOut


class RecordingContext:
    """Records progress, tokens and artifacts; cancels (or times out) at the n-th check."""

    def __init__(
        self,
        job_input: dict[str, Any],
        job_id: str = "job_test",
        cancel_at_check: int | None = None,
        timeout_at_check: int | None = None,
    ) -> None:
        self.job_id = job_id
        self.input = job_input
        self.cancel_at_check = cancel_at_check
        self.timeout_at_check = timeout_at_check
        self.checks = 0
        self.progress_calls: list[tuple[int, int]] = []
        self.tokens: list[str] = []
        self.artifacts: dict[str, tuple[bytes, str]] = {}

    def progress(self, current: int, total: int) -> None:
        self.progress_calls.append((current, total))

    def token(self, text: str) -> None:
        self.tokens.append(text)

    def canceled(self) -> bool:
        return self.cancel_at_check is not None and self.checks >= self.cancel_at_check

    def check(self) -> None:
        self.checks += 1
        if self.canceled():
            raise JobCanceled("canceled")
        if self.timeout_at_check is not None and self.checks >= self.timeout_at_check:
            raise JobTimedOut("timed out")

    def save_artifact(self, name: str, data: bytes, content_type: str) -> str:
        self.artifacts[name] = (data, content_type)
        return f"https://files.test/{self.job_id}/{name}"
