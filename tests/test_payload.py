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
