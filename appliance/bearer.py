"""Bearer mode: ``Authorization: Bearer <JWT>`` verified with PyJWT.

Keys come from exactly one of `jwks_url`, `jwks_file`, `public_key_file` (PEM) or a shared
`secret` (HS256/384/512 only). A key is only ever used with the algorithms of its own type, so
an RSA public key can never serve as an HMAC secret, and `none` is never accepted.

JWKS over HTTPS is fetched on a worker thread, never on the event loop; the last good key set
is kept when the issuer is unreachable; an unknown `kid` triggers at most one re-fetch a minute
and a background refresh runs every `jwks_refresh_seconds`.
Claims: `iss` equals `issuer`, `aud` contains `audience`, `exp` is required, `nbf`/`iat` are
honoured with `leeway_seconds`, and `sub` equals `subject` when one is configured.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import jwt
import trio
from jwt import PyJWK
from jwt.utils import base64url_decode

from .config import BearerConfig, mask_url
from .errors import AuthFailure, KeyLoadError
from .logs import fields

log = logging.getLogger("ct_appliance.auth")

_FAMILY = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP", "HS": "oct"}
REFETCH_MIN_SECONDS = 60.0
# A token carrying an RS512 signature and a few claims is under 2 KiB; past this, a token is
# refused before anything is decoded, which bounds what an anonymous sender makes us parse.
MAX_TOKEN_CHARS = 16 * 1024
# What malformed input can raise from inside PyJWT or `cryptography` besides PyJWTError (bad
# base64 and bad UTF-8 are ValueErrors, deep JSON a RecursionError, odd claim types a TypeError).
_MALFORMED = (ValueError, TypeError, LookupError, ArithmeticError, RecursionError)
_REASONS = {
    jwt.ExpiredSignatureError: "token expired",
    jwt.ImmatureSignatureError: "token not yet valid (nbf/iat)",
    jwt.InvalidIssuerError: "wrong issuer",
    jwt.InvalidAudienceError: "wrong audience",
    jwt.MissingRequiredClaimError: "required claim missing",
    jwt.InvalidSignatureError: "bad signature",
    jwt.InvalidAlgorithmError: "algorithm not allowed",
    jwt.DecodeError: "malformed token",
    jwt.InvalidTokenError: "invalid token",
}


def _family(alg: str) -> str:
    return _FAMILY.get(alg[:2], "?")


class BearerVerifier:
    mode = "bearer"

    def __init__(self, cfg: BearerConfig) -> None:
        self.cfg = cfg
        self._keys: dict[str | None, tuple[Any, str]] = {}  # kid -> (key, family)
        self._loaded_at = 0.0
        self._last_kid_fetch = -REFETCH_MIN_SECONDS
        self._fetch_lock = trio.Lock()
        self._stop = trio.Event()

    def describe(self) -> dict[str, object]:
        c = self.cfg
        source = next(
            k for k in ("jwks_url", "jwks_file", "public_key_file", "secret") if getattr(c, k)
        )
        return {
            "mode": "bearer",
            "issuer": c.issuer,
            "audience": c.audience,
            "algorithms": list(c.algorithms),
            "key_source": source
            if source == "secret"
            else mask_url(f"{source} {getattr(c, source)}"),
            "subject": c.subject,
            "keys_loaded": len(self._keys),
        }

    def ready(self) -> bool:
        return bool(self._keys)

    # -- keys -------------------------------------------------------------------------------
    async def prepare(self) -> None:
        """Load the keys once; raises KeyLoadError when none can be had."""
        c = self.cfg
        if c.secret is not None:
            self._keys = {None: (c.secret.value, "oct")}
        elif c.public_key_file:
            self._keys = {None: await trio.to_thread.run_sync(self._load_pem, c.public_key_file)}
        elif c.jwks_file:
            try:
                text = await trio.to_thread.run_sync(Path(c.jwks_file).read_text)
            except OSError as e:
                raise KeyLoadError(f"cannot read jwks_file {c.jwks_file}: {e.strerror}") from None
            self._keys = self._parse_jwks(text)
        else:
            await self._fetch(force=True)
            if not self._keys:
                raise KeyLoadError(f"no key set could be fetched from {mask_url(c.jwks_url or '')}")
        self._loaded_at = time.time()

    @staticmethod
    def _load_pem(path: str) -> tuple[Any, str]:
        from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        try:
            key = load_pem_public_key(Path(path).read_bytes())
        except (OSError, ValueError) as e:
            raise KeyLoadError(f"cannot load public_key_file {path}: {e}") from None
        if isinstance(key, rsa.RSAPublicKey):
            return key, "RSA"
        if isinstance(key, ec.EllipticCurvePublicKey):
            return key, "EC"
        if isinstance(key, ed25519.Ed25519PublicKey):
            return key, "OKP"
        raise KeyLoadError(f"public_key_file {path}: unsupported key type")

    def _parse_jwks(self, text: str) -> dict[str | None, tuple[Any, str]]:
        try:
            doc = json.loads(text)
            entries = doc["keys"]
        except (ValueError, KeyError, TypeError):
            raise KeyLoadError("the key set is not a JWKS document") from None
        keys: dict[str | None, tuple[Any, str]] = {}
        for entry in entries:
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                continue
            kty = entry.get("kty")
            if kty == "oct":
                continue  # shared secrets never come from a key set
            try:
                jwk = PyJWK(entry)
            except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError):
                continue
            keys[entry.get("kid")] = (jwk.key, str(kty))
        if not keys:
            raise KeyLoadError("the key set holds no usable signing key")
        return keys

    async def _fetch(self, *, force: bool = False) -> bool:
        """Fetch the JWKS (rate-limited unless forced); keep the old keys on failure."""
        async with self._fetch_lock:
            if not force:
                # Unknown-kid fetches are what a forger can provoke: at most one a minute.
                if time.monotonic() - self._last_kid_fetch < REFETCH_MIN_SECONDS:
                    return False
                self._last_kid_fetch = time.monotonic()
            url = self.cfg.jwks_url
            assert url is not None
            try:
                text = await trio.to_thread.run_sync(self._get, url, abandon_on_cancel=True)
                keys = self._parse_jwks(text)
            except (httpx.HTTPError, KeyLoadError) as e:
                log.warning(
                    "JWKS fetch failed; keeping the last good key set",
                    extra=fields(
                        url=mask_url(url), error=mask_url(str(e)), keys_kept=len(self._keys)
                    ),
                )
                return False
            changed = set(keys) != set(self._keys)
            self._keys = keys
            self._loaded_at = time.time()
            if changed:
                log.info(
                    "JWKS loaded", extra=fields(url=mask_url(url), kids=sorted(map(str, keys)))
                )
            return True

    def _get(self, url: str) -> str:
        verify: Any = self.cfg.jwks_ca_file or True
        with httpx.Client(timeout=5.0, verify=verify, follow_redirects=False) as client:
            response = client.get(url, headers={"accept": "application/json"})
            response.raise_for_status()
            return response.text

    async def run(self) -> None:
        if not self.cfg.jwks_url:
            return
        while not self._stop.is_set():
            with trio.move_on_after(self.cfg.jwks_refresh_seconds if self._keys else 2.0):
                await self._stop.wait()
                return
            await self._fetch(force=True)

    def stop(self) -> None:
        self._stop.set()

    # -- tokens -----------------------------------------------------------------------------
    async def verify_headers(self, headers: Mapping[str, str]) -> bool:
        await self.verify(headers, b"")
        return True  # the token alone authenticates: the body is read only after this

    async def verify(self, headers: Mapping[str, str], body: bytes) -> None:
        """Raise AuthFailure unless the request carries a valid token; never looks at `body`.
        Whatever an anonymous sender puts in the token ends here as an AuthFailure with a short
        reason, never as another error."""
        token = _bearer_token(headers)
        alg, kid = _check_header(_unverified_header(token), self.cfg.algorithms)
        entry = self._key_for(kid)
        if entry is None and self.cfg.jwks_url and await self._fetch():
            entry = self._key_for(kid)
        if entry is None:
            raise AuthFailure(f"unknown key id {_clip(kid)}")
        key, family = entry
        if _family(alg) != family:
            raise AuthFailure(f"algorithm {alg} does not fit a {family} key")
        c = self.cfg
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=c.audience,
                issuer=c.issuer,
                leeway=c.leeway_seconds,
                options={"require": ["exp", "iss", "aud"], "verify_sub": False},
            )
        except jwt.PyJWTError as e:
            # Fixed reasons only: PyJWT's own messages may quote the token.
            reason = next((r for t, r in _REASONS.items() if isinstance(e, t)), "invalid token")
            raise AuthFailure(reason) from None
        except _MALFORMED:
            raise AuthFailure("malformed token") from None
        if c.subject is not None and claims.get("sub") != c.subject:
            raise AuthFailure("wrong subject")

    def _key_for(self, kid: str | None) -> tuple[Any, str] | None:
        if None in self._keys and len(self._keys) == 1:
            return self._keys[None]
        if kid is None:
            return next(iter(self._keys.values())) if len(self._keys) == 1 else None
        return self._keys.get(kid)


def _bearer_token(headers: Mapping[str, str]) -> str:
    value = headers.get("authorization")
    if value is None:
        raise AuthFailure("missing Authorization header")
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthFailure(f"Authorization scheme is {_clip(scheme, 16)}, not Bearer")
    if len(token) > MAX_TOKEN_CHARS:
        raise AuthFailure(f"token longer than {MAX_TOKEN_CHARS} characters")
    if not token.isascii():
        raise AuthFailure("token is not ASCII")
    return token


def _unverified_header(token: str) -> dict[str, Any]:
    """The JOSE header, not yet trusted. Only the compact JWS form is accepted: three segments
    (five would be a JWE, which is never what CoinTracker sends)."""
    segments = token.count(".") + 1
    if segments != 3:
        raise AuthFailure(f"token has {min(segments, 999)} segments, not 3")
    try:
        header = json.loads(base64url_decode(token.partition(".")[0]))
    except _MALFORMED:
        raise AuthFailure("token header is not base64url JSON") from None
    if not isinstance(header, dict):
        raise AuthFailure(f"token header is a JSON {_kind(header)}, not an object")
    return header


def _check_header(header: dict[str, Any], allowed: tuple[str, ...]) -> tuple[str, str | None]:
    """The (alg, kid) to verify with, once the header's types hold (RFC 7515 §4.1)."""
    alg = header.get("alg")
    if not isinstance(alg, str):
        raise AuthFailure(f"alg is {_kind(alg)}, not a string")
    if alg not in allowed:
        raise AuthFailure(f"algorithm {_clip(alg, 16)} not allowed")
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise AuthFailure(f"kid is {_kind(kid)}, not a string")
    for name in ("typ", "cty"):
        if name in header and not isinstance(header[name], str):
            raise AuthFailure(f"{name} is {_kind(header[name])}, not a string")
    if "crit" in header:
        # RFC 7515 §4.1.11: a recipient must reject a token whose critical extensions it does
        # not understand, and this verifier understands none (not even RFC 7797 "b64": a
        # webhook token never has a detached payload). A malformed crit is rejected as well.
        crit = header["crit"]
        if not isinstance(crit, list):
            raise AuthFailure(f"crit is {_kind(crit)}, not a list")
        raise AuthFailure(f"critical extension not understood: {_clip(crit)}")
    return alg, kid


def _kind(value: object) -> str:
    """A JSON type name for a reason: never the attacker's value itself."""
    if value is None:
        return "absent"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), "a number"
    )


def _clip(value: object, limit: int = 64) -> str:
    """At most `limit` characters of attacker-controlled input, quoted, for a log-only reason."""
    text = value if isinstance(value, str) else json.dumps(value)[: limit + 1]
    return repr(text[:limit] + ("..." if len(text) > limit else ""))
