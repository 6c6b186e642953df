"""Hostile bearer tokens against a real server in bearer mode (issue 13, item 3).

Whatever an anonymous sender puts in `Authorization: Bearer ...` (a header of the wrong types,
an unknown `crit`, five segments, 60 KB, bytes that are not ASCII) must be what spec §4 says of
a bad token: 401 with `WWW-Authenticate`, counted as a signature failure, and never a 500 with
a traceback. Many tokens here are correctly signed with a key the server trusts, so only the
header checks stand between them and a 200.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ..conftest import Appliance, delivery
from ..e2e.test_bearer import JWKSServer, bearer_config, jwk, rsa_key, sig_failures, token
from ..test_bearer import (
    KEY,
    MALFORMED,
    OTHER,
    b64,
    header_is_clean,
    payloads,
    segments,
    signed,
)
from ..test_bearer import headers as jose_headers

SETTINGS = settings(
    deadline=None,
    derandomize=True,  # the same examples in CI every time; bounded run time
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@pytest.fixture(scope="module")
def server() -> Iterator[Appliance]:
    # KEY is trusted as "rsa-1"; "rsa-2" is a key nobody here can sign with, so a token without
    # a kid cannot pick one and a token signed by OTHER never verifies.
    issuer = JWKSServer([jwk(KEY, "rsa-1"), jwk(rsa_key(), "rsa-2")])
    tmp = Path(tempfile.mkdtemp(prefix="ct-fault-tokens-"))
    app = Appliance(tmp, bearer_config(jwks_url=issuer.url))
    app.cli("importer", "pause")
    app.start()
    try:
        yield app
    finally:
        app.close()
        issuer.stop()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def client(server: Appliance) -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as c:
        yield c


posted: list[str] = []  # every bad token sent to the module's server


def post(client: httpx.Client, app: Appliance, tok: str) -> httpx.Response:
    # Bytes, so a non-ASCII token goes out as the UTF-8 a hostile client would send.
    auth = ("Bearer " + tok).encode()
    posted.append(tok)
    return client.post(app.url, content=delivery(["t-never"]), headers={"authorization": auth})


def post_one(client: httpx.Client, app: Appliance, tok: str) -> str | None:
    """Send one bad token; None when it was refused as spec §4 says and counted once."""
    before = sig_failures(app)
    why = refused(post(client, app, tok))
    counted = sig_failures(app) - before
    return why or (None if counted == 1 else f"signature failures grew by {counted}, not 1")


def refused(r: httpx.Response) -> str | None:
    """None when `r` is the 401 spec §4 calls for, else what is wrong with it."""
    if r.status_code != 401:
        return f"{r.status_code} {r.text[:200]}"
    if r.headers.get("www-authenticate") != 'Bearer error="invalid_token"':
        return f"WWW-Authenticate is {r.headers.get('www-authenticate')!r}"
    if r.json().get("error") != "unauthorized":
        return f"body {r.text[:200]}"
    return None


def no_internal_errors(app: Appliance) -> None:
    assert "Traceback" not in app.logs()
    metrics = httpx.get(app.admin + "/metrics", timeout=10).text
    answered = {
        labels: float(value)
        for labels, value in re.findall(r"ct_appliance_requests_total\{([^}]*)\} (\S+)", metrics)
    }
    # (Series may be listed at 0 before they happen.)
    assert not any(
        n
        for labels, n in answered.items()
        if 'outcome="internal"' in labels or 'status="5' in labels
    ), answered


BAD_TOKENS = {
    **MALFORMED,
    "kid as an int, correctly signed": signed({"alg": "RS256", "kid": 7}),
    "huge (60 KB)": signed({"alg": "RS256", "kid": "rsa-1", "pad": "p" * 44_000}),
    "three segments, payload not JSON": ".".join(
        [b64(b'{"alg":"RS256","kid":"rsa-1"}'), "WwA", "AA"]
    ),
    "five segments": signed({"alg": "RS256", "kid": "rsa-1"}) + ".AA.AA",
    "header base64url of [1]": b64(b"[1]") + ".e30.AA",
    'header base64url of "x"': b64(b'"x"') + ".e30.AA",
    "base64 padding in the header": b64(b'{"alg":"RS256"}') + "==.e30.AA",
    "base64 garbage": "=.=.=",
    "typ an object, correctly signed": signed({"alg": "RS256", "kid": "rsa-1", "typ": {"a": 1}}),
    "signed by a stranger": signed({"alg": "RS256", "kid": "rsa-1"}, key=OTHER),
}


def test_each_malformed_token_is_a_401_counted_as_a_signature_failure(
    server: Appliance, client: httpx.Client
) -> None:
    assert len(BAD_TOKENS["huge (60 KB)"]) > 59_000
    before = sig_failures(server)
    wrong = {name: refused(post(client, server, tok)) for name, tok in BAD_TOKENS.items()}
    assert {name: why for name, why in wrong.items() if why} == {}
    assert sig_failures(server) - before == len(BAD_TOKENS)
    no_internal_errors(server)
    # The server is in bearer mode and trusts KEY: a good token still gets in.
    body = delivery(["t-good"])
    r = client.post(
        server.url, content=body, headers={"authorization": "Bearer " + token(KEY, "rsa-1")}
    )
    assert r.status_code == 200, r.text
    assert [d["state"] for d in server.cli_json("inbox", "list")] == ["pending"]


@settings(SETTINGS, max_examples=150)
@given(
    st.tuples(jose_headers, payloads).filter(lambda hp: not header_is_clean(hp[0])),
    st.sampled_from([KEY, OTHER]),
)
def test_any_strange_header_even_correctly_signed_is_a_401(
    server: Appliance, client: httpx.Client, header_payload: tuple[Any, Any], key: Any
) -> None:
    header, payload = header_payload
    why = post_one(client, server, signed(header, payload, key))
    assert why is None, (why, json.dumps(header)[:200])


@settings(SETTINGS, max_examples=150)
@given(segments)
def test_any_string_of_segments_is_a_401(server: Appliance, client: httpx.Client, tok: str) -> None:
    why = post_one(client, server, tok.strip() or "x")
    assert why is None, (why, tok[:200])


def test_afterwards_every_bad_token_was_counted_nothing_was_a_500_nor_stored(
    server: Appliance,
) -> None:
    assert sig_failures(server) == len(posted)
    no_internal_errors(server)
    assert all(d["state"] == "pending" for d in server.cli_json("inbox", "list"))
    assert len(server.cli_json("inbox", "list")) <= 1  # at most the one good token's delivery
