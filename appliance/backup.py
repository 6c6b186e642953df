"""Backup and restore of the LMDB store: a hot, consistent, compacted copy of the inbox.

Theory of operation
-------------------
* A backup is a directory holding `data.mdb`, a compacting copy (LMDB's `copy` with
  `compact=True`) of the inbox environment at `store.path`, and `backup.json`, its manifest.
  The copy is taken from ONE read transaction, the one the manifest's last seq is read from,
  so the manifest says exactly what the copy holds. A read transaction never blocks the
  writer: a server keeps accepting while a backup runs (the pages of that snapshot are only
  kept from reuse until the copy ends, so the store may grow meanwhile).
* The flow-id index (`store.path/index`) is not copied: it is derived state, replayed from
  the inbox by the next server that starts on a store without one (flowindex.py).
* No half backup: the copy is written into a hidden directory beside DEST, every file and the
  directory are fsync'd, and it is renamed onto DEST last. Files 0600, directories 0700.
* A restore verifies the backup before it touches `store.path` (manifest, size and sha256 of
  the copy, the copy opens and ends at the manifest's seq). It takes the store's lock
  exclusively without opening the store's environments (a running server holds it shared,
  so it is refused), and refuses an existing store unless forced. The copy is staged inside
  `store.path`, given a new instance epoch (inbox.begin_epoch: the ids the lost store handed
  out after the backup are never handed out again), fsync'd and renamed in. Forced, the old
  index goes first, then data.mdb is replaced by one rename, then its lock file: whatever
  interrupts it leaves the old inbox or the restored one, each with no index or its own.
* Run as root on a store directory a service user owns (systemd's DynamicUser=), what the
  restore writes becomes that user's, plus an empty `index/` of its own: systemd re-owns a
  state directory at start only when its top is not the user's already.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lmdb

from .durations import rfc3339
from .errors import CommandFailed, StoreLocked
from .inbox import begin_epoch, delivery_id, key_seq, read_epochs
from .store import DB_NAMES, LOCK_FILE
from .version import VERSION

MANIFEST = "backup.json"
FORMAT = "ct-appliance-backup"
FORMAT_VERSION = 1
DATED = re.compile(r"\d{8}T\d{6}Z")  # the name of a --dated backup: UTC time of its start
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Manifest:
    """What `backup.json` says about the copy beside it."""

    created_at: float
    last_seq: int  # the last delivery seq in the copy (0: no delivery)
    deliveries: int
    instance: str  # the instance id naming the store's newest deliveries
    epochs: tuple[tuple[int, str], ...]  # (first seq, instance), see inbox.py
    app_version: str
    bytes: int  # of data.mdb
    sha256: str  # of data.mdb
    source: str  # the store.path it was taken from

    def last_delivery_id(self) -> str | None:
        """The delivery id of the last delivery in the copy."""
        if not self.last_seq:
            return None
        return delivery_id(
            next(i for s, i in reversed(self.epochs) if s <= self.last_seq), self.last_seq
        )

    def to_json(self) -> dict[str, Any]:
        doc = {"format": FORMAT, "format_version": FORMAT_VERSION}
        return doc | asdict(self) | {"created": rfc3339(self.created_at)}

    @classmethod
    def from_json(cls, doc: Any) -> Manifest:
        """Raises ValueError for anything that is not a manifest this release can restore."""
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} manifest")
        version = doc.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(f"format_version {version!r}: written by a newer ct-appliance")
        try:
            return cls(
                created_at=float(doc["created_at"]),
                last_seq=int(doc["last_seq"]),
                deliveries=int(doc["deliveries"]),
                instance=str(doc["instance"]),
                epochs=tuple((int(s), str(i)) for s, i in doc["epochs"]),
                app_version=str(doc["app_version"]),
                bytes=int(doc["bytes"]),
                sha256=str(doc["sha256"]),
                source=str(doc["source"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"field {e} missing or malformed") from None


@dataclass(frozen=True)
class Restored:
    manifest: Manifest
    store_path: str
    instance: str  # names the deliveries the restored store accepts from now on
    first_seq: int  # the first of them
    replaced: tuple[str, ...]  # what --force deleted of the previous store


@dataclass(frozen=True)
class _Contents:
    last_seq: int
    deliveries: int
    epochs: tuple[tuple[int, str], ...]


# -- backup -------------------------------------------------------------------------------


def backup(store_path: Path, dest: Path) -> Manifest:
    """Copy the inbox at `store_path` into the new directory `dest` (refused when it exists
    and is not empty). Safe beside a running server."""
    if not (store_path / "data.mdb").is_file():
        raise CommandFailed(f"no store at {store_path} (has the appliance run with this config?)")
    _refuse_existing(dest)
    try:
        dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    except OSError as e:
        raise CommandFailed(f"cannot write into {dest.parent}: {e.strerror}") from None
    try:
        manifest = _copy(store_path, tmp)
        _refuse_existing(dest)  # again: another backup may have taken the name meanwhile
        os.rename(tmp, dest)  # onto an empty directory too (rename(2) replaces it)
        _fsync_dir(dest.parent)
        return manifest
    except (OSError, lmdb.Error) as e:
        raise CommandFailed(f"backup failed: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after the rename


def backup_dated(
    store_path: Path, root: Path, keep: int | None
) -> tuple[Path, Manifest, list[Path]]:
    """A backup into `root/<UTC time>`; then, with `keep`, only the `keep` newest dated
    backups in `root` stay (other names in `root` are never touched). Returns the backup's
    path, its manifest and the backups deleted."""
    dest = root / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    manifest = backup(store_path, dest)
    try:
        pruned = prune(root, keep) if keep is not None else []
    except OSError as e:
        raise CommandFailed(f"backup written to {dest}, but pruning {root} failed: {e}") from None
    return dest, manifest, pruned


def prune(root: Path, keep: int) -> list[Path]:
    """Delete all but the `keep` newest complete dated backups in `root`; returns them."""
    dated = sorted(
        p for p in root.iterdir() if DATED.fullmatch(p.name) and (p / MANIFEST).is_file()
    )
    old = dated[: max(len(dated) - keep, 0)]
    for path in old:
        shutil.rmtree(path)
    return old


def _refuse_existing(dest: Path) -> None:
    try:
        if dest.is_dir() and not dest.is_symlink() and not any(dest.iterdir()):
            return
    except OSError as e:
        raise CommandFailed(f"cannot look into {dest}: {e.strerror}") from None
    if dest.exists() or dest.is_symlink():
        what = "holds a backup" if (dest / MANIFEST).exists() else "exists and is not empty"
        raise CommandFailed(f"{dest} {what}; give a new directory")


def _copy(store_path: Path, tmp: Path) -> Manifest:
    env = _open(store_path, shared=True)
    try:
        for _ in range(3):
            try:
                txn = env.begin()
                break
            except lmdb.MapResizedError:  # the server grew the map since we opened it
                env.set_mapsize(0)
        else:
            raise CommandFailed("the store map keeps being resized; try again")
        try:
            contents = _contents(env, txn)
            env.copy(str(tmp), compact=True, txn=txn)  # exactly the snapshot read above
        finally:
            txn.abort()
    finally:
        env.close()
    data = tmp / "data.mdb"
    os.chmod(data, 0o600)
    size, digest = _fsync_and_hash(data)
    if _inspect(tmp) != contents:
        raise CommandFailed("the copy does not hold what its snapshot held; nothing was kept")
    manifest = Manifest(
        created_at=time.time(),
        last_seq=contents.last_seq,
        deliveries=contents.deliveries,
        instance=contents.epochs[-1][1] if contents.epochs else "",
        epochs=contents.epochs,
        app_version=VERSION,
        bytes=size,
        sha256=digest,
        source=str(store_path),
    )
    fd = os.open(tmp / MANIFEST, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(manifest.to_json(), f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    return manifest


# -- restore ------------------------------------------------------------------------------


def verify(src: Path) -> Manifest:
    """The manifest of the backup in `src`, once the copy beside it is shown to match it."""
    path = src / MANIFEST
    if not path.is_file():
        raise CommandFailed(f"{src} is not a ct-appliance backup (no {MANIFEST})")
    try:
        manifest = Manifest.from_json(json.loads(path.read_text()))
    except (OSError, ValueError) as e:
        raise CommandFailed(f"{path}: {e}") from None
    data = src / "data.mdb"
    try:
        size, digest = _hash(data)
        contents = _inspect(src)
    except (OSError, lmdb.Error) as e:
        raise CommandFailed(f"{data} cannot be read as a store: {e}") from None
    if (size, digest) != (manifest.bytes, manifest.sha256):
        raise CommandFailed(f"{data} is not the copy {MANIFEST} describes (damaged or altered)")
    if contents.last_seq != manifest.last_seq or contents.epochs != manifest.epochs:
        raise CommandFailed(
            f"{data} ends at seq {contents.last_seq}, {MANIFEST} says {manifest.last_seq}"
        )
    return manifest


def restore(src: Path, store_path: Path, *, force: bool) -> Restored:
    """Put the backup in `src` at `store_path`, which must hold no store unless `force`;
    refused while a server (or another maintenance command) holds the store."""
    manifest = verify(src)
    try:
        store_path.mkdir(mode=0o700, parents=True, exist_ok=True)
        with _exclusive(store_path):
            return _restore(src, store_path, manifest, force)
    except (OSError, lmdb.Error) as e:
        raise CommandFailed(f"restore failed: {e}") from None


def _restore(src: Path, store_path: Path, manifest: Manifest, force: bool) -> Restored:
    present = tuple(n for n in ("data.mdb", "index") if (store_path / n).exists())
    if present and not force:
        raise CommandFailed(
            f"{store_path} holds a store ({', '.join(present)}); restore --force replaces "
            "it (its data.mdb, lock.mdb and index/ are deleted)"
        )
    staging = Path(tempfile.mkdtemp(prefix=".restore-", dir=store_path))
    try:
        staged = staging / "data.mdb"
        with (src / "data.mdb").open("rb") as fin:
            fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fout:
                shutil.copyfileobj(fin, fout, _CHUNK)
        first_seq = manifest.last_seq + 1
        instance = _begin_epoch(staging, first_seq)
        _fsync_and_hash(staged, digest=False)
        service_owned = _owned_like(store_path, staged, store_path / LOCK_FILE)
        replaced = []
        if (store_path / "index").exists():
            shutil.rmtree(store_path / "index")
            replaced.append("index/")
        if (store_path / "data.mdb").exists():
            replaced.append("data.mdb")
        os.replace(staged, store_path / "data.mdb")
        with contextlib.suppress(FileNotFoundError):
            (store_path / "lock.mdb").unlink()
            replaced.append("lock.mdb")
        if service_owned:
            # An empty index directory of the service's own: an index that a command run as
            # root creates in it before the server starts is one the server can replace.
            (store_path / "index").mkdir(mode=0o700)
            _owned_like(store_path, store_path / "index")
        _fsync_dir(store_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Restored(manifest, str(store_path), instance, first_seq, tuple(replaced))


def _begin_epoch(path: Path, first_seq: int) -> str:
    size = (path / "data.mdb").stat().st_size
    env = lmdb.open(str(path), map_size=size + (64 << 20), max_dbs=len(DB_NAMES) + 2, mode=0o600)
    try:
        state = env.open_db(b"state", create=False)
        with env.begin(write=True) as txn:
            return begin_epoch(
                lambda key: txn.get(key, db=state),
                lambda key, value: txn.put(key, value, db=state),
                first_seq,
            )
    finally:
        env.close()


@contextlib.contextmanager
def _exclusive(store_path: Path) -> Iterator[None]:
    """The store's lock (store.Store.locked), held exclusively, without opening the store."""
    fd = os.open(store_path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreLocked(
                f"a server (or a maintenance command) is using the store at {store_path}; "
                "stop it first (systemctl stop ct-appliance)"
            ) from None
        yield
    finally:
        os.close(fd)


def _owned_like(directory: Path, *paths: Path) -> bool:
    """Run as root on a store a service user owns (DynamicUser=): what the restore wrote (the
    inbox, and the lock file if it made it) becomes that user's, or the service could not open
    it (systemd re-owns a state directory at start only when its top is not the user's).
    Whether it was such a store."""
    st = directory.stat()
    if os.geteuid() != 0 or (st.st_uid, st.st_gid) == (0, 0):
        return False
    for path in paths:
        os.chown(path, st.st_uid, st.st_gid)
    return True


# -- reading a copy -----------------------------------------------------------------------


def _open(path: Path, *, shared: bool) -> Any:
    """The inbox environment at `path`, read-only; `shared`: a live store (take a reader slot
    in its lock file so the writer keeps our snapshot), else a copy no one else opens."""
    size = (path / "data.mdb").stat().st_size
    return lmdb.open(
        str(path),
        readonly=True,
        lock=shared,
        map_size=max(size, 1 << 20),
        max_dbs=len(DB_NAMES) + 2,
        max_readers=512,
        readahead=False,
    )


def _contents(env: Any, txn: Any) -> _Contents:
    deliveries = env.open_db(b"deliveries", txn=txn, create=False)
    state = env.open_db(b"state", txn=txn, create=False)
    with txn.cursor(db=deliveries) as cur:
        last = key_seq(cur.key()) if cur.last() else 0
    epochs = read_epochs(lambda key: txn.get(key, db=state))
    return _Contents(last, txn.stat(deliveries)["entries"], epochs)


def _inspect(path: Path) -> _Contents:
    env = _open(path, shared=False)
    try:
        with env.begin() as txn:
            return _contents(env, txn)
    finally:
        env.close()


def _hash(path: Path) -> tuple[int, str]:
    h, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _fsync_and_hash(path: Path, *, digest: bool = True) -> tuple[int, str]:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return _hash(path) if digest else (path.stat().st_size, "")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
