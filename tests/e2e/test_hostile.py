"""Hostile clients against the real platform: forged and stale tokens, absurd inputs,
bytes that are not UTF-8, wrong content types, other users' ids, and bursts at the rate
limits from many connections and several API processes at once (API.md)."""

from __future__ import annotations

import base64
import json
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from sqlalchemy import func, select

from spool.models import Job, User
from spool.settings import DEV_SECRET
from tests import support

ECHO = {"kind": "echo", "model": "echo"}


def err(r: requests.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """The response is `status` with API.md's error shape; returns the inner error."""
    assert r.status_code == status, (r.status_code, r.text[:500])
    assert r.headers["Content-Type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "details"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


def new_user(admin: bool = False) -> tuple[str, str]:
    """(name, API key) of a fresh user in the platform's database."""
    name = f"h_{uuid.uuid4().hex[:10]}"
    return name, support.create_user(name, admin=admin)


def token_for(platform: support.Platform, api_key: str) -> str:
    r = requests.post(platform.url + "/v1/auth/token", json={"api_key": api_key}, timeout=10)
    assert r.status_code == 200, r.text
    return str(r.json()["access_token"])


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def platform_secret(platform: support.Platform) -> str:
    return platform.env().get("SPOOL_SECRET_KEY") or DEV_SECRET


def claims_of(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# --- tokens ----------------------------------------------------------------------------


@pytest.fixture()
def real_token(platform: support.Platform, user_key: str) -> str:
    return token_for(platform, user_key)


def test_token_minted_with_the_platform_secret_is_accepted(
    platform: support.Platform, real_token: str
) -> None:
    # The control for the forgeries below: re-signing the real claims works, so each
    # 401 below is caused by the one thing each forgery changes.
    token = jwt.encode(claims_of(real_token), platform_secret(platform), algorithm="HS256")
    assert requests.get(platform.url + "/v1/jobs", headers=bearer(token), timeout=10).ok


def test_expired_token_is_401(platform: support.Platform, real_token: str) -> None:
    now = int(time.time())
    claims = {**claims_of(real_token), "iat": now - 7200, "nbf": now - 7200, "exp": now - 60}
    token = jwt.encode(claims, platform_secret(platform), algorithm="HS256")
    r = requests.get(platform.url + "/v1/jobs", headers=bearer(token), timeout=10)
    err(r, 401, "token_expired")


def test_token_accepted_before_is_401_once_it_expires(
    platform: support.Platform, real_token: str
) -> None:
    # The API remembers tokens it verified (api/extensions.py): a remembered token must
    # still stop working at its `exp`. Ten requests over fresh connections reach every
    # API process, so each has it remembered before it expires.
    exp = int(time.time()) + 3
    token = jwt.encode({**claims_of(real_token), "exp": exp}, platform_secret(platform))
    for _ in range(10):
        assert requests.get(platform.url + "/v1/jobs", headers=bearer(token), timeout=10).ok
    time.sleep(max(0.0, exp - time.time()) + 0.2)
    for _ in range(10):
        r = requests.get(platform.url + "/v1/jobs", headers=bearer(token), timeout=10)
        err(r, 401, "token_expired")


def test_token_with_wrong_signature_is_401(platform: support.Platform, real_token: str) -> None:
    forged = jwt.encode(claims_of(real_token), "not-the-secret-" + "x" * 40, algorithm="HS256")
    err(requests.get(platform.url + "/v1/jobs", headers=bearer(forged), timeout=10), 401)
    # A real token whose payload was edited (another subject) keeps a signature that no
    # longer matches.
    head, _payload, sig = real_token.split(".")
    payload = b64url(json.dumps({**claims_of(real_token), "sub": "usr_someone_else"}).encode())
    edited = f"{head}.{payload}.{sig}"
    err(requests.get(platform.url + "/v1/jobs", headers=bearer(edited), timeout=10), 401)


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
def test_alg_none_and_other_algorithms_are_401(platform: support.Platform, real_token: str) -> None:
    claims = claims_of(real_token)
    unsigned = ".".join(
        [
            b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode()),
            b64url(json.dumps(claims).encode()),
            "",
        ]
    )
    for token in (unsigned, unsigned + b64url(b"sig")):
        err(requests.get(platform.url + "/v1/jobs", headers=bearer(token), timeout=10), 401)
    # Right secret, algorithm not allowed (the API decodes HS256 only).
    hs512 = jwt.encode(claims, platform_secret(platform), algorithm="HS512")
    err(requests.get(platform.url + "/v1/jobs", headers=bearer(hs512), timeout=10), 401)


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer ", "Bearer a.b", "Bearer a.b.c", "Basic dXNlcjpwYXNz", "token"],
)
def test_missing_or_malformed_authorization_is_401(
    platform: support.Platform, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    for path in ("/v1/jobs", "/v1/models", "/v1/webhook-secret", "/v1/batches"):
        err(requests.get(platform.url + path, headers=headers, timeout=10), 401)
    r = requests.post(
        platform.url + "/v1/jobs", json={**ECHO, "input": {}}, headers=headers, timeout=10
    )
    err(r, 401)


def test_token_of_a_revoked_key_is_401(platform: support.Platform) -> None:
    from spool import db, users

    name, key = new_user()
    token = token_for(platform, key)
    job = requests.post(
        platform.url + "/v1/jobs", json={**ECHO, "input": {}}, headers=bearer(token), timeout=10
    )
    assert job.status_code == 202
    with db.transaction() as s:
        assert users.revoke(s, name) == 1
    # The hot views check the key in their own query; the others look it up first.
    for method, path in hot_paths(job.json()["id"]) + [("GET", "/v1/jobs")]:
        r = requests.request(
            method, platform.url + path, json=HOT_BODY, headers=bearer(token), timeout=10
        )
        err(r, 401, "token_revoked")
    r = requests.post(platform.url + "/v1/auth/token", json={"api_key": key}, timeout=10)
    err(r, 401)
    with db.transaction() as s:  # the refused submit recorded nothing
        mine = select(func.count(Job.id)).join(User, User.id == Job.user_id)
        assert s.scalar(mine.where(User.name == name)) == 1


HOT_BODY = {**ECHO, "input": {}}  # the POST's body (the GETs ignore it)


def hot_paths(job_id: str) -> list[tuple[str, str]]:
    """The views that check the token's key in their own query (api.auth)."""
    return [
        ("POST", "/v1/jobs"),
        ("GET", f"/v1/jobs/{job_id}"),
        ("GET", f"/result/{job_id}"),
        ("GET", f"/result/{job_id}?wait=1"),
        ("GET", f"/v1/jobs/{job_id}/result"),
    ]


def test_token_of_a_deleted_user_is_401(platform: support.Platform) -> None:
    from spool import db, users

    name, key = new_user()
    token = token_for(platform, key)
    job = requests.post(
        platform.url + "/v1/jobs", json={**ECHO, "input": {}}, headers=bearer(token), timeout=10
    )
    assert job.status_code == 202
    with db.transaction() as s:
        users.delete(s, name)
    paths = [("GET", "/v1/jobs"), ("POST", f"/v1/jobs/{job.json()['id']}/cancel")]
    for method, path in paths + hot_paths(job.json()["id"]):
        r = requests.request(
            method, platform.url + path, json=HOT_BODY, headers=bearer(token), timeout=10
        )
        err(r, 401, "token_revoked")
    r = requests.post(platform.url + "/v1/auth/token", json={"api_key": key}, timeout=10)
    err(r, 401)


# --- absurd inputs ---------------------------------------------------------------------

SD = {"kind": "image.generate", "model": "tiny-sd"}
LLM = {"kind": "text.generate", "model": "tiny-llm"}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**SD, "input": {"prompt": "x", "num_images": 10**9}}, "input.num_images"),
        ({**SD, "input": {"prompt": "x", "num_images": 9}}, "input.num_images"),
        ({**SD, "input": {"prompt": "x", "steps": 10**12}}, "input.steps"),
        ({**SD, "input": {"prompt": "x", "steps": 51}}, "input.steps"),  # model limit 50
        ({**SD, "input": {"prompt": "x", "width": 2**40}}, "input.width"),
        ({**SD, "input": {"prompt": "x", "width": 4096}}, "input.width"),  # model limit 256
        ({**SD, "input": {"prompt": "x", "height": 100}}, "input.height"),  # not a multiple of 8
        ({**SD, "input": {"prompt": "x", "num_images": -1}}, "input.num_images"),
        ({**SD, "input": {"prompt": "x", "num_images": "many"}}, "input.num_images"),
        ({**SD, "input": {"prompt": "x" * 2001}}, "input.prompt"),
        ({**SD, "input": {"prompt": "x", "seed": 2**64}}, "input.seed"),
        ({**LLM, "input": {"prompt": "x", "max_tokens": 10**12}}, "input.max_tokens"),
        ({**LLM, "input": {"prompt": "x", "max_tokens": 513}}, "input.max_tokens"),  # limit 512
        ({**LLM, "input": {"prompt": "x" * 200_000}}, "input.prompt"),
        (
            {**LLM, "input": {"messages": [{"role": "user", "content": "x"}] * 10_000}},
            "input.messages",
        ),
        ({**LLM, "input": {"prompt": "x", "stop": ["a"] * 1000}}, "input.stop"),
        ({**ECHO, "input": {"sleep_s": 10**9}}, "input.sleep_s"),
        ({**ECHO, "input": {}, "ttl_s": 10**15}, "ttl_s"),
        ({**ECHO, "input": {}, "timeout_s": 10**15}, "timeout_s"),
        ({**ECHO, "input": {}, "metadata": {"blob": "x" * 100_000}}, "metadata"),
        ({**ECHO, "input": {}, "webhook_events": ["completed"] * 1000}, "webhook_events"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_absurd_values_are_422_naming_the_field(
    api: support.Api, body: dict[str, Any], field: str
) -> None:
    e = err(api.post("/v1/jobs", json=body), 422, "validation_failed")
    assert field in e["details"], e
    assert field in e["message"]
    assert api.get("/v1/jobs").json()["data"] == []  # nothing was created


def test_float_overflow_is_rejected_not_stored(api: support.Api) -> None:
    # 1e999 parses as infinity in Python; PostgreSQL's jsonb cannot hold it.
    raw = (
        b'{"kind": "image.generate", "model": "tiny-sd", "input": {"prompt": "x", '
        b'"guidance_scale": 1e999}}'
    )
    r = api.post("/v1/jobs", data=raw, headers={"Content-Type": "application/json"})
    e = err(r, 422)
    assert "input.guidance_scale" in e["details"]


def test_declared_huge_body_is_413_without_reading_it(
    platform: support.Platform, real_token: str
) -> None:
    host, port = "127.0.0.1", int(platform.url.rsplit(":", 1)[1])
    head = (
        "POST /v1/jobs HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\nAuthorization: Bearer {real_token}\r\n"
        "Content-Type: application/json\r\nContent-Length: 10000000000\r\n"
        "Connection: close\r\n\r\n"
    )
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(head.encode() + b'{"kind": ')
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    status_line, _, rest = reply.partition(b"\r\n")
    assert b" 413 " in status_line, reply[:300]
    body = json.loads(rest.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "payload_too_large"


def test_deeply_nested_json_is_400(api: support.Api) -> None:
    depth = 100_000
    raw = b'{"kind": "echo", "model": "echo", "input": {"value": ' + b"[" * depth + b"]" * depth
    r = api.post("/v1/jobs", data=raw + b"}}", headers={"Content-Type": "application/json"})
    err(r, 400)


# --- bytes that are not UTF-8 ----------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b'{"kind": "echo", "model": "echo", "input": {"value": "\xff\xfe\xfd"}}',
        b'{"kind": "echo", "model": "\xc3\x28", "input": {}}',  # an invalid 2-byte sequence
        b'{"kind": "echo\x80", "model": "echo", "input": {}}',  # a lone continuation byte
        b'{"kind": "echo", "model": "echo", "input": {"value": "caf\xe9"}}',  # latin-1
    ],
)
def test_body_that_is_not_utf8_is_400(api: support.Api, raw: bytes) -> None:
    r = api.post("/v1/jobs", data=raw, headers={"Content-Type": "application/json"})
    err(r, 400)
    # A declared charset changes nothing: JSON is UTF-8 (RFC 8259).
    r = api.post(
        "/v1/jobs", data=raw, headers={"Content-Type": "application/json; charset=latin-1"}
    )
    err(r, 400)


def test_ids_and_filters_that_are_not_utf8(api: support.Api) -> None:
    for path in ("/v1/jobs/%FF%FE", "/result/job_%C3%28", "/v1/batches/%FF"):
        err(api.get(path), 404)
    err(api.post("/v1/jobs/%FF%FE/cancel"), 404)
    r = api.get("/v1/jobs?model=%FF%FE&kind=%C3%28")
    assert r.status_code == 200, r.text
    assert r.json()["data"] == []


def test_valid_json_with_unicode_is_stored_exactly(api: support.Api) -> None:
    value = {"emoji": "🦄", "rtl": "שלום", "cjk": "漢字", "zero-width": "a\u200bb"}
    job = api.submit({"value": value})
    assert api.wait(job["id"])["output"] == {"value": value}


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/jobs/job_%00"),
        ("GET", "/result/job_%00"),
        ("POST", "/v1/jobs/%00/cancel"),
        ("GET", "/v1/jobs?model=%00"),
        ("GET", "/v1/batches/bat_%00"),
    ],
)
def test_nul_in_ids_and_filters_is_a_4xx(api: support.Api, method: str, path: str) -> None:
    r = api.s.request(method, api.base + path, timeout=10)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    err(r, r.status_code)


JSON_CT, NDJSON_CT = "application/json", "application/x-ndjson"


@pytest.mark.parametrize(
    ("path", "ctype", "raw"),
    [
        (
            "/v1/jobs",
            JSON_CT,
            b'{"kind": "echo", "model": "echo", "input": {"value": "a\\u0000b"}}',
        ),
        ("/v1/jobs", JSON_CT, b'{"kind": "echo", "model": "echo", "input": {"value": "\\ud800"}}'),
        ("/v1/jobs", JSON_CT, b'{"kind": "echo", "model": "echo", "input": {"value": NaN}}'),
        (
            "/v1/jobs",
            JSON_CT,
            b'{"kind": "echo", "model": "echo", "input": {}, "metadata": {"x": Infinity}}',
        ),
        (
            "/v1/batches",
            JSON_CT,
            b'{"jobs": [{"kind": "echo", "model": "echo", "input": {"value": NaN}}]}',
        ),
        (
            "/v1/batches",
            NDJSON_CT,
            b'{"kind": "echo", "model": "echo", "input": {"value": "\\u0000"}}\n',
        ),
        (  # a text column, not jsonb: the driver refuses it before PostgreSQL sees it
            "/v1/batches",
            JSON_CT,
            b'{"jobs": [{"kind": "echo", "model": "echo", "input": {}, "custom_id": "a\\u0000"}]}',
        ),
    ],
    ids=[
        "nul",
        "lone-surrogate",
        "nan",
        "infinity",
        "batch-nan",
        "batch-ndjson-nul",
        "batch-custom-id-nul",
    ],
)
def test_json_that_postgres_cannot_store_is_a_4xx(
    api: support.Api, path: str, ctype: str, raw: bytes
) -> None:
    r = api.post(path, data=raw, headers={"Content-Type": ctype})
    assert r.status_code in (400, 422), (r.status_code, r.text[:300])
    err(r, r.status_code)


# --- content types ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "ctype",
    [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/xml",
        "application/x-ndjson",  # only batches take NDJSON
        "application/jsonx",
        "",
    ],
)
def test_wrong_content_type_is_415(api: support.Api, ctype: str) -> None:
    body = json.dumps({**ECHO, "input": {}}).encode()
    job = api.submit({})
    for path in ("/v1/jobs", f"/v1/jobs/{job['id']}/cancel", "/v1/auth/token"):
        r = api.post(path, data=body, headers={"Content-Type": ctype})
        e = err(r, 415, "unsupported_media_type")
        assert "Content-Type" in e["details"]
    assert len(api.get("/v1/jobs").json()["data"]) == 1  # only the job made above
    r = api.post("/v1/batches", data=body, headers={"Content-Type": ctype})
    if ctype == "application/x-ndjson":
        assert r.status_code == 202, r.text  # the one place NDJSON is allowed
    else:
        err(r, 415, "unsupported_media_type")


# --- other users' ids ------------------------------------------------------------------


def _fill(path: str, ids: dict[str, str]) -> str:
    for name, value in ids.items():
        path = path.replace("{" + name + "}", value)
    return path


def id_operations(platform: support.Platform) -> list[tuple[str, str]]:
    """Every (method, path) of the OpenAPI document that takes an id in its path."""
    spec = requests.get(platform.url + "/openapi.json", timeout=10).json()
    ops = []
    for path, item in spec["paths"].items():
        if "{" not in path:
            continue
        for method in item:
            if method in ("get", "post", "put", "patch", "delete"):
                ops.append((method.upper(), path))
    return sorted(ops)


def test_other_users_ids_answer_404_like_missing_ones(platform: support.Platform) -> None:
    owner = support.Api(platform.url, new_user()[1])
    other = support.Api(platform.url, new_user()[1])
    done = owner.wait(owner.submit({"value": 1})["id"])
    running = owner.submit({"sleep_s": 30})
    batch = owner.post("/v1/batches", json={"jobs": [{**ECHO, "input": {"value": 2}}]})
    assert batch.status_code == 202, batch.text
    # An artifact of the owner's finished job, in the store the API reads from.
    from spool.artifacts import ArtifactStore

    png = b"\x89PNG\r\n\x1a\n"
    store = platform.env().get("SPOOL_ARTIFACTS_URL") or str(platform.var_dir / "artifacts")
    ArtifactStore(store).put(done["id"], "image-0.png", png)

    ops = id_operations(platform)
    assert len(ops) >= 10, ops  # jobs, results, events, files, batches, webhooks
    seen = 0
    for job in (done, running):
        real = {"job_id": job["id"], "batch_id": batch.json()["id"], "name": "image-0.png"}
        missing = {
            "job_id": "job_" + "0" * 20,
            "batch_id": "bat_" + "0" * 20,
            "name": "image-0.png",
        }
        for method, path in ops:
            r_other = other.s.request(
                method, other.base + _fill(path, real), timeout=10, stream=True
            )
            r_missing = other.s.request(
                method, other.base + _fill(path, missing), timeout=10, stream=True
            )
            e_other = err(r_other, 404)
            assert e_other == err(r_missing, 404), (method, path)
            seen += 1
    assert seen == 2 * len(ops)

    # The ids were real: their owner gets them (reads only; nothing was changed by `other`).
    assert owner.get(f"/v1/jobs/{done['id']}").status_code == 200
    assert owner.get(f"/v1/files/{done['id']}/image-0.png").content == png
    assert owner.get(f"/v1/batches/{batch.json()['id']}").status_code == 200
    still = owner.get(f"/v1/jobs/{running['id']}").json()
    assert still["status"] in ("queued", "running"), still  # `other`'s cancel did nothing
    assert owner.post(f"/v1/jobs/{running['id']}/cancel").status_code == 202
    # Lists never show another user's jobs or batches, even when asked for all.
    for path in (
        "/v1/jobs",
        "/v1/jobs?all=true",
        f"/v1/jobs?batch_id={batch.json()['id']}",
        "/v1/batches",
        "/v1/batches?all=true",
    ):
        r = other.get(path)
        assert r.status_code == 200 and r.json()["data"] == [], (path, r.text[:300])


def test_admin_sees_other_users_jobs(platform: support.Platform) -> None:
    owner = support.Api(platform.url, new_user()[1])
    admin = support.Api(platform.url, new_user(admin=True)[1])
    job = owner.submit({"value": 3})
    assert admin.get(f"/v1/jobs/{job['id']}").json()["id"] == job["id"]


# --- rate limits under concurrency -----------------------------------------------------

LIMIT = 10
BURST = 40


@pytest.mark.slow
def test_submit_rate_limit_holds_across_processes_and_connections(
    platform: support.Platform, tmp_path: Path
) -> None:
    """Two more API processes (three gunicorn workers in all) on the same database and
    Redis, with a submit limit of 10/minute: 40 concurrent submits from one user through
    both of them get exactly 10 accepted, and exactly 10 jobs exist."""
    limited = [
        support.Platform(
            platform.database_url,
            platform.redis_url,
            tmp_path / f"api{i}",
            extra_env={
                "SPOOL_RATE_LIMIT_SUBMIT": f"{LIMIT}/minute",
                "SPOOL_API_WORKERS": str(workers),
            },
        )
        for i, workers in enumerate((2, 1))
    ]
    try:
        for p in limited:
            p.start_api()
        _, key = new_user()
        token = token_for(limited[0], key)
        user_id = claims_of(token)["sub"]

        def submit(i: int) -> requests.Response:
            url = limited[i % len(limited)].url
            with requests.Session() as s:
                return s.post(
                    url + "/v1/jobs",
                    json={**ECHO, "input": {"value": i}},
                    headers=bearer(token),
                    timeout=30,
                )

        # The headers count down exactly, whichever process answers (another user).
        _, other_key = new_user()
        other = bearer(token_for(limited[0], other_key))
        for i in range(3):
            r = requests.post(
                limited[i % 2].url + "/v1/jobs",
                json={**ECHO, "input": {}},
                headers=other,
                timeout=30,
            )
            assert r.status_code == 202, r.text
            assert r.headers["X-RateLimit-Limit"] == str(LIMIT)
            assert r.headers["X-RateLimit-Remaining"] == str(LIMIT - 1 - i)
            assert 0 <= int(r.headers["X-RateLimit-Reset"]) - time.time() <= 61

        with ThreadPoolExecutor(BURST) as pool:
            responses = list(pool.map(submit, range(BURST)))
    finally:
        for p in limited:
            p.stop()

    codes = sorted(r.status_code for r in responses)
    assert codes.count(202) == LIMIT and codes.count(429) == BURST - LIMIT, codes
    for r in responses:
        assert {"X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset"} <= set(
            r.headers
        ), (r.status_code, dict(r.headers))
        assert r.headers["X-RateLimit-Limit"] == str(LIMIT)
        if r.status_code == 429:
            err(r, 429, "rate_limited")
            assert int(r.headers["Retry-After"]) >= 1
            assert r.headers["X-RateLimit-Remaining"] == "0"

    from spool import db
    from spool.models import Job

    with db.session() as s:
        n = s.scalar(select(func.count()).select_from(Job).where(Job.user_id == user_id))
    assert n == LIMIT
    accepted = {r.json()["id"] for r in responses if r.status_code == 202}
    assert len(accepted) == LIMIT
