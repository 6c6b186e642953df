"""A real PostgreSQL cluster in a temporary directory, for tests that need the database itself.

`PgCluster` drives the server binaries of the highest PostgreSQL major installed under
/usr/lib/postgresql/<major>/bin (never Debian's pg_wrapper in /usr/bin or /usr/local/bin, which
picks clusters and versions by its own rules). `make deps` installs them.

Running as root: initdb, pg_ctl and pg_basebackup refuse to run as root, so they run as the
`postgres` system user (`runuser -u postgres --`), which owns the cluster directory. That user has
to be able to traverse every directory above it, and pytest's tmp_path lives under
/tmp/pytest-of-root/, which is mode 700 for root: so a cluster's directory is by default made
with `tempfile.mkdtemp(prefix="ct-pg-")` in /tmp and opened to mode 755 (see `temp_root`). The
directory also holds the server's unix socket, whose path must stay short (~107 bytes), one more
reason not to nest it in a long pytest path. psql needs no privilege drop: it connects over TCP
as the database user `postgres` with trust authentication.

Fixtures, registered for the whole suite from tests/conftest.py:
  pg_cluster  session-scoped: one running cluster for the test session, stopped at its end
  pg_dsn      function-scoped: a fresh database in that cluster (CREATE DATABASE with a unique
              name), its libpq keyword DSN; dropped WITH (FORCE) afterwards
If the PostgreSQL binaries are missing, the fixtures fail (never skip) and say to run `make deps`.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import pytest

PG_ROOT = Path("/usr/lib/postgresql")
PG_USER = "postgres"
# Longest path a unix socket may have (sun_path is 108 bytes with its terminating NUL).
_SUN_PATH_MAX = 107
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class PgMissing(RuntimeError):
    """The PostgreSQL server binaries are not installed."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pg_bindir() -> Path:
    """The bin directory of the highest PostgreSQL major under /usr/lib/postgresql."""
    found: list[tuple[int, Path]] = []
    if PG_ROOT.is_dir():
        for d in PG_ROOT.iterdir():
            if d.name.isdigit() and (d / "bin" / "initdb").is_file():
                found.append((int(d.name), d / "bin"))
    if not found:
        raise PgMissing(
            f"PostgreSQL server binaries not found in {PG_ROOT}/<major>/bin: run `make deps`"
        )
    return max(found)[1]


def _as_root() -> bool:
    return os.geteuid() == 0


def temp_root(prefix: str = "ct-pg-") -> Path:
    """A new, short directory in /tmp that the postgres user can traverse (mode 755)."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)
    return root


def _check_traversable(path: Path) -> None:
    """As root, every directory above `path` must let the postgres user through."""
    pw = pwd.getpwnam(PG_USER)
    for d in path.parents:
        st = d.stat()
        if st.st_mode & stat.S_IXOTH:
            continue
        if st.st_uid == pw.pw_uid and st.st_mode & stat.S_IXUSR:
            continue
        if st.st_gid == pw.pw_gid and st.st_mode & stat.S_IXGRP:
            continue
        raise PermissionError(
            f"the {PG_USER} user cannot traverse {d} (mode {stat.filemode(st.st_mode)}) to reach "
            f"{path}: put the cluster under a directory from tests.pgcluster.temp_root()"
        )


def _conf_value(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int | float):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


def _quote_ident(name: str) -> str:
    if not _IDENT.match(name):
        raise ValueError(f"not a plain SQL identifier: {name!r}")
    return '"' + name + '"'


def _clean_env() -> dict[str, str]:
    """The environment without libpq/PG variables that would redirect the tools."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


class PgCluster:
    """One PostgreSQL cluster: data in `<root>/data`, socket in `<root>/sock`, server log in
    `<root>/postgres.log`, listening on 127.0.0.1:`port`. `close()` stops it and removes root."""

    def __init__(self, root: Path | None = None, port: int | None = None) -> None:
        self.bindir = pg_bindir()
        self.root = (root or temp_root()).resolve()
        self.port = port or free_port()
        self.data = self.root / "data"
        self.sock = self.root / "sock"
        self.log = self.root / "postgres.log"
        if len(str(self.sock / f".s.PGSQL.{self.port}.lock")) > _SUN_PATH_MAX:
            raise ValueError(
                f"socket directory {self.sock} is too long for a unix socket path: "
                "use a root from tests.pgcluster.temp_root()"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        self.sock.mkdir(exist_ok=True)
        if _as_root():
            _check_traversable(self.root)
            shutil.chown(self.root, PG_USER, PG_USER)
            shutil.chown(self.sock, PG_USER, PG_USER)

    # -- running the tools -------------------------------------------------------------------

    def _run(
        self, tool: str, *args: str, timeout: float = 120.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a server tool (initdb, pg_ctl, pg_basebackup) as the cluster's owner."""
        cmd = [str(self.bindir / tool), *args]
        if _as_root():
            cmd = ["runuser", "-u", PG_USER, "--", *cmd]
        result = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_clean_env(),
            cwd=self.root,
            stdin=subprocess.DEVNULL,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{tool} {' '.join(args)} exited {result.returncode}\n"
                f"{result.stdout}{result.stderr}\n--- server log ---\n{self.log_tail()}"
            )
        return result

    def _psql(self, *args: str, dbname: str = "postgres", timeout: float = 60.0) -> str:
        cmd = [
            str(self.bindir / "psql"),
            "-X",
            "-q",
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            PG_USER,
            "-d",
            dbname,
            *args,
        ]
        result = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_clean_env(),
            stdin=subprocess.DEVNULL,
        )
        if result.returncode != 0:
            raise RuntimeError(f"psql {args} on port {self.port}: {result.stderr.strip()}")
        return result.stdout

    # -- lifecycle -----------------------------------------------------------------------------

    def base_conf(self) -> dict[str, object]:
        return {
            "listen_addresses": "127.0.0.1",
            "port": self.port,
            "unix_socket_directories": str(self.sock),
            "fsync": True,
            "synchronous_commit": True,
            "max_connections": 100,
            "shared_buffers": "128MB",
            "wal_level": "replica",
            "max_wal_senders": 5,
        }

    def init(self, **conf: object) -> PgCluster:
        """initdb (trust, superuser postgres, UTF8, locale C) and write the test configuration;
        `conf` overrides or adds settings (True/False become on/off, strings are quoted)."""
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-A",
            "trust",
            "-U",
            PG_USER,
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )
        settings = {**self.base_conf(), **conf}
        # Appended, so these win over initdb's defaults in the same file.
        with (self.data / "postgresql.conf").open("a") as f:
            f.write("\n# ct-appliance test cluster\n")
            for key, value in settings.items():
                f.write(f"{key} = {_conf_value(value)}\n")
        # Replaces initdb's pg_hba.conf: trust over the socket and loopback, replication too.
        (self.data / "pg_hba.conf").write_text(
            "local all         all              trust\n"
            "local replication all              trust\n"
            "host  all         all 127.0.0.1/32 trust\n"
            "host  replication all 127.0.0.1/32 trust\n"
        )
        return self

    def start(self, timeout: int = 60) -> PgCluster:
        self._run(
            "pg_ctl",
            "start",
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-w",
            "-t",
            str(timeout),
            timeout=timeout + 30,
        )
        return self

    def stop(self, mode: str = "fast", timeout: int = 60) -> None:
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"stop mode {mode!r}")
        if not self.running:
            return
        self._run(
            "pg_ctl",
            "stop",
            "-D",
            str(self.data),
            "-m",
            mode,
            "-w",
            "-t",
            str(timeout),
            timeout=timeout + 30,
        )

    def restart(self, mode: str = "fast") -> PgCluster:
        self.stop(mode)
        return self.start()

    def reload(self) -> None:
        self.sql("SELECT pg_reload_conf()")

    @property
    def pid(self) -> int | None:
        """The postmaster's pid from postmaster.pid, if that process is alive."""
        try:
            pid = int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (FileNotFoundError, ValueError, IndexError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        return pid

    @property
    def running(self) -> bool:
        return self.pid is not None

    def kill9(self, timeout: float = 30.0) -> None:
        """SIGKILL the postmaster and its backends (pg_ctl starts it as a session leader, so
        they share its process group), as a power cut would; waits until they are gone."""
        pid = self.pid
        if pid is None:
            return
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        raise RuntimeError(f"postgres process group {pid} still alive {timeout} s after SIGKILL")

    def promote(self, timeout: int = 60) -> None:
        """End recovery on a standby; returns once it accepts writes."""
        self._run(
            "pg_ctl",
            "promote",
            "-D",
            str(self.data),
            "-w",
            "-t",
            str(timeout),
            timeout=timeout + 30,
        )

    def close(self) -> None:
        """Stop (immediate; SIGKILL if that fails) and remove the cluster's directory."""
        try:
            if self.running:
                try:
                    self.stop("immediate", timeout=30)
                except (RuntimeError, subprocess.TimeoutExpired):
                    self.kill9()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PgCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- SQL -----------------------------------------------------------------------------------

    def dsn(self, dbname: str = "postgres", **params: str | int) -> str:
        """A libpq keyword DSN for this cluster over TCP; `params` add keywords."""
        kv = {"host": "127.0.0.1", "port": self.port, "user": PG_USER, "dbname": dbname, **params}
        return " ".join(f"{k}={v}" for k, v in kv.items())

    def sql(self, statement: str, dbname: str = "postgres") -> str:
        """Run one statement (or several, as one implicit transaction) with psql; its output
        unaligned, tuples only: fields split by '|', rows by newlines."""
        return self._psql("-c", statement, dbname=dbname)

    def set_conf(self, **settings: object) -> None:
        """ALTER SYSTEM SET each setting (each its own statement: ALTER SYSTEM cannot run in a
        transaction block), then pg_reload_conf(). Settings that need a restart need
        `restart()`."""
        args: list[str] = []
        for key, value in settings.items():
            _quote_ident(key)
            args += ["-c", f"ALTER SYSTEM SET {key} = {_conf_value(value)}"]
        args += ["-c", "SELECT pg_reload_conf()"]
        self._psql(*args)

    def create_database(self, name: str) -> None:
        self.sql(f"CREATE DATABASE {_quote_ident(name)}")

    def drop_database(self, name: str) -> None:
        self.sql(f"DROP DATABASE IF EXISTS {_quote_ident(name)} WITH (FORCE)")

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "(no server log)"
        return "\n".join(lines[-n:])

    # -- replication ---------------------------------------------------------------------------

    @classmethod
    def standby_of(
        cls,
        primary: PgCluster,
        root: Path | None = None,
        port: int | None = None,
        app_name: str = "standby",
    ) -> PgCluster:
        """A running streaming standby of `primary`, cloned with pg_basebackup -R -X stream.

        It connects with application_name=`app_name` (the name synchronous_standby_names and
        pg_stat_replication use). It keeps the primary's settings, including those set with
        ALTER SYSTEM, except its own port and socket directory, and synchronous_standby_names is
        cleared: promoted with no standby of its own, it would otherwise wait forever on every
        commit for a synchronous standby that does not exist."""
        standby = cls(root, port)
        standby._run(
            "pg_basebackup",
            "-R",
            "-X",
            "stream",
            "-c",
            "fast",
            "--no-sync",
            "-h",
            "127.0.0.1",
            "-p",
            str(primary.port),
            "-U",
            PG_USER,
            "-D",
            str(standby.data),
        )
        conninfo = f"host=127.0.0.1 port={primary.port} user={PG_USER} application_name={app_name}"
        # postgresql.auto.conf is read after postgresql.conf, and within it the last line wins:
        # this overrides the primary's copied settings and the primary_conninfo of -R.
        with (standby.data / "postgresql.auto.conf").open("a") as f:
            f.write(f"port = {standby.port}\n")
            f.write(f"unix_socket_directories = {_conf_value(str(standby.sock))}\n")
            f.write("synchronous_standby_names = ''\n")
            f.write(f"primary_conninfo = {_conf_value(conninfo)}\n")
        return standby.start()

    def wait_streaming(
        self, app_name: str = "standby", timeout: float = 30.0, sync: bool = False
    ) -> None:
        """On a primary: wait until pg_stat_replication shows `app_name` streaming (and, with
        `sync`, as the synchronous standby)."""
        query = (
            "SELECT state || ',' || sync_state FROM pg_stat_replication "
            f"WHERE application_name = {_conf_value(app_name)}"
        )
        deadline = time.monotonic() + timeout
        seen = ""
        while time.monotonic() < deadline:
            seen = self.sql(query).strip()
            for row in seen.splitlines():
                state, sync_state = row.split(",")
                if state == "streaming" and (not sync or sync_state == "sync"):
                    return
            time.sleep(0.1)
        raise AssertionError(
            f"standby {app_name!r} not {'sync ' if sync else ''}streaming after {timeout} s "
            f"(pg_stat_replication: {seen or 'no row'})\n--- primary log ---\n{self.log_tail()}"
        )


# -- pytest fixtures ---------------------------------------------------------------------------


def _require_pg() -> None:
    """Fail (not skip) the test when PostgreSQL is not installed."""
    try:
        pg_bindir()
    except PgMissing as e:
        message = str(e)
    else:
        return
    pytest.fail(message, pytrace=False)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """One running PostgreSQL cluster for the whole test session."""
    _require_pg()
    with PgCluster() as cluster:
        cluster.init().start()
        yield cluster


@pytest.fixture
def pg_dsn(pg_cluster: PgCluster) -> Iterator[str]:
    """A new database in the session cluster, as a libpq keyword DSN; dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    pg_cluster.create_database(name)
    try:
        yield pg_cluster.dsn(name)
    finally:
        pg_cluster.drop_database(name)
