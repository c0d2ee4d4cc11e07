"""The token header flask-jwt-extended reads on every request is parsed once per token."""

from __future__ import annotations

import flask_jwt_extended.view_decorators as jwt_views
import jwt
import pytest

from api import extensions


def _token(sub: str) -> str:
    return jwt.encode({"sub": sub}, "k" * 32, algorithm="HS256", headers={"kid": sub})


def test_flask_jwt_extended_reads_the_remembered_header() -> None:
    assert jwt_views.get_unverified_jwt_headers is extensions.unverified_header


def test_a_token_header_is_parsed_once_and_handed_out_as_a_copy() -> None:
    token = _token("usr_a")
    before = extensions._remembered_header.cache_info()
    header = extensions.unverified_header(token)
    assert (
        header
        == jwt.get_unverified_header(token)
        == {
            "alg": "HS256",
            "typ": "JWT",
            "kid": "usr_a",
        }
    )
    header["kid"] = "changed"
    assert extensions.unverified_header(token)["kid"] == "usr_a"
    after = extensions._remembered_header.cache_info()
    assert (after.misses - before.misses, after.hits - before.hits) == (1, 1)


def test_a_token_that_does_not_parse_raises_every_time() -> None:
    before = extensions._remembered_header.cache_info()
    for _ in range(2):
        with pytest.raises(jwt.DecodeError):
            extensions.unverified_header("not.a!token")
    after = extensions._remembered_header.cache_info()
    assert after.currsize == before.currsize and after.hits == before.hits
