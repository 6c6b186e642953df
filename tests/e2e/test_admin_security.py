"""The admin listener against a hostile browser and a hostile network (spec §8, issue 13):
Host checking against DNS rebinding, `admin.token`, the CLI reading a token-protected listener,
and URL credentials kept out of everything an operator sees. Real server, real sockets."""

from __future__ import annotations

import base64
import json
import signal
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest

from ..conftest import Appliance, delivery, free_port

TOKEN = "admin-token-" + "cd" * 16
GUARDED = ("/status", "/metrics", "/")
OPEN = ("/healthz", "/readyz")


def get(app: Appliance, path: str, **headers: str) -> httpx.Response:
    return httpx.get(app.admin + path, headers=headers, timeout=10)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_a_dns_rebinding_host_gets_421_and_known_hosts_are_answered(make_appliance: Any) -> None:
    app = make_appliance({"admin": {"allowed_hosts": ["ops.partner.example"]}}).start()
    port = app.admin_port
    for path in ("/status", "/", "/metrics", "/healthz"):
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "x:y"):
            r = get(app, path, Host=host)
            assert r.status_code == 421, (path, host, r.status_code)
            assert r.json()["error"] == "misdirected_request"
            assert "inbox" not in r.text and "launch_window" not in r.text
    answered = ("ops.partner.example", f"OPS.partner.example.:{port}", f"localhost:{port}")
    answered += (f"127.0.0.1:{port}", "127.7.7.7", f"[::1]:{port}", "localhost")
    for host in answered:
        r = get(app, "/status", Host=host)
        assert r.status_code == 200, (host, r.status_code)
        assert "launch_window" in r.json()
    # No browser omits Host, so rebinding cannot send this; a load balancer's HTTP/1.0
    # health check (HAProxy's default) does, and is answered.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /readyz HTTP/1.0\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer and (chunk := s.recv(4096)):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200") or answer.startswith(b"HTTP/1.0 200"), answer[:100]


def test_the_admin_token_guards_all_but_health_and_readiness(make_appliance: Any) -> None:
    app = make_appliance({"admin": {"token": {"value": TOKEN}}}).start()
    for path in GUARDED:
        for auth in (None, "Bearer wrong", f"Bearer {TOKEN}x", basic("ops", "wrong"), "Basic %%%"):
            r = get(app, path, **({"Authorization": auth} if auth else {}))
            assert r.status_code == 401, (path, auth, r.status_code)
            assert r.json()["error"] == "unauthorized"
            challenges = r.headers.get_list("www-authenticate")
            assert 'Basic realm="ct-appliance"' in challenges and any(
                c.startswith("Bearer") for c in challenges
            )
            assert TOKEN not in r.text
        assert get(app, path, Authorization=f"Bearer {TOKEN}").status_code == 200, path
        assert get(app, path, Authorization=basic("ops", TOKEN)).status_code == 200, path
    for path in OPEN:
        assert get(app, path).status_code == 200, path
    # The Host check comes first: a rebinding page holding a token still gets nothing.
    r = get(app, "/status", Host="evil.example", Authorization=f"Bearer {TOKEN}")
    assert r.status_code == 421
    assert TOKEN not in app.logs()


def test_status_watch_and_check_config_send_the_token(make_appliance: Any) -> None:
    app = make_appliance({"admin": {"token": {"value": TOKEN}}}).start()
    assert app.post(delivery(["tok-1"])).status_code == 200
    doc = app.cli_json("status")
    assert doc["auth_mode"] == "hmac" and "launch_window" in doc  # the live figures
    text = app.cli("status").stdout
    assert "launch window" in text and "server: " not in text
    assert app.cli("watch", "--once").returncode == 0
    shown = app.cli("check-config").stdout
    assert "a reload (systemctl reload ct-appliance) would change:" in shown
    assert TOKEN not in shown


def test_a_token_the_cli_cannot_read_is_said_clearly_and_status_falls_back(
    make_appliance: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "admin-token").write_text(TOKEN + "\n")
    app = make_appliance({"admin": {"token": {"file": "${CREDENTIALS_DIRECTORY}/admin-token"}}})
    app.start(env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert get(app, "/status").status_code == 401
    assert get(app, "/status", Authorization=f"Bearer {TOKEN}").status_code == 200
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)  # an operator's shell
    status = app.cli("status")
    assert (
        "cannot read admin.token" in status.stderr and "${CREDENTIALS_DIRECTORY}" in status.stderr
    )
    assert "(figures from the store alone)" in status.stdout
    assert "inbox: pending" in status.stdout
    watch = app.cli("watch", "--once", check=False)
    assert watch.returncode == 1 and "cannot read admin.token" in watch.stderr
    assert "Traceback" not in status.stderr + watch.stderr


def test_a_wrong_token_in_the_cli_config_is_reported_not_taken_for_a_stopped_server(
    make_appliance: Any,
) -> None:
    app = make_appliance({"admin": {"token": {"value": TOKEN}}}).start()
    app.write_config({**app.config, "admin": {**app.config["admin"], "token": {"value": "x" * 40}}})
    status = app.cli("status")
    assert "answered 401: admin.token is wrong" in status.stderr
    assert "(figures from the store alone)" in status.stdout
    watch = app.cli("watch", "--once", check=False)
    assert watch.returncode == 1 and "answered 401" in watch.stderr
    assert "answered 401" in app.cli("check-config").stdout


def test_url_passwords_never_show(make_appliance: Any) -> None:
    dead_port = free_port()  # nothing listens: every attempt fails and is summarised
    url = f"http://importer:pa55w0rd-{'q' * 8}@127.0.0.1:{dead_port}/import"
    app = make_appliance({"importer": {"command": None, "url": url, "env": {}}})
    del app.config["importer"]["command"]
    app.write_config()
    check = app.cli("check-config")
    assert "pa55w0rd" not in check.stdout + check.stderr
    assert f"http://importer:***@127.0.0.1:{dead_port}/import" in check.stdout
    as_json = app.cli_json("check-config")
    assert as_json["config"]["importer"] == f"http://importer:***@127.0.0.1:{dead_port}/import"
    app.start()
    assert app.post(delivery(["masked-1"])).status_code == 200
    app.wait_for(lambda: _attempted(app), what="a failed importer attempt")
    status = get(app, "/status")
    assert status.json()["config"]["importer"].startswith("http://importer:***@")
    assert "pa55w0rd" not in status.text and "pa55w0rd" not in get(app, "/").text
    # A reload that changes the password logs the change, masked.
    app.config["importer"]["url"] = url.replace("pa55w0rd", "n3wpa55w0rd")
    app.write_config()
    assert app.proc is not None
    app.proc.send_signal(signal.SIGHUP)
    app.wait_for(lambda: "config reloaded" in app.logs(), what="reload")
    assert "pa55w0rd" not in app.logs()
    listing = app.cli("inbox", "list", "--json").stdout
    shown = [app.cli("inbox", "show", d["delivery_id"]).stdout for d in json.loads(listing)]
    assert shown and not any("pa55w0rd" in s for s in shown)


def test_a_jwks_url_password_never_shows_in_check_config(make_appliance: Any) -> None:
    jwks = "https://keys:j3wk5pw-secret@issuer.example/.well-known/jwks.json"
    bearer = {"issuer": "https://issuer.example/", "audience": "aud", "jwks_url": jwks}
    app = make_appliance({"auth": {"mode": "bearer", "bearer": bearer}})
    for args in (("check-config",), ("check-config", "--json")):
        out = app.cli(*args).stdout
        assert "j3wk5pw" not in out
        assert "jwks_url https://keys:***@issuer.example/.well-known/jwks.json" in out


def _attempted(app: Appliance) -> bool:
    docs = json.loads(app.cli("inbox", "list", "--json").stdout)
    return any(d["attempts"] and d["last_result"] for d in docs)
