"""The HTTP surface against its OpenAPI 3 document (tests/fault/openapi.yaml), live.

Two runs against ONE server per module:
* Hypothesis driven by the document itself (always runs): for every documented operation,
  generated requests (bodies from the Delivery schema, signed or not; query values) must be
  answered with a documented status, never a 5xx, and JSON answers must match the documented
  schema (required keys, types, enums, no extra keys where the document forbids them).
* schemathesis (4.32.5, pinned in the dev extras; nothing is installed at run time): its
  schema-valid and schema-violating cases, with its own checks."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ..conftest import SECRET, Appliance
from .helpers import report, rss_kib

OPENAPI = Path(__file__).with_name("openapi.yaml")
DOC: dict[str, Any] = yaml.safe_load(OPENAPI.read_text())
SETTINGS = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    app = Appliance(tmp_path_factory.mktemp("openapi"))
    app.cli("importer", "pause")  # the surface, not the importer
    app.start()
    yield app
    app.close()


def base_url(app: Appliance, path: str) -> str:
    return f"http://127.0.0.1:{app.port}" if path.startswith("/webhooks") else app.admin


def resolve(node: Any) -> Any:
    while isinstance(node, dict) and "$ref" in node:
        target: Any = DOC
        for part in node["$ref"].lstrip("#/").split("/"):
            target = target[part]
        node = target
    return node


def conforms(value: Any, schema: Any, where: str = "$") -> None:
    """A validator for the subset of JSON Schema the document uses."""
    schema = resolve(schema)
    if value is None and schema.get("nullable"):
        return
    if "oneOf" in schema:
        errors = []
        for option in schema["oneOf"]:
            try:
                conforms(value, option, where)
                return
            except AssertionError as e:
                errors.append(str(e))
        raise AssertionError(f"{where}: matches no oneOf option: {errors}")
    kind = schema.get("type")
    types = {"object": dict, "array": list, "string": str, "boolean": bool, "integer": int}
    if kind is not None:
        assert isinstance(value, types[kind]), f"{where}: {value!r} is not {kind}"
    if "enum" in schema:
        assert value in schema["enum"], f"{where}: {value!r} not in {schema['enum']}"
    if "minimum" in schema:
        assert value >= schema["minimum"], f"{where}: {value!r} < {schema['minimum']}"
    if kind == "object":
        for key in schema.get("required", []):
            assert key in value, f"{where}: missing {key}"
        props = schema.get("properties", {})
        for key, sub in props.items():
            if key in value:
                conforms(value[key], sub, f"{where}.{key}")
        if schema.get("additionalProperties") is False:
            assert set(value) <= set(props), f"{where}: extra keys {set(value) - set(props)}"


def check_answer(path: str, method: str, r: httpx.Response) -> None:
    op = DOC["paths"][path][method]
    responses = op["responses"]
    assert r.status_code < 500, (method, path, r.status_code, r.text[:300])
    assert str(r.status_code) in responses, (method, path, r.status_code, r.text[:300])
    documented = resolve(responses[str(r.status_code)])
    content = documented.get("content", {})
    if "application/json" in content:
        assert r.headers["content-type"].startswith("application/json")
        conforms(r.json(), content["application/json"]["schema"])
    for header in documented.get("headers", {}):
        assert header.lower() in r.headers, (header, r.headers)


texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=30)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | texts,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(texts, c, max_size=4),
    max_leaves=12,
)
deliveries = st.fixed_dictionaries(
    {
        "flow_ids": st.lists(texts, max_size=8),
        "cost_basis_run_id": texts,
        "ghost_user_id": texts,
    },
    optional={"user_config": json_values, "partner_config": json_values, "other": json_values},
)
OPERATIONS = [(p, m) for p, ops in DOC["paths"].items() for m in ops if m != "servers"]


@settings(SETTINGS, max_examples=150)
@given(
    op=st.sampled_from(OPERATIONS),
    doc=deliveries | json_values,
    signed=st.booleans(),
    window=st.none() | texts,
)
def test_every_documented_operation_answers_as_documented(
    server: Appliance, op: tuple[str, str], doc: Any, signed: bool, window: str | None
) -> None:
    path, method = op
    url = base_url(server, path) + path
    body = json.dumps(doc).encode()
    headers = {}
    if signed:
        headers["X-Cointracker-Signature"] = hmac.new(
            SECRET.encode(), body, hashlib.sha256
        ).hexdigest()
    params = {"window": window} if window is not None else None
    if method == "get":
        r = httpx.get(url, params=params, timeout=10)
    else:
        r = httpx.request(method.upper(), url, content=body, headers=headers, timeout=10)
    check_answer(path, method, r)
    if path.startswith("/webhooks") and method == "post" and not signed:
        assert r.status_code == 401


def test_the_document_covers_the_live_surface(server: Appliance) -> None:
    """Nothing undocumented answers 2xx on either listener; other methods on the webhook 405."""
    for method in ("GET", "PUT", "DELETE", "PATCH"):
        r = httpx.request(method, server.url)
        assert (r.status_code, r.headers.get("allow")) == (405, "POST"), method
    for base in (f"http://127.0.0.1:{server.port}", server.admin):
        for path in ("/admin", "/webhooks", "/webhooks/cointracker/", "/debug", "/.env"):
            assert httpx.get(base + path).status_code == 404, (base, path)
    start = rss_kib(server.proc.pid) if server.proc else 0
    report("openapi", operations=len(OPERATIONS), server_rss_mib=round(start / 1024, 1))


def test_schemathesis_against_the_live_server(server: Appliance) -> None:
    import schemathesis  # pinned in the dev extras: a missing install fails, never skips
    from hypothesis import given as hgiven
    from hypothesis.errors import Unsatisfiable

    schema = schemathesis.openapi.from_path(str(OPENAPI))
    started = time.monotonic()
    failures: list[str] = []
    counter = [0]

    def runner(operation: Any, url: str, mode: Any) -> Any:
        @settings(SETTINGS, max_examples=40)
        @hgiven(case=operation.as_strategy(generation_mode=mode))
        def run(case: Any) -> None:
            counter[0] += 1
            response = case.call(base_url=url)
            assert response.status_code < 500, (case.method, case.path, response.status_code)
            if mode == schemathesis.GenerationMode.POSITIVE:
                case.validate_response(response)  # all of schemathesis's checks

        return run

    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in schemathesis.GenerationMode:  # schema-valid cases, then schema-violating
            try:
                runner(operation, base_url(server, operation.path), mode)()
            except Unsatisfiable:
                assert mode.value == "negative"  # nothing to violate: no parameters, no body
            except (Exception, BaseExceptionGroup) as e:  # collect every operation's failure
                failures.append(f"{mode.value} {operation.method.upper()} {operation.path}: {e}")
    cases = counter[0]
    report(
        "schemathesis",
        version=schemathesis.__version__ if hasattr(schemathesis, "__version__") else "?",
        cases=cases,
        failures=len(failures),
        seconds=round(time.monotonic() - started, 1),
    )
    assert server.proc is not None and server.proc.poll() is None
    assert not failures, "\n\n".join(failures)
