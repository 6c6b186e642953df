"""The HTTP attempt kind: POST the importer document to ``importer.url`` (spec §6, over HTTP).

Same document, same outcomes as a command: 2xx imported; 4xx other than 408 and 429 dead at
once; 408, 429, 5xx, connection refused or reset, TLS errors and the timeout retried, with
``Retry-After`` (seconds or an HTTP date) handed to the dispatcher's backoff. One pooled
httpx client per config keeps connections alive; TLS is verified (``importer.ca_file`` for a
private CA); redirects are not followed; the first 64 KiB of each answer is kept. A summary
never holds the URL's password (`mask_url`): summaries are logged and shown by `inbox show`.
"""

from __future__ import annotations

import email.utils
import json
import time
from typing import Any

import httpx

from .auth import sign
from .config import ImporterConfig, mask_url
from .importer import TAIL_BYTES, AttemptResult
from .record import Outcome

_RETRYABLE_4XX = (408, 429)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (now if now is not None else time.time()))


class HttpAttempt:
    def __init__(self, cfg: ImporterConfig) -> None:
        assert cfg.url is not None
        self.cfg = cfg
        self.url = cfg.url
        verify: Any = cfg.ca_file or True
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(cfg.timeout_seconds),
            verify=verify,
            follow_redirects=False,
            limits=httpx.Limits(
                max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency
            ),
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    async def __call__(self, doc: dict[str, Any]) -> AttemptResult:
        body = json.dumps(doc).encode()
        headers = {
            **self.cfg.headers,
            "Content-Type": "application/json",
            "CT-Delivery-Id": doc["delivery_id"],
            "CT-Attempt": str(doc["attempt"]),
        }
        if self.cfg.sign_secret is not None:
            headers["CT-Signature"] = sign(self.cfg.sign_secret.value, body)
        started = time.monotonic()
        try:
            async with self.client.stream("POST", self.url, content=body, headers=headers) as r:
                kept = bytearray()
                async for chunk in r.aiter_raw():
                    kept += chunk[: TAIL_BYTES - len(kept)]
                    if len(kept) >= TAIL_BYTES:
                        break
                status = r.status_code
                retry_after = parse_retry_after(r.headers.get("retry-after"))
        except httpx.TimeoutException:
            summary = f"no answer within {self.cfg.timeout_seconds:g} s"
            return AttemptResult(Outcome.RETRY, summary, time.monotonic() - started)
        except httpx.HTTPError as e:
            summary = mask_url(f"{e.__class__.__name__}: {e}")[:300]
            return AttemptResult(Outcome.RETRY, summary, time.monotonic() - started)
        duration = time.monotonic() - started
        output = {"response": bytes(kept).decode("utf-8", "replace")}
        summary = f"HTTP {status}"
        if 200 <= status < 300:
            return AttemptResult(Outcome.SUCCESS, summary, duration, output)
        if 400 <= status < 500 and status not in _RETRYABLE_4XX:
            return AttemptResult(Outcome.DEAD, f"{summary} (permanent)", duration, output)
        return AttemptResult(Outcome.RETRY, summary, duration, output, retry_after=retry_after)
