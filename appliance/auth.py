"""Authentication of a delivery before anything else looks at its body.

HMAC mode: the header (default ``X-Cointracker-Signature``) carries the hex HMAC-SHA256 of the raw
body bytes under the shared secret. Lower- or upper-case hex and an optional ``sha256=`` prefix
are accepted; any configured secret may match (rotation); digests are compared in constant time.
Bearer mode lives in `bearer.py` (which builds on this module); both present the same
`Verifier` face to the HTTP layer, and the server picks one per config.

A failed check raises `AuthFailure` whose `reason` is for the log only: the sender gets a bare
401 and never learns which check failed or what was expected.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from typing import Protocol

import trio

from .config import HmacConfig
from .errors import AuthFailure


class Verifier(Protocol):
    mode: str

    async def verify_headers(self, headers: Mapping[str, str]) -> bool:
        """Before the body is read: raise AuthFailure for what the headers alone refute. True
        when they authenticate the request by themselves (bearer), so an unauthenticated body
        is never even buffered; False when `verify` must still check the body (HMAC)."""

    async def verify(self, headers: Mapping[str, str], body: bytes) -> None:
        """Raise AuthFailure unless the delivery is authentic. Must not parse the body."""

    def ready(self) -> bool:
        """True once the verifier can accept a valid delivery (keys loaded)."""

    async def prepare(self) -> None:
        """Load what verification needs before the verifier is switched in (may raise)."""

    async def run(self) -> None:
        """Background upkeep (key refresh) until `stop`; returns at once when there is none."""

    def stop(self) -> None:
        """End `run`."""

    def describe(self) -> dict[str, object]:
        """What check-config and the status show: never a secret."""


def sign(secret: bytes, body: bytes) -> str:
    """The lowercase hex HMAC-SHA256 of `body`, as CoinTracker sends it."""
    return hmac.new(secret, body, hashlib.sha256).hexdigest()


def parse_signature(value: str) -> bytes | None:
    """Digest bytes from a header value, or None when it is not a SHA-256 hex digest."""
    value = value.strip()
    if value[:7].lower() == "sha256=":
        value = value[7:]
    if len(value) != 64:
        return None
    try:
        return bytes.fromhex(value)
    except ValueError:
        return None


# Above this size the digest is computed on a worker thread: OpenSSL releases the GIL, so a
# 30 MiB body does not hold the event loop for the ~40 ms its digest takes.
THREAD_DIGEST_BYTES = 1 << 20


class HmacVerifier:
    mode = "hmac"

    def __init__(self, cfg: HmacConfig) -> None:
        self.header = cfg.header.lower()
        self._keys = tuple(s.value for s in cfg.secrets)

    def ready(self) -> bool:
        return bool(self._keys)

    async def prepare(self) -> None:
        return None

    async def run(self) -> None:
        return None

    def stop(self) -> None:
        return None

    def describe(self) -> dict[str, object]:
        return {"mode": "hmac", "header": self.header, "secrets": len(self._keys)}

    async def verify(self, headers: Mapping[str, str], body: bytes) -> None:
        if len(body) > THREAD_DIGEST_BYTES:
            await trio.to_thread.run_sync(self.check, headers, body)
        else:
            self.check(headers, body)

    async def verify_headers(self, headers: Mapping[str, str]) -> bool:
        self._given(headers)  # present and a SHA-256 hex digest; the body decides the rest
        return False

    def _given(self, headers: Mapping[str, str]) -> bytes:
        value = headers.get(self.header)
        if value is None:
            raise AuthFailure(f"missing {self.header} header")
        given = parse_signature(value)
        if given is None:
            raise AuthFailure(f"malformed {self.header} header (not a hex SHA-256 digest)")
        return given

    def check(self, headers: Mapping[str, str], body: bytes) -> None:
        given = self._given(headers)
        matched = False
        for key in self._keys:
            # Every key is tried, match or not, so timing does not tell which one matched.
            # hmac.digest is OpenSSL's one-shot HMAC: no HMAC object per request.
            matched |= hmac.compare_digest(hmac.digest(key, body, "sha256"), given)
        if not matched:
            raise AuthFailure("signature does not match any configured secret")
