"""The PostgreSQL store's schema: versioned migrations, applied by `ct-appliance db migrate`.

    ct_meta        key -> value: schema_version, instance, epochs (the store's delivery-id names)
    ct_deliveries  one row per stored delivery: the record (record.encode_record, the same JSON
                   as the LMDB store) beside the columns the queries need (state, due time,
                   lease), so a record is still changed only by lifecycle.py
    ct_bodies      raw bodies, apart from records (a state change never rewrites a body)
    ct_outputs     captured output per attempt
    ct_flows       flow id -> seq: the claim. Its primary key is what makes claims exact across
                   appliances (`INSERT ... ON CONFLICT DO NOTHING RETURNING`)
    ct_runs        per cost_basis_run_id counts, added to by every accept (upsert)
    ct_counters    flow ids and deliveries stored, one row per appliance: summed by `status` (count(*) over
                   100 M rows is not a status query), never a row two appliances both update
    ct_pause       the importer pause flag
    ct_appliances  a heartbeat per appliance, for /status

Migrations only ever append: `MIGRATIONS[i]` takes the schema from version i to i + 1. `migrate`
runs each pending one in its own transaction under an advisory lock, so two appliances running
`db migrate` at once apply each step once; `check` refuses a server whose binary expects another
version (older: run `db migrate`; newer: the database was migrated by a newer release).
"""

from __future__ import annotations

from typing import Any

from .errors import SchemaError

MIGRATIONS: tuple[str, ...] = (
    # 1: the first schema
    """
    CREATE TABLE ct_meta (key text PRIMARY KEY, value text NOT NULL);
    INSERT INTO ct_meta (key, value) VALUES ('instance', substr(md5(random()::text), 1, 8));
    CREATE SEQUENCE ct_seq AS bigint;
    CREATE TABLE ct_deliveries (
        seq bigint PRIMARY KEY,
        state text NOT NULL,
        received_at double precision NOT NULL,
        next_at double precision NOT NULL,
        done_at double precision,
        body_kept boolean NOT NULL DEFAULT true,
        lease_owner text,
        lease_until double precision,
        record bytea NOT NULL
    );
    CREATE INDEX ct_deliveries_pending ON ct_deliveries (seq) WHERE state = 'pending';
    CREATE INDEX ct_deliveries_importing ON ct_deliveries (seq) WHERE state = 'importing';
    CREATE INDEX ct_deliveries_dead ON ct_deliveries (seq) WHERE state = 'dead';
    CREATE INDEX ct_deliveries_prunable ON ct_deliveries (done_at)
        WHERE state = 'done' AND body_kept;
    CREATE TABLE ct_bodies (seq bigint PRIMARY KEY, body bytea NOT NULL);
    CREATE TABLE ct_outputs (
        seq bigint NOT NULL, n integer NOT NULL, output bytea NOT NULL, PRIMARY KEY (seq, n)
    );
    CREATE TABLE ct_flows (flow_id text PRIMARY KEY, seq bigint NOT NULL);
    CREATE TABLE ct_runs (
        run_id text PRIMARY KEY,
        ghost_user_id text NOT NULL,
        first_seen double precision NOT NULL,
        last_seen double precision NOT NULL,
        pages bigint NOT NULL,
        accepted_pages bigint NOT NULL,
        duplicate_pages bigint NOT NULL,
        flows_new bigint NOT NULL,
        flows_duplicate bigint NOT NULL
    );
    CREATE INDEX ct_runs_last_seen ON ct_runs (last_seen);
    CREATE TABLE ct_counters (
        name text PRIMARY KEY,
        flows bigint NOT NULL DEFAULT 0,
        deliveries bigint NOT NULL DEFAULT 0
    );
    CREATE TABLE ct_pause (
        id integer PRIMARY KEY CHECK (id = 1),
        paused boolean NOT NULL,
        at double precision,
        by text
    );
    CREATE TABLE ct_appliances (
        name text PRIMARY KEY,
        version text NOT NULL,
        pid integer NOT NULL,
        started_at double precision NOT NULL,
        seen_at double precision NOT NULL
    );
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)
_LOCK = 0x63745F6170706C  # pg_advisory_xact_lock key: "ct_appl"


def current_version(conn: Any) -> int:
    """The schema version of the database `conn` is connected to (0: none yet)."""
    row = conn.execute("SELECT to_regclass('ct_meta') IS NOT NULL").fetchone()
    if not row or not row[0]:
        return 0
    found = conn.execute("SELECT value FROM ct_meta WHERE key = 'schema_version'").fetchone()
    return int(found[0]) if found else 0


def migrate(conn: Any) -> tuple[int, int]:
    """Apply every pending migration (autocommit connection); (version before, after)."""
    before = current_version(conn)
    if before > SCHEMA_VERSION:
        check(conn)  # SchemaError: a newer release migrated it; this one must not touch it
    version = before
    while version < SCHEMA_VERSION:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
            version = current_version(conn)  # another `db migrate` may have got here first
            if version >= SCHEMA_VERSION:
                break
            conn.execute(MIGRATIONS[version])
            conn.execute(
                "INSERT INTO ct_meta (key, value) VALUES ('schema_version', %s) "
                "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                (str(version + 1),),
            )
            version += 1
    return before, max(version, current_version(conn))


def check(conn: Any) -> None:
    """Refuse a database whose schema this binary cannot use (SchemaError says what to do)."""
    version = current_version(conn)
    if version == SCHEMA_VERSION:
        return
    if version == 0:
        raise SchemaError("the database has no ct-appliance schema: run `ct-appliance db migrate`")
    if version < SCHEMA_VERSION:
        raise SchemaError(
            f"the database schema is version {version}, this release needs "
            f"{SCHEMA_VERSION}: run `ct-appliance db migrate`"
        )
    raise SchemaError(
        f"the database schema is version {version}, newer than this release "
        f"({SCHEMA_VERSION}): it was migrated by a newer ct-appliance; run that release"
    )
