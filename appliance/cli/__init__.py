"""The `ct-appliance` command line (spec §7).

Every command takes `--config`, exits 0 ok, 1 failed, 2 usage or config error, and list
commands take `--json`. Store commands open the LMDB environment directly and are safe while
the server runs; `status` and `check-config` also ask the running server's admin listener.
Heavy imports (trio, Quart, Hypercorn) happen only in the commands that need them.
"""

from __future__ import annotations

import argparse
import secrets
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .. import config as config_mod
from ..errors import ApplianceError, ConfigError
from ..version import version_line
from .common import EXIT_FAILED, EXIT_OK, EXIT_USAGE


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        metavar="PATH",
        default=None,
        help="config file (default: $CT_APPLIANCE_CONFIG, else /etc/ct-appliance/config.yaml)",
    )


def _add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ct-appliance",
        description="Self-hosted receiver for CoinTracker cost-basis webhooks.",
    )
    parser.add_argument("--version", action="store_true", help="print version, commit, build date")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, help_text: str, **kw: Any) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, **kw)
        _add_config(p)
        return p

    command("serve", "run the appliance")
    p = command("check-config", "validate the config; show what a reload would change")
    _add_json(p)
    p = command("status", "inbox counts, oldest pending, and the live launch-window table")
    _add_json(p)
    p.add_argument("--window", default="15m", help="sliding window (default 15m)")
    p = command("watch", "evaluate the launch-window signals continuously")
    p.add_argument("--window", default="15m", help="sliding window (default 15m)")
    p.add_argument("--interval", default="10s", help="time between evaluations (default 10s)")
    p.add_argument("--once", action="store_true", help="evaluate once; exit 1 past 'investigate'")
    _add_json(p)

    inbox = command("inbox", "operate the inbox").add_subparsers(dest="action", metavar="ACTION")
    inbox.required = True
    p = inbox.add_parser("list", help="list deliveries, newest first")
    _add_config(p)
    _add_json(p)
    p.add_argument("--state", choices=["pending", "importing", "done", "dead"])
    p.add_argument("--limit", type=int, default=50)
    p = inbox.add_parser("show", help="one delivery with its attempts and their output")
    _add_config(p)
    _add_json(p)
    p.add_argument("id", metavar="DELIVERY_ID")
    p.add_argument("--body", action="store_true", help="also print the stored raw body")
    p = inbox.add_parser("retry", help="queue dead (or waiting) deliveries for a new attempt")
    _add_config(p)
    _add_json(p)
    p.add_argument("ids", metavar="DELIVERY_ID", nargs="*")
    p.add_argument("--dead", action="store_true", help="retry every dead delivery")
    p = inbox.add_parser("purge", help="drop bodies and outputs of old imported deliveries")
    _add_config(p)
    _add_json(p)
    p.add_argument("--older-than", required=True, metavar="AGE", help="e.g. 30d")
    p.add_argument("--include-dead", action="store_true", help="dead deliveries too (final)")

    flows = command("flows", "look up flow ids").add_subparsers(dest="action", metavar="ACTION")
    flows.required = True
    p = flows.add_parser("show", help="which delivery brought each flow id, and its state")
    _add_config(p)
    _add_json(p)
    p.add_argument("flow_ids", metavar="FLOW_ID", nargs="+")

    runs = command("runs", "pagination view per cost_basis_run_id").add_subparsers(
        dest="action", metavar="ACTION"
    )
    runs.required = True
    p = runs.add_parser("list", help="runs, most recently seen first")
    _add_config(p)
    _add_json(p)
    p.add_argument("--limit", type=int, default=50)
    p = runs.add_parser("show", help="one run: pages, new vs duplicate flow ids, first/last seen")
    _add_config(p)
    _add_json(p)
    p.add_argument("run_id", metavar="RUN_ID")

    p = command("rebuild-index", "rebuild the flow-id index from the inbox (server stopped)")
    _add_json(p)

    p = command("backup", "hot, consistent copy of the inbox into DEST, while the server runs")
    _add_json(p)
    p.add_argument("dest", metavar="DEST", help="a new (or empty) directory for the backup")
    p.add_argument(
        "--dated", action="store_true", help="write into DEST/<UTC time>, e.g. 20261126T070513Z"
    )
    p.add_argument(
        "--keep",
        type=int,
        metavar="N",
        help="with --dated: afterwards delete all but the N newest dated backups in DEST",
    )
    p = command("restore", "put a backup in store.path (server stopped); the index is rebuilt")
    _add_json(p)
    p.add_argument("src", metavar="SRC", help="a directory written by backup")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace the store in store.path (its data.mdb, lock.mdb and index/)",
    )

    db = command("db", "the PostgreSQL store (store.backend: postgresql)").add_subparsers(
        dest="action", metavar="ACTION"
    )
    db.required = True
    p = db.add_parser("migrate", help="create or upgrade the schema (idempotent)")
    _add_config(p)
    _add_json(p)
    p = db.add_parser("import-lmdb", help="move an LMDB store (server stopped) into the database")
    _add_config(p)
    _add_json(p)
    p.add_argument("path", metavar="PATH", help="the LMDB store directory (its store.path)")

    imp = command("importer", "hold or release importer runs").add_subparsers(
        dest="action", metavar="ACTION"
    )
    imp.required = True
    for action, text in (
        ("pause", "stop new importer runs; deliveries are still accepted and queued"),
        ("resume", "release importer runs"),
    ):
        _add_config(imp.add_parser(action, help=text))

    p = sub.add_parser("send", help="act as CoinTracker: sign, post, retry 5xx like it does")
    p.add_argument("url")
    auth = p.add_mutually_exclusive_group()
    auth.add_argument("--secret-file", metavar="F", help="file holding the HMAC secret")
    auth.add_argument("--token", metavar="T", help="bearer token (JWT)")
    auth.add_argument("--token-file", metavar="F", help="file holding the bearer token")
    p.add_argument("--body", metavar="FILE", help="send this body as is")
    p.add_argument("--flows", type=int, default=50, help="flow ids per page (generated body)")
    p.add_argument("--pages", type=int, default=1, help="POSTs in one run (generated body)")
    p.add_argument("--run-id", help="cost_basis_run_id (default: random)")
    p.add_argument("--header", default="X-Cointracker-Signature", help="HMAC header name")
    p.add_argument("--retries", type=int, default=5, help="retries on 5xx (default 5)")
    p.add_argument("--backoff-base-seconds", type=float, default=30.0)
    p.add_argument("--timeout-seconds", type=float, default=30.0)
    p.add_argument("--cacert", metavar="F", help="CA bundle for an https URL")
    _add_json(p)
    sub.add_parser("gen-secret", help="print a new random 32-byte hex secret")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        print(version_line())
        return EXIT_OK
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    handler = _HANDLERS[args.command]
    try:
        return handler(args)
    except ConfigError as e:
        for line in e.problems:
            print(line, file=sys.stderr)
        return EXIT_USAGE
    except ApplianceError as e:
        print(f"ct-appliance {args.command}: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED
    except BrokenPipeError:
        return EXIT_OK


def _serve(args: argparse.Namespace) -> int:
    from .. import server

    return server.main(args.config or config_mod.default_path())


def _gen_secret(args: argparse.Namespace) -> int:
    print(secrets.token_hex(32))
    return EXIT_OK


def _lazy(module: str, name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        import importlib

        fn: Callable[[argparse.Namespace], int] = getattr(
            importlib.import_module(f"appliance.cli.{module}"), name
        )
        return fn(args)

    return run


_HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "serve": _serve,
    "check-config": _lazy("ops", "check_config"),
    "status": _lazy("ops", "status"),
    "watch": _lazy("ops", "watch"),
    "inbox": _lazy("store", "inbox"),
    "flows": _lazy("store", "flows"),
    "runs": _lazy("store", "runs"),
    "rebuild-index": _lazy("store", "rebuild_index"),
    "backup": _lazy("backup", "backup"),
    "restore": _lazy("backup", "restore"),
    "importer": _lazy("store", "importer"),
    "db": _lazy("db", "db"),
    "send": _lazy("send", "main"),
    "gen-secret": _gen_secret,
}


if __name__ == "__main__":
    sys.exit(main())
