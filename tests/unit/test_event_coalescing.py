"""The courier's folding of one round's events: fewer entries, the same story."""

from __future__ import annotations

from workers.context import coalesce


def _tok(job: str, text: str) -> tuple[str, str, dict[str, object]]:
    return (job, "token", {"text": text})


def _prog(job: str, current: int, total: int = 9) -> tuple[str, str, dict[str, object]]:
    return (job, "progress", {"current": current, "total": total})


def test_a_jobs_tokens_join_and_its_latest_progress_comes_after_them() -> None:
    round_ = []
    for step in (1, 2, 3):  # a batch of two jobs, a token and a progress each per step
        round_ += [
            _tok("a", f"a{step} "),
            _prog("a", step),
            _tok("b", f"b{step} "),
            _prog("b", step),
        ]
    assert coalesce(round_) == [
        _tok("a", "a1 a2 a3 "),
        _tok("b", "b1 b2 b3 "),
        _prog("a", 3),
        _prog("b", 3),
    ]


def test_a_step_with_no_text_still_moves_progress() -> None:
    # A token ending inside a multi-byte character sends no text, only its progress.
    assert coalesce([_prog("a", 1), _prog("a", 2), _tok("a", "é"), _prog("a", 3)]) == [
        _tok("a", "é"),
        _prog("a", 3),
    ]


def test_another_event_is_a_barrier_nothing_crosses() -> None:
    status = ("a", "status", {"status": "running"})
    got = coalesce([_tok("a", "x"), _prog("a", 1), status, _tok("a", "y"), _prog("a", 2)])
    assert got == [_tok("a", "x"), _prog("a", 1), status, _tok("a", "y"), _prog("a", 2)]


def test_the_reported_events_are_not_changed() -> None:
    first, second = _tok("a", "x"), _tok("a", "y")
    coalesce([first, second])
    assert first == _tok("a", "x") and second == _tok("a", "y")


def test_nothing_to_fold() -> None:
    assert coalesce([]) == []
    single = [_prog("a", 1)]
    assert coalesce(single) == single
