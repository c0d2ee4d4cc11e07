"""Claim and finish on the real PostgreSQL: what each costs, and what each still writes.

A job with no webhook and no batch is claimed and finished with one statement each (no
BEGIN/COMMIT around it). A job with a webhook records its job.started delivery in the
claim's transaction, and a batch job ends its batch in the finish's.
"""

from __future__ import annotations

from unittest import mock

from sqlalchemy import text
from sqlalchemy.orm import Session

from spool import db
from tests import support
from workers import lease


def _status(job_id: str) -> tuple[str, int]:
    with db.transaction() as s:
        row = s.execute(text("SELECT status, attempts FROM jobs WHERE id = :i"), {"i": job_id})
        status, attempts = row.one()
        return status, attempts


def test_plain_job_is_claimed_and_finished_in_one_statement_each(
    statements: list[str],
) -> None:
    model, queue = support.own_queue()
    job_id = support.queue_job(support.create_user_id(), model)
    statements.clear()

    c = lease.claim(queue, "test-worker")
    claim_statements, statements[:] = list(statements), []
    assert c is not None and c.job_id == job_id and c.plain
    assert _status(job_id) == ("running", 1)
    statements.clear()
    assert lease.finish(c, "succeeded", {"value": 1})
    finish_statements = list(statements)

    assert len(claim_statements) == 1, claim_statements
    assert claim_statements[0].startswith("auto:EXECUTE spool_claim_"), claim_statements
    assert len(finish_statements) == 1, finish_statements
    assert finish_statements[0].startswith("auto:EXECUTE spool_finish_"), finish_statements
    assert _status(job_id) == ("succeeded", 1)
    assert lease.claim(queue, "test-worker") is None  # nothing left, nothing taken twice


def test_plain_job_makes_no_orm_session() -> None:
    """A plain claim, renewal and finish run on a bare connection: making an ORM
    Session for a single statement cost more CPU than the statement itself."""
    model, queue = support.own_queue()
    support.queue_job(support.create_user_id(), model)
    init = Session.__init__
    with mock.patch.object(Session, "__init__", autospec=True, side_effect=init) as made:
        c = lease.claim(queue, "test-worker")
        assert c is not None
        assert lease.renew([c]) == {c.job_id: "running"}
        assert lease.finish(c, "succeeded", {"value": 1})
    assert made.call_count == 0


def test_webhook_job_records_started_in_the_claims_transaction(statements: list[str]) -> None:
    model, queue = support.own_queue()
    hook = "http://hooks.example/spool"
    job_id = support.queue_job(
        support.create_user_id(), model, webhook=hook, webhook_events=["started", "completed"]
    )
    statements.clear()

    c = lease.claim(queue, "test-worker")
    assert c is not None and c.job_id == job_id and c.webhook and not c.plain
    with db.transaction() as s:
        told = s.execute(
            text("SELECT event FROM webhook_deliveries WHERE job_id = :i"), {"i": job_id}
        ).scalars()
        assert list(told) == ["job.started"]
    # The first, autocommitted statement left the job queued; the claim in a transaction
    # took it, so it ran once.
    assert _status(job_id) == ("running", 1)
    claims = [st for st in statements if "EXECUTE spool_claim_" in st]
    assert claims[0].startswith("auto:") and not claims[1].startswith("auto:"), statements
    assert len(claims) == 2, statements

    assert lease.finish(c, "succeeded", {"value": 1})
    with db.transaction() as s:
        events = s.execute(
            text("SELECT event FROM webhook_deliveries WHERE job_id = :i ORDER BY created_at"),
            {"i": job_id},
        ).scalars()
        assert list(events) == ["job.started", "job.completed"]


def test_best_job_first_even_when_it_needs_a_transaction() -> None:
    model, queue = support.own_queue()
    user_id = support.create_user_id()
    plain = support.queue_job(user_id, model, priority="low")
    hooked = support.queue_job(user_id, model, priority="high", webhook="http://hooks.example/x")

    first = lease.claim(queue, "test-worker")
    second = lease.claim(queue, "test-worker")
    assert first is not None and second is not None
    assert (first.job_id, second.job_id) == (hooked, plain)
    assert first.webhook and second.plain
