from __future__ import annotations

import pytest

from spool import states
from spool.states import Status


def test_terminal_states_have_no_way_out() -> None:
    for s in states.TERMINAL:
        assert states.TRANSITIONS[s] == frozenset()
        assert states.is_terminal(s)


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        ("queued", "running"),
        ("queued", "canceled"),
        ("queued", "expired"),
        ("running", "succeeded"),
        ("running", "failed"),
        ("running", "canceling"),
        ("running", "queued"),
        ("canceling", "canceled"),
    ],
)
def test_allowed(src: str, dst: str) -> None:
    states.check_transition(src, dst)


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        ("succeeded", "running"),
        ("expired", "queued"),
        ("canceled", "running"),
        ("queued", "succeeded"),
        ("canceling", "running"),
        ("failed", "queued"),
    ],
)
def test_refused(src: str, dst: str) -> None:
    with pytest.raises(states.InvalidTransition):
        states.check_transition(src, dst)


def test_priorities_order_high_first() -> None:
    p = states.PRIORITIES
    assert p["high"] < p["normal"] < p["low"]  # the Redis transport pops lower numbers first
    assert Status("queued") is Status.QUEUED
