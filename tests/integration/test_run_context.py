"""A running job's context and its courier, on the real Redis and PostgreSQL.

A backend reports from its batch thread; the courier sends in the background. What a
client sees must not change: every event, in order, before the job's final status.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from spool import events
from spool.jobs import CANCEL_KEY
from tests import support
from workers import lease
from workers.backends.base import JobCanceled
from workers.context import CANCEL_POLL_S, RunContext


def _context() -> RunContext:
    claim = lease.Claim(
        job_id=f"job_{uuid.uuid4().hex[:20]}",
        token=uuid.uuid4().hex,
        kind="text.generate",
        model="tiny-llm",
        input={},
        attempts=1,
        timeout_s=60,
        user_id="usr_test",
    )
    return RunContext(claim)


def test_events_of_many_jobs_go_out_in_order_before_close_returns(database_url: str) -> None:
    steps = 300
    contexts = [_context() for _ in range(4)]
    for step in range(1, steps + 1):  # a batch of 4 jobs, a token and a progress per step
        for ctx in contexts:
            ctx.token(f"t{step} ")
            ctx.progress(step, steps)
    text = "".join(f"t{step} " for step in range(1, steps + 1))
    for ctx in contexts:
        unsent = ctx.close()  # lease.finish publishes these just before the final status
        events.publish_status(ctx.job_id, "succeeded", before=unsent)
        sent = [(e.type, e.data) for e in events.history(ctx.job_id)]
        assert sent[-2:] == [("status", {"status": "succeeded"}), ("done", {"status": "succeeded"})]
        sent = sent[:-2]
        # Each round's tokens of a job come folded into one event, its progress after
        # them: the whole text, progress only going up to the last step, never ahead of
        # the text sent before it.
        assert "".join(d["text"] for t, d in sent if t == "token") == text
        progress = [d for t, d in sent if t == "progress"]
        assert progress[-1] == {"current": steps, "total": steps}
        currents = [d["current"] for d in progress]
        assert currents == sorted(set(currents))
        shown = 0
        for type_, data in sent:
            if type_ == "token":
                shown += data["text"].count("t")
            else:
                assert data["current"] <= shown
        assert len(sent) < 2 * steps  # folded: the loop reports far faster than a round


def test_a_short_job_hands_its_unsent_events_to_its_finish(database_url: str) -> None:
    """A job over before the courier's round (an echo) has its `running` status sent with
    its end, in one round trip, not by the courier first."""
    from workers.context import COALESCE_S

    ctx = _context()
    ctx.announce_running()
    ctx.token("hi")
    ctx.token(" there")
    unsent = ctx.close()
    running = {"status": "running", "attempt": 1}
    assert unsent == [
        (ctx.job_id, "status", running),
        (ctx.job_id, "token", {"text": "hi there"}),  # folded as the courier would
    ]
    time.sleep(COALESCE_S * 5)
    assert events.history(ctx.job_id) == []  # the courier did not send them too
    events.publish_status(ctx.job_id, "succeeded", before=unsent)
    assert [(e.type, e.data) for e in events.history(ctx.job_id)] == [
        ("status", running),
        ("token", {"text": "hi there"}),
        ("status", {"status": "succeeded"}),
        ("done", {"status": "succeeded"}),
    ]


def test_cancel_flag_is_seen_within_a_poll(database_url: str, redis_client: Any) -> None:
    ctx = _context()
    try:
        ctx.check()
        assert not ctx.canceled()
        redis_client.set(CANCEL_KEY.format(ctx.job_id), "1", ex=60)
        t0 = time.monotonic()
        support.wait_until(ctx.canceled, timeout=2, every=0.005, what="the cancel flag")
        assert time.monotonic() - t0 < CANCEL_POLL_S + 0.5
        with pytest.raises(JobCanceled):
            ctx.check()
    finally:
        ctx.close()


def test_a_closed_job_is_no_longer_polled(database_url: str, redis_client: Any) -> None:
    ctx = _context()
    ctx.close()
    redis_client.set(CANCEL_KEY.format(ctx.job_id), "1", ex=60)
    time.sleep(CANCEL_POLL_S * 4)
    assert not ctx.canceled()


def test_a_job_shorter_than_a_poll_sends_no_poll(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first job after an idle spell starts the poll clock: an echo job of a few ms
    does not pay for an MGET racing it for the CPU."""
    from workers import context

    polled: list[int] = []
    real = context._poll_cancel
    monkeypatch.setattr(context, "_poll_cancel", lambda w: (polled.append(len(w)), real(w)))
    time.sleep(CANCEL_POLL_S * 2)  # whatever an earlier test left watched is long gone
    polled.clear()
    ctx = _context()
    ctx.token("hi")
    # a round of the courier while the job is watched
    support.wait_until(lambda: events.history(ctx.job_id), timeout=2, every=0.005, what="a round")
    ctx.close()
    time.sleep(CANCEL_POLL_S * 3)
    assert polled == []
    ctx = _context()  # one that runs for longer is polled, one poll interval in
    try:
        support.wait_until(lambda: polled, timeout=2, every=0.005, what="a poll")
    finally:
        ctx.close()


def test_heartbeat_wakes_for_a_first_job_only(database_url: str) -> None:
    """The heartbeat thread sleeps a whole interval between beats, however often the set
    of running jobs empties and fills again (short jobs do, all the time), and wakes at
    once only for a first job after an idle spell. A job with no row (here: never
    claimed) is given up at its first beat."""
    from workers.context import Heartbeat

    hb = Heartbeat(interval_s=0.6)
    woke: list[float] = []
    real_wait = hb._cond.wait

    def wait(timeout: float | None = None) -> bool:
        got = real_wait(timeout)
        woke.append(time.monotonic())
        return got

    hb._cond.wait = wait  # type: ignore[method-assign]
    first, second, third = _context(), _context(), _context()
    t0 = time.monotonic()
    hb.add(first)  # starts the thread: next beat one interval on
    time.sleep(0.1)
    hb.remove(first)
    hb.add(second)  # the set was empty a moment: no wake-up for this
    time.sleep(0.2)
    assert woke == []
    assert second.lost.wait(2.0)  # beaten at the interval's end: no row, so given up
    assert 0.5 <= time.monotonic() - t0 < 1.5
    assert not first.lost.is_set()
    time.sleep(0.1)  # idle now: no job to renew
    n = len(woke)
    hb.add(third)  # a first job after an idle spell wakes the thread at once
    time.sleep(0.1)
    assert len(woke) == n + 1
    assert third.lost.wait(2.0)
