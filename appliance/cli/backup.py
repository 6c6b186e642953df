"""`backup` and `restore`: a hot copy of the store while it serves, and putting one back.

The work is in appliance/backup.py; this module reads the config and tells the operator what
the copy holds and what a restore means for deliveries acknowledged after the backup.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .. import backup as backup_mod
from ..errors import CommandFailed
from .common import EXIT_OK, EXIT_USAGE, emit, load


def _size(n: int) -> str:
    value, unit = float(n), "bytes"
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{n} bytes" if unit == "bytes" else f"{value:.1f} {unit}"


def _lmdb_path(args: argparse.Namespace) -> Path:
    cfg = load(args).config
    if cfg.store.backend != "lmdb":
        raise CommandFailed(
            "backup and restore copy the embedded LMDB store; the PostgreSQL store is backed "
            "up with PostgreSQL's own tools (pg_basebackup and WAL archiving, or your "
            "provider's backups): see docs/SCALING.md"
        )
    return Path(cfg.store.path)


def backup(args: argparse.Namespace) -> int:
    if args.keep is not None and (not args.dated or args.keep < 1):
        print("ct-appliance backup: --keep N needs --dated and N >= 1", file=sys.stderr)
        return EXIT_USAGE
    store_path = _lmdb_path(args)
    started = time.monotonic()
    pruned: list[Path] = []
    if args.dated:
        dest, manifest, pruned = backup_mod.backup_dated(store_path, Path(args.dest), args.keep)
    else:
        dest = Path(args.dest)
        manifest = backup_mod.backup(store_path, dest)
    seconds = round(time.monotonic() - started, 3)
    doc = {"path": str(dest), **manifest.to_json(), "seconds": seconds}
    doc["last_delivery_id"] = manifest.last_delivery_id()
    doc["pruned"] = [str(p) for p in pruned]

    def text() -> str:
        last = (
            f"up to seq {manifest.last_seq} ({manifest.last_delivery_id()})"
            if manifest.last_seq
            else "(no delivery yet)"
        )
        lines = [
            f"backup written to {dest} in {seconds} s",
            f"  size        {_size(manifest.bytes)} ({manifest.bytes} bytes, compacted)",
            f"  deliveries  {manifest.deliveries}, {last}",
            "  flow index  not copied: a server started on a restored store rebuilds it",
        ]
        lines += [f"  pruned      {p}" for p in pruned]
        return "\n".join(lines)

    emit(args, doc, text)
    return EXIT_OK


def restore(args: argparse.Namespace) -> int:
    store_path = _lmdb_path(args)
    done = backup_mod.restore(Path(args.src), store_path, force=args.force)
    m = done.manifest
    doc = {
        "store_path": done.store_path,
        "source": str(args.src),
        "last_seq": m.last_seq,
        "deliveries": m.deliveries,
        "backup_created": m.to_json()["created"],
        "instance": done.instance,
        "first_seq": done.first_seq,
        "replaced": list(done.replaced),
        "index": "rebuilt from the inbox when the server starts",
    }

    def text() -> str:
        lines = [f"restored {args.src} into {done.store_path}"]
        if done.replaced:
            lines.append(f"  replaced    the previous store's {', '.join(done.replaced)}")
        lines += [
            f"  deliveries  {m.deliveries}, up to seq {m.last_seq}, as backed up at "
            f"{doc['backup_created']}",
            f"  new ids     deliveries from seq {done.first_seq} on are named "
            f"{done.instance}-..., never an id the old store handed out",
            "  flow index  rebuilt from the inbox when the server starts "
            "(systemctl start ct-appliance; how long: docs/INDEX.md)",
            "Deliveries acknowledged after the backup are not in this store, and CoinTracker "
            "will not send them again: see docs/INSTALL.md, 'Backup and restore'.",
        ]
        return "\n".join(lines)

    emit(args, doc, text)
    return EXIT_OK
