"""jsoncodec.dumps: what the standard library would write, faster (issue 16)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from appliance import jsoncodec

# Every JSON value: any text (lone surrogates too), integers of any size, finite floats.
values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=20,
)
# What records, run counters and log lines hold: ids and text in ASCII below DEL, integers within 64
# bits, times and durations (floats written without an exponent).
ascii_text = st.text(st.characters(min_codepoint=0, max_codepoint=126))
stored = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(min_value=1e-4, max_value=1e15)
    | st.just(0.0)
    | ascii_text,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(ascii_text, inner, max_size=5),
    max_leaves=20,
)


@given(values)
def test_every_value_reads_back_the_same(value: Any) -> None:
    assert json.loads(jsoncodec.dumps(value)) == value


@given(stored)
def test_what_the_store_holds_is_written_byte_for_byte_as_before(value: Any) -> None:
    assert jsoncodec.dumps(value) == json.dumps(value, separators=(",", ":")).encode()


def test_what_orjson_refuses_falls_back_to_the_standard_library() -> None:
    for value in ({"id": "\udfff"}, [2**70], {1: "a"}):
        assert jsoncodec.dumps(value) == json.dumps(value, separators=(",", ":")).encode()


def test_default_handles_the_rest() -> None:
    assert jsoncodec.dumps({"when": object}, default=lambda o: "x") == b'{"when":"x"}'
