"""The webhook endpoint over real sockets against a real `ct-appliance serve` (spec §4, §5)."""

from __future__ import annotations

import json
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import trio

from appliance.lmdbbackend import LmdbBackend

from ..conftest import SECRET, Appliance, delivery, sign


def error_of(r: httpx.Response) -> str:
    doc = r.json()
    assert set(doc) == {"error", "message"}, doc
    return str(doc["error"])


def test_status_table_in_order(appliance: Appliance) -> None:
    body = delivery(["f1", "f2"])
    base = appliance.url.rsplit("/", 2)[0]
    r = httpx.post(base + "/other", content=body)
    assert (r.status_code, error_of(r)) == (404, "not_found")
    r = httpx.get(appliance.url)
    assert (r.status_code, error_of(r)) == (405, "method_not_allowed")
    # Size is checked before authentication: an unsigned oversized body is 413, not 401.
    big = b"x" * (33_554_432 + 1)
    r = httpx.post(appliance.url, content=big)
    assert (r.status_code, error_of(r)) == (413, "too_large")
    for headers in (
        {},
        {"X-Cointracker-Signature": "nothex"},
        {"X-Cointracker-Signature": "0" * 64},
    ):
        r = httpx.post(appliance.url, content=body, headers=headers)
        assert (r.status_code, error_of(r)) == (401, "unauthorized"), headers
        assert "expected" not in r.text and SECRET not in r.text
    for bad in (b"not json", b"[1, 2]", b"\xff\xfe{", b'{"a": ' * 5000):
        r = appliance.post(bad)
        assert (r.status_code, error_of(r)) == (400, "invalid_json"), bad[:20]
    for doc, field in (
        ({"cost_basis_run_id": "r", "ghost_user_id": "g"}, "flow_ids"),
        ({"flow_ids": "f1", "cost_basis_run_id": "r", "ghost_user_id": "g"}, "flow_ids"),
        ({"flow_ids": ["f", 3], "cost_basis_run_id": "r", "ghost_user_id": "g"}, "flow_ids[1]"),
        ({"flow_ids": ["f"], "ghost_user_id": "g"}, "cost_basis_run_id"),
        ({"flow_ids": ["f"], "cost_basis_run_id": "r"}, "ghost_user_id"),
        (
            {"flow_ids": ["f"], "cost_basis_run_id": "r", "ghost_user_id": "g", "user_config": []},
            "user_config",
        ),
    ):
        r = appliance.post(json.dumps(doc).encode())
        assert (r.status_code, error_of(r)) == (400, "invalid_payload"), doc
        assert field in r.json()["message"]
    r = appliance.post(body)
    assert r.status_code == 200
    assert r.json()["status"] == "accepted" and r.json()["delivery_id"]
    r = appliance.post(body)
    assert r.status_code == 200 and r.json() == {"status": "duplicate"}
    r = appliance.post(delivery([]))
    assert r.status_code == 200 and r.json() == {"status": "duplicate"}
    # Nothing unauthenticated or invalid was stored: exactly one delivery.
    assert len(appliance.cli_json("inbox", "list")) == 1


def test_signature_from_openssl_is_accepted_and_reserialized_body_is_not(
    appliance: Appliance, tmp_path: Path
) -> None:
    body = delivery(["openssl-1", "openssl-2"])
    path = tmp_path / "body.json"
    path.write_bytes(body)
    out = subprocess.run(
        ["openssl", "dgst", "-sha256", "-hmac", SECRET, "-hex", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    signature = out.strip().rsplit(" ", 1)[-1]
    reserialized = json.dumps(json.loads(body), indent=2).encode()
    r = httpx.post(
        appliance.url, content=reserialized, headers={"X-Cointracker-Signature": signature}
    )
    assert r.status_code == 401
    for variant in (signature, signature.upper(), "sha256=" + signature):
        r = httpx.post(appliance.url, content=body, headers={"X-Cointracker-Signature": variant})
        assert r.status_code == 200, (variant, r.text)
    assert [d["status"] for d in [r.json()]] == ["duplicate"]


def test_two_secrets_during_rotation_both_verify(make_appliance: Any) -> None:
    app = make_appliance(
        {"auth": {"hmac": {"secrets": [{"value": SECRET}, {"value": "the-new-secret"}]}}}
    ).start()
    assert app.post(delivery(["old-1"])).json()["status"] == "accepted"
    assert app.post(delivery(["new-1"]), secret="the-new-secret").json()["status"] == "accepted"
    assert app.post(delivery(["x-1"]), secret="neither").status_code == 401


def test_retry_is_duplicate_and_overlapping_pages_store_only_new_flows(
    appliance: Appliance,
) -> None:
    page1 = delivery(["a", "b", "c", "a"], run="run-42")
    page2 = delivery(["c", "d", "e"], run="run-42")
    first = appliance.post(page1).json()
    assert appliance.post(page1).json() == {"status": "duplicate"}
    second = appliance.post(page2).json()
    assert second["status"] == "accepted"
    listed = appliance.cli_json("inbox", "list")
    assert sorted(d["delivery_id"] for d in listed) == sorted(
        [first["delivery_id"], second["delivery_id"]]
    )
    shown = appliance.cli_json("inbox", "show", second["delivery_id"])
    assert shown["flow_ids"] == ["d", "e"]
    assert appliance.cli_json("inbox", "show", first["delivery_id"])["flow_ids"] == ["a", "b", "c"]
    run = appliance.cli_json("runs", "show", "run-42")
    assert run["pages"] == 3 and run["accepted_pages"] == 2 and run["duplicate_pages"] == 1
    assert run["flows_new"] == 5 and run["flows_duplicate"] == 4


def test_acknowledged_delivery_survives_kill_9(make_appliance: Any) -> None:
    app = make_appliance({"importer": {"command": ["/bin/false"], "max_attempts": 1000}}).start()
    acked = []
    for i in range(30):
        r = app.post(delivery([f"k9-{i}-a", f"k9-{i}-b"]))
        assert r.status_code == 200
        acked.append(r.json()["delivery_id"])
    app.kill9()
    app.start()
    stored = {d["delivery_id"] for d in app.cli_json("inbox", "list", "--limit", "100")}
    assert set(acked) <= stored
    flows = app.cli_json("flows", "show", *[f"k9-{i}-b" for i in range(30)])
    assert all(f["known"] for f in flows)
    # And the server still answers retries of them as duplicates.
    assert app.post(delivery(["k9-3-a", "k9-3-b"])).json() == {"status": "duplicate"}


async def test_concurrent_overlapping_deliveries_claim_each_flow_once(make_appliance: Any) -> None:
    app = make_appliance({"importer": {"command": ["/bin/false"], "max_attempts": 1000}})
    await trio.to_thread.run_sync(app.start)
    rng = random.Random(7)
    pool = [f"shared-{i}" for i in range(600)]
    bodies = [delivery(rng.sample(pool, 25)) for _ in range(200)]
    answers: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=50)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:

        async def send(body: bytes) -> None:
            r = await client.post(
                app.url, content=body, headers={"X-Cointracker-Signature": sign(body)}
            )
            assert r.status_code == 200, r.text
            answers.append(r.json())

        async with trio.open_nursery() as nursery:
            for body in bodies:
                nursery.start_soon(send, body)
    assert await trio.to_thread.run_sync(app.stop) == 0
    # Read back from the store itself.
    backend = LmdbBackend(app.config["store"]["path"])
    try:
        records = backend.records(limit=10_000)
    finally:
        backend.close()
    claims: dict[str, int] = {}
    for rec in records:
        for flow in rec.flows:
            assert flow not in claims, f"{flow} claimed by two deliveries"
            claims[flow] = rec.seq
    distinct = {f for b in bodies for f in json.loads(b)["flow_ids"]}
    assert set(claims) == distinct
    assert len(records) == sum(1 for a in answers if a["status"] == "accepted")


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _raw_request(port: int, head: bytes, body_chunks: Any = (), read_timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as s:
        s.sendall(head)
        try:
            for chunk in body_chunks:
                s.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                more = s.recv(65536)
                if not more:
                    break
                data += more
        except ConnectionResetError:
            pass
        return data


def test_lying_content_length_and_chunked_body_past_limit_get_413_memory_flat(
    make_appliance: Any,
) -> None:
    app = make_appliance({"webhook": {"max_body_bytes": 1 << 20}}).start()
    assert app.proc is not None
    before = _rss_kib(app.proc.pid)
    head = (
        b"POST /webhooks/cointracker HTTP/1.1\r\nHost: x\r\nContent-Length: 1099511627776\r\n\r\n"
    )
    # A terabyte announced: answered at once, nothing read.
    answer = _raw_request(app.port, head, [b"x" * 1000])
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    # A chunked body that never says how long it is: cut off at the limit while streaming.
    # (A well-formed signature header: without one the sender is refused before the body.)
    head = (
        b"POST /webhooks/cointracker HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"X-Cointracker-Signature: " + b"0" * 64 + b"\r\n\r\n"
    )
    chunk = b"x" * 65536
    frame = b"%x\r\n%s\r\n" % (len(chunk), chunk)
    answer = _raw_request(app.port, head, (frame for _ in range(3200)))  # up to 200 MiB
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    after = _rss_kib(app.proc.pid)
    assert after - before < 40 * 1024, f"RSS grew from {before} to {after} KiB"
    assert app.post(delivery(["still-fine"])).status_code == 200


def test_body_not_complete_in_time_is_503_body_timeout(make_appliance: Any) -> None:
    app = make_appliance({"webhook": {"body_timeout_seconds": 1}}).start()
    head = (
        b"POST /webhooks/cointracker HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
        b"X-Cointracker-Signature: " + b"0" * 64 + b"\r\n\r\n"
    )
    started = time.monotonic()
    answer = _raw_request(app.port, head, [b'{"flow_ids":'])
    assert answer.startswith(b"HTTP/1.1 503"), answer
    assert b"body_timeout" in answer or b"retry-after" in answer.lower()
    assert 0.9 < time.monotonic() - started < 10


def _post_across_sigterms(app: Appliance, flow: str, sigterms: int) -> bytes:
    """Start a signed POST, send `sigterms` SIGTERMs mid-body, finish the body, read the answer."""
    body = delivery([flow])
    head = (
        b"POST /webhooks/cointracker HTTP/1.1\r\nHost: x\r\n"
        + f"X-Cointracker-Signature: {sign(body)}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    )
    assert app.proc is not None
    with socket.create_connection(("127.0.0.1", app.port), timeout=15) as s:
        s.sendall(head + body[:10])
        time.sleep(0.3)
        for _ in range(sigterms):  # systemd and the onefile bootloader may both send one
            app.proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
        s.sendall(body[10:])
        answer = b""
        while b"accepted" not in answer:
            more = s.recv(65536)
            if not more:
                break
            answer += more
    return answer


def test_sigterm_finishes_in_flight_request_then_exits_0(appliance: Appliance) -> None:
    answer = _post_across_sigterms(appliance, "term-1", 1)
    assert answer.startswith(b"HTTP/1.1 200") and b"accepted" in answer, answer
    assert appliance.proc is not None and appliance.proc.wait(20) == 0
    assert "stopped cleanly" in appliance.logs()
    appliance.start()
    assert appliance.cli_json("flows", "show", "term-1")[0]["known"] is True


def test_config_error_names_file_line_and_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "environment: alpha\n"
        "auth:\n"
        "  mode: hmac\n"
        "  hmac:\n"
        "    secrets:\n"
        "      - {value: a, env: B}\n"
        "importer: {command: [/bin/true]}\n"
        "store: {path: /tmp/x, retention_dayz: 3}\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "appliance", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert f"{path}:6: auth.hmac.secrets[0]: give exactly one of value, file, env" in result.stderr
    assert f"{path}:8: store.retention_dayz: unknown key" in result.stderr
    assert "Traceback" not in result.stderr
    r = subprocess.run(
        [sys.executable, "-m", "appliance", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "secrets[0]" in (r.stdout + r.stderr)


def test_no_answer_or_log_line_leaks_the_secret(appliance: Appliance) -> None:
    body = delivery(["leak-1"])
    r = appliance.post(body, secret="wrong")
    assert SECRET not in r.text and sign(body) not in r.text
    assert SECRET not in appliance.logs()


def test_a_second_sigterm_during_the_drain_still_exits_0(appliance: Appliance) -> None:
    answer = _post_across_sigterms(appliance, "twice-1", 2)
    assert answer.startswith(b"HTTP/1.1 200") and b"accepted" in answer, answer
    assert appliance.proc is not None and appliance.proc.wait(20) == 0
    assert "already stopping; signal ignored" in appliance.logs()


def test_a_taken_port_is_one_clear_line_and_exit_1(
    appliance: Appliance, make_appliance: Any
) -> None:
    other = make_appliance(sub="b")
    other.config["listen"]["bind"] = [f"127.0.0.1:{appliance.port}"]
    other.write_config()
    other.start(wait=False)
    assert other.proc is not None
    assert other.proc.wait(20) == 1
    assert "Traceback" not in other.logs()
    failure = [line for line in other.log_lines() if line.get("msg") == "cannot start"]
    assert failure and "cannot listen on" in failure[0]["error"]
