"""A broken config file on SIGHUP (issue 13): the reload is refused with file:line:key, the
server keeps serving under the config it had, and `check-config` says the same thing, exit 2,
without a traceback. Every edit below crashed the server or the CLI before the fix, or is one
of the kinds of hostile YAML the loader must turn into a refusal."""

from __future__ import annotations

import signal
from typing import Any

import httpx
import yaml

from ..conftest import SECRET, Appliance, delivery, sign

OTHER_SECRET = "other-secret-" + "ef" * 16

# (what is appended to the file, the problem the refusal must name, after "FILE:LINE: ")
HOSTILE = [
    ("log: {level: !custom info}\n", "log.level: unknown YAML tag !custom"),
    ("log: {level: !!int abc}\n", "log.level: not a valid value for its YAML tag !!int"),
    ("log: !custom {level: info}\n", "log: unknown YAML tag !custom"),
    ("log: &l {level: *l}\n", "log.level: must be a string"),
    ("log: {level: !!python/name:os.system x}\n", "log.level: unsupported YAML tag"),
    ("testing: {fail_first_deliveries: !!float .nan}\n", "testing.fail_first_deliveries: "),
]


def refusals(app: Appliance) -> list[list[str]]:
    return [
        line["errors"]
        for line in app.log_lines()
        if str(line.get("msg", "")).startswith("reload refused")
    ]


def post_with(app: Appliance, body: bytes, secret: str) -> int:
    headers = {"X-Cointracker-Signature": sign(body, secret)}
    return httpx.post(app.url, content=body, headers=headers, timeout=30).status_code


def test_a_broken_config_on_sighup_is_refused_and_the_old_one_keeps_serving(
    make_appliance: Any,
) -> None:
    app = make_appliance().start()
    assert app.proc is not None
    assert app.post(delivery(["before"])).status_code == 200
    # The new file changes the secret too: only the old config would accept SECRET.
    new = dict(app.config, auth={"mode": "hmac", "hmac": {"secrets": [{"value": OTHER_SECRET}]}})
    good_text = yaml.safe_dump(new)
    line = len(good_text.splitlines()) + 1
    for n, (edit, problem) in enumerate(HOSTILE, start=1):
        app.config_path.write_text(good_text + edit)
        app.proc.send_signal(signal.SIGHUP)
        app.wait_for(lambda n=n: len(refusals(app)) == n, what=f"refusal of {edit!r}")
        errors = refusals(app)[-1]
        assert any(e.startswith(f"{app.config_path}:{line}: {problem}") for e in errors), errors
        assert app.proc.poll() is None, app.logs()[-3000:]
        body = delivery([f"after-{n}"])
        assert post_with(app, body, SECRET) == 200  # the old secret: the old config serves
        assert post_with(app, delivery([f"new-{n}"]), OTHER_SECRET) == 401
        assert httpx.get(app.admin + "/readyz", timeout=10).status_code == 200
        status = httpx.get(app.admin + "/status", timeout=10).json()
        assert status["last_reload"]["ok"] is False
        assert status["last_reload"]["errors"] == errors
        check = app.cli("check-config", check=False)
        assert check.returncode == 2, check
        assert f"{app.config_path}:{line}: {problem}" in check.stderr
        assert "Traceback" not in check.stdout + check.stderr
    assert "Traceback" not in app.logs()
    app.wait_for(lambda: len(app.imported_docs()) == 1 + len(HOSTILE), what="imports")
    # A good file is then taken as usual.
    app.config_path.write_text(good_text)
    app.proc.send_signal(signal.SIGHUP)
    app.wait_for(lambda: "config reloaded" in app.logs(), what="reload")
    assert post_with(app, delivery(["switched"]), OTHER_SECRET) == 200
    assert post_with(app, delivery(["old-now-refused"]), SECRET) == 401
