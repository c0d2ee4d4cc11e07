"""Schemathesis against the running platform's own /openapi.json, as an authenticated user.

Generated requests (valid and invalid) must never get a 5xx, and every response must
match the document: documented status, content type, headers and body schema.
Authenticated endpoints must refuse a request without the token. Operations that block
(`?wait=`) or stream (events, batch results) are left out; the rest are bounded by a
small example count per operation.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterator

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests import support

MAX_EXAMPLES = 25
# Batches also take NDJSON (a string in the document): send it as the text it is.
schemathesis.serializer.alias("application/x-ndjson", "text/plain")
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    ignored_auth,
]


@pytest.fixture(scope="module")
def st_token(platform: support.Platform) -> str:
    r = requests.post(
        platform.url + "/v1/auth/token", json={"api_key": support.create_user()}, timeout=10
    )
    r.raise_for_status()
    return str(r.json()["access_token"])


@pytest.fixture(scope="module")
def st_session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        yield s


def load_schema(platform: support.Platform) -> schemathesis.BaseSchema:
    return (
        schemathesis.openapi.from_url(platform.url + "/openapi.json")
        .exclude(path_regex=r"/events$")  # SSE: streams until the job ends
        .exclude(path_regex=r"^/v1/batches/\{batch_id\}/results$")  # NDJSON stream
        .exclude(path_regex=r"^(/result/|/v1/jobs/\{job_id\}/result$)")  # ?wait= long polls
        .exclude(path="/metrics")  # Prometheus text; nothing to generate
    )


# Jobs only get past validation with a model of their kind and an input of that kind's
# shape, which the document cannot spell out (models come from the registry): half of
# the generated job bodies become echo jobs carrying the generated input as their value,
# so the fuzzer reaches intake, the database and the queue rather than stopping at 422.
def steer(case: schemathesis.Case, flip: bool) -> schemathesis.Case:
    if not flip or case.method.upper() != "POST" or not isinstance(case.body, dict):
        return case
    jobs = [case.body] if case.path == "/v1/jobs" else case.body.get("jobs")
    for job in jobs if isinstance(jobs, list) else []:
        if isinstance(job, dict) and "input" in job:
            job.update(kind="echo", model="echo", input={"value": job["input"]})
    return case


# Product bugs already reported, matched by operation (None: any) and pieces of the
# failure text; they are shown as an expected failure instead of failing the run, and
# their entry goes when they are fixed. Any other failure fails the run.
KNOWN_BUGS: list[tuple[str | None, tuple[str, ...], str]] = []


def known_bug(label: str, text: str) -> str | None:
    for op, pieces, why in KNOWN_BUGS:
        if op in (None, label) and all(p in text for p in pieces):
            return why
    return None


# Not `schemathesis.pytest.from_fixture(...).parametrize()`: with pytest 9 it fails on
# `request.node._nodeid` (schemathesis 4.32), so each operation's strategy is driven here.
@pytest.mark.slow
@pytest.mark.parametrize(
    "mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value
)
def test_api_conforms_to_its_openapi_document(
    platform: support.Platform,
    st_token: str,
    st_session: requests.Session,
    mode: GenerationMode,
) -> None:
    headers = {"Authorization": f"Bearer {st_token}"}
    failures: list[str] = []
    known: list[str] = []
    statuses: dict[str, Counter[int]] = defaultdict(Counter)
    operations = 0
    for result in load_schema(platform).get_all_operations():
        if not isinstance(result, Ok):
            raise result.err()  # the document itself is broken
        operation = result.ok()
        operations += 1
        strategy = operation.as_strategy(generation_mode=mode)
        if mode is GenerationMode.POSITIVE:
            strategy = st.tuples(strategy, st.booleans()).map(lambda cf: steer(*cf))

        @given(case=strategy)
        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            database=None,  # no .hypothesis/ in the repository
            suppress_health_check=list(HealthCheck),
            phases=[Phase.explicit, Phase.generate, Phase.shrink],
        )
        def run(case: schemathesis.Case) -> None:
            r = case.call_and_validate(
                session=st_session, headers=headers, checks=CHECKS, timeout=30
            )
            statuses[case.operation.label][r.status_code] += 1

        try:
            run()
        except Unsatisfiable:
            # No invalid request can be made for an operation without parameters or body.
            if mode is not GenerationMode.NEGATIVE:
                raise
        except (FailureGroup, Exception) as exc:  # FailureGroup's text has a curl reproduction
            text = f"{operation.label}: {type(exc).__name__}: {exc}"
            bug = known_bug(operation.label, text)
            (known if bug else failures).append(f"[known: {bug}] {text}" if bug else text)
    assert operations >= 12
    if mode is GenerationMode.POSITIVE:
        # The steering works: generated jobs got past validation into the queue.
        assert statuses["POST /v1/jobs"][202] > 0, dict(statuses)
    assert not failures, "\n\n".join(failures)
    if known:
        pytest.xfail("known product bugs:\n\n" + "\n\n".join(known))
