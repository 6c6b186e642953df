"""The PostgreSQL rows: durable accept (50 new flow ids per POST, as the `app` row) with
`store.backend: postgresql`, one appliance (`pg1`) or two on one database behind haproxy (`pg2`,
wrk and the paced generator post to haproxy), on an empty database or on one holding 10 M
claimed flow ids (`pg1-10m`, `pg2-10m`).

Each round starts its own PostgreSQL 15 cluster (tests/pgcluster.py: fsync and
synchronous_commit on, trust on 127.0.0.1, in a temp directory, a free loopback port, stopped and
removed after the row) on a copy of a template data directory, runs `ct-appliance db migrate`
(a no-op on the template, as a deployment would run it), pauses the importer, starts the
appliance(s) and, for pg2, haproxy (tests/haproxy.py: round robin, /readyz health checks).

Placement: everything on the server side (the appliances, PostgreSQL and haproxy) is pinned to
the server's CPU, as the bare and LMDB rows' single process is, and the load stays on the other:
every row gets one core, so "× bare" compares the same budget, and the row's CPU per request
is split by part (appliances, PostgreSQL, haproxy). On this two-core machine a second appliance
adds work to the same core: pg2 measures what two appliances and a proxy cost, not scaling.

Templates are kept in var/bench/seed-cache/ (`pg_cache_dir`, named by what decides their bytes):
- 0 ids: initdb (tests/pgcluster.py's settings), a database, `db migrate`;
- 10 M ids: the same, then the LMDB store bench/seed.py seeds for the idx10m row (real done
  records of 50 random UUID-4 flow ids, cached there too) moved in by the appliance's own
  `ct-appliance db import-lmdb`: one COPY into ct_flows with its primary key in place, so the
  index is built by inserts in random key order, as traffic builds it; then VACUUM (ANALYZE), as
  autovacuum would have left a table that old.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import servers
import variants
from servers import LOAD_CPU, SERVER_CPU, Server
from variants import Ctx, NotAvailable, Target, Variant

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.haproxy import HAPROXY, Haproxy  # noqa: E402
from tests.pgcluster import PgCluster, PgMissing, pg_bindir, temp_root  # noqa: E402

DATABASE = "ct_bench"
TEN_M = 10**7
SEED_TIMEOUT = 3 * 3600


def rows() -> list[Variant]:
    """This module's rows, beside variants.lmdb_variants(); the 10 M ones only when named."""
    one, two = "ct-appliance on PostgreSQL", "2 ct-appliances on PostgreSQL behind haproxy"
    out = []
    for key, label, appliances, flows in (
        ("pg1", f"{one}, 50 new ids/POST", 1, 0),
        ("pg2", f"{two}, 50 new ids/POST", 2, 0),
        ("pg1-10m", f"{one}, 10M ids claimed", 1, TEN_M),
        ("pg2-10m", f"{two}, 10M ids claimed", 2, TEN_M),
    ):
        start, prepare = _rows(appliances, flows), _prepare(flows)
        out.append(Variant(key, label, "http", start, prepare=prepare, default=not flows))
    return out


# --- processes ------------------------------------------------------------------------------------


@contextmanager
def pinned(cpus: str) -> Iterator[None]:
    """Run what is started inside on `cpus` ("0", "0,1"): children inherit the affinity of the
    thread that forks them (pg_ctl's postmaster, haproxy, which sizes its threads by it)."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


class Cluster:
    """A PgCluster on a copy of a template data directory, stopped by `stop()` or by
    servers.stop_all() (Ctrl-C, an error anywhere)."""

    def __init__(self, template: Path | None, cpus: str) -> None:
        self.pg = PgCluster(temp_root("ct-bench-pg-"))
        servers.on_stop_all(self.stop)
        try:
            if template is None:
                self.pg.init()
            else:
                subprocess.run(["cp", "-a", "--reflink=auto", str(template), str(self.pg.data)],
                               check=True)  # fmt: skip
                os.sync()  # the copy's writeback is the harness's, not the row's
                # postgresql.auto.conf is read last: this copy's own port and socket directory.
                with (self.pg.data / "postgresql.auto.conf").open("a") as f:
                    f.write(f"port = {self.pg.port}\n")
                    f.write(f"unix_socket_directories = '{self.pg.sock}'\n")
            with pinned(cpus):
                self.pg.start()
        except BaseException:
            self.stop()
            raise

    def dsn(self) -> str:
        return self.pg.dsn(DATABASE)

    def probe(self) -> dict[str, float]:
        """Counters read before and after saturation: checkpoints started (log_checkpoints is
        on by default in PostgreSQL 15), WAL bytes and full-page images written (pg_stat_wal)."""
        try:
            checkpoints = self.pg.log.read_text(errors="replace").count("checkpoint starting:")
        except OSError:
            checkpoints = 0
        fpi, wal = self.pg.sql("SELECT wal_fpi, wal_bytes FROM pg_stat_wal", DATABASE).split("|")
        return {"checkpoints": checkpoints, "wal_fpi": int(fpi), "wal_bytes": float(wal)}

    def stop(self) -> None:
        servers.forget(self.stop)
        self.pg.close()  # immediate stop, directory removed


class Proxy:
    """tests/haproxy.py's Haproxy over the appliances, stopped like Cluster."""

    def __init__(self, backends: list[tuple[str, int, int]]) -> None:
        self.h = Haproxy(backends)
        servers.on_stop_all(self.stop)
        try:
            with pinned(SERVER_CPU):
                self.h.start()
            try:
                self.h.wait_servers_up({name for name, _, _ in backends})
            except AssertionError as e:  # tests/haproxy.py's way of saying it: a failed row here
                raise RuntimeError(str(e)) from None
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        assert self.h.proc is not None
        return self.h.proc.pid

    def stop(self) -> None:
        servers.forget(self.stop)
        self.h.close()


def _cli(ctx: Ctx, *args: str, timeout: float = 120, json_out: bool = True) -> dict[str, Any]:
    """`ct-appliance ARGS [--json]`: its JSON answer ({} without json_out)."""
    done = variants._cli(ctx, *args, *(["--json"] if json_out else []), timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"ct-appliance {args[0]} {args[1]}: exit {done.returncode}: "
                           f"{(done.stdout + done.stderr).strip()[-400:]}")  # fmt: skip
    out: dict[str, Any] = json.loads(done.stdout) if json_out else {}
    return out


# --- templates ------------------------------------------------------------------------------------


def _pg_version() -> str:
    done = subprocess.run([str(pg_bindir() / "postgres"), "--version"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return done.stdout.strip()


def pg_cache_dir(root: Path, flows: int) -> Path:
    """Where the data directory holding `flows` claimed ids is kept between runs, named by what
    decides its bytes: the PostgreSQL version, the cluster settings of tests/pgcluster.py, the
    schema, how it is built here and, seeded, the LMDB store it is imported from (whose own
    name covers bench/seed.py and the record format) and the importer."""
    digest = hashlib.sha256()
    digest.update(_pg_version().encode())
    for fn in (PgCluster.init, PgCluster.base_conf, _build):
        digest.update(inspect.getsource(fn).encode())
    digest.update((root / "appliance" / "pgschema.py").read_bytes())
    if flows:
        digest.update(variants.seed_cache_dir(root, flows).name.encode())
        digest.update((root / "appliance" / "pgimport.py").read_bytes())
    return root / "var" / "bench" / "seed-cache" / f"pg-{flows}-{digest.hexdigest()[:12]}"


def _prepare(flows: int) -> Callable[[Ctx], None]:
    def prepare(ctx: Ctx) -> None:
        if flows in ctx.pg_templates or flows in ctx.pg_reasons:
            return
        try:
            ctx.pg_templates[flows] = template(ctx, flows)
        except (PgMissing, NotAvailable, RuntimeError, OSError, subprocess.SubprocessError) as e:
            ctx.pg_reasons[flows] = str(e).strip().splitlines()[0][:300]

    return prepare


def template(ctx: Ctx, flows: int) -> Path:
    """The data directory with `flows` claimed ids, from the seed cache or built now."""
    if ctx.app_reason:
        raise NotAvailable(ctx.app_reason)
    d = pg_cache_dir(ctx.root, flows)
    report = d / "seeded.json"
    if report.exists():
        ctx.pg_seeds[flows] = {**json.loads(report.read_text()), "cached": True}
        return d / "data"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    seeded = _build(ctx, flows, d)
    report.write_text(json.dumps(seeded) + "\n")
    ctx.pg_seeds[flows] = {**seeded, "cached": False}
    return d / "data"


def _build(ctx: Ctx, flows: int, d: Path) -> dict[str, Any]:
    """initdb, a database, `db migrate`; with flows, `db import-lmdb` of a copy of bench/seed.py's
    LMDB store, then VACUUM (ANALYZE). Timings and sizes; the data directory ends in d/data."""
    t0 = time.perf_counter()
    out: dict[str, Any] = {"flows": flows}
    lmdb: Path | None = None
    if flows:  # the LMDB store of the idx10m row (seeded now unless cached)
        variants.seed_template(ctx, flows)
        lmdb = ctx.templates.get(flows)
        if lmdb is None:
            raise NotAvailable(ctx.template_reasons.get(flows, "LMDB store not seeded"))
        out["lmdb_seed_seconds"] = round(ctx.seed_seconds[flows], 1)
    cluster = Cluster(None, f"{SERVER_CPU},{LOAD_CPU}")  # seeding is not measured: both cores
    copy = ctx.work / f"pg-seed-{flows}-lmdb"
    try:
        cluster.pg.create_database(DATABASE)
        cfg = ctx.work / f"pg-seed-{flows}.yaml"
        variants.app_config(ctx, cfg, ctx.work / "unused", dsn=cluster.dsn())
        _cli(ctx, "db", "migrate", "--config", str(cfg))
        if lmdb is not None:
            subprocess.run(["cp", "-a", "--reflink=auto", str(lmdb), str(copy)], check=True)
            t1 = time.perf_counter()
            done = _cli(ctx, "db", "import-lmdb", "--config", str(cfg), str(copy),
                        timeout=SEED_TIMEOUT)  # fmt: skip
            t2 = time.perf_counter()
            if done["flow_ids"] != flows:
                raise RuntimeError(f"db import-lmdb moved {done['flow_ids']} flow ids, not {flows}")
            cluster.pg.sql("VACUUM (ANALYZE)", DATABASE)
            out.update(
                import_seconds=round(t2 - t1, 1),
                vacuum_seconds=round(time.perf_counter() - t2, 1),
            )
        sizes = cluster.pg.sql(
            "SELECT pg_database_size(current_database()), pg_total_relation_size('ct_flows'), "
            "pg_relation_size('ct_flows_pkey')",
            DATABASE,
        ).strip()
        out["database_bytes"], out["flows_bytes"], out["flows_pkey_bytes"] = map(
            int, sizes.split("|")
        )
        cluster.pg.stop("fast")  # a clean shutdown: the copies start without recovery
        shutil.move(str(cluster.pg.data), str(d / "data"))
    finally:
        cluster.stop()
        shutil.rmtree(copy, ignore_errors=True)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


# --- the rows ---------------------------------------------------------------------------------------


def _rows(appliances: int, flows: int) -> Callable[[Ctx, Path], Target]:
    def start(ctx: Ctx, rdir: Path) -> Target:
        if ctx.app_reason:
            raise NotAvailable(ctx.app_reason)
        data = ctx.pg_templates.get(flows)
        if data is None:
            raise NotAvailable(ctx.pg_reasons.get(flows, "no PostgreSQL template"))
        if appliances > 1 and not HAPROXY.is_file():
            raise NotAvailable(f"{HAPROXY} not found: run `make deps`")
        cluster = Cluster(data, SERVER_CPU)
        started: list[Server] = []
        proxy: Proxy | None = None

        def cleanup() -> None:
            if proxy is not None:
                proxy.stop()
            cluster.stop()

        try:
            dsn = cluster.dsn()
            cfg = rdir / "pg.yaml"
            variants.app_config(ctx, cfg, rdir / "unused", dsn=dsn)
            _cli(ctx, "db", "migrate", "--config", str(cfg))
            # Imports paused, as in the LMDB rows: the flag lives in the database.
            _cli(ctx, "importer", "pause", "--config", str(cfg), json_out=False)
            backends = []
            for i in range(appliances):
                server, url, admin = variants.start_app(
                    ctx, rdir, rdir / "unused", pause=False, dsn=dsn, name=f"appliance{i + 1}"
                )
                started.append(server)
                port = urlsplit(url).port
                assert port is not None
                backends.append((f"a{i + 1}", port, admin))
            if appliances > 1:
                proxy = Proxy(backends)
                url = proxy.h.url + variants.WEBHOOK_PATH
            postmaster = cluster.pg.pid
            assert postmaster is not None
            parts = {"appliances": [s.pid for s in started], "postgresql": [postmaster]}
            if proxy is not None:
                parts["haproxy"] = [proxy.pid]
        except BaseException:
            for s in started:
                s.stop()
            cleanup()
            raise
        f = ctx.files
        first = started[0]
        first.ready_seconds = max(s.ready_seconds or 0.0 for s in started)
        what = "the appliances, PostgreSQL and haproxy" if proxy else "the appliance and PostgreSQL"
        notes = [f"CPU: {what}; memory: the appliance(s) only"]
        return Target(first, url, f["warm"], f["sat"], f["paced"], notes,
                      others=started[1:], cpu_parts=parts, cleanup=cleanup,
                      probe=cluster.probe,
                      )  # fmt: skip

    return start


def describe_seed(seed: dict[str, Any]) -> str:
    """One line on how a template was made (and whether this run made it)."""
    how = "from the seed cache, built" if seed.get("cached") else "built now"
    text = f"{how} in {seed['seconds']:.0f} s"
    if seed.get("flows"):
        text += (
            f" (LMDB seed {seed['lmdb_seed_seconds']:.0f} s, cached separately; "
            f"`db import-lmdb` {seed['import_seconds']:.0f} s; VACUUM (ANALYZE) "
            f"{seed['vacuum_seconds']:.0f} s)"
        )
    return text + (
        f"; database {seed['database_bytes'] / 2**20:,.0f} MiB, ct_flows with its index "
        f"{seed['flows_bytes'] / 2**20:,.0f} MiB, of which the primary key "
        f"{seed['flows_pkey_bytes'] / 2**20:,.0f} MiB"
    )
