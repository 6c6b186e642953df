"""Failover of the PostgreSQL store to a promoted synchronous standby, with the real processes:
a primary and a streaming standby (tests/pgcluster.py), `synchronous_standby_names` set on the
primary so a commit is acknowledged only once the standby has it, and two appliances whose DSN
lists both servers (`host=127.0.0.1,127.0.0.1 port=P1,P2`; the appliance adds
`target_session_attrs=read-write`, so a connection lands on whichever one accepts writes).

The primary is stopped in immediate mode (no checkpoint, backends killed: a crash, as far as
clients see) while deliveries flow to both appliances and an import is running; the standby is
then promoted. What CoinTracker must see: only 200 and 503 + Retry-After answers (a 4xx would be
permanent), the appliances back by themselves once the standby accepts writes, every delivery
acknowledged before or after the failover still known (`duplicate` when re-posted) and imported
exactly once."""

from __future__ import annotations

import json
import sys
import textwrap
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from ..conftest import Appliance, delivery
from ..pgcluster import PgCluster

LEASE_SECONDS = 20  # an attempt outlives the outage on its lease; a lost result shows within it
SLOW_SECONDS = 3.0  # the import running at the crash ends while the database is down

# Appends one line per successful run (never dedupes: a second run of a delivery shows). A
# delivery with a flow id starting "slow-" first notes it started, then sleeps SLOW_SECONDS
# (the file `slow.seconds`).
IMPORTER = textwrap.dedent(
    """\
    import json, os, sys, time
    doc = json.load(sys.stdin)
    state = os.environ["STATE_DIR"]
    if any(f.startswith("slow-") for f in doc["flow_ids"]):
        with open(os.path.join(state, "slow.started"), "a") as f:
            f.write(f"{doc['delivery_id']} {doc['attempt']} {time.time()}\\n")
        with open(os.path.join(state, "slow.seconds")) as f:
            time.sleep(float(f.read()))
    line = {k: doc[k] for k in ("delivery_id", "attempt", "flow_ids")}
    line["at"] = time.time()
    fd = os.open(os.path.join(state, "record.jsonl"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, (json.dumps(line) + "\\n").encode())
    os.fsync(fd)
    os.close(fd)
    """
)


@dataclass
class Post:
    app: str
    body: bytes
    flow: str
    status: int  # 0: no answer (connection error)
    doc: dict[str, Any]
    retry_after: str | None
    at: float


class Load:
    """One thread per appliance posting deliveries of one new flow id each, until stopped."""

    def __init__(self, apps: dict[str, Appliance]) -> None:
        self.apps = apps
        self.posts: list[Post] = []
        self.lock = threading.Lock()
        self.errors: list[BaseException] = []
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(n,)) for n in apps]

    def _run(self, name: str) -> None:
        app = self.apps[name]
        try:
            with httpx.Client() as client:
                while not self.stopping.is_set():
                    flow = f"fo-{name}-{uuid.uuid4().hex[:12]}"
                    body = delivery([flow])
                    try:
                        r = app.post(body, client=client)
                        status, doc = r.status_code, r.json()
                        retry_after = r.headers.get("retry-after")
                    except httpx.TransportError as e:
                        status, doc, retry_after = 0, {"error": repr(e)}, None
                    with self.lock:
                        self.posts.append(
                            Post(name, body, flow, status, doc, retry_after, time.monotonic())
                        )
                    time.sleep(0.1)
        except BaseException as e:  # seen by the test, not lost in a thread
            self.errors.append(e)

    def snapshot(self) -> list[Post]:
        with self.lock:
            return list(self.posts)

    def count(self, app: str, status: int, since: float = 0.0) -> int:
        return sum(
            1 for p in self.snapshot() if p.app == app and p.status == status and p.at > since
        )

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(60)


def wait(predicate: Any, timeout: float, what: str, context: Any = lambda: "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{context()}")


class Phases:
    """Prints when each phase of the test was reached (shown by pytest when the test fails)."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self, what: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f} s] {what}", flush=True)


def readyz(app: Appliance) -> tuple[int, str]:
    try:
        r = httpx.get(app.admin + "/readyz", timeout=5)
    except httpx.TransportError as e:
        return 0, repr(e)
    return r.status_code, str(r.json().get("reason"))


def repost(
    posts: Iterable[Post], to: dict[str, Appliance]
) -> list[tuple[Post, tuple[int, str | None]]]:
    """Post each body again to `to[its appliance]`, 4 at a time; each with its answer
    (HTTP status, `status` or `error` of the JSON body)."""
    with httpx.Client() as client, ThreadPoolExecutor(4) as pool:

        def one(p: Post) -> tuple[Post, tuple[int, str | None]]:
            r = to[p.app].post(p.body, client=client)
            return p, (r.status_code, r.json().get("status") or r.json().get("error"))

        return list(pool.map(one, posts))


def read_record(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def tail(app: Appliance, n: int = 30) -> str:
    return f"--- {app.url} log ---\n" + "\n".join(app.logs().splitlines()[-n:])


def test_failover_to_promoted_standby_loses_nothing_acknowledged(
    make_appliance: Any, tmp_path: Path
) -> None:
    state = tmp_path / "importer"
    state.mkdir()
    (state / "importer.py").write_text(IMPORTER)
    (state / "slow.seconds").write_text(str(SLOW_SECONDS))
    record = state / "record.jsonl"
    phase = Phases()

    with ExitStack() as stack:
        primary = stack.enter_context(PgCluster())
        primary.init().start()
        standby = stack.enter_context(PgCluster.standby_of(primary, app_name="standby"))
        primary.set_conf(synchronous_standby_names="standby")
        primary.wait_streaming("standby", sync=True)
        assert primary.sql("SHOW synchronous_standby_names").strip() == "standby"
        # Promoted, the standby must not wait for a synchronous standby of its own.
        assert standby.sql("SHOW synchronous_standby_names").strip() == "", (
            "the standby kept synchronous_standby_names: promoted, every commit would hang"
        )
        primary.create_database("ct")
        dsn = f"host=127.0.0.1,127.0.0.1 port={primary.port},{standby.port} user=postgres dbname=ct"
        cfg = {
            "store": {
                "backend": "postgresql",
                "postgresql": {
                    "dsn": {"value": dsn},
                    "pool_size": 4,
                    "lease_seconds": LEASE_SECONDS,
                },
            },
            "importer": {
                "command": [sys.executable, str(state / "importer.py")],
                "env": {"STATE_DIR": str(state)},
                "concurrency": 2,
            },
        }
        apps = {"a": make_appliance(cfg, sub="a"), "b": make_appliance(cfg, sub="b")}
        a, b = apps["a"], apps["b"]
        stack.callback(lambda: [app.close() for app in apps.values()])  # before the clusters
        phase("clusters streaming (sync)")
        migrated = a.cli_json("db", "migrate")
        assert migrated["schema_version_before"] == 0, migrated
        for app in apps.values():  # both start at once, then both must be ready
            app.start(wait=False)
        for app in apps.values():
            app.wait_ready(60)

        def logs() -> str:
            return "\n".join(tail(app) for app in apps.values())

        phase("appliances ready")
        with Load(apps) as load:
            for name in apps:
                wait(lambda n=name: load.count(n, 200) >= 10, 30, f"traffic through {name}", logs)

            # An import running when the primary goes: it ends while the database is down.
            slow = a.post(delivery(["slow-1"]))
            assert slow.json().get("status") == "accepted", slow.text
            slow_id = slow.json()["delivery_id"]
            wait(lambda: (state / "slow.started").exists(), 15, "the slow import to start", logs)

            phase("slow import started; stopping the primary (immediate)")
            crashed_at = time.monotonic()
            primary.stop("immediate")

            for name, app in apps.items():
                wait(lambda app=app: readyz(app)[0] == 503, 15, f"{name} /readyz 503", logs)
                reason = readyz(app)[1]
                assert "store unavailable" in reason, f"{name} /readyz reason: {reason!r}"
                wait(
                    lambda n=name: load.count(n, 503, crashed_at) >= 3,
                    15,
                    f"503s from {name} while the database is down",
                    logs,
                )
            wait(
                lambda: any("slow-1" in r["flow_ids"] for r in read_record(record)),
                SLOW_SECONDS + 15,
                "the slow import to end during the outage",
                logs,
            )
            phase("outage seen: /readyz 503, webhook 503, slow import ended")
            time.sleep(1.5)  # its result is being recorded, and refused, meanwhile
            assert not primary.running

            promoted_at = time.monotonic()
            standby.promote()
            for name, app in apps.items():
                wait(lambda app=app: readyz(app)[0] == 200, 30, f"{name} ready again", logs)
            recovered = time.monotonic() - promoted_at
            phase(f"standby promoted; both ready again {recovered:.1f} s after")
            for name in apps:
                wait(
                    lambda n=name: load.count(n, 200, promoted_at + recovered) >= 8,
                    30,
                    f"deliveries accepted by {name} after the failover",
                    logs,
                )
            (state / "slow.seconds").write_text("0")
        assert not load.errors, load.errors
        phase("load stopped")
        outage = promoted_at - crashed_at

        posts = load.snapshot()
        statuses = Counter(p.status for p in posts)
        assert set(statuses) <= {200, 503}, (
            f"answers other than 200 and 503 (a 4xx is permanent for CoinTracker): {statuses}\n"
            + "\n".join(f"{p.app} {p.status} {p.doc}" for p in posts if p.status not in (200, 503))
        )
        unavailable = [p for p in posts if p.status == 503]
        assert unavailable, "no 503 seen: the outage was not observed"
        assert all(p.retry_after for p in unavailable), "a 503 without Retry-After"
        codes = Counter(str(p.doc.get("error")) for p in unavailable)
        assert set(codes) == {"unavailable"}, f"503 error codes: {codes}"
        assert all(p.doc.get("status") == "accepted" for p in posts if p.status == 200), (
            "a new flow id answered other than accepted"
        )

        # Every acknowledged delivery is still known: re-posted (to the other appliance) it is
        # a duplicate. A delivery answered 503 is retried as CoinTracker would: 200 either way
        # (a duplicate when its commit reached the standby before the crash cut the answer).
        other = {"a": b, "b": a}
        slow_post = Post("a", slow.request.content, "slow-1", 200, slow.json(), None, 0.0)
        acked = {p.flow: p for p in [*posts, slow_post] if p.status == 200}
        reposted = repost(acked.values(), other)
        not_duplicate = [(p.flow, p.doc, ans) for p, ans in reposted if ans != (200, "duplicate")]
        assert not not_duplicate, (
            f"{len(not_duplicate)} of {len(acked)} acknowledged deliveries not a duplicate "
            f"after the failover (lost with the old primary?): {not_duplicate[:10]}"
        )
        retried: Counter[str] = Counter()
        for p, answer in repost(unavailable, other):
            assert answer in ((200, "accepted"), (200, "duplicate")), (p.flow, answer)
            retried[str(answer[1])] += 1
            acked[p.flow] = p

        phase(f"re-posted {len(acked)} acknowledged and {len(unavailable)} refused deliveries")

        def drained() -> bool:
            inbox = httpx.get(a.admin + "/status", timeout=10).json()["inbox"]
            return bool(inbox["pending"] == 0 and inbox["importing"] == 0)

        wait(drained, LEASE_SECONDS + 60, "every delivery imported", logs)
        phase("inbox drained")
        time.sleep(1.0)  # a second run of something would show now

        lines = read_record(record)
        imported = Counter(f for line in lines for f in line["flow_ids"])
        missing = sorted(set(acked) - set(imported))
        assert not missing, (
            f"{len(missing)} acknowledged flow ids never imported: {missing[:10]}\n{logs()}"
        )
        unexpected = sorted(set(imported) - set(acked))
        assert not unexpected, f"imported but never acknowledged: {unexpected[:10]}"
        states = a.cli_json("flows", "show", *sorted(acked))
        not_done = [(s["flow_id"], s.get("state")) for s in states if s.get("state") != "done"]
        assert not not_done, f"acknowledged flow ids not done: {not_done[:10]}"
        assert a.cli_json("inbox", "list", "--state", "dead") == []
        # And in the database itself: the promoted standby holds every claim.
        assert standby.sql("SELECT pg_is_in_recovery()").strip() == "f"
        claimed = set(standby.sql("SELECT flow_id FROM ct_flows", dbname="ct").split())
        assert set(acked) <= claimed, f"not in the promoted standby: {sorted(set(acked) - claimed)}"

        twice = {f: n for f, n in imported.items() if n > 1}
        runs = [line for line in lines if set(line["flow_ids"]) & set(twice)]
        lost_results = [
            line
            for app in apps.values()
            for line in app.log_lines()
            if any(w in str(line.get("msg")) for w in ("lease", "interrupt", "cancelling"))
        ]
        assert not twice, (
            "imported more than once across the failover (the appliances never crashed, so "
            f"spec §5.3 allows no re-run): {twice}; importer runs: {runs}\n"
            f"{slow_id} (the import that ended while the database was down): "
            f"{json.dumps(a.cli_json('inbox', 'show', slow_id)['attempt_log'])}\n"
            f"appliance log lines: {lost_results}"
        )
        print(
            f"\nfailover: {len(acked)} flow ids acknowledged, outage {outage:.1f} s, "
            f"ready {recovered:.1f} s after promotion, answers {dict(statuses)}, "
            f"503s re-posted {dict(retried)}"
        )
        for app in apps.values():
            assert app.stop() == 0, tail(app)
