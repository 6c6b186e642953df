"""importer.py and httpattempt.py: one attempt, real processes, and the retry schedule."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

from appliance.config import ImporterConfig
from appliance.httpattempt import parse_retry_after
from appliance.importer import TAIL_BYTES, CommandAttempt, backoff, importer_env

DOC = {
    "delivery_id": "d-1",
    "attempt": 1,
    "received_at": "t",
    "cost_basis_run_id": "r",
    "ghost_user_id": "g",
    "flow_ids": ["a", "b"],
    "user_config": {},
    "partner_config": {},
    "extra": {},
}


def cfg(**kw: object) -> ImporterConfig:
    return ImporterConfig(**kw)  # type: ignore[arg-type]


def test_backoff_is_exponential_capped_and_jittered() -> None:
    c = cfg(command=("x",), backoff_initial_seconds=5, backoff_max_seconds=60)
    rng = random.Random(1)
    delays = [backoff(n, c, rng) for n in range(1, 8)]
    for n, d in enumerate(delays, 1):
        top = min(60, 5 * 2 ** (n - 1))
        assert 0.75 * top <= d <= top


def test_environment_has_the_contract_and_nothing_secret(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", "/run/credentials/x")
    monkeypatch.setenv("CT_HMAC_SECRET", "nope")
    env = importer_env(cfg(command=("x",), env={"PARTNER_DB_URL": "pg://"}), DOC)
    assert env["CT_DELIVERY_ID"] == "d-1" and env["CT_FLOW_COUNT"] == "2"
    assert env["PARTNER_DB_URL"] == "pg://"
    assert "CREDENTIALS_DIRECTORY" not in env and "CT_HMAC_SECRET" not in env


def script(tmp_path: Path, code: str) -> tuple[str, ...]:
    path = tmp_path / "imp.py"
    path.write_text(code)
    return (sys.executable, str(path))


@pytest.mark.parametrize(
    ("code", "outcome", "summary"),
    [
        ("import sys; sys.stdin.read(); sys.exit(0)", "success", "exit 0"),
        ("import sys; sys.exit(65)", "dead", "exit 65 (EX_DATAERR: permanent)"),
        ("import sys; sys.exit(75)", "retry", "exit 75"),
        (
            "import os, signal; os.kill(os.getpid(), signal.SIGKILL)",
            "retry",
            "killed by signal SIGKILL",
        ),
    ],
)
async def test_exit_status_decides_the_outcome(
    tmp_path: Path, code: str, outcome: str, summary: str
) -> None:
    result = await CommandAttempt(cfg(command=script(tmp_path, code)))(DOC)
    assert (result.outcome, result.summary) == (outcome, summary)


async def test_stdin_carries_the_document_and_output_tail_is_capped(tmp_path: Path) -> None:
    code = (
        "import sys, json; d = json.load(sys.stdin); print(d['flow_ids']);"
        "sys.stderr.write('E' * 300000 + 'END')"
    )
    result = await CommandAttempt(cfg(command=script(tmp_path, code)))(DOC)
    assert result.outcome == "success"
    assert "['a', 'b']" in result.output["stdout"]
    assert result.output["stderr"].endswith("END")
    assert len(result.output["stderr"]) < TAIL_BYTES + 100
    assert "bytes cut" in result.output["stderr"]


async def test_missing_command_is_a_retry_not_a_crash() -> None:
    result = await CommandAttempt(cfg(command=("/nonexistent/importer",)))(DOC)
    assert result.outcome == "retry" and "cannot start" in result.summary


def test_retry_after_seconds_and_http_date() -> None:
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480 - 10) == 10.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


async def test_a_spawn_the_delivery_makes_impossible_is_dead_at_once(tmp_path: Path) -> None:
    # A 300 KB ghost_user_id (the payload check would refuse it; only a spawn can tell what the
    # kernel takes) travels in CT_GHOST_USER_ID, past Linux's 128 KiB per string: E2BIG.
    ran = tmp_path / "ran"
    code = f"open({str(ran)!r}, 'w').close()"
    attempt = CommandAttempt(cfg(command=script(tmp_path, code)))
    result = await attempt({**DOC, "ghost_user_id": "g" * 300_000})
    assert result.outcome == "dead"
    assert result.summary == "cannot start the importer: argument list too long (E2BIG)"
    assert not ran.exists()
    # The same importer with a normal document runs: the delivery, not the command, was at fault.
    assert (await attempt(DOC)).outcome == "success" and ran.exists()


@pytest.mark.parametrize("mode", ["missing", "not executable"])
async def test_a_command_the_operator_can_fix_stays_a_retry(tmp_path: Path, mode: str) -> None:
    command = tmp_path / "importer"
    if mode == "not executable":
        command.write_text("#!/bin/sh\nexit 0\n")
        command.chmod(0o644)
    result = await CommandAttempt(cfg(command=(str(command),)))(DOC)
    assert result.outcome == "retry"
    errno_name = "ENOENT" if mode == "missing" else "EACCES"
    assert result.summary.startswith(f"cannot start {command}: ") and errno_name in result.summary
