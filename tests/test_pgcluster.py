"""Smoke tests of the real PostgreSQL and haproxy fixtures (tests/pgcluster.py, tests/haproxy.py)
that the end-to-end tests build on."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import psycopg

from .haproxy import Haproxy
from .pgcluster import PgCluster


def test_session_cluster_answers(pg_dsn: str, pg_cluster: PgCluster) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        conn.execute("create table t (id int primary key)")
        conn.execute("insert into t values (7)")
    dbname = pg_dsn.split("dbname=")[1].split()[0]
    assert pg_cluster.sql("select id from t", dbname=dbname) == "7\n"


def test_sync_standby_failover() -> None:
    with PgCluster() as primary:
        primary.init().start()
        with PgCluster.standby_of(primary, app_name="standby") as standby:
            primary.set_conf(synchronous_standby_names="standby")
            primary.wait_streaming("standby", timeout=30, sync=True)

            with psycopg.connect(primary.dsn(), autocommit=True) as conn:
                conn.execute("create table t (id int primary key, v text)")
                conn.execute("insert into t values (1, 'committed on the primary')")
            # synchronous_commit=on with a sync standby: committed means flushed there, and
            # visible once replayed (remote_apply is not asked for, so poll briefly).
            with psycopg.connect(standby.dsn(), autocommit=True) as conn:
                assert conn.execute("select pg_is_in_recovery()").fetchone() == (True,)
                row = None
                for _ in range(100):
                    row = conn.execute("select v from t where id = 1").fetchone()
                    if row:
                        break
                    conn.execute("select pg_sleep(0.05)")
                assert row == ("committed on the primary",)

            primary.stop("immediate")
            standby.promote()
            multi = (
                f"host=127.0.0.1,127.0.0.1 port={primary.port},{standby.port} user=postgres "
                "dbname=postgres target_session_attrs=read-write connect_timeout=5"
            )
            with psycopg.connect(multi, autocommit=True) as conn:
                assert conn.info.port == standby.port
                conn.execute("insert into t values (2, 'written after failover')")
                assert conn.execute("select count(*) from t").fetchone() == (2,)


class _Backend:
    """A tiny HTTP server answering any GET/POST with its name, and an admin server whose
    /readyz answers 200: the shape haproxy expects of an appliance."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.hits = 0
        backend = self

        class App(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                self.rfile.read(length)
                backend.hits += 1
                body = backend.name.encode()
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, format: str, *args: object) -> None:
                pass

        class Admin(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200 if self.path == "/readyz" else 404)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.app = ThreadingHTTPServer(("127.0.0.1", 0), App)
        self.admin = ThreadingHTTPServer(("127.0.0.1", 0), Admin)
        self.threads = [
            threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
            for s in (self.app, self.admin)
        ]
        for t in self.threads:
            t.start()

    @property
    def spec(self) -> tuple[str, int, int]:
        return (self.name, self.app.server_address[1], self.admin.server_address[1])

    def stop(self) -> None:
        for s in (self.app, self.admin):
            s.shutdown()
            s.server_close()
        for t in self.threads:
            t.join(5)


@contextmanager
def _backends(*names: str) -> Iterator[list[_Backend]]:
    made = [_Backend(n) for n in names]
    try:
        yield made
    finally:
        for b in made:
            if b.app.socket.fileno() != -1:
                b.stop()


def test_haproxy_balances_and_drops_a_dead_backend() -> None:
    with _backends("a", "b") as (a, b), Haproxy([a.spec, b.spec]) as hap:
        hap.start()
        hap.wait_servers_up({"a", "b"})
        with httpx.Client(base_url=hap.url, timeout=10) as client:
            answers = {client.post("/webhooks/cointracker", content=b"{}").text for _ in range(6)}
            assert answers == {"a", "b"}
            assert a.hits >= 1 and b.hits >= 1

            b.stop()
            # Requests keep succeeding while b is being found dead (conn-failure retries go to a)
            # and after haproxy has marked it down.
            for _ in range(4):
                r = client.post("/webhooks/cointracker", content=b"{}")
                assert (r.status_code, r.text) == (200, "a")
            hap.wait_servers_up({"a"}, timeout=10)
            assert hap.server_status()["b"].startswith("DOWN")
            assert client.get("/").text == "a"
