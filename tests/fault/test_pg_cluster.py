"""The PostgreSQL store under faults, with the real processes: two appliances sharing one
database behind a real haproxy while they are kill -9'd in turn; one appliance while PostgreSQL
itself is stopped and killed under load; and a lease renewal slowed down while new imports start.

History kept by the test (the oracle), as CoinTracker would see it:
  sent    every flow id put in a body that went out (answered or not);
  acked   every flow id of a body answered 2xx (accepted or duplicate).
Each page is posted with CoinTracker's semantics (spec §1): a 2xx ends it, a 4xx is permanent
(never expected here: any 4xx fails the test), a 5xx or a connection error is retried RETRIES
times with exponential backoff, after which CoinTracker gives up on it.

Record kept by the importers: the example importer (examples/jsonl_importer.py), one file per
appliance. It skips a delivery id already in ITS file, so a re-run on the same appliance adds
no line, while a delivery re-run by the other appliance (a lease taken over) appears in both
files. A repeat on the same appliance still shows: the importer says "already imported,
skipping" on stdout, which the store keeps with the attempt (ct_outputs).

  lost        = acked - imported                                        must be empty
  unexpected  = imported - sent                                         must be empty
  split       = flow ids imported under two delivery ids                must be empty
  duplicated  = successful importer runs of a delivery (its lines in both files plus its
                "already imported" runs) beyond 1 + the reruns its record counts      must be 0
With no crash of the appliance (test 2, test 3) a delivery is handed to the importer once.
"""

from __future__ import annotations

import json
import random
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg

from appliance.pgbackend import PgBackend
from appliance.record import Outcome, Record, State

from ..conftest import EXAMPLE_IMPORTER, ROOT, SECRET, Appliance, delivery, sign
from ..haproxy import Haproxy
from ..pgcluster import PgCluster
from .helpers import Stopwatch, metric, report

LEASE_SECONDS = 10
RETRIES = 5  # CoinTracker: a 5xx is retried 5 times with exponential backoff
RERUNS_METRIC = "ct_appliance_import_reruns_total"


# -- the appliances ------------------------------------------------------------------------------
def pg_overrides(dsn: str, **importer: Any) -> dict[str, Any]:
    return {
        "store": {
            "backend": "postgresql",
            "postgresql": {
                "dsn": {"value": dsn},
                "pool_size": 8,
                "lease_seconds": LEASE_SECONDS,
            },
        },
        "importer": {
            "concurrency": 2,
            "backoff_initial_seconds": 0.05,
            "backoff_max_seconds": 0.5,
            **importer,
        },
    }


def appliance_name(app: Appliance) -> str:
    """How the appliance is known in the shared store (backend.appliance_name)."""
    return f"{socket.gethostname()}:{app.port}"


def tail(text: str, n: int = 3000) -> str:
    return text[-n:]


def logs_of(*apps: Appliance, hap: Haproxy | None = None, pg: PgCluster | None = None) -> str:
    """The tails of every log a failure may need, for assertion messages."""
    parts = [f"--- {app.tmp.name} server.log ---\n{tail(app.logs())}" for app in apps]
    if hap is not None:
        parts.append(f"--- haproxy ---\n{tail(hap.logs(), 1500)}")
    if pg is not None:
        parts.append(f"--- postgres ---\n{pg.log_tail(30)}")
    return "\n".join(parts)


@contextmanager
def db(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    """The test's own connection to the store's database (autocommit, for looking)."""
    conn = psycopg.connect(dsn, autocommit=True, connect_timeout=5)
    try:
        yield conn
    finally:
        conn.close()


def leases_held(conn: psycopg.Connection[Any], owner: str) -> int:
    row = conn.execute(
        "SELECT count(*) FROM ct_deliveries WHERE state = 'importing' AND lease_owner = %s",
        (owner,),
    ).fetchone()
    return int(row[0]) if row else 0


def state_counts(conn: psycopg.Connection[Any]) -> dict[str, int]:
    rows = conn.execute("SELECT state, count(*) FROM ct_deliveries GROUP BY state").fetchall()
    return {str(r[0]): int(r[1]) for r in rows}


def wait_drained_db(dsn: str, timeout: float, why: Any) -> dict[str, int]:
    """Until no delivery in the shared store is pending or importing."""
    deadline = time.monotonic() + timeout
    counts: dict[str, int] = {}
    with db(dsn) as conn:
        while time.monotonic() < deadline:
            counts = state_counts(conn)
            if not counts.get("pending") and not counts.get("importing"):
                return counts
            time.sleep(0.2)
    raise AssertionError(f"not drained in {timeout} s: {counts}\n{why()}")


def interruptions(records: list[Record]) -> dict[str, int]:
    """Why attempts were cut short (the summaries of `interrupted` attempts), counted; the
    appliance's name in a summary is replaced by NAME."""
    out: Counter[str] = Counter()
    for rec in records:
        for a in rec.attempts:
            if a.outcome is Outcome.INTERRUPTED:
                out[re.sub(r"appliance \S+ ", "appliance NAME ", a.summary or "")] += 1
    return dict(out)


SKIPPED = b"already imported, skipping"  # what the example importer prints for a repeat


def repeated_imports(dsn: str) -> list[tuple[int, int]]:
    """(seq, attempt) of every successful importer run that was handed a delivery its
    appliance's importer had already imported (the example importer says so on stdout, which
    the store keeps per attempt)."""
    with db(dsn) as conn:
        rows = conn.execute("SELECT seq, n, output FROM ct_outputs ORDER BY seq, n").fetchall()
    return [(int(r[0]), int(r[1])) for r in rows if SKIPPED in bytes(r[2])]


def log_lines_about(app: Appliance, *needles: str) -> str:
    """The appliance's log lines that contain any of `needles` (at most 20)."""
    found = [line for line in app.logs().splitlines() if any(n in line for n in needles)]
    return "\n".join(found[:20])


def cancellations(*apps: Appliance) -> dict[str, int]:
    """The import attempts the appliances cancelled for their lease, by appliance and reason."""
    out: Counter[str] = Counter()
    for app in apps:
        for line in app.log_lines():
            if line.get("msg") == "cancelling an import attempt":
                out[f"{app.tmp.name}: {line.get('reason')}"] += 1
    return dict(out)


def cancelled_attempts(records: list[Record], *apps: Appliance) -> list[str]:
    """Each lease cancellation in the logs, with how old the attempt it cancelled was: an
    attempt a few milliseconds old had a fresh lease that nobody else could hold."""
    by_seq = {r.seq: r for r in records}
    out = []
    for app in apps:
        for line in app.log_lines():
            if line.get("msg") != "cancelling an import attempt":
                continue
            at = datetime.fromisoformat(line["ts"].replace("Z", "+00:00")).timestamp()
            rec = by_seq.get(int(line["seq"]))
            started = [a.started_at for a in rec.attempts if a.started_at <= at] if rec else []
            age = f"{(at - started[-1]) * 1000:.0f} ms" if started else "?"
            attempts = (
                [(a.n, a.outcome and a.outcome.value, a.summary) for a in rec.attempts]
                if rec
                else None
            )
            out.append(
                f"{app.tmp.name} {line['ts']} seq {line['seq']} ({line.get('reason')}): the "
                f"attempt was {age} old; attempts {attempts}"
            )
    return out


def store_records(dsn: str) -> list[Record]:
    """Every record in the store, read as the appliance reads them (delivery ids included)."""
    backend = PgBackend(dsn, name="test-reader", pool_size=2)
    try:
        return backend.records(limit=10**7, newest_first=False)
    finally:
        backend.close()


# -- CoinTracker ---------------------------------------------------------------------------------
class History:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sent: set[str] = set()
        self.acked: set[str] = set()
        self.acked_bodies: list[bytes] = []
        self.pages = 0
        self.retried_pages = 0  # pages that needed more than one attempt
        self.gave_up: list[tuple[bytes, list[str]]] = []  # pages CoinTracker gave up on
        self.answers: Counter[str] = Counter()
        self.client_errors: list[str] = []  # every 4xx (never expected: CoinTracker drops it)
        self.no_retry_after = 0  # 503s from an appliance without Retry-After
        self.unavailable_at: list[float] = []  # when each 503 came (monotonic)


def post_page(
    client: httpx.Client, url: str, body: bytes, history: History, backoff: float
) -> bool:
    """One page as CoinTracker posts it; True once answered 2xx."""
    headers = {"X-Cointracker-Signature": sign(body), "content-type": "application/json"}
    trail: list[str] = []
    for attempt in range(1, RETRIES + 2):
        try:
            r = client.post(url, content=body, headers=headers)
        except httpx.HTTPError as e:
            what = type(e).__name__
            status = None
        else:
            status = r.status_code
            try:
                answer = r.json()
            except ValueError:
                answer = None  # not the appliance's (haproxy's own error pages are HTML)
            if isinstance(answer, dict):
                what = f"{status} {answer.get('status') or answer.get('error')}"
            else:
                what = f"{status} (not JSON)"
        trail.append(what)
        with history.lock:
            history.answers[what] += 1
            if status is not None and 200 <= status < 300:
                history.pages += 1
                history.retried_pages += attempt > 1
                history.acked.update(json.loads(body)["flow_ids"])
                history.acked_bodies.append(body)
                return True
            if status is not None and 400 <= status < 500:
                history.client_errors.append(f"{what}: {r.text[:200]}")
                return False  # permanent: CoinTracker never retries a 4xx
            if status == 503:
                history.unavailable_at.append(time.monotonic())
                # An appliance's 503 (a JSON error) carries Retry-After; haproxy's own need not.
                if isinstance(answer, dict) and "retry-after" not in r.headers:
                    history.no_retry_after += 1
        if attempt <= RETRIES:
            time.sleep(backoff * 2 ** (attempt - 1))
    with history.lock:
        history.gave_up.append((body, trail))
    return False


def sender(
    n: int,
    url: str,
    history: History,
    stop: threading.Event,
    seed: float,
    backoff: float,
    pace: tuple[float, float],
) -> None:
    """Posts pages of new flow ids, now and then re-sends an acknowledged page (the duplicate
    path). A page under way is always finished, retries included, before the sender stops."""
    rng = random.Random(seed)
    seq = 0
    with httpx.Client(timeout=10) as client:
        while not stop.is_set():
            if history.acked_bodies and rng.random() < 0.1:
                body = rng.choice(history.acked_bodies)
            else:
                seq += 1
                flows = [f"pg-{n}-{seq}-{k}" for k in range(rng.randint(1, 4))]
                body = delivery(flows, run=f"pg-run-{n}-{seq // 10}")
                with history.lock:
                    history.sent.update(flows)
            post_page(client, url, body, history, backoff)
            time.sleep(rng.uniform(*pace))


def start_senders(
    count: int, url: str, history: History, backoff: float, pace: tuple[float, float], seed: int
) -> tuple[threading.Event, list[threading.Thread]]:
    rng = random.Random(seed)
    stop = threading.Event()
    threads = [
        threading.Thread(
            target=sender,
            args=(n, url, history, stop, rng.random(), backoff, pace),
            daemon=True,
        )
        for n in range(count)
    ]
    for t in threads:
        t.start()
    return stop, threads


def stop_senders(stop: threading.Event, threads: list[threading.Thread]) -> None:
    stop.set()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a sender did not finish its page in 60 s"


def imported_by_file(*apps: Appliance) -> list[tuple[str, dict[str, Any]]]:
    """Every line of every appliance's import file, with the appliance it came from."""
    return [(app.tmp.name, doc) for app in apps for doc in app.imported_docs()]


def haproxy_retries(hap: Haproxy) -> tuple[int, int]:
    """(retries, redispatches) haproxy made for the appliances' backend (`show stat`)."""
    lines = hap.command("show stat").splitlines()
    header = lines[0][2:].split(",")
    px, sv = header.index("pxname"), header.index("svname")
    wretr, wredis = header.index("wretr"), header.index("wredis")
    for line in lines[1:]:
        f = line.split(",")
        if len(f) > wredis and f[px] == "appliances" and f[sv] == "BACKEND":
            return int(f[wretr] or 0), int(f[wredis] or 0)
    raise AssertionError(f"no appliances BACKEND row in show stat: {lines[:3]}")


# -- 1. two appliances behind haproxy, kill -9 in turn -------------------------------------------
CYCLES = 8
PAUSED_IMPORTER = (
    "import runpy, sys, time; time.sleep(0.15); runpy.run_path(sys.argv[1], run_name='__main__')"
)
LONG_CYCLES = 2  # cycles whose victim stays down until the other appliance reclaims its leases
SENDERS = 3
PACE = (0.2, 0.5)  # seconds between a sender's pages: ~8 pages/s in all, what the importers
# (four example-importer slots, 0.2-0.5 s a run on this shared machine) keep up with


def test_two_appliances_behind_haproxy_survive_kill9_loop(
    make_appliance: Any, pg_dsn: str, tmp_path: Path
) -> None:
    """Appliances a and b on one database behind haproxy; CoinTracker posts through haproxy
    while a and b are kill -9'd in turn and restarted (with the same name, so each takes back
    its own leases at once). Two of the cycles aim the kill at an import in flight and keep the
    victim down until the survivor has reclaimed its expired leases (lease_seconds 10)."""
    clock = Stopwatch()
    # The example importer, after a short pause: on a quiet machine it takes ~50 ms, and the
    # kills must find imports in flight (leases held) whatever the machine's speed.
    paused = {"command": [sys.executable, "-c", PAUSED_IMPORTER, str(EXAMPLE_IMPORTER)]}
    a: Appliance = make_appliance(pg_overrides(pg_dsn, **paused), sub="a")
    b: Appliance = make_appliance(pg_overrides(pg_dsn, **paused), sub="b")
    a.cli("db", "migrate")
    b.cli("db", "migrate")  # idempotent: the second appliance's operator runs it too
    apps = {"a": a, "b": b}
    names = {k: appliance_name(app) for k, app in apps.items()}
    for app in apps.values():
        app.start()
    with Haproxy([(k, app.port, app.admin_port) for k, app in apps.items()]) as hap:
        hap.start()
        hap.wait_servers_up({"a", "b"})

        def why() -> str:
            return logs_of(a, b, hap=hap)

        status = httpx.get(a.admin + "/status", timeout=10).json()
        assert status["store"] == {"backend": "postgresql", "error": None}, status["store"]
        seen = {p["name"] for p in status["appliances"]}
        assert seen == set(names.values()), f"/status appliances {seen}, expected {names}"

        url = hap.url + "/webhooks/cointracker"
        history = History()
        rng = random.Random(20261017)
        stop, threads = start_senders(
            SENDERS, url, history, backoff=0.2, pace=PACE, seed=rng.randrange(1 << 30)
        )
        reruns_metric = 0.0
        kills: list[dict[str, Any]] = []
        long_done = 0
        try:
            with db(pg_dsn) as conn:
                cycle = 0
                while cycle < CYCLES or long_done < LONG_CYCLES:
                    assert cycle < CYCLES + 4, f"no long cycle caught an import in flight: {kills}"
                    victim = "a" if cycle % 2 == 0 else "b"
                    app, owner = apps[victim], names[victim]
                    time.sleep(rng.uniform(0.3, 1.5))
                    # Aim the kill at an import in flight: wait (bounded) for the victim to
                    # hold a lease, then kill it at once.
                    deadline = time.monotonic() + 3
                    while leases_held(conn, owner) == 0 and time.monotonic() < deadline:
                        time.sleep(0.005)
                    reruns_metric += metric(app, RERUNS_METRIC)  # this process's, read last
                    app.kill9()
                    # A commit the victim had already sent still lands: count after it.
                    time.sleep(0.3)
                    held = leases_held(conn, owner)
                    # The last cycles stay down long enough for the survivor to take over.
                    long = held > 0 and long_done < LONG_CYCLES and cycle >= CYCLES - 4
                    down = time.monotonic()
                    if long:
                        deadline = down + LEASE_SECONDS + 20
                        while leases_held(conn, owner) and time.monotonic() < deadline:
                            time.sleep(0.1)
                        left = leases_held(conn, owner)
                        assert left == 0, (
                            f"{left} leases of the dead {owner} not reclaimed by the other "
                            f"appliance in {LEASE_SECONDS + 20} s\n{why()}"
                        )
                        long_done += 1
                    else:
                        time.sleep(rng.uniform(0.2, 1.0))
                    down_s = round(time.monotonic() - down, 1)
                    app.start()
                    hap.wait_servers_up({"a", "b"}, timeout=20)
                    kills.append(
                        {
                            "victim": victim,
                            "leases_at_kill": held,
                            "long": long,
                            "down_s": down_s,
                            "back_s": round(time.monotonic() - down - down_s, 1),
                        }
                    )
                    cycle += 1
        finally:
            stop_senders(stop, threads)
        loop_seconds = clock()

        drained = wait_drained_db(pg_dsn, timeout=90, why=why)
        time.sleep(0.5)  # an importer orphaned by the last kill may still be writing
        for app in apps.values():
            reruns_metric += metric(app, RERUNS_METRIC)
        retries, redispatches = haproxy_retries(hap)
        for k, app in apps.items():
            code = app.stop()
            assert code == 0, f"appliance {k} exited {code} on SIGTERM\n{why()}"

    records = store_records(pg_dsn)
    repeats = repeated_imports(pg_dsn)
    dead = a.cli_json("inbox", "list", "--state", "dead")  # the CLI reads the shared store too
    by_id = {r.delivery_id: r for r in records}
    lines = imported_by_file(a, b)
    imported_by: dict[str, set[str]] = defaultdict(set)
    files_of: dict[str, list[str]] = defaultdict(list)
    for file, doc in lines:
        files_of[doc["delivery_id"]].append(file)
        for flow in doc["flow_ids"]:
            imported_by[flow].add(doc["delivery_id"])
    imported = set(imported_by)
    lost = history.acked - imported
    unexpected = imported - history.sent
    split = {f: ids for f, ids in imported_by.items() if len(ids) > 1}
    line_counts = Counter(doc["delivery_id"] for _, doc in lines)
    # Successful importer runs per delivery: the lines it left in the files, plus the runs
    # that found it already in their appliance's file. Each beyond the first needs a rerun.
    by_seq = {r.seq: r for r in records}
    handed = Counter(line_counts)
    handed.update(by_seq[seq].delivery_id for seq, _ in repeats)
    db_reruns = sum(r.reruns for r in records)
    duplicated = {
        i: (c, by_id[i].reruns if i in by_id else None)
        for i, c in handed.items()
        if i not in by_id or c - 1 > by_id[i].reruns
    }
    extra_lines = sum(c - 1 for c in line_counts.values())
    states = Counter(r.state for r in records)
    per_file = Counter(file for file, _ in lines)

    report(
        "pg_cluster_kill_loop",
        seconds=clock(),
        loop_seconds=loop_seconds,
        kills=kills,
        senders=SENDERS,
        pages_acked=history.pages,
        pages_retried=history.retried_pages,
        pages_given_up=len(history.gave_up),
        flow_ids_sent=len(history.sent),
        flow_ids_acked=len(history.acked),
        flow_ids_imported=len(imported),
        deliveries=len(records),
        import_lines=len(lines),
        import_lines_per_appliance=dict(per_file),
        lost=len(lost),
        unexpected=len(unexpected),
        split=len(split),
        extra_import_lines=extra_lines,
        repeated_imports=len(repeats),
        db_reruns=db_reruns,
        reruns_metric_sum=reruns_metric,
        interrupted=interruptions(records),
        cancelled=cancellations(a, b),
        haproxy_retries=retries,
        haproxy_redispatches=redispatches,
        drained=drained,
        answers=dict(history.answers),
    )
    holder = {f: r for r in records for f in r.flows}
    assert not history.client_errors, (
        f"4xx answers (CoinTracker drops those): {history.client_errors[:5]}"
    )
    assert not history.gave_up, (
        f"{len(history.gave_up)} pages given up after {RETRIES} retries with one appliance "
        f"always up behind haproxy: {[t for _, t in history.gave_up[:3]]}\n{logs_of(a, b)}"
    )
    assert not lost, (
        f"{len(lost)} acknowledged flow ids never imported: "
        + "; ".join(
            f"{f} in {holder[f].delivery_id} {holder[f].state.value} {holder[f].attempts}"
            if f in holder
            else f"{f} not in the store"
            for f in sorted(lost)[:5]
        )
        + f"\n{logs_of(a, b)}"
    )
    assert not unexpected, f"imported but never sent: {sorted(unexpected)[:10]}"
    assert not split, f"flow ids imported under two delivery ids: {list(split.items())[:5]}"
    assert not duplicated, (
        "deliveries handed to a successful importer run more often than 1 + their counted "
        f"reruns (delivery: (runs, reruns)): {list(duplicated.items())[:10]}\n{logs_of(a, b)}"
    )
    assert states == {State.DONE: len(records)}, f"not every delivery done: {states}"
    assert dead == [], f"`inbox list --state dead`: {dead}"
    # Every done delivery is in an import file, with exactly the flow ids it claimed.
    missing = [r.delivery_id for r in records if r.delivery_id not in line_counts]
    assert not missing, f"done but in no import file: {missing[:10]}"
    for _, doc in lines:
        assert doc["flow_ids"] == list(by_id[doc["delivery_id"]].flows), doc["delivery_id"]
    assert reruns_metric <= db_reruns, (reruns_metric, db_reruns)

    # The loop exercised what it claims to.
    assert len(kills) >= CYCLES and {k["victim"] for k in kills} == {"a", "b"}, kills
    assert sum(k["leases_at_kill"] for k in kills) > 0, f"no import in flight at any kill: {kills}"
    assert db_reruns > 0, "no import was ever re-run: the kills hit nothing"
    assert reruns_metric > 0, f"{RERUNS_METRIC} never counted a rerun ({db_reruns} in the store)"
    assert per_file["a"] > 0 and per_file["b"] > 0, f"an appliance imported nothing: {per_file}"
    assert retries + redispatches > 0 or history.retried_pages > 0, (
        "no request was ever in flight or retried at a kill "
        f"(haproxy retries {retries}, redispatches {redispatches}, {history.answers})"
    )
    assert len(history.acked) > 300, f"too little traffic: {len(history.acked)} flow ids acked"
    # PostgreSQL is up throughout and every lease is renewed in time: no import may have been
    # cancelled for its lease (test 3 shows the race that once did it deterministically).
    cancelled = cancelled_attempts(records, a, b)
    assert not cancelled, "imports cancelled for their lease:\n" + "\n".join(cancelled[:10])


# -- 2. PostgreSQL stopped and killed under load -------------------------------------------------
OUTAGE_SECONDS = 5.0
SEND_PAGES, SEND_FLOWS = 20, 3


def start_send(url: str, secret_file: Path, run_id: str) -> subprocess.Popen[str]:
    """`ct-appliance send`: CoinTracker's retries (5, backoff 0.5 s doubling: 15.5 s in all)."""
    return subprocess.Popen(
        [sys.executable, "-m", "appliance", "send", url, "--secret-file", str(secret_file)]
        + ["--flows", str(SEND_FLOWS), "--pages", str(SEND_PAGES), "--run-id", run_id]
        + ["--backoff-base-seconds", "0.5", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def finish_send(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return proc.returncode, out, err


def get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=5)
    except httpx.HTTPError:
        return None


def wait_until(pred: Any, timeout: float, what: str, why: Any) -> float:
    """Seconds until `pred()` held; fails with `why()` in the message after `timeout`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if pred():
            return round(time.monotonic() - started, 2)
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{why()}")


def wait_readyz(
    app: Appliance, code: int, timeout: float, what: str, why: Any
) -> tuple[float, dict[str, Any]]:
    """Seconds until /readyz answered `code`, and that answer."""
    seen: dict[str, Any] = {}

    def answered() -> bool:
        r = get(app.admin + "/readyz")
        if r is None or r.status_code != code:
            return False
        seen.update(r.json())
        return True

    return wait_until(answered, timeout, what, why), seen


def test_postgresql_restart_mid_load_answers_503_and_loses_nothing(
    make_appliance: Any, tmp_path: Path
) -> None:
    """One appliance on a PostgreSQL cluster of the test's own, CoinTracker posting to it (three
    senders, and the real `ct-appliance send`): PostgreSQL is stopped (-m fast) for 5 s, then
    killed (-9, crash recovery on start) for 5 s. While it is down the webhook answers 503 with
    Retry-After (never a 4xx), /readyz 503 names the reason, /healthz and /status answer, and
    the process stays up; after each start it is ready again by itself, every page lands on a
    retry, and every acknowledged flow id is imported once."""
    clock = Stopwatch()
    with PgCluster() as pg:  # our own: the session cluster is shared with other tests
        pg.init().start()
        pg.create_database("ct")
        dsn = pg.dsn("ct")
        app: Appliance = make_appliance(pg_overrides(dsn))
        app.cli("db", "migrate")
        app.start()
        assert app.proc is not None
        pid = app.proc.pid

        def why() -> str:
            return logs_of(app, pg=pg)

        secret_file = tmp_path / "secret"
        secret_file.write_text(SECRET)
        history = History()
        stop, threads = start_senders(
            3, app.url, history, backoff=0.5, pace=(0.02, 0.08), seed=20261017
        )
        outages: list[dict[str, Any]] = []
        sends: list[tuple[str, subprocess.Popen[str]]] = []
        try:
            for how in ("stop -m fast", "kill -9"):
                time.sleep(2)
                before = len(history.unavailable_at)
                down = time.monotonic()
                if how == "kill -9":
                    pg.kill9()
                else:
                    pg.stop("fast")
                outage: dict[str, Any] = {"how": how}
                outage["readyz_503_after_s"], readyz = wait_readyz(
                    app, 503, 10, f"/readyz 503 after postgresql {how}", why
                )
                assert "store unavailable" in str(readyz.get("reason")), readyz
                outage["webhook_503_after_s"] = wait_until(
                    lambda n=before: len(history.unavailable_at) > n,
                    10,
                    f"a webhook 503 after postgresql {how}",
                    why,
                )
                # The real `ct-appliance send` too, its first page posted into the outage.
                run_id = f"pg-send-{len(sends)}"
                sends.append((run_id, start_send(app.url, secret_file, run_id)))
                healthz = get(app.admin + "/healthz")
                assert healthz is not None and healthz.status_code == 200, why()
                status = get(app.admin + "/status")
                assert status is not None and status.status_code == 200, (
                    f"/status while postgresql is down: "
                    f"{status.status_code if status is not None else 'no answer'}\n{why()}"
                )
                store = status.json()["store"]
                assert store["backend"] == "postgresql" and store["error"], store
                time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - down)))
                assert app.proc.poll() is None, f"server exited while postgresql was down\n{why()}"
                outage["down_s"] = round(time.monotonic() - down, 1)
                outage["readyz_reason"] = readyz.get("reason")
                pg.start()
                outage["pg_start_s"] = round(time.monotonic() - down - outage["down_s"], 1)
                outage["ready_after_pg_start_s"], _ = wait_readyz(
                    app, 200, 20, f"/readyz 200 after postgresql came back ({how})", why
                )
                outage["webhook_503s"] = len(history.unavailable_at) - before
                outages.append(outage)
            time.sleep(2)
        finally:
            stop_senders(stop, threads)
            results = [(run_id, finish_send(proc)) for run_id, proc in sends]
        send_retried = 0
        send_statuses: Counter[str] = Counter()
        for run_id, (code, out, err) in results:
            assert code == 0, (
                f"`send` ({run_id}) exited {code}: a page never got a 2xx\n"
                f"{tail(out)}\n{err}\n{why()}"
            )
            pages = json.loads(out)
            send_retried += sum(1 for p in pages if len(p["attempts"]) > 1)
            send_statuses.update(str(a["status"]) for p in pages for a in p["attempts"])
            for p in pages:
                flows = [f"flow-{run_id}-{p['page'] - 1}-{i}" for i in range(SEND_FLOWS)]
                history.sent.update(flows)
                if 200 <= (p["final_status"] or 0) < 300:
                    history.acked.update(flows)

        counts = wait_drained_db(dsn, timeout=60, why=why)
        assert app.proc.pid == pid and app.proc.poll() is None, why()
        reruns_metric = metric(app, RERUNS_METRIC)
        assert app.stop() == 0, why()
        records = store_records(dsn)
        repeats = repeated_imports(dsn)

    lines = app.imported_docs()
    times: Counter[str] = Counter(f for doc in lines for f in doc["flow_ids"])
    imported = set(times)
    lost = history.acked - imported
    unexpected = imported - history.sent
    twice = {f: c for f, c in times.items() if c > 1}
    states = Counter(r.state for r in records)
    report(
        "pg_restart_mid_load",
        seconds=clock(),
        outages=outages,
        pages_acked=history.pages,
        pages_retried=history.retried_pages,
        pages_given_up=len(history.gave_up),
        send_pages=len(results) * SEND_PAGES,
        send_pages_retried=send_retried,
        send_statuses=dict(send_statuses),
        flow_ids_sent=len(history.sent),
        flow_ids_acked=len(history.acked),
        flow_ids_imported=len(imported),
        deliveries=len(records),
        lost=len(lost),
        unexpected=len(unexpected),
        imported_twice=len(twice),
        db_reruns=sum(r.reruns for r in records),
        reruns_metric=reruns_metric,
        interrupted=interruptions(records),
        repeated_imports=len(repeats),
        drained=counts,
        answers=dict(history.answers),
    )
    assert not history.client_errors, (
        f"4xx while postgresql was down (CoinTracker drops those): {history.client_errors[:5]}"
    )
    assert history.no_retry_after == 0, f"{history.no_retry_after} 503s without Retry-After"
    assert not history.gave_up, (
        f"{len(history.gave_up)} pages still unanswered after {RETRIES} retries: "
        f"{[t for _, t in history.gave_up[:3]]}"
    )
    assert all(o["webhook_503s"] > 0 for o in outages), outages
    assert send_retried > 0, "`send` never had to retry: its pages missed both outages"
    assert not lost, f"{len(lost)} acknowledged flow ids never imported: {sorted(lost)[:10]}"
    assert not unexpected, f"imported but never sent: {sorted(unexpected)[:10]}"
    assert not twice, f"flow ids imported more than once: {list(twice.items())[:10]}"
    assert states == {State.DONE: len(records)}, f"not every delivery done: {states}"
    assert len(history.acked) > 200, f"too little traffic: {len(history.acked)} flow ids acked"
    # The appliance never crashed, so no delivery may reach a successful importer run twice
    # (spec §5.3): an attempt that ended while the database was down keeps its result and
    # records it once writes work again. The example importer hides a repeat in its file, but
    # says so on stdout.
    by_seq = {r.seq: r for r in records}
    assert not repeats, (
        f"{len(repeats)} deliveries handed to the importer again after a successful run, "
        "with no crash to explain it: "
        + "; ".join(
            f"{by_seq[seq].delivery_id} attempt {n}, attempts "
            + str([(a.n, a.outcome and a.outcome.value, a.summary) for a in by_seq[seq].attempts])
            for seq, n in repeats[:3]
        )
        + "\n--- log ---\n"
        + log_lines_about(app, "no longer holds its lease", "cannot record importer", "re-running")
    )


# -- 3. a lease renewal in flight while a new attempt starts -------------------------------------
SLOW_IMPORTER = """\
import json, os, sys, time
doc = json.load(sys.stdin)
def note(event):
    line = json.dumps({"delivery_id": doc["delivery_id"], "attempt": doc["attempt"], "event": event})
    fd = os.open(os.environ["RECORD"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.write(fd, (line + "\\n").encode())
    os.close(fd)
note("start")
if doc["attempt"] == 1:  # a flow id "name-S-..." makes the first attempt take S seconds
    time.sleep(float(doc["flow_ids"][0].split("-")[1]))
note("done")
"""


def importer_events(record: Path) -> list[tuple[str, int, str]]:
    """(delivery_id, attempt, event) for each line SLOW_IMPORTER wrote."""
    if not record.exists():
        return []
    docs = [json.loads(line) for line in record.read_text().splitlines() if line.strip()]
    return [(d["delivery_id"], int(d["attempt"]), d["event"]) for d in docs]


def slow_importer(tmp: Path, **importer: Any) -> tuple[dict[str, Any], Path]:
    script = tmp / "slow_importer.py"
    script.write_text(SLOW_IMPORTER)
    record = tmp / "record.jsonl"
    cmd = {"command": [sys.executable, "-I", "-S", str(script)], "env": {"RECORD": str(record)}}
    return {**cmd, **importer}, record


def test_lease_renewal_never_cancels_an_attempt_started_meanwhile(
    make_appliance: Any, pg_dsn: str, tmp_path: Path
) -> None:
    """The dispatcher renews the leases of the attempts running when a renewal starts; an
    attempt started while that renewal is in flight was not in it, yet must not be taken for
    one whose lease another appliance holds. The renewal is made slow (as under a loaded
    database) by holding a lock on the running attempt's row."""
    importer, record = slow_importer(tmp_path, concurrency=4)
    app: Appliance = make_appliance(pg_overrides(pg_dsn, **importer))
    app.cli("db", "migrate")
    app.start()

    def why() -> str:
        return logs_of(app)

    def post(flow: str) -> int:
        r = app.post(delivery([flow]))
        assert r.status_code == 200 and r.json()["status"] == "accepted", r.text
        seq = int(r.json()["delivery_id"].rsplit("-", 1)[1])
        return seq

    with db(pg_dsn) as conn, db(pg_dsn) as locker:

        def importing(*seqs: int) -> bool:
            rows = conn.execute(
                "SELECT count(*) FROM ct_deliveries WHERE seq = ANY(%s) AND state = 'importing'",
                (list(seqs),),
            ).fetchone()
            return bool(rows and rows[0] == len(seqs))

        long_one = post("long-9")  # its importer runs 9 s: a renewal comes within 5 s
        wait_until(lambda: importing(long_one), 10, "the long import to start", why)
        with locker.transaction():
            locker.execute("SELECT 1 FROM ct_deliveries WHERE seq = %s FOR UPDATE", (long_one,))

            def renewal_waiting() -> bool:
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND query LIKE 'UPDATE ct_deliveries SET lease_until%'"
                ).fetchone()
                return bool(row and row[0])

            wait_until(renewal_waiting, 8, "a lease renewal waiting on the held row", why)
            # While that renewal waits, three more deliveries start (4 s imports each).
            others = [post(f"short-4-{k}") for k in range(3)]
            wait_until(lambda: importing(*others), 10, "the other imports to start", why)
        # The renewal now returns the long attempt's lease only.
        drained = wait_drained_db(pg_dsn, timeout=60, why=why)
        reruns_metric = metric(app, RERUNS_METRIC)
    assert app.stop() == 0, why()
    records = store_records(pg_dsn)
    runs = Counter(i for i, _, event in importer_events(record) if event == "start")
    cancelled = cancelled_attempts(records, app)
    report(
        "pg_lease_renewal_race",
        drained=drained,
        importer_starts=dict(runs),
        cancelled=len(cancelled),
        db_reruns=sum(r.reruns for r in records),
        reruns_metric=reruns_metric,
        interrupted=interruptions(records),
    )
    assert {r.state for r in records} == {State.DONE} and len(records) == 4, records
    assert not cancelled, (
        f"{len(cancelled)} import attempts started during a lease renewal were cancelled as if "
        "another appliance held their lease (the importer was killed and the delivery re-run; "
        "importer starts per delivery: "
        f"{dict(runs)}):\n" + "\n".join(cancelled) + "\n" + log_lines_about(app, "lease")
    )
    # Every rerun the store counts is on the metric too (spec §8: import_reruns_total).
    assert reruns_metric == sum(r.reruns for r in records), (
        f"{RERUNS_METRIC} {reruns_metric}, reruns in the records "
        f"{sum(r.reruns for r in records)}: {interruptions(records)}"
    )
    assert all(n == 1 for n in runs.values()), f"importer started more than once: {dict(runs)}"


# -- 4. PostgreSQL down for longer than a lease, an import running -------------------------------
def test_postgresql_down_past_the_lease_cancels_the_import_and_reruns_it_once(
    make_appliance: Any, tmp_path: Path
) -> None:
    """An attempt whose lease cannot be renewed is cancelled before the lease runs out (its
    importer killed), so it never runs on a lease another appliance could take; once the
    database is back it is re-run once, and the rerun is counted."""
    clock = Stopwatch()
    with PgCluster() as pg:  # our own: stopped for longer than a lease
        pg.init().start()
        pg.create_database("ct")
        dsn = pg.dsn("ct")
        importer, record = slow_importer(tmp_path)
        app: Appliance = make_appliance(pg_overrides(dsn, **importer))
        app.cli("db", "migrate")
        app.start()

        def why() -> str:
            return logs_of(app, pg=pg)

        r = app.post(delivery(["long-60-0", "long-60-1"]))  # attempt 1 would run 60 s
        assert r.status_code == 200 and r.json()["status"] == "accepted", r.text
        delivery_id = r.json()["delivery_id"]
        wait_until(
            lambda: (delivery_id, 1, "start") in importer_events(record),
            15,
            "the importer to start",
            why,
        )
        # Stop PostgreSQL just after a renewal: the lease then ends LEASE_SECONDS later.
        with db(dsn) as conn:

            def lease_until() -> float:
                row = conn.execute("SELECT lease_until FROM ct_deliveries").fetchone()
                return float(row[0]) if row and row[0] is not None else 0.0

            first = lease_until()
            wait_until(lambda: lease_until() != first, 10, "a lease renewal", why)
            until = lease_until()
        pg.stop("fast")
        down = time.monotonic()
        cancel_at: list[float] = []

        def cancelled() -> bool:
            for line in app.log_lines():
                if line.get("msg") == "cancelling an import attempt":
                    ts = line["ts"].replace("Z", "+00:00")
                    cancel_at.append(datetime.fromisoformat(ts).timestamp())
                    return True
            return False

        # Renewed every lease/3; cancelled in the last sixth of the lease it could not renew.
        cancelled_after = wait_until(cancelled, LEASE_SECONDS + 5, "the attempt cancelled", why)
        margin = round(until - cancel_at[0], 3)
        assert app.proc is not None and app.proc.poll() is None, why()
        down_s = round(time.monotonic() - down, 1)
        pg.start()
        wait_readyz(app, 200, 20, "/readyz 200 after postgresql came back", why)
        drained = wait_drained_db(dsn, timeout=30, why=why)
        reruns_metric = metric(app, RERUNS_METRIC)
        assert app.stop() == 0, why()
        records = store_records(dsn)
    events = importer_events(record)
    report(
        "pg_down_past_lease",
        seconds=clock(),
        cancelled_after_s=cancelled_after,
        cancelled_before_lease_end_s=margin,
        down_s=down_s,
        drained=drained,
        importer_events=events,
        reruns=[r.reruns for r in records],
        reruns_metric=reruns_metric,
        interrupted=interruptions(records),
    )
    assert margin > 0, (
        f"the attempt was cancelled {-margin} s after its lease ended: another appliance "
        f"could have taken it while its importer still ran\n{why()}"
    )
    assert len(records) == 1 and records[0].state is State.DONE, records
    rec = records[0]
    outcomes = [(a.n, a.outcome and a.outcome.value, a.summary) for a in rec.attempts]
    assert [o for _, o, _ in outcomes] == ["interrupted", "success"], outcomes
    assert "lease" in str(outcomes[0][2]), outcomes
    # The first importer was killed (it never said "done"); the second ran once, to the end.
    assert events == [
        (delivery_id, 1, "start"),
        (delivery_id, 2, "start"),
        (delivery_id, 2, "done"),
    ], f"{events}\n{why()}"
    assert rec.reruns == 1, outcomes
    # The rerun is counted where operators look (spec §8), as the record counts it (the
    # LMDB kill loop holds the same: the records' reruns == import_reruns_total).
    assert reruns_metric == rec.reruns, (
        f"{RERUNS_METRIC} is {reruns_metric} while the record counts {rec.reruns} rerun: "
        f"{outcomes}\n" + log_lines_about(app, "interrupt", "cancelling", "re-running")
    )
