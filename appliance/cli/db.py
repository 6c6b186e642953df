"""`db migrate` and `db import-lmdb PATH`: the PostgreSQL store's schema, and moving an LMDB
store into it. Both need `store.postgresql` in the config (its DSN is the one secret read)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from ..configrules import DSN_PATH
from ..errors import CommandFailed
from .common import EXIT_OK, emit, load

if TYPE_CHECKING:
    from ..pgdb import Db


def _db(args: argparse.Namespace) -> Db:
    from ..backend import appliance_name
    from ..pgdb import Db

    cfg = load(args, resolve_only=(DSN_PATH,)).config
    pg = cfg.store.postgresql
    if pg is None:
        raise CommandFailed("the config has no store.postgresql section (store.backend)")
    name = f"ct-appliance db ({appliance_name(cfg)})"
    return Db(pg.dsn.value.decode(), size=1, application_name=name[:63])


def db(args: argparse.Namespace) -> int:
    return {"migrate": _migrate, "import-lmdb": _import}[args.action](args)


def _migrate(args: argparse.Namespace) -> int:
    import psycopg

    from .. import pgschema
    from ..pgdb import unavailable_error

    try:
        with _db(args).connection() as conn:  # each migration its own transaction
            before, after = pgschema.migrate(conn)
    except psycopg.Error as e:
        raise unavailable_error(e) from None
    doc = {"schema_version_before": before, "schema_version": after}
    if before == after:
        text = f"schema is at version {after}: nothing to do"
    else:
        text = f"schema migrated from version {before} to {after}"
    emit(args, doc, lambda: text)
    return EXIT_OK


def _import(args: argparse.Namespace) -> int:
    import psycopg

    from ..pgdb import unavailable_error
    from ..pgimport import import_lmdb

    try:
        done = import_lmdb(Path(args.path), _db(args))
    except psycopg.Error as e:  # e.g. a role without the rights: one line, no traceback
        raise unavailable_error(e) from None
    doc = {
        "deliveries": done.deliveries,
        "flow_ids": done.flows,
        "runs": done.runs,
        "requeued": done.requeued,
        "last_seq": done.last_seq,
        "instance": done.instance,
        "seconds": round(done.seconds, 3),
    }
    text = (
        f"imported {done.deliveries} deliveries, {done.flows} flow ids and {done.runs} runs "
        f"in {doc['seconds']} s; {done.requeued} interrupted imports re-queued. Delivery ids "
        f"of the LMDB store keep their names; new deliveries are {done.instance}-..."
    )
    emit(args, doc, lambda: text)
    return EXIT_OK
