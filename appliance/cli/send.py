"""`ct-appliance send`: a sender that behaves like CoinTracker's webhook delivery.

It signs each body (HMAC-SHA256 hex in the header, or a bearer token), posts the pages of one
`cost_basis_run_id`, reads the answer the way CoinTracker does (2xx accepted; 4xx permanent,
never retried; 5xx and connection failures retried `--retries` times with exponential backoff
from `--backoff-base-seconds`), and prints every attempt with status and latency. It is the
other half of the staging retry drill (`testing.fail_first_deliveries`).
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from ..auth import sign
from ..errors import CommandFailed
from .common import EXIT_FAILED, EXIT_OK


def make_pages(flows: int, pages: int, run_id: str) -> list[bytes]:
    user = f"ghost-{uuid.uuid4().hex[:12]}"
    out = []
    for page in range(pages):
        body = {
            "flow_ids": [f"flow-{run_id}-{page}-{i}" for i in range(flows)],
            "cost_basis_run_id": run_id,
            "ghost_user_id": user,
            "user_config": {},
            "partner_config": {},
        }
        out.append(json.dumps(body).encode())
    return out


def main(args: argparse.Namespace) -> int:
    if args.body:
        pages = [Path(args.body).read_bytes()]
    else:
        pages = make_pages(args.flows, args.pages, args.run_id or f"run-{uuid.uuid4().hex[:12]}")
    secret = Path(args.secret_file).read_text().strip().encode() if args.secret_file else None
    token = args.token or (Path(args.token_file).read_text().strip() if args.token_file else None)
    if secret is None and token is None:
        raise CommandFailed("give --secret-file (HMAC) or --token / --token-file (bearer)")
    results = []
    verify: Any = args.cacert or True
    with httpx.Client(timeout=args.timeout_seconds, verify=verify) as client:
        for n, body in enumerate(pages, 1):
            headers = {"content-type": "application/json"}
            if secret is not None:
                headers[args.header] = sign(secret, body)
            else:
                headers["authorization"] = f"Bearer {token}"
            results.append(_deliver(client, args, body, headers, n, len(pages)))
    ok = all(r["final_status"] is not None and 200 <= r["final_status"] < 300 for r in results)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        good = sum(1 for r in results if r["final_status"] and r["final_status"] < 300)
        print(f"{good}/{len(results)} pages accepted")
    return EXIT_OK if ok else EXIT_FAILED


def _deliver(
    client: httpx.Client,
    args: argparse.Namespace,
    body: bytes,
    headers: dict[str, str],
    page: int,
    pages: int,
) -> dict[str, Any]:
    attempts: list[dict[str, Any]] = []
    status: int | None = None
    for attempt in range(1, args.retries + 2):
        started = time.perf_counter()
        try:
            response = client.post(args.url, content=body, headers=headers)
            status = response.status_code
            try:
                answer = response.json()
            except ValueError:
                answer = {"raw": response.text[:200]}
            what = answer.get("status") or answer.get("error") or ""
        except httpx.HTTPError as e:
            status, answer, what = None, {}, f"{e.__class__.__name__}: {e}"
        ms = (time.perf_counter() - started) * 1000
        attempts.append(
            {"attempt": attempt, "status": status, "answer": answer, "ms": round(ms, 1)}
        )
        transient = status is None or status >= 500
        last = attempt == args.retries + 1
        delay = args.backoff_base_seconds * 2 ** (attempt - 1)
        tail = f"; retrying in {delay:g} s" if transient and not last else ""
        if not args.json:
            print(
                f"page {page}/{pages} attempt {attempt}: {status or 'no answer'} {what} "
                f"{ms:.1f} ms{tail}",
                flush=True,
            )
        if not transient:
            break
        if not last:
            time.sleep(delay)
    return {"page": page, "final_status": status, "attempts": attempts}
