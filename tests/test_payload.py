"""payload.py: the shape of a delivery, checked after authentication."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance import payload
from appliance.errors import InvalidJSON, InvalidPayload


def test_valid_delivery_collapses_in_body_duplicates_in_arrival_order() -> None:
    d = payload.parse(
        b'{"flow_ids": ["b", "a", "b", "c", "a"], "cost_basis_run_id": "r", "ghost_user_id": "g"}'
    )
    assert d.flow_ids == ("b", "a", "c") and d.in_body_duplicates == 2


def test_importer_document_passes_unknown_fields_under_extra() -> None:
    body = json.dumps(
        {"flow_ids": ["a"], "cost_basis_run_id": "r", "ghost_user_id": "g", "new_field": [1]}
    ).encode()
    doc = payload.importer_document(
        body, delivery_id="d", attempt=2, received_at="t", new_flow_ids=["a"]
    )
    assert doc["extra"] == {"new_field": [1]}
    assert doc["user_config"] == {} and doc["attempt"] == 2


@pytest.mark.parametrize("body", [b"", b"nope", b"[]", b"1", b'"s"', b"\xff", b"[" * 100_000])
def test_not_json_or_not_object(body: bytes) -> None:
    with pytest.raises(InvalidJSON):
        payload.parse(body)


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=2000)
    | st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(),
        lambda c: st.lists(c) | st.dictionaries(st.text(), c),
    ).map(lambda v: json.dumps(v).encode())
)
def test_any_body_is_a_delivery_or_a_400(body: bytes) -> None:
    try:
        payload.parse(body)
    except (InvalidJSON, InvalidPayload) as e:
        assert e.status == 400


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("flow_ids", ["ok", "\udfff"]),
        ("cost_basis_run_id", "run-\udfff"),
        ("ghost_user_id", "g\x00h"),
    ],
)
def test_ids_that_cannot_travel_as_utf8_or_environment_are_400(field: str, value: object) -> None:
    doc = {"flow_ids": ["a"], "cost_basis_run_id": "r", "ghost_user_id": "g", field: value}
    with pytest.raises(InvalidPayload):
        payload.validate(doc)


def doc_with(**over: object) -> dict[str, object]:
    return {"flow_ids": ["a"], "cost_basis_run_id": "r", "ghost_user_id": "g", **over}


@pytest.mark.parametrize("field", ["cost_basis_run_id", "ghost_user_id"])
def test_id_fields_hold_at_most_1024_bytes(field: str) -> None:
    assert payload.validate(doc_with(**{field: "x" * 1024}))
    with pytest.raises(InvalidPayload, match=rf"^{field} is longer than 1024 bytes$"):
        payload.validate(doc_with(**{field: "x" * 1025}))


def test_flow_id_limit_names_the_index_and_counts_bytes_not_characters() -> None:
    # "é" is 2 bytes and "€" 3 bytes of UTF-8: 512 and 342 characters sit either side of 1024.
    at_limit = ["é" * 512, "€" * 341 + "x", "x" * 1024]
    assert payload.validate(doc_with(flow_ids=at_limit)).flow_ids == tuple(at_limit)
    for over in ("é" * 512 + "x", "€" * 342, "x" * 1025, "😀" * 257, "x" * 300_000):
        ids = ["a", "b", "c", over, "e"]
        with pytest.raises(InvalidPayload, match=r"^flow_ids\[3\] is longer than 1024 bytes$"):
            payload.validate(doc_with(flow_ids=ids))


@pytest.mark.parametrize("field", ["cost_basis_run_id", "ghost_user_id"])
def test_id_field_limit_counts_bytes_not_characters(field: str) -> None:
    assert payload.validate(doc_with(**{field: "€" * 341 + "x"}))  # 1024 bytes, 342 characters
    with pytest.raises(InvalidPayload, match=f"^{field} is longer than 1024 bytes$"):
        payload.validate(doc_with(**{field: "€" * 342}))  # 1026 bytes, 342 characters


@pytest.mark.parametrize(
    ("ids", "index"),
    [(["a", 1, "c"], 1), (["a", "b", ""], 2), (["a", "b\udfff"], 1), (["\ud83d", "\ude00"], 0)],
)
def test_the_first_bad_flow_id_is_named(ids: list[object], index: int) -> None:
    with pytest.raises(InvalidPayload, match=rf"^flow_ids\[{index}\] must be a non-empty string"):
        payload.validate(doc_with(flow_ids=ids))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.text(st.characters(exclude_categories=()), max_size=400)  # lone surrogates too
        | st.builds(lambda n, c: c * n, st.integers(200, 1100), st.sampled_from("xé€😀"))
        | st.integers()
        | st.none(),
        max_size=8,
    )
)
def test_flow_ids_are_accepted_exactly_when_each_one_is_a_short_utf8_string(
    ids: list[object],
) -> None:
    def good(f: object) -> bool:
        if not isinstance(f, str) or not f:
            return False
        try:
            return len(f.encode()) <= 1024
        except UnicodeEncodeError:
            return False

    try:
        d = payload.validate(doc_with(flow_ids=ids))
    except InvalidPayload as e:
        first_bad = next(i for i, f in enumerate(ids) if not good(f))
        assert str(e).startswith(f"flow_ids[{first_bad}] ")
    else:
        assert all(good(f) for f in ids) and set(d.flow_ids) == set(ids)
