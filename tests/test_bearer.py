"""bearer.py: `BearerVerifier.verify` on hand-made tokens, without a server.

Tokens are assembled segment by segment and signed here (RSA over the exact header bytes), so a
header can carry anything JSON can: a correctly signed token with a strange header must still
be refused, and no token of any shape may raise anything but AuthFailure.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
import trio
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.bearer import MAX_TOKEN_CHARS, BearerVerifier
from appliance.config import BearerConfig
from appliance.errors import AuthFailure

ISSUER = "https://issuer.test/"
AUDIENCE = "https://partner.test/cointracker"
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER = rsa.generate_private_key(public_exponent=65537, key_size=2048)
MAX_REASON = 120  # a reason quotes at most 64 characters of the token


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 300, **over}


def signed(header: Any, payload: Any = None, key: rsa.RSAPrivateKey = KEY) -> str:
    """A compact JWS over exactly these header and payload values, RS256-signed by `key`."""
    body = claims() if payload is None else payload
    head = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(body).encode())}"
    sig = key.sign(head.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{head}.{b64(sig)}"


def make_verifier(tmp_path: Path) -> BearerVerifier:
    pub = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(KEY.public_key()))
    other = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(OTHER.public_key()))
    keys = [{**pub, "kid": "rsa-1", "use": "sig"}, {**other, "kid": "rsa-2", "use": "sig"}]
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": keys}))
    cfg = BearerConfig(
        issuer=ISSUER, audience=AUDIENCE, algorithms=("RS256", "ES256"), jwks_file=str(path)
    )
    return BearerVerifier(cfg)


def outcome(tmp_path: Path, authorization: str | None) -> str | None:
    """None when the token is accepted, else the AuthFailure reason; anything else raises."""

    async def run() -> str | None:
        verifier = make_verifier(tmp_path)
        await verifier.prepare()
        headers = {} if authorization is None else {"authorization": authorization}
        try:
            await verifier.verify(headers, b"")
        except AuthFailure as e:
            return e.reason
        return None

    return trio.run(run)


def test_a_good_token_is_accepted_and_its_kid_selects_the_key(tmp_path: Path) -> None:
    assert outcome(tmp_path, "Bearer " + signed({"alg": "RS256", "kid": "rsa-1"})) is None
    # typ is the issuer's business (RFC 9068 access tokens say "at+jwt"): any string will do.
    good = signed({"alg": "RS256", "kid": "rsa-1", "typ": "at+jwt", "cty": "x"})
    assert outcome(tmp_path, "bearer  " + good) is None
    assert outcome(tmp_path, "Bearer " + signed({"alg": "RS256", "kid": "rsa-2"})) == (
        "bad signature"
    )
    # Two keys in the set: a token without a kid cannot say which one.
    assert "unknown key id" in (outcome(tmp_path, "Bearer " + signed({"alg": "RS256"})) or "")


LONG = "k" * 5000
MALFORMED = {
    "kid is an int": signed({"alg": "RS256", "kid": 1}),
    "kid is a list": signed({"alg": "RS256", "kid": ["rsa-1"]}),
    "kid is an object": signed({"alg": "RS256", "kid": {"a": "rsa-1"}}),
    "kid is very long": signed({"alg": "RS256", "kid": LONG}),
    "unknown crit": signed({"alg": "RS256", "kid": "rsa-1", "crit": ["exp"], "exp": 1}),
    "b64 crit": signed({"alg": "RS256", "kid": "rsa-1", "crit": ["b64"], "b64": True}),
    "crit not a list": signed({"alg": "RS256", "kid": "rsa-1", "crit": "b64"}),
    "crit empty": signed({"alg": "RS256", "kid": "rsa-1", "crit": []}),
    "alg is a list": signed({"alg": ["RS256"], "kid": "rsa-1"}),
    "alg is an int": signed({"alg": 256, "kid": "rsa-1"}),
    "alg is long": signed({"alg": "RS256" * 1000, "kid": "rsa-1"}),
    "typ is a number": signed({"alg": "RS256", "kid": "rsa-1", "typ": 7}),
    "cty is an object": signed({"alg": "RS256", "kid": "rsa-1", "cty": {}}),
    "header is a list": signed([1]),
    "header is a string": signed("x"),
    "header is null": signed(None),
    "payload is a list": signed({"alg": "RS256", "kid": "rsa-1"}, [1]),
    "payload not JSON": b64(b'{"alg":"RS256","kid":"rsa-1"}') + "." + b64(b"{nope") + "." + "AA",
    "exp is text": signed({"alg": "RS256", "kid": "rsa-1"}, claims(exp="soon")),
    "exp is infinite": signed({"alg": "RS256", "kid": "rsa-1"}, claims(exp=float("inf"))),
    "nbf is NaN": signed({"alg": "RS256", "kid": "rsa-1"}, claims(nbf=float("nan"))),
    "aud is a number": signed({"alg": "RS256", "kid": "rsa-1"}, claims(aud=5)),
    "iss is an object": signed({"alg": "RS256", "kid": "rsa-1"}, claims(iss={"a": 1})),
    "two segments": "eyJhbGciOiJSUzI1NiJ9.e30",
    "four segments": signed({"alg": "RS256", "kid": "rsa-1"}) + ".AA",
    "five segments (JWE)": "eyJhbGciOiJSU0EtT0FFUCJ9.a.b.c.d",
    "header not base64": "!!!.e30.AA",
    "padding garbage": signed({"alg": "RS256", "kid": "rsa-1"}).replace(".", "===.", 1),
    "signature padding garbage": signed({"alg": "RS256", "kid": "rsa-1"}) + "=====",
    "non-ASCII": signed({"alg": "RS256", "kid": "rsa-1"})[:-4] + "é€😀",
    "huge": signed({"alg": "RS256", "kid": "rsa-1", "x": "y" * 45_000}),
    "header deeply nested": b64(b'{"alg":' + b"[" * 5000 + b"]" * 5000 + b"}") + ".e30.AA",
    "empty segments": "..",
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_a_malformed_token_is_an_auth_failure_with_a_short_reason(
    tmp_path: Path, name: str
) -> None:
    reason = outcome(tmp_path, "Bearer " + MALFORMED[name])
    assert reason is not None, name
    assert len(reason) <= MAX_REASON, reason
    assert LONG[:65] not in reason and "RS256" * 14 not in reason


@pytest.mark.parametrize(
    "authorization", [None, "", "Bearer", "Bearer   ", "Basic dXNlcjpwYXNz", "x" * 100]
)
def test_missing_or_other_credentials_are_auth_failures(
    tmp_path: Path, authorization: str | None
) -> None:
    reason = outcome(tmp_path, authorization)
    assert reason is not None and len(reason) <= MAX_REASON


def test_an_oversized_token_is_refused_before_it_is_decoded(tmp_path: Path) -> None:
    reason = outcome(tmp_path, "Bearer " + "A" * (MAX_TOKEN_CHARS + 1))
    assert reason == f"token longer than {MAX_TOKEN_CHARS} characters"


# -- Hypothesis: any header, any payload, any segments ---------------------------------------
any_text = st.text(st.characters(exclude_categories=()), max_size=30)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | any_text,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(any_text, c, max_size=4),
    max_leaves=12,
)
header_fields = st.fixed_dictionaries(
    {},
    optional={
        "alg": st.sampled_from(["RS256", "ES256", "HS256", "none", "PS256"]) | json_values,
        "kid": st.sampled_from(["rsa-1", "rsa-2", "nobody", ""]) | json_values,
        "typ": st.sampled_from(["JWT", "at+jwt"]) | json_values,
        "crit": st.lists(st.sampled_from(["b64", "exp", "kid"])) | json_values,
        "b64": st.booleans() | json_values,
        "cty": json_values,
        "jku": json_values,
    },
)
headers = header_fields | json_values
# Objects made of the header names that matter, with any values: what a random segment needs
# to be to reach the header checks.
jose_fields = st.dictionaries(st.sampled_from(["alg", "kid", "typ", "crit", "b64"]), json_values)
# None stands for valid claims, made when the token is signed (their times are current).
payloads = (
    st.none()
    | st.builds(
        lambda extra: {**claims(), **extra},
        st.dictionaries(st.sampled_from(["iss", "aud", "exp", "nbf", "iat", "sub"]), json_values),
    )
    | json_values
)


def header_is_clean(header: Any) -> bool:
    """What the verifier must insist on before it may accept a correctly signed token."""
    return (
        isinstance(header, dict)
        and header.get("alg") == "RS256"
        and header.get("kid") == "rsa-1"  # two keys in the set: the kid must name one
        and isinstance(header.get("typ", ""), str)
        and isinstance(header.get("cty", ""), str)
        and "crit" not in header
        and header.get("b64", True) is not False
    )


SETTINGS = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@SETTINGS
@given(header=headers, payload=payloads, key=st.sampled_from([KEY, OTHER]))
def test_any_signed_header_and_payload_is_accepted_only_when_both_are_clean(
    tmp_path: Path, header: Any, payload: Any, key: rsa.RSAPrivateKey
) -> None:
    reason = outcome(tmp_path, "Bearer " + signed(header, payload, key))
    if header_is_clean(header) and key is KEY and payload is None:
        assert reason is None
    elif not header_is_clean(header) or key is not KEY or not isinstance(payload, dict | None):
        assert reason is not None  # (random claims may be valid; these never are)
    if reason is not None:
        assert len(reason) <= MAX_REASON, reason


segment = (
    st.text(st.sampled_from("AZaz09-_=.+/!~ é€"), max_size=60)
    | st.binary(max_size=80).map(b64)
    | json_values.map(lambda v: b64(json.dumps(v).encode()))
)
# Any number of segments, or the three of a compact JWS with a header worth parsing.
segments = st.lists(segment, max_size=6).map(".".join) | st.tuples(
    jose_fields.map(lambda v: b64(json.dumps(v).encode())), segment, segment
).map(".".join)


@SETTINGS
@given(token=segments)
def test_any_string_of_segments_is_an_auth_failure(tmp_path: Path, token: str) -> None:
    reason = outcome(tmp_path, "Bearer " + token)
    assert reason is not None and len(reason) <= MAX_REASON


def test_a_password_in_the_jwks_url_is_never_shown(caplog: pytest.LogCaptureFixture) -> None:
    """describe() (check-config, /status) and the key-load error (logs, a refused reload) show
    the JWKS URL with its password masked."""
    from appliance.errors import KeyLoadError

    cfg = BearerConfig(
        issuer=ISSUER, audience=AUDIENCE, jwks_url="https://ops:hunter2-secret@127.0.0.1:9/jwks"
    )
    verifier = BearerVerifier(cfg)
    assert "hunter2" not in json.dumps(verifier.describe())
    assert "ops:***@127.0.0.1" in str(verifier.describe()["key_source"])
    with pytest.raises(KeyLoadError) as e:
        trio.run(verifier.prepare)  # nothing listens on port 9: the fetch fails
    assert "hunter2" not in str(e.value) and "ops:***@" in str(e.value)
    assert caplog.records and all(
        "hunter2" not in r.getMessage() + str(vars(r)) for r in caplog.records
    )
