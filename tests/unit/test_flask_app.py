"""The app class: Flask's coroutine check made once per function."""

from __future__ import annotations

from api import SpoolFlask


def test_sync_functions_come_back_as_they_are_and_async_ones_wrapped() -> None:
    app = SpoolFlask("t")

    def view() -> str:
        return "sync"

    async def async_view() -> str:
        return "async"

    class Hooks:
        def method(self) -> str:
            return "method"

    assert app.ensure_sync(view) is view
    assert app.ensure_sync(view) is view  # remembered
    bound = Hooks().method
    assert app.ensure_sync(bound) is bound  # a fresh bound method each time is fine
    # Async is still told apart: Flask wraps it, or says it needs its [async] extra.
    try:
        wrapped = app.ensure_sync(async_view)
    except RuntimeError as exc:
        assert "async" in str(exc)
    else:
        assert wrapped is not async_view and wrapped() == "async"
