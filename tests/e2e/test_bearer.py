"""Bearer mode and reload, end to end (spec §1, §3, §4, §9).

Tokens are minted on the test side with PyJWT over keys made by `cryptography`; the JWKS is
served over loopback by the test itself.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac as hmac_mod
import http.server
import ipaddress
import json
import re
import signal
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from ..conftest import SECRET, Appliance, delivery, free_port, sign

ISSUER = "https://issuer.test/"
AUDIENCE = "https://partner.test/cointracker"


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwk(key: Any, kid: str) -> dict[str, Any]:
    pub = key.public_key()
    if isinstance(pub, rsa.RSAPublicKey):
        doc = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(pub))
        doc["alg"] = "RS256"
    else:
        doc = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(pub))
        doc["alg"] = "ES256"
    doc.update(kid=kid, use="sig")
    return dict(doc)


def token(key: Any, kid: str | None, alg: str = "RS256", **claims: Any) -> str:
    now = int(time.time())
    body = {"iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 300, "sub": "ct-client"}
    body.update(claims)
    body = {k: v for k, v in body.items() if v is not None}
    headers = {"kid": kid} if kid else {}
    return jwt.encode(body, key, algorithm=alg, headers=headers)


class JWKSServer:
    def __init__(self, keys: list[dict[str, Any]], port: int = 0) -> None:
        self.keys = keys
        self.fetches = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.fetches += 1
                data = json.dumps({"keys": outer.keys}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/.well-known/jwks.json"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def keys() -> dict[str, Any]:
    return {"rsa": rsa_key(), "ec": ec.generate_private_key(ec.SECP256R1()), "other": rsa_key()}


@pytest.fixture
def jwks(keys: dict[str, Any]) -> Iterator[JWKSServer]:
    server = JWKSServer([jwk(keys["rsa"], "rsa-1"), jwk(keys["ec"], "ec-1")])
    yield server
    server.stop()


def bearer_config(**source: Any) -> dict[str, Any]:
    return {
        "auth": {
            "mode": "bearer",
            "bearer": {
                "issuer": ISSUER,
                "audience": AUDIENCE,
                "algorithms": ["RS256", "ES256"],
                "leeway_seconds": 5,
                **source,
            },
        }
    }


def post_token(
    app: Appliance, tok: str | None, body: bytes, scheme: str = "Bearer"
) -> httpx.Response:
    headers = {"authorization": f"{scheme} {tok}"} if tok is not None else {}
    return httpx.post(app.url, content=body, headers=headers, timeout=10)


def sig_failures(app: Appliance) -> float:
    text = httpx.get(app.admin + "/metrics").text
    m = re.search(r'ct_appliance_signature_failures_total\{mode="bearer"\} (\S+)', text)
    assert m is not None
    return float(m.group(1))


def test_bearer_accepts_valid_tokens_and_refuses_each_forgery(
    make_appliance: Any, keys: dict[str, Any], jwks: JWKSServer
) -> None:
    app = make_appliance(bearer_config(jwks_url=jwks.url)).start()
    rsa_k, ec_k, other = keys["rsa"], keys["ec"], keys["other"]
    assert post_token(app, token(rsa_k, "rsa-1"), delivery(["b-rs"])).json()["status"] == "accepted"
    assert post_token(app, token(ec_k, "ec-1", "ES256"), delivery(["b-es"])).status_code == 200

    # Rotation at the issuer: a new kid appears; accepted without a restart.
    new_key = rsa_key()
    jwks.keys.append(jwk(new_key, "rsa-2"))
    assert post_token(app, token(new_key, "rsa-2"), delivery(["b-rot"])).status_code == 200

    public_pem = rsa_k.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    unsigned = jwt.encode(
        {"iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 60}, None, algorithm="none"
    )

    # PyJWT refuses to sign HS256 with a PEM key, so the confused-deputy token is made by hand.
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}).encode())
    payload = b64(
        json.dumps({"iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 60}).encode()
    )
    mac = hmac_mod.new(public_pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    confused = f"{header}.{payload}.{b64(mac)}"

    forgeries = {
        "wrong issuer": (token(rsa_k, "rsa-1", iss="https://evil.test/"), "Bearer"),
        "wrong audience": (token(rsa_k, "rsa-1", aud="https://other.test/"), "Bearer"),
        "expired": (token(rsa_k, "rsa-1", exp=int(time.time()) - 120), "Bearer"),
        "not yet valid": (token(rsa_k, "rsa-1", nbf=int(time.time()) + 120), "Bearer"),
        "bad signature": (token(other, "rsa-1"), "Bearer"),
        "alg none": (unsigned, "Bearer"),
        "HS256 with the RSA public key": (confused, "Bearer"),
        "unknown kid": (token(other, "nobody"), "Bearer"),
        "no exp": (token(rsa_k, "rsa-1", exp=None), "Bearer"),
        "Basic scheme": ("dXNlcjpwYXNz", "Basic"),
    }
    before = sig_failures(app)
    for name, (tok, scheme) in forgeries.items():
        r = post_token(app, tok, delivery([f"forged-{name}"]), scheme)
        assert r.status_code == 401, (name, r.text)
        assert r.headers["www-authenticate"] == 'Bearer error="invalid_token"', name
        assert r.json()["error"] == "unauthorized" and "kid" not in r.json()["message"]
    r = post_token(app, None, delivery(["forged-missing"]))
    assert r.status_code == 401
    assert sig_failures(app) - before == len(forgeries) + 1
    reasons = {line.get("auth_failure") for line in app.log_lines() if line.get("status") == 401}
    for expected in (
        "wrong issuer",
        "wrong audience",
        "token expired",
        "bad signature",
        "unknown key id",
    ):
        assert any(r and expected in r for r in reasons), (expected, reasons)
    assert not any(
        f.startswith("forged")
        for d in app.cli_json("inbox", "list")
        for f in [d["cost_basis_run_id"]]
    )

    # The issuer goes down: cached keys keep verifying.
    jwks.stop()
    assert post_token(app, token(rsa_k, "rsa-1"), delivery(["b-down"])).status_code == 200
    assert post_token(app, token(new_key, "rsa-2"), delivery(["b-down2"])).status_code == 200


def test_readyz_waits_for_the_key_set(make_appliance: Any, keys: dict[str, Any]) -> None:
    port = free_port()
    app = make_appliance(bearer_config(jwks_url=f"http://127.0.0.1:{port}/jwks.json"))
    app.start(wait=False)
    time.sleep(1.5)
    r = httpx.get(app.admin + "/readyz")
    assert r.status_code == 503 and "keys not loaded" in r.json()["reason"]
    server = JWKSServer([jwk(keys["rsa"], "rsa-1")], port=port)
    try:
        app.wait_ready(timeout=10)
        assert post_token(app, token(keys["rsa"], "rsa-1"), delivery(["late"])).status_code == 200
    finally:
        server.stop()


def test_credentials_directory_secrets_in_both_modes(make_appliance: Any, tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "hmac-secret").write_text(SECRET + "\n")
    (creds / "bearer-secret").write_text("shared-hs-secret-of-enough-length-0123456789\n")
    app = make_appliance(
        {"auth": {"hmac": {"secrets": [{"file": "${CREDENTIALS_DIRECTORY}/hmac-secret"}]}}}
    )
    app.start(env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert app.post(delivery(["cred-hmac"])).status_code == 200
    assert app.stop() == 0
    cfg = bearer_config(secret={"file": "${CREDENTIALS_DIRECTORY}/bearer-secret"})
    cfg["auth"]["bearer"]["algorithms"] = ["HS256"]
    app.config = {**app.config, "auth": cfg["auth"]}
    app.write_config()
    app.start(env={"CREDENTIALS_DIRECTORY": str(creds)})
    tok = token("shared-hs-secret-of-enough-length-0123456789", None, "HS256")
    assert post_token(app, tok, delivery(["cred-bearer"])).status_code == 200
    assert (
        post_token(
            app, token("wrong-secret-of-enough-length-0123456789", None, "HS256"), delivery(["x"])
        ).status_code
        == 401
    )


class Pounder:
    """Sends signed deliveries continuously on keep-alive and fresh connections; records any
    connection that could not be made or was dropped."""

    def __init__(self, app: Appliance) -> None:
        self.app = app
        self.errors: list[str] = []
        self.statuses: list[int] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        n = 0
        with httpx.Client(timeout=10) as keepalive:
            while not self.stop.is_set():
                n += 1
                body = delivery([f"pound-{n}"])
                for client in (keepalive, None):
                    try:
                        self.statuses.append(self.app.post(body, client=client).status_code)
                    except httpx.HTTPError as e:
                        self.errors.append(f"{e.__class__.__name__}: {e}")
                time.sleep(0.01)


def test_sighup_switches_hmac_to_bearer_without_refusing_a_connection(
    make_appliance: Any, keys: dict[str, Any], tmp_path: Path
) -> None:
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps({"keys": [jwk(keys["rsa"], "rsa-1")]}))
    app = make_appliance().start()
    pounder = Pounder(app)
    pounder.thread.start()
    time.sleep(0.5)
    # check-config shows what the reload would change, and no secret.
    new = dict(app.config)
    new["auth"] = bearer_config(jwks_file=str(jwks_file))["auth"]
    app.write_config(new)
    shown = app.cli("check-config").stdout
    assert "auth_mode: 'hmac' -> 'bearer'" in shown and ISSUER in shown and AUDIENCE in shown
    assert SECRET not in shown
    assert app.proc is not None
    app.proc.send_signal(signal.SIGHUP)
    app.wait_for(lambda: "config reloaded" in app.logs(), what="reload")
    time.sleep(0.5)
    pounder.stop.set()
    pounder.thread.join(10)
    assert pounder.errors == [], pounder.errors[:5]
    assert 200 in pounder.statuses and 401 in pounder.statuses  # served throughout, then refused
    assert app.post(delivery(["after-hmac"])).status_code == 401
    assert (
        post_token(app, token(keys["rsa"], "rsa-1"), delivery(["after-bearer"])).status_code == 200
    )
    status = httpx.get(app.admin + "/status").json()
    assert status["auth_mode"] == "bearer"
    assert 'auth_mode="bearer"' in httpx.get(app.admin + "/metrics").text

    # An invalid edit is refused and the running mode keeps working.
    app.config_path.write_text(app.config_path.read_text().replace("mode: bearer", "mode: bearr"))
    app.proc.send_signal(signal.SIGHUP)
    app.wait_for(lambda: "reload refused" in app.logs(), what="refusal")
    refusal = [line for line in app.log_lines() if line.get("msg", "").startswith("reload refused")]
    assert any("auth.mode: must be one of hmac | bearer" in e for e in refusal[-1]["errors"])
    assert f"{app.config_path}:" in refusal[-1]["errors"][0]
    assert (
        post_token(app, token(keys["rsa"], "rsa-1"), delivery(["still-bearer"])).status_code == 200
    )
    assert app.proc.poll() is None


def make_cert(tmp: Path, name: str, key: Any = None) -> tuple[Path, Path, bytes]:
    """A self-signed certificate for 127.0.0.1 (an EC P-256 key unless one is given)."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.datetime(2020, 1, 1))
        .not_valid_after(datetime.datetime(2040, 1, 1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .sign(key, hashes.SHA256())
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    cert_path, key_path = tmp / f"{name}.crt", tmp / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path, der


def peer_cert(port: int) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port)) as s, ctx.wrap_socket(s) as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return der


def test_sighup_rotates_the_tls_certificate_for_new_connections(
    make_appliance: Any, tmp_path: Path
) -> None:
    live_cert, live_key = tmp_path / "live.crt", tmp_path / "live.key"
    a_cert, a_key, a_der = make_cert(tmp_path, "cert-a")
    b_cert, b_key, b_der = make_cert(tmp_path, "cert-b")
    live_cert.write_bytes(a_cert.read_bytes())
    live_key.write_bytes(a_key.read_bytes())
    app = make_appliance(
        {"listen": {"tls": {"cert_file": str(live_cert), "key_file": str(live_key)}}}
    )
    app.start()
    url = app.url.replace("http://", "https://")
    assert peer_cert(app.port) == a_der
    with httpx.Client(verify=False, timeout=10) as keepalive:
        body = delivery(["tls-1"])
        headers = {"X-Cointracker-Signature": sign(body)}
        assert keepalive.post(url, content=body, headers=headers).status_code == 200
        # certbot's deploy hook: new files, then systemctl reload (SIGHUP).
        live_cert.write_bytes(b_cert.read_bytes())
        live_key.write_bytes(b_key.read_bytes())
        assert app.proc is not None
        app.proc.send_signal(signal.SIGHUP)
        app.wait_for(lambda: "config reloaded" in app.logs(), what="reload")
        assert peer_cert(app.port) == b_der
        body = delivery(["tls-2"])
        r = keepalive.post(url, content=body, headers={"X-Cointracker-Signature": sign(body)})
        assert r.status_code == 200
        assert len(keepalive._transport._pool.connections) == 1  # the same connection, still open
