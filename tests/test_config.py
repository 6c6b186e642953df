"""config.py: the YAML file as frozen typed config, with errors naming file, line and key."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

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
    assert len(loaded.warnings) == 4  # value secret, drill, plain HTTP, 1-byte secret
    found = problems("environment: production\n" + text)
    assert any(
        "auth.hmac.secrets[0]: refused in production: a secret given as value" in p for p in found
    )
    assert any("testing.fail_first_deliveries: refused in production" in p for p in found)
    assert any("listen: refused in production: plain HTTP" in p for p in found)


def test_world_readable_file_with_secrets_is_refused_in_production(
    tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("S", "x" * 32)
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
        assert not any("a bug in ct-appliance" in p for p in e.problems), e.problems


KEY_PATHS = (Path(__file__).parent / "snapshots" / "config-keys.txt").read_text().split()
LEAVES = ["production", "bearer", "imported", "[RS256]", "[HS256, none]", "{A: b}", "[a, '']"]
SECRETS = "[{value: " + "s" * 40 + "}]"
LEAVES += [SECRETS, "{env: HOME}", "[{file: /dev/null}]", "{value: s}"]
LEAVES += ["0.0.0.0:1", "'[::1]:0'", "http://u:p@h/x", "https://h/j", "/x", "1024", "0", "16"]


@st.composite
def config_shaped(draw: st.DrawFn) -> str:
    """Text shaped like a real config (known keys, nested as the dataclasses are) with hostile
    or plausible leaves, so the cross-key rules see odd values in the right places."""
    tree: dict[str, Any] = {
        "importer": {"command": "[a]"},
        "auth": {"hmac": {"secrets": SECRETS}},
    }
    for path in draw(st.lists(st.sampled_from(KEY_PATHS), min_size=1, max_size=8, unique=True)):
        *parents, leaf = path.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = draw(st.one_of(st.sampled_from(LEAVES), st.sampled_from(LEAVES), yamlish()))

    def render(node: dict[str, Any]) -> str:
        inner = (f"{k}: {render(v) if isinstance(v, dict) else v}" for k, v in node.items())
        return "{" + ", ".join(inner) + "}"

    return render(tree)


@settings(max_examples=400, deadline=None)
@given(config_shaped())
def test_any_config_shaped_text_gives_a_config_or_a_config_error(text: str) -> None:
    try:
        config.loads(text)
    except ConfigError as e:
        assert all(p.startswith("config.yaml") and p.isprintable() for p in e.problems)
        assert not any("a bug in ct-appliance" in p for p in e.problems), e.problems


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
    assert cfg.listen.max_connections == 1024
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


# --- Hostile files: every input is a config or a ConfigError naming file:line:key -------------


def test_an_unknown_tag_is_a_problem_naming_file_line_and_key() -> None:
    found = problems(BASE + "log:\n  format: json\n  level: !custom info\n")
    assert found == ["c.yaml:5: log.level: unknown YAML tag !custom"]


@pytest.mark.parametrize(
    ("fragment", "expected"),
    [
        ("importer: {command: [a], concurrency: !!int abc}", "c.yaml:1: importer.concurrency: "),
        ("importer: {command: [a], timeout_seconds: !!float x}", "importer.timeout_seconds: not a"),
        ("importer: {command: [a]}\nstore: {path: !!timestamp junk}", "c.yaml:2: store.path: "),
        ("importer: {command: [a], concurrency: !!int " + "9" * 5000 + "}", "importer.concurre"),
        ("importer: {command: [a]}\nstore:\n  path: !!binary ???", "c.yaml:3: store.path: unsup"),
        ("importer: {command: [a]}\nlog: !custom {level: info}", "c.yaml:2: log: unknown YAML"),
        ("importer: {command: [a]}\nlisten: {bind: !!set {a: null}}", "listen.bind: unsupported"),
        (
            "importer: {command: [a]}\nlisten: {bind: !!omap [{a: 1}]}",
            "unsupported YAML tag !!omap",
        ),
        ("importer: {command: [a]}\nstore: {path: !!map x}", "!!map cannot mark a scalar"),
        ("importer: {command: [a]}\nstore: {path: !<tag:x.example,2024:p> x}", "unknown YAML tag"),
        ("importer: {command: !!python/object/apply:os.system [ls]}", "importer.command: unsup"),
        ("importer: {command: [a]}\nlisten: {bind: &b [*b]}", "listen.bind[0]: must be a string"),
        ("importer: {command: [a]}\nlisten: &l {tls: *l}", "listen.tls.tls: unknown key"),
        ("importer: {command: [a]}\nstore: {path: *nowhere}", "c.yaml:2: not valid YAML: found"),
        ("importer: {command: [a]}\nx: &a 1\ny: &a 2", "c.yaml:3: not valid YAML"),
        ("importer: {command: [a]}\nstore: {path: " + "[" * 3000 + "]" * 3000 + "}", "deeply"),
        ("importer: {command: [a], timeout_seconds: .nan}", "must be a finite number"),
        ("importer: {command: [a], timeout_seconds: -.inf}", "importer.timeout_seconds: must be"),
        ("importer: {command: [a]}\n? [store]\n: {path: x}", "c.yaml:2: (top): a key must be"),
        ("importer: {command: [a]}\n!weird store: {path: x}", "key unknown YAML tag !weird"),
        ('importer: {command: [a]}\nstore: {path: "a\\0b"}', "must not contain a NUL character"),
        ('importer: {command: [a]}\nstore: {path: "\\ud800"}', "holds a lone surrogate"),
        ('importer: {command: ["\\0"]}', "importer.command[0]: must not contain a NUL"),
        ("importer: {command: [a], env: {A: 1, A: 2}}", "importer.env.A: given twice"),
        ('importer: {command: [a], env: {"A=B": x}}', "must not be empty or hold ="),
        ("importer: {url: 'https://h/x', headers: {'a b': x}}", "not a valid HTTP header name"),
        ("importer: {url: 'https://h:port/x'}", "importer.url: not a valid URL"),
        ("importer: {url: 'ftp://h/x'}", "importer.url: must start with http:// or https://"),
        ("importer: {url: 'https:///x'}", "importer.url: has no host"),
        ("importer: {command: [a]}\nadmin: {allowed_hosts: ['http://x/']}", "not a host name"),
    ],
)
def test_hostile_yaml_is_a_config_error_never_a_crash(fragment: str, expected: str) -> None:
    found = problems(fragment + "\nauth: {hmac: {secrets: [{value: s}]}}\n")
    assert any(expected in p for p in found), found
    assert all(p.startswith("c.yaml") and p.isprintable() for p in found), found


def test_a_value_that_may_be_a_secret_is_never_echoed() -> None:
    found = problems(
        "importer: {command: [a], env: {DB: !!float hunter2pw}, headers: {X: [tok3n]}}\n"
        "auth: {hmac: {secrets: [{value: !!int s3cretvalue}, {value: 2024-01-01}]}}\n"
    )
    text = "\n".join(found)
    assert "c.yaml:2: auth.hmac.secrets[0].value: not a valid value for its YAML tag !!int" in found
    assert "c.yaml:2: auth.hmac.secrets[1].value: must be a string, not (value hidden)" in found
    assert "importer.env.DB: not a valid value" in text
    for secret in ("hunter2pw", "s3cretvalue", "2024-01-01", "tok3n"):
        assert secret not in text


def test_problems_are_capped_so_a_file_cannot_flood_the_log() -> None:
    text = "importer: {command: [a]}\n" + "".join(f"k{i}: 1\n" for i in range(500))
    found = problems(text)
    assert len(found) == config.MAX_PROBLEMS + 1
    assert found[-1] == f"c.yaml: ... and {500 - config.MAX_PROBLEMS} more problems"


def test_a_secret_file_that_never_ends_is_refused_not_read(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    found = problems(BASE.replace("{value: s}", "{file: /dev/zero}"))
    assert "c.yaml:2: auth.hmac.secrets[0]: cannot read secret file /dev/zero: ValueError" in found


def test_a_file_too_large_to_be_a_config_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    path.write_bytes(b"importer: {command: [a]}\n" + b"#" * config.MAX_FILE_BYTES)
    with pytest.raises(ConfigError) as e:
        config.load(path)
    assert e.value.problems == [f"{path}: larger than 16 MiB; not a config"]


TAGS = ["", "!custom ", "!!int ", "!!float ", "!!timestamp ", "!!binary ", "!!bool ", "!!null "]
TAGS += ["!!str ", "!!set ", "!!map ", "!!seq ", "!!omap ", "!<tag:x> ", "!!python/name:os.system "]
KEYS = ["importer", "command", "url", "env", "auth", "hmac", "secrets", "value", "file", "mode"]
KEYS += ["listen", "bind", "tls", "admin", "token", "log", "level", "webhook", "max_body_bytes"]
WORDS = ["a", "1", "-3", "0x1f", "1e999", ".nan", "~", "true", "2024-01-01", "???", "'x'", '"\\0"']
WORDS += ['"\\ud800"', "https://u:p@h/", "127.0.0.1:1", "[]", "{}", "*a", "*b", "*zz"]


@st.composite
def yamlish(draw: st.DrawFn, depth: int = 0) -> str:
    """YAML-shaped text built from config keys, tags, anchors and aliases (some undefined)."""
    tag = draw(st.sampled_from(TAGS))
    anchor = draw(st.sampled_from(["", "", "&a ", "&b "]))
    kind = draw(st.sampled_from(["scalar", "scalar", "seq", "map"] if depth < 4 else ["scalar"]))
    if kind == "scalar":
        return anchor + tag + draw(st.sampled_from(WORDS))
    items = draw(st.lists(yamlish(depth + 1), max_size=4))
    if kind == "seq":
        return f"{anchor}{tag}[{', '.join(items)}]"
    keys = draw(st.lists(st.sampled_from(KEYS + TAGS[1:4]), min_size=len(items), max_size=9))
    pairs = ", ".join(f"{k}: {v}" for k, v in zip(keys, items, strict=False))
    return f"{anchor}{tag}{{{pairs}}}"


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(KEYS), yamlish()), min_size=1, max_size=6))
def test_any_yamlish_structure_gives_a_config_or_a_config_error(
    entries: list[tuple[str, str]],
) -> None:
    text = "".join(f"{key}: {value}\n" for key, value in entries)
    for base in ("", "importer: {command: [a]}\nauth: {hmac: {secrets: [{value: s}]}}\n"):
        try:
            config.loads(base + text)
        except ConfigError as e:
            assert all(p.startswith("config.yaml") and p.isprintable() for p in e.problems)
            assert not any("a bug in ct-appliance" in p for p in e.problems), e.problems


# --- Production refuses insecure settings; alpha warns ------------------------------------------

LONG = "k" * 32
PROD = "environment: production\nlisten: {behind_proxy: true}\n"


def prod_and_alpha(extra: str, monkeypatch) -> tuple[list[str], list[str]]:  # type: ignore[no-untyped-def]
    """(problems in production, warnings in alpha) for PROD + extra; secrets come from env."""
    monkeypatch.setenv("LONG", LONG)
    monkeypatch.setenv("SHORT", "k" * 31)
    text = PROD + extra + ("" if "importer:" in extra else "importer: {command: [a]}\n")
    alpha = config.loads(text.replace("production", "alpha"), "c.yaml").warnings
    return problems(text), list(alpha)


@pytest.mark.parametrize(
    ("extra", "path", "why"),
    [
        (
            "auth:\n  mode: bearer\n  bearer: {issuer: i, audience: a, "
            "jwks_url: 'HTTP://issuer.example/jwks'}\n",
            "c.yaml:5: auth.bearer.jwks_url",
            "keys fetched over plain http://",
        ),
        (
            "auth: {hmac: {secrets: [{env: LONG}]}}\n"
            "importer: {url: 'http://imp.example/x', headers: {X-Token: t}}\n",
            "c.yaml:4: importer.url",
            "plain http:// while importer.headers or sign_secret",
        ),
        (
            "auth: {hmac: {secrets: [{env: LONG}]}}\n"
            "importer: {url: 'http://imp.example/x', sign_secret: {env: LONG}}\n",
            "c.yaml:4: importer.url",
            "plain http:// while importer.headers or sign_secret",
        ),
        (
            "auth: {hmac: {secrets: [{env: LONG}]}}\nadmin: {bind: '0.0.0.0:9811'}\n",
            "c.yaml:4: admin.bind",
            "not loopback and no admin.token",
        ),
        (
            "auth: {hmac: {secrets: [{env: LONG}]}}\nadmin: {bind: 'admin.example:9811'}\n",
            "c.yaml:4: admin.bind",
            "not loopback and no admin.token",
        ),
        (
            "auth: {hmac: {secrets: [{env: LONG}, {env: SHORT}]}}\n",
            "c.yaml:3: auth.hmac.secrets[1]",
            "shorter than 32 bytes",
        ),
        (
            "auth:\n  mode: bearer\n  bearer: {issuer: i, audience: a, algorithms: [HS256],\n"
            "    secret: {env: SHORT}}\n",
            "c.yaml:6: auth.bearer.secret",
            "shorter than 32 bytes",
        ),
        (
            "auth: {hmac: {secrets: [{env: LONG}]}}\n"
            "importer: {url: 'https://imp.example/x', sign_secret: {env: SHORT}}\n",
            "c.yaml:4: importer.sign_secret",
            "shorter than 32 bytes",
        ),
        (
            "auth: {hmac: {secrets: [{env: LONG}]}}\nadmin: {token: {env: SHORT}}\n",
            "c.yaml:4: admin.token",
            "shorter than 32 bytes",
        ),
        (
            "auth: {hmac: {secrets: [{env: LONG}]}}\nstore:\n  backend: postgresql\n"
            "  postgresql: {dsn: {value: 'host=db user=ct password=hunter2'}}\n",
            "c.yaml:6: store.postgresql.dsn",
            "a secret given as value:",
        ),
    ],
)
def test_production_refuses_insecure_settings_that_alpha_warns_about(
    extra: str, path: str, why: str, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    found, warned = prod_and_alpha(extra, monkeypatch)
    assert any(p.startswith(f"{path}: refused in production: {why}") for p in found), found
    assert any(w.startswith(f"{path}: {why}") and "refused in production" in w for w in warned)
    assert not any(("k" * 31) in p for p in found + warned)


@pytest.mark.parametrize(
    "extra",
    [
        "admin: {bind: '127.0.0.2:9811'}\n",
        "admin: {bind: '[::1]:9811'}\n",
        "admin: {bind: 'localhost:9811'}\n",
        "admin: {bind: '0.0.0.0:9811', token: {env: LONG}, allowed_hosts: [ops.example]}\n",
        "importer: {url: 'http://imp.example/x'}\n",  # no credential travels
        "importer: {url: 'https://imp.example/x', headers: {X: t}, sign_secret: {env: LONG}}\n",
        # a DSN without a password is no secret (peer auth, a .pgpass); short is fine too
        "store: {backend: postgresql, postgresql: {dsn: {value: 'host=/run/postgresql'}}}\n",
    ],
)
def test_production_accepts_the_safe_forms(extra: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("LONG", LONG)
    text = PROD + "auth: {hmac: {secrets: [{env: LONG}]}}\n" + extra
    text += "" if "importer:" in extra else "importer: {command: [a]}\n"
    assert config.loads(text).config.environment == "production"


def test_importer_env_that_no_process_could_receive_is_refused_everywhere(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    big = "x" * (128 * 1024)
    for env in ("alpha", "production"):
        found = problems(
            f"environment: {env}\nimporter:\n  command: [a]\n  env:\n    BIG: {big}\n"
            "auth: {hmac: {secrets: [{value: s}]}}\n"
        )
        assert any(
            p.startswith("c.yaml:5: importer.env.BIG: BIG=... is 131077 bytes; one environment")
            and "128 KiB" in p
            for p in found
        ), found
        assert not any(big in p for p in found)
    many = "".join(f"    V{i}: {'y' * 100_000}\n" for i in range(11))
    found = problems(f"importer:\n  command: [a]\n  env:\n{many}auth: {{hmac: {{secrets: []}}}}\n")
    assert any(p.startswith("c.yaml:4: importer.env: the entries total") for p in found), found
    assert any("1 MiB" in p and "E2BIG" in p for p in found)


def test_admin_token_and_allowed_hosts(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("TOKEN", LONG)
    text = BASE + "admin: {token: {env: TOKEN}, allowed_hosts: [ops.example, '[fd00::1]:9811']}\n"
    admin = config.loads(text).config.admin
    assert admin.token is not None and admin.token.value == LONG.encode()
    assert admin.allowed_hosts == ("ops.example", "[fd00::1]:9811")
    assert config.loads(BASE).config.admin.token is None


def test_an_admin_token_must_travel_in_a_header(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("TOKEN", "a b" + LONG)
    found = problems(BASE + "admin: {token: {env: TOKEN}}\n")
    assert found == [
        "c.yaml:3: admin.token: must be printable ASCII without spaces (it travels in an HTTP header)"
    ]


def test_an_operator_command_resolves_only_the_admin_token(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("TOKEN", LONG)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    text = (
        "importer: {command: [a]}\n"
        "auth: {hmac: {secrets: [{file: '${CREDENTIALS_DIRECTORY}/s'}]}}\n"
        "admin: {token: {env: TOKEN}}\n"
    )
    cfg = config.loads(text, resolve_secrets=False, resolve_only=("admin.token",)).config
    assert cfg.admin.token is not None and cfg.admin.token.value == LONG.encode()
    assert cfg.auth.hmac is not None and cfg.auth.hmac.secrets[0].value == b""
    monkeypatch.delenv("TOKEN")
    found = problems(text, resolve_secrets=False, resolve_only=("admin.token",))
    assert found == ["c.yaml:3: admin.token: environment variable TOKEN is not set"]


# --- URL credentials --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("https://user:pa55w0rd@imp.example/x?y=1", "https://user:***@imp.example/x?y=1"),
        ("https://t0ken@imp.example/", "https://***@imp.example/"),
        ("http://u:p@ss:w@rd@h:8080/p", "http://u:***@h:8080/p"),
        ("https://imp.example/a@b?c=d@e", "https://imp.example/a@b?c=d@e"),
        ("https://imp.example:8443/x", "https://imp.example:8443/x"),
        ("ConnectError for url 'https://a:b@h/x' and https://c:d@h2", "url 'https://a:***@h/x'"),
    ],
)
def test_mask_url_hides_passwords(text: str, shown: str) -> None:
    masked = config.mask_url(text)
    assert shown in masked
    for secret in ("pa55w0rd", "t0ken", "ss:w@rd", ":b@", ":d@"):
        assert secret not in masked


def test_the_postgresql_store_needs_its_section_sane_sizes_and_a_dsn_that_parses() -> None:
    found = problems(BASE + "store: {backend: postgresql}\n")
    assert found == ["c.yaml:3: store.postgresql: backend postgresql needs this section"], found
    text = BASE + (
        "store:\n  backend: postgresql\n  postgresql:\n    dsn: {value: 'host=a port=x=y secretword'}\n"
        "    pool_size: 1\n    lease_seconds: 5\n"
    )
    found = problems(text)
    assert any(
        p.startswith("c.yaml:7: store.postgresql.pool_size: must be between 2") for p in found
    )
    assert any(
        p.startswith("c.yaml:8: store.postgresql.lease_seconds: must be at least 10") for p in found
    )
    assert any(
        p.startswith("c.yaml:6: store.postgresql.dsn: not a libpq connection") for p in found
    )
    assert not any("secretword" in p for p in found), found
    cfg = config.loads(
        BASE + "store: {backend: postgresql, postgresql: {dsn: {value: 'host=h'}}}\n"
    )
    pg = cfg.config.store.postgresql
    assert pg is not None and (pg.pool_size, pg.lease_seconds) == (8, 300.0)
