"""errors.py: the one JSON error shape, pinned."""

from __future__ import annotations

import json

from appliance import errors


def test_every_http_error_has_the_one_shape_and_its_status() -> None:
    table = {
        errors.NotFound: (404, "not_found"),
        errors.MethodNotAllowed: (405, "method_not_allowed"),
        errors.Unavailable: (503, "unavailable"),
        errors.Overloaded: (503, "overloaded"),
        errors.PayloadTooLarge: (413, "too_large"),
        errors.BodyTimeout: (503, "body_timeout"),
        errors.Unauthorized: (401, "unauthorized"),
        errors.InvalidJSON: (400, "invalid_json"),
        errors.InvalidPayload: (400, "invalid_payload"),
        errors.InjectedFailure: (500, "injected_failure"),
        errors.ImportFailed: (500, "import_failed"),
        errors.Internal: (500, "internal"),
    }
    assert set(table) == set(errors.HTTPError.__subclasses__())
    for cls, (status, code) in table.items():
        e = cls("why")
        assert (e.status, e.code) == (status, code)
        assert json.loads(e.body()) == {"error": code, "message": "why"}
