"""config.py: the YAML file as frozen typed config, with errors naming file, line and key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance import config
from appliance.errors import ConfigError

BASE = "importer: {command: [/bin/true]}\nauth: {hmac: {secrets: [{value: s}]}}\n"


def problems(text: str, **kw: object) -> list[str]:
    with pytest.raises(ConfigError) as e:
        config.loads(text, "c.yaml", **kw)  # type: ignore[arg-type]
    return e.value.problems


def test_defaults_live_in_code() -> None:
    cfg = config.loads(BASE).config
    assert cfg.environment == "alpha"
    assert cfg.webhook.path == "/webhooks/cointracker"
    assert cfg.webhook.max_body_bytes == 33_554_432
    assert cfg.auth.mode == "hmac" and cfg.auth.hmac is not None
    assert cfg.auth.hmac.header == "X-Cointracker-Signature"
    assert cfg.importer.command == ("/bin/true",)
    assert cfg.importer.max_attempts == 10 and cfg.ack == "durable"
    assert cfg.admin.bind == "127.0.0.1:9811"


def test_example_config_is_valid_once_its_credential_exists(tmp_path: Path) -> None:
    (tmp_path / "hmac-secret").write_text("s3cret\n")
    os.environ["CREDENTIALS_DIRECTORY"] = str(tmp_path)
    try:
        loaded = config.load(Path(__file__).parent.parent / "config.example.yaml")
    finally:
        del os.environ["CREDENTIALS_DIRECTORY"]
    assert loaded.config.auth.hmac is not None
    assert loaded.config.auth.hmac.secrets[0].value == b"s3cret"


def test_unknown_key_wrong_type_and_missing_key_name_line_and_path() -> None:
    text = (
        "importer:\n"
        "  command: [/bin/true]\n"
        "  concurency: 2\n"
        "webhook:\n"
        "  max_body_bytes: lots\n"
        "auth: {hmac: {secrets: [{value: s}]}}\n"
    )
    found = problems(text)
    assert any(p.startswith("c.yaml:3: importer.concurency: unknown key") for p in found)
    assert "c.yaml:5: webhook.max_body_bytes: must be a whole number, not 'lots'" in found
    assert problems("store: {path: x}\n") == ["c.yaml:1: importer: required key is missing"]


def test_secret_sources_and_credentials_directory(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "hmac-secret").write_text("from-file\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    monkeypatch.setenv("CT_SECRET", "from-env")
    cfg = config.loads(
        "importer: {command: [/bin/true]}\n"
        "auth:\n  hmac:\n    secrets:\n"
        "      - file: ${CREDENTIALS_DIRECTORY}/hmac-secret\n"
        "      - env: CT_SECRET\n"
        "      - value: inline\n"
    ).config
    assert cfg.auth.hmac is not None
    assert [s.value for s in cfg.auth.hmac.secrets] == [b"from-file", b"from-env", b"inline"]
    assert "from-file" not in repr(cfg)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    found = problems(
        "importer: {command: [/bin/true]}\n"
        "auth: {hmac: {secrets: [{file: '${CREDENTIALS_DIRECTORY}/x'}, {value: a, env: B}]}}\n"
    )
    assert any(
        "c.yaml:2: auth.hmac.secrets[0]: ${CREDENTIALS_DIRECTORY} is not set" in p for p in found
    )
    assert "c.yaml:2: auth.hmac.secrets[1]: give exactly one of value, file, env" in found


def test_production_refuses_what_alpha_warns_about() -> None:
    text = BASE + "testing: {fail_first_deliveries: 1}\n"
    loaded = config.loads(text)
    assert len(loaded.warnings) == 3  # value secret, drill, plain HTTP
    found = problems("environment: production\n" + text)
    assert any(
        "auth.hmac.secrets[0]: refused in production: a secret given as value" in p for p in found
    )
    assert any("testing.fail_first_deliveries: refused in production" in p for p in found)
    assert any("listen: refused in production: plain HTTP" in p for p in found)


def test_world_readable_file_with_secrets_is_refused_in_production(
    tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("S", "x")
    text = (
        "environment: production\nlisten: {behind_proxy: true}\n"
        "importer: {command: [/bin/true], env: {DB_URL: 'postgres://u:p@h/db'}}\n"
        "auth: {hmac: {secrets: [{env: S}]}}\n"
    )
    path = tmp_path / "c.yaml"
    path.write_text(text)
    path.chmod(0o644)
    with pytest.raises(ConfigError) as e:
        config.load(path)
    assert "readable by others" in str(e.value)
    path.chmod(0o600)
    assert config.load(path).config.environment == "production"


def test_exactly_one_importer_kind_and_bearer_key_rules() -> None:
    found = problems(
        "auth: {hmac: {secrets: [{value: s}]}}\nimporter: {command: [a], url: 'http://x'}\n"
    )
    assert "c.yaml:2: importer: give exactly one of command, url" in found
    found = problems(
        "importer: {command: [a]}\nauth:\n  mode: bearer\n  bearer:\n    issuer: i\n"
        "    audience: a\n    algorithms: [HS256]\n    public_key_file: /x.pem\n"
    )
    assert any("HS256 needs auth.bearer.secret" in p for p in found)
    found = problems(
        "importer: {command: [a]}\nauth:\n  mode: bearer\n  bearer:\n    issuer: i\n"
        "    audience: a\n    algorithms: [none]\n    jwks_file: /x\n"
    )
    assert any("'none' is not accepted" in p for p in found)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_any_text_gives_a_config_or_a_config_error(text: str) -> None:
    try:
        config.loads(text)
    except ConfigError as e:
        assert all(p.startswith("config.yaml") for p in e.problems)


def test_operator_commands_need_no_credentials_directory(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    text = "importer: {command: [a]}\nauth: {hmac: {secrets: [{file: '${CREDENTIALS_DIRECTORY}/s'}]}}\n"
    with pytest.raises(ConfigError):
        config.loads(text)
    cfg = config.loads(text, resolve_secrets=False).config
    assert cfg.auth.hmac is not None and cfg.auth.hmac.secrets[0].value == b""


def test_body_budget_and_connection_cap_have_defaults_and_floors() -> None:
    cfg = config.loads(BASE).config
    assert cfg.webhook.max_inflight_body_bytes == 268_435_456
    assert cfg.listen.max_connections == 4096
    found = problems(
        BASE + "webhook:\n  max_body_bytes: 1048576\n  max_inflight_body_bytes: 2097151\n"
        "listen:\n  max_connections: 15\n"
    )
    assert any(
        p.startswith("c.yaml:5: webhook.max_inflight_body_bytes: must be at least 2 x")
        and "a body of the maximum size must fit beside" in p
        for p in found
    ), found
    assert "c.yaml:7: listen.max_connections: must be >= 16" in found
    ok = BASE + "webhook: {max_body_bytes: 1048576, max_inflight_body_bytes: 2097152}\n"
    assert config.loads(ok).config.webhook.max_inflight_body_bytes == 2_097_152
