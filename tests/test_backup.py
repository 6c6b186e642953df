"""backup.py on real stores, and the instance epochs of inbox.py that keep delivery ids unique
across a restore."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import backup
from appliance.cli import main
from appliance.errors import CommandFailed, StoreLocked
from appliance.inbox import Inbox, begin_epoch
from appliance.lmdbbackend import LmdbBackend, run_inline
from appliance.payload import Delivery
from appliance.record import Incoming, State
from appliance.store import Store


def accept(backend: LmdbBackend, *flows: str) -> tuple[str, int]:
    item = Incoming(Delivery(tuple(flows), "run", "ghost", 0), b"{}", 1.0e9)
    result = run_inline(lambda: backend.accept(item))
    assert result.status == "accepted" and result.delivery_id and result.seq
    return result.delivery_id, result.seq


@pytest.fixture
def store_with(tmp_path: Path) -> Iterator[tuple[Path, list[tuple[str, int]]]]:
    """A store at tmp_path/store holding three deliveries (closed again)."""
    path = tmp_path / "store"
    backend = LmdbBackend(path)
    made = [accept(backend, f"flow-{i}") for i in range(3)]
    backend.close()
    yield path, made


def epoch_in(store: Store, first_seq: int) -> str:
    state = store.dbs.state
    return store.write(
        lambda txn: begin_epoch(
            lambda k: txn.get(k, db=state), lambda k, v: txn.put(k, v, db=state), first_seq
        )
    )


# -- instance epochs ----------------------------------------------------------------------


def test_a_new_epoch_names_later_seqs_and_old_ids_still_resolve(tmp_path: Path) -> None:
    store = Store(tmp_path)
    old = Inbox(store).instance
    new = epoch_in(store, 4)
    inbox = Inbox(store)
    assert new != old and inbox.epochs == ((1, old), (4, new)) and inbox.instance == new
    assert [inbox.delivery_id_of(s) for s in (1, 3, 4, 9)] == [
        f"{old}-0000000001",
        f"{old}-0000000003",
        f"{new}-0000000004",
        f"{new}-0000000009",
    ]
    assert inbox.seq_of(f"{old}-0000000003") == 3
    assert inbox.seq_of(f"{new}-0000000004") == 4
    # The lost store's id for seq 4 names nothing here; neither does a made-up instance.
    assert inbox.seq_of(f"{old}-0000000004") is None
    assert inbox.seq_of(f"{new}-0000000003") is None
    assert inbox.seq_of("ffffffff-0000000001") is None
    assert inbox.seq_of("7") == 7 and inbox.seq_of("nonsense") is None


def test_an_epoch_at_the_same_seq_replaces_the_last_and_instances_stay_distinct(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(tmp_path)
    first = Inbox(store).instance
    a = epoch_in(store, 10)
    b = epoch_in(store, 20)
    c = epoch_in(store, 20)  # a backup taken before seq 20 restored a second time
    assert Inbox(store).epochs == ((1, first), (10, a), (20, c))
    assert len({first, a, b, c}) == 4
    draws = iter([bytes.fromhex(first), bytes.fromhex(a), bytes.fromhex("01020304")])
    monkeypatch.setattr(os, "urandom", lambda n: next(draws))
    assert epoch_in(store, 15) == "01020304"
    assert Inbox(store).epochs == ((1, first), (10, a), (15, "01020304"))


def test_a_store_without_epochs_reads_as_its_one_instance(tmp_path: Path) -> None:
    store = Store(tmp_path)
    inbox = Inbox(store)
    assert inbox.epochs == ((1, inbox.instance),)
    assert inbox.delivery_id_of(12) == f"{inbox.instance}-0000000012"


# -- backup -------------------------------------------------------------------------------


def test_backup_holds_the_inbox_and_a_manifest_but_no_index(
    store_with: tuple[Path, list[tuple[str, int]]], tmp_path: Path
) -> None:
    path, made = store_with
    dest = tmp_path / "backups" / "one"
    manifest = backup.backup(path, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["backup.json", "data.mdb"]
    assert (dest.stat().st_mode & 0o777, (dest / "data.mdb").stat().st_mode & 0o777) == (
        0o700,
        0o600,
    )
    assert (dest / "backup.json").stat().st_mode & 0o777 == 0o600
    assert (manifest.last_seq, manifest.deliveries) == (3, 3)
    assert manifest.last_delivery_id() == made[-1][0]
    assert manifest.bytes == (dest / "data.mdb").stat().st_size
    assert backup.verify(dest) == manifest
    assert [p.name for p in dest.parent.iterdir()] == ["one"]  # no partial directory left


def test_backup_refuses_an_existing_destination_and_a_missing_store(
    store_with: tuple[Path, list[tuple[str, int]]], tmp_path: Path
) -> None:
    path, _ = store_with
    dest = tmp_path / "b"
    backup.backup(path, dest)
    with pytest.raises(CommandFailed, match="holds a backup"):
        backup.backup(path, dest)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(CommandFailed, match="exists and is not empty"):
        backup.backup(path, other)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert backup.backup(path, empty).last_seq == 3  # an empty directory is taken
    with pytest.raises(CommandFailed, match="no store at"):
        backup.backup(tmp_path / "nowhere", tmp_path / "b2")


def test_a_failed_backup_leaves_nothing_under_dest(
    store_with: tuple[Path, list[tuple[str, int]]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path, _ = store_with
    root = tmp_path / "backups"

    def broken(p: Path, *, digest: bool = True) -> tuple[int, str]:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(backup, "_fsync_and_hash", broken)
    with pytest.raises(CommandFailed, match="backup failed: .*No space left"):
        backup.backup(path, root / "b")
    assert list(root.iterdir()) == []


def test_prune_keeps_the_newest_dated_backups_only(
    store_with: tuple[Path, list[tuple[str, int]]], tmp_path: Path
) -> None:
    path, _ = store_with
    root = tmp_path / "backups"
    names = ["20260101T000000Z", "20260102T000000Z", "20260103T000000Z"]
    for name in names:
        backup.backup(path, root / name)
    (root / "20251231T000000Z").mkdir()  # not a complete backup: never touched
    (root / "keep-me").mkdir()
    dest, _, pruned = backup.backup_dated(path, root, keep=2)
    assert backup.DATED.fullmatch(dest.name) and dest.name > names[-1]
    assert sorted(p.name for p in pruned) == names[:2]
    assert sorted(p.name for p in root.iterdir()) == sorted(
        ["20251231T000000Z", "keep-me", names[2], dest.name]
    )


# -- verify and restore -------------------------------------------------------------------


def test_restore_puts_the_inbox_back_under_a_new_epoch(
    store_with: tuple[Path, list[tuple[str, int]]], tmp_path: Path
) -> None:
    path, made = store_with
    manifest = backup.backup(path, tmp_path / "b")
    lost = LmdbBackend(path)  # the lost store hands out seq 4 after the backup
    lost_id, lost_seq = accept(lost, "after-backup")
    lost.close()
    target = tmp_path / "restored"
    done = backup.restore(tmp_path / "b", target, force=False)
    assert (done.first_seq, done.replaced) == (4, ())
    assert not (target / "index").exists()
    assert (target / "data.mdb").stat().st_mode & 0o777 == 0o600
    restored = LmdbBackend(target)
    for did, seq in made:
        assert restored.find(did) == seq
        assert restored.delivery_id(seq) == did
    assert [r.state for r in restored.records()] == [State.PENDING] * 3
    new_id, new_seq = accept(restored, "after-backup")  # the lost delivery, sent again
    assert new_seq == lost_seq and new_id != lost_id
    assert new_id.startswith(done.instance + "-") and manifest.instance != done.instance
    assert restored.find(lost_id) is None and restored.find(new_id) == new_seq
    restored.close()


def test_restore_refuses_a_store_without_force_and_keeps_other_files(
    store_with: tuple[Path, list[tuple[str, int]]], tmp_path: Path
) -> None:
    path, made = store_with
    backup.backup(path, tmp_path / "b")
    target = tmp_path / "target"
    other = LmdbBackend(target)
    accept(other, "something-else")
    other.close()
    (target / "imported").mkdir()
    with pytest.raises(CommandFailed, match="holds a store .*--force"):
        backup.restore(tmp_path / "b", target, force=False)
    done = backup.restore(tmp_path / "b", target, force=True)
    assert sorted(done.replaced) == ["data.mdb", "index/", "lock.mdb"]
    assert sorted(p.name for p in target.iterdir()) == ["data.mdb", "imported", "server.lock"]
    restored = LmdbBackend(target)
    assert restored.find(made[0][0]) == made[0][1]
    restored.close()


def test_restore_is_refused_while_a_server_holds_the_store(
    store_with: tuple[Path, list[tuple[str, int]]], tmp_path: Path
) -> None:
    path, _ = store_with
    backup.backup(path, tmp_path / "b")
    before = (path / "data.mdb").read_bytes()
    server = LmdbBackend(path, serving=True)  # holds the lock shared, as `serve` does
    try:
        with pytest.raises(StoreLocked, match="stop it first"):
            backup.restore(tmp_path / "b", path, force=True)
    finally:
        server.close()
    assert (path / "data.mdb").read_bytes() == before


def test_verify_refuses_what_is_not_the_backup_it_claims(
    store_with: tuple[Path, list[tuple[str, int]]], tmp_path: Path
) -> None:
    path, _ = store_with
    good = tmp_path / "good"
    backup.backup(path, good)
    with pytest.raises(CommandFailed, match="not a ct-appliance backup"):
        backup.verify(tmp_path)

    def variant(name: str) -> Path:
        copy = tmp_path / name
        shutil.copytree(good, copy)
        return copy

    damaged = variant("damaged")
    raw = bytearray((damaged / "data.mdb").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (damaged / "data.mdb").write_bytes(bytes(raw))
    with pytest.raises(CommandFailed, match="damaged or altered"):
        backup.verify(damaged)

    def edit_manifest(name: str, **change: object) -> Path:
        copy = variant(name)
        doc = json.loads((copy / "backup.json").read_text())
        (copy / "backup.json").write_text(json.dumps(doc | change))
        return copy

    with pytest.raises(CommandFailed, match="ends at seq 3, backup.json says 2"):
        backup.verify(edit_manifest("wrong-seq", last_seq=2))
    with pytest.raises(CommandFailed, match="written by a newer ct-appliance"):
        backup.verify(edit_manifest("newer", format_version=99))
    with pytest.raises(CommandFailed, match="missing or malformed"):
        backup.verify(edit_manifest("broken", last_seq="three"))
    target = tmp_path / "never-touched"
    with pytest.raises(CommandFailed):
        backup.restore(damaged, target, force=False)
    assert not target.exists()


def test_cli_backup_and_restore_exit_codes(
    store_with: tuple[Path, list[tuple[str, int]]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, made = store_with
    config = tmp_path / "config.yaml"
    config.write_text(
        f"store: {{path: {path}}}\nimporter: {{command: [/bin/true]}}\n"
        'auth: {hmac: {secrets: [{value: "' + "s" * 40 + '"}]}}\n'
    )
    args = ["--config", str(config)]
    assert main(["backup", str(tmp_path / "b"), *args, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["last_seq"], doc["last_delivery_id"]) == (3, made[-1][0])
    assert main(["backup", str(tmp_path / "b"), *args]) == 1
    assert "holds a backup" in capsys.readouterr().err
    assert main(["backup", str(tmp_path / "b2"), "--keep", "2", *args]) == 2
    assert "--keep N needs --dated" in capsys.readouterr().err
    assert main(["restore", str(tmp_path / "b"), *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ct-appliance restore: ") and "--force" in err
    assert len(err.strip().splitlines()) == 1


def test_restore_as_root_gives_the_files_to_the_owner_of_the_store_directory(
    store_with: tuple[Path, list[tuple[str, int]]], tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root, as `sudo ct-appliance restore` runs")
    path, _ = store_with
    backup.backup(path, tmp_path / "b")
    target = tmp_path / "service-owned"  # as systemd leaves a DynamicUser= state directory
    target.mkdir(mode=0o700)
    os.chown(target, 61234, 61234)
    backup.restore(tmp_path / "b", target, force=False)
    owners = {(p.name, p.stat().st_uid, p.stat().st_gid) for p in target.iterdir()}
    assert owners == {(n, 61234, 61234) for n in ("data.mdb", "server.lock", "index")}
    assert list((target / "index").iterdir()) == []  # no index: the server rebuilds it
