"""A real haproxy (/usr/sbin/haproxy, installed by `make deps`) in front of several appliances.

`Haproxy` writes a config into a temporary directory, checks it with `haproxy -c`, and runs
haproxy in the foreground (`-db`, a plain child process, no daemon, no master) on a free loopback
port, in HTTP mode, balancing round-robin over backends given as (name, webhook_port,
admin_port). Each backend is health-checked with GET /readyz on its admin port. A unix stats
socket tells a test which servers haproxy sees UP (`servers_up()`).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

HAPROXY = Path("/usr/sbin/haproxy")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Haproxy:
    """haproxy on 127.0.0.1:`port` balancing over `backends` [(name, webhook_port, admin_port)].

    `close()` stops it and removes its directory; it is a context manager too."""

    def __init__(
        self,
        backends: Sequence[tuple[str, int, int]],
        port: int | None = None,
        root: Path | None = None,
        check_inter_ms: int = 500,
    ) -> None:
        if not HAPROXY.is_file():
            raise RuntimeError(f"{HAPROXY} not found: run `make deps`")
        self.backends = list(backends)
        self.port = port or free_port()
        # A short directory of our own: the stats socket path must fit a unix socket (~107 bytes).
        self.root = root or Path(tempfile.mkdtemp(prefix="ct-haproxy-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path = self.root / "haproxy.cfg"
        self.stats_path = self.root / "stats.sock"
        self.log_path = self.root / "haproxy.log"
        self.check_inter_ms = check_inter_ms
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> str:
        servers = "\n".join(
            f"    server {name} 127.0.0.1:{port} check port {admin} "
            f"inter {self.check_inter_ms}ms fall 2 rise 1"
            for name, port, admin in self.backends
        )
        return f"""\
global
    stats socket {self.stats_path} mode 600 level admin
    # No syslog: haproxy's own alerts go to stderr, which is captured in haproxy.log.

defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout http-request 30s
    timeout queue 30s

frontend fe
    bind 127.0.0.1:{self.port}
    default_backend appliances

backend appliances
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    # A failed attempt is tried again on another server. Retrying a POST is safe here only
    # because the appliances are idempotent on flow ids: a delivery that reached a server
    # whose answer was lost is stored once, and its re-sent copy is answered as a duplicate.
    # L7 retries (empty-response, response-timeout) need the request body buffered, which
    # http-buffer-request does before haproxy connects (bodies up to tune.bufsize, 16 KiB).
    option redispatch
    retries 3
    retry-on conn-failure empty-response response-timeout
    option http-buffer-request
{servers}
"""

    def check_config(self) -> None:
        self.config_path.write_text(self.config())
        result = subprocess.run(
            [str(HAPROXY), "-c", "-f", str(self.config_path)],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"haproxy -c rejected {self.config_path} ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}\n--- config ---\n{self.config()}"
            )

    def start(self, timeout: float = 10.0) -> Haproxy:
        self.check_config()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(HAPROXY), "-db", "-f", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"haproxy exited {self.proc.returncode}:\n{self.logs()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    pass
                if self.stats_path.exists():
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"haproxy not listening on {self.port} in {timeout} s:\n{self.logs()}")

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: haproxy's hard stop
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Haproxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- stats socket ----------------------------------------------------------------------------

    def command(self, cmd: str, timeout: float = 5.0) -> str:
        """One command on the stats socket (e.g. "show stat", "disable server appliances/a")."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.stats_path))
            s.sendall(cmd.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def server_status(self) -> dict[str, str]:
        """Each backend server's status from `show stat`: UP, DOWN, "UP 1/2", MAINT, ..."""
        lines = self.command("show stat").splitlines()
        if not lines or not lines[0].startswith("# "):
            raise RuntimeError(f"unexpected show stat output: {lines[:3]}")
        header = lines[0][2:].split(",")
        px, sv, st = header.index("pxname"), header.index("svname"), header.index("status")
        out: dict[str, str] = {}
        for line in lines[1:]:
            fields = line.split(",")
            if len(fields) <= st or fields[px] != "appliances":
                continue
            if fields[sv] in ("FRONTEND", "BACKEND"):
                continue
            out[fields[sv]] = fields[st]
        return out

    def servers_up(self) -> set[str]:
        """Names of the servers haproxy currently sends traffic to (status UP, including a
        server going down that has not yet failed `fall` checks, shown as "UP 1/2")."""
        return _up(self.server_status())

    def wait_servers_up(self, expected: set[str], timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        seen: dict[str, str] = {}
        while time.monotonic() < deadline:
            seen = self.server_status()
            if _up(seen) == expected:
                return
            time.sleep(0.1)
        raise AssertionError(f"haproxy servers not {sorted(expected)} after {timeout} s: {seen}")


def _up(status: dict[str, str]) -> set[str]:
    return {name for name, st in status.items() if st.startswith("UP")}
