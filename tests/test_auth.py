"""auth.py: HMAC-SHA256 over the raw body."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from appliance.auth import HmacVerifier, parse_signature, sign
from appliance.config import HmacConfig, Secret
from appliance.errors import AuthFailure

BODY = b'{"flow_ids": ["a"], "cost_basis_run_id": "r", "ghost_user_id": "g"}'


def verifier(*secrets: bytes, header: str = "X-Cointracker-Signature") -> HmacVerifier:
    return HmacVerifier(HmacConfig(tuple(Secret(s, "test") for s in secrets), header))


def test_sign_matches_the_standard_library() -> None:
    assert sign(b"k", BODY) == hmac.new(b"k", BODY, hashlib.sha256).hexdigest()


@pytest.mark.parametrize("fmt", [str.lower, str.upper, lambda s: "sha256=" + s, lambda s: f" {s} "])
def test_accepted_spellings(fmt) -> None:  # type: ignore[no-untyped-def]
    v = verifier(b"k")
    v.check({"x-cointracker-signature": fmt(sign(b"k", BODY))}, BODY)


def test_rotation_any_secret_matches_and_header_is_configurable() -> None:
    v = verifier(b"old", b"new", header="X-Sig")
    v.check({"x-sig": sign(b"old", BODY)}, BODY)
    v.check({"x-sig": sign(b"new", BODY)}, BODY)
    with pytest.raises(AuthFailure):
        v.check({"x-sig": sign(b"other", BODY)}, BODY)


def test_failures_have_log_reasons_without_the_expected_digest() -> None:
    v = verifier(b"k")
    cases = [({}, "missing"), ({"x-cointracker-signature": "zz"}, "malformed")]
    cases.append(({"x-cointracker-signature": "0" * 64}, "does not match"))
    for headers, reason in cases:
        with pytest.raises(AuthFailure) as e:
            v.check(headers, BODY)
        assert reason in e.value.reason
        assert sign(b"k", BODY) not in e.value.reason


def test_body_is_compared_byte_for_byte() -> None:
    v = verifier(b"k")
    with pytest.raises(AuthFailure):
        v.check({"x-cointracker-signature": sign(b"k", BODY)}, BODY.replace(b", ", b","))


def test_parse_signature() -> None:
    assert parse_signature("sha256=" + "ab" * 32) == bytes.fromhex("ab" * 32)
    assert parse_signature("ab" * 31) is None
    assert parse_signature("g" * 64) is None
