"""The TLS listener (issue 13): Mozilla's "intermediate" profile without DHE, and HTTP/2 only
here, through ALPN, with a bounded stream count and the same body budget as HTTP/1.1.

Handshakes use Python's `ssl` (OpenSSL) as a client that offers exactly one suite at a time."""

from __future__ import annotations

import socket
import ssl
import warnings
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from ..conftest import Appliance, delivery, sign
from .test_bearer import make_cert


@pytest.fixture
def tls_app(make_appliance: Any, tmp_path: Path) -> Appliance:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert, key, _ = make_cert(tmp_path, "tls", key=rsa_key)
    app: Appliance = make_appliance(
        {"listen": {"tls": {"cert_file": str(cert), "key_file": str(key)}}}
    )
    return app.start()


def client_context(
    *, cipher: str | None = None, version: ssl.TLSVersion | None = None, alpn: list[str] = ()
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    if cipher is not None:
        # SECLEVEL=0 so the client really offers what the server must refuse.
        ctx.set_ciphers(cipher + ":@SECLEVEL=0")
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def handshake(port: int, ctx: ssl.SSLContext) -> tuple[str, str, str | None] | None:
    """(protocol version, cipher, ALPN) of a completed handshake, None when refused."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        try:
            with ctx.wrap_socket(raw) as tls:
                cipher = tls.cipher()
                assert cipher is not None
                return cipher[1], cipher[0], tls.selected_alpn_protocol()
        except (ssl.SSLError, ConnectionResetError):
            return None


@pytest.mark.parametrize(
    "cipher",
    [
        "ECDHE-RSA-AES128-SHA256",  # CBC: offered by the landed server (issue 13, item 9)
        "ECDHE-RSA-AES256-SHA384",  # CBC: ditto
        "ECDHE-RSA-AES128-SHA",  # CBC with SHA-1
        "AES128-GCM-SHA256",  # RSA key exchange: no forward secrecy
        "DHE-RSA-AES128-GCM-SHA256",  # finite-field DHE
    ],
)
def test_tls12_refuses_cbc_rsa_and_dhe_suites(tls_app: Appliance, cipher: str) -> None:
    assert (
        handshake(tls_app.port, client_context(cipher=cipher, version=ssl.TLSVersion.TLSv1_2))
        is None
    )


@pytest.mark.parametrize(
    "cipher",
    ["ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-RSA-CHACHA20-POLY1305"],
)
def test_tls12_accepts_ecdhe_aead_suites(tls_app: Appliance, cipher: str) -> None:
    got = handshake(tls_app.port, client_context(cipher=cipher, version=ssl.TLSVersion.TLSv1_2))
    assert got is not None and got[:2] == ("TLSv1.2", cipher)


def test_tls13_is_offered_and_tls11_is_refused(tls_app: Appliance) -> None:
    got = handshake(tls_app.port, client_context(version=ssl.TLSVersion.TLSv1_3))
    assert got is not None and got[0] == "TLSv1.3"
    with warnings.catch_warnings():  # Python deprecates TLS 1.1; offering it is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        old = client_context(cipher="DEFAULT", version=ssl.TLSVersion.TLSv1_1)
    assert handshake(tls_app.port, old) is None


def test_http2_over_alpn_with_bounded_streams(tls_app: Appliance) -> None:
    got = handshake(tls_app.port, client_context(alpn=["h2", "http/1.1"]))
    assert got is not None and got[2] == "h2"
    settings = server_settings(tls_app.port)
    assert settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] == 16
    body = delivery(["over-h2"])
    with httpx.Client(http2=True, verify=False, timeout=10) as client:
        url = f"https://127.0.0.1:{tls_app.port}/webhooks/cointracker"
        r = client.post(url, content=body, headers={"X-Cointracker-Signature": sign(body)})
    assert r.http_version == "HTTP/2"
    assert r.status_code == 200 and r.json()["status"] == "accepted"


def h2_connection(port: int) -> tuple[ssl.SSLSocket, h2.connection.H2Connection]:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    tls = client_context(alpn=["h2"]).wrap_socket(raw)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    tls.sendall(conn.data_to_send())
    return tls, conn


def server_settings(port: int) -> dict[int, int]:
    tls, conn = h2_connection(port)
    with tls:
        while True:
            for event in conn.receive_data(tls.recv(65536)):
                if isinstance(event, h2.events.RemoteSettingsChanged):
                    return {code: s.new_value for code, s in event.changed_settings.items()}


def test_http2_streams_draw_on_the_same_body_budget(tls_app: Appliance) -> None:
    """One HTTP/2 connection announces 30 MiB bodies on 16 streams without sending them: the
    default budget (256 MiB) admits the few that fit under its line and answers the rest 503
    overloaded at once, as it would 16 HTTP/1.1 connections."""
    tls, conn = h2_connection(tls_app.port)
    statuses: dict[int, int] = {}
    with tls:
        for i in range(16):
            conn.send_headers(
                1 + 2 * i,
                [
                    (":method", "POST"),
                    (":path", "/webhooks/cointracker"),
                    (":scheme", "https"),
                    (":authority", f"127.0.0.1:{tls_app.port}"),
                    ("content-length", str(30 << 20)),
                    ("x-cointracker-signature", "0" * 64),
                ],
            )
        tls.sendall(conn.data_to_send())
        tls.settimeout(5)
        try:
            while len(statuses) < 12:
                for event in conn.receive_data(tls.recv(65536)):
                    if isinstance(event, h2.events.ResponseReceived):
                        statuses[event.stream_id] = int(dict(event.headers)[b":status"])
                tls.sendall(conn.data_to_send())
        except TimeoutError:
            pass
    overloaded = sum(1 for s in statuses.values() if s == 503)
    # line(30 MiB) = 256 - 120 = 136 MiB: four 30 MiB bodies fit, the other twelve do not.
    assert overloaded == 12, statuses
