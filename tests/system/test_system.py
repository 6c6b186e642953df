"""System test (issue 7): the .deb on a booted Debian bookworm, as a partner's VM would run it.

`make test-system` builds the binary and the .deb, then runs this module with
CT_SYSTEM_TEST=1. It copies the cached debootstrapped root (tests/system/rootfs.sh, under
build/cache/), boots it with systemd-nspawn (the host has no systemd as PID 1) in its own network
namespace, so nothing binds outside the container, and runs every command inside with
`nsenter -t <container init> -a`. HTTP is spoken with curl inside the container: the root has
no Python, exactly like the VMs the binary is for. Signatures and tokens are made here.

The tests run in file order and share one machine: install, configure, start, deliver, reload,
stop, crash, upgrade, purge. A ledger keeps every acknowledged delivery so that later steps can
check none was lost.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import hmac
import json
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

if os.environ.get("CT_SYSTEM_TEST") != "1":
    pytest.skip(
        "system test: boots Debian in systemd-nspawn as root and needs the .deb; "
        "run it with `make test-system` (which sets CT_SYSTEM_TEST=1)",
        allow_module_level=True,
    )

import jwt  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
WORK = REPO / "build" / "work" / "system"
UNIT = "ct-appliance.service"
CONFIG = "/etc/ct-appliance/config.yaml"
WEBHOOK = "http://127.0.0.1:8443/webhooks/cointracker"
READYZ = "http://127.0.0.1:9811/readyz"
IMPORTED = "/var/lib/private/ct-appliance/imported"  # DynamicUser's real place for the state
ISSUER = "https://issuer.test/"
AUDIENCE = "https://partner.test/cointracker"
ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "DEBIAN_FRONTEND": "noninteractive",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
}
MEASURES = WORK / "measurements.txt"

T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 30.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def measure(line: str) -> None:
    with MEASURES.open("a") as f:
        f.write(line + "\n")


class Machine:
    """A Debian root booted by systemd-nspawn; commands run inside through nsenter."""

    def __init__(self, root: Path, log: Path, deb_name: str) -> None:
        self.root = root
        self.log = log
        self.deb_name = deb_name
        self.proc: subprocess.Popen[bytes] | None = None
        self.init_pid = 0

    def boot(self) -> None:
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    "systemd-nspawn",
                    "--boot",
                    "--register=no",
                    "--keep-unit",
                    "--console=passive",
                    "--private-network",
                    "--machine=ct-system-test",
                    f"--directory={self.root}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        (WORK / "nspawn.pid").write_text(str(self.proc.pid))
        self.init_pid = wait_for("the container's init", self._find_init, timeout=30)

        def booted() -> str | None:
            # "offline" until systemd listens on its private socket; --wait covers "starting".
            state = self.run("systemctl", "is-system-running", "--wait", check=False).stdout
            return None if state.strip() == "offline" else state.strip()

        state = wait_for("the container to boot", booted, timeout=120)
        assert state in {"running", "degraded"}, self.run_text("systemctl", "--failed")

    def _find_init(self) -> int | None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"systemd-nspawn exited: {self.log.read_text()[-2000:]}")
        todo = [self.proc.pid]
        while todo:
            pid = todo.pop()
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                continue
            nspid = re.search(r"^NSpid:\s+(.*)$", status, re.M)
            if pid != self.proc.pid and nspid and nspid.group(1).split()[-1] == "1":
                return pid
            todo.extend(int(c) for c in children)
        return None

    def run(
        self,
        *argv: str,
        input: bytes | None = None,
        check: bool = True,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        cmd = ["nsenter", "-t", str(self.init_pid), "-a", "env", "-i"]
        cmd += [f"{k}={v}" for k, v in ENV.items()] + list(argv)
        done = subprocess.run(cmd, input=input, capture_output=True, timeout=timeout)
        result = subprocess.CompletedProcess(
            done.args,
            done.returncode,
            done.stdout.decode(errors="replace"),
            done.stderr.decode(errors="replace"),
        )
        if check and result.returncode != 0:
            journal = ""
            if argv[0] == "systemctl":
                journal = self.run_text("journalctl", "-u", UNIT, "-n", "25", "--no-pager")
            raise AssertionError(
                f"{' '.join(argv)} exited {result.returncode}\n"
                f"stdout: {result.stdout[-3000:]}\nstderr: {result.stderr[-3000:]}\n{journal}"
            )
        return result

    def run_text(self, *argv: str) -> str:
        return self.run(*argv, check=False).stdout

    def sh(self, script: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.run("sh", "-c", script, **kw)

    def path(self, inside: str) -> Path:
        return self.root / inside.lstrip("/")

    def shutdown(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        # SIGTERM makes nspawn power the container off cleanly (SIGRTMIN+3 to its init).
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    # --- the service as an operator sees it ---

    def show(self, *props: str) -> dict[str, str]:
        out = self.run_text("systemctl", "show", UNIT, *[f"--property={p}" for p in props])
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def readyz(self) -> int:
        out = self.run_text(
            "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", READYZ
        )
        return int(out or 0)

    def post(
        self, body: bytes, headers: dict[str, str], url: str = WEBHOOK
    ) -> tuple[int, dict[str, Any]]:
        argv = ["curl", "-sS", "--max-time", "20", "-w", "\n%{http_code}", "--data-binary", "@-"]
        for name, value in {"Content-Type": "application/json", **headers}.items():
            argv += ["-H", f"{name}: {value}"]
        out = self.run(*argv, url, input=body).stdout
        text, _, code = out.rpartition("\n")
        return int(code), json.loads(text) if text.strip() else {}

    def journal(self) -> str:
        return self.run_text("journalctl", "-u", UNIT, "-o", "cat", "--no-pager")


def _stop_stale_container() -> None:
    pid_file = WORK / "nspawn.pid"
    with contextlib.suppress(OSError, ValueError):
        pid = int(pid_file.read_text())
        if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd-nspawn":
            os.killpg(pid, signal.SIGKILL)
            time.sleep(1)
    pid_file.unlink(missing_ok=True)


def _interrupt(signum: int, frame: object) -> None:
    # `timeout` in make sends SIGTERM: turn it into an interrupt so fixtures tear down.
    raise KeyboardInterrupt


@pytest.fixture(scope="module")
def machine() -> Iterator[Machine]:
    deb = Path(os.environ.get("CT_SYSTEM_DEB", ""))
    if not deb.is_file():
        debs = sorted((REPO / "dist").glob("ct-appliance_*_amd64.deb"))
        assert debs, "no .deb in dist/: run `make deb` (make test-system does)"
        deb = debs[-1]
    _stop_stale_container()
    cache = subprocess.run(
        ["sh", str(REPO / "tests/system/rootfs.sh"), str(REPO / "build/cache")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    root = WORK / "root"
    shutil.rmtree(root, ignore_errors=True)
    WORK.mkdir(parents=True, exist_ok=True)
    MEASURES.write_text("")
    subprocess.run(["cp", "-a", "--reflink=auto", cache, str(root)], check=True)
    shutil.copy(deb, root / "root" / deb.name)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    box = Machine(root, WORK / "nspawn.log", deb.name)
    atexit.register(box.shutdown)
    try:
        box.boot()
        yield box
    finally:
        box.shutdown()
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(root, ignore_errors=True)
        (WORK / "nspawn.pid").unlink(missing_ok=True)


@dataclass
class Delivery:
    body: bytes
    flow_ids: list[str]
    delivery_id: str = ""


@dataclass
class Ledger:
    """What the appliance acknowledged, and how to sign the next request."""

    accepted: list[Delivery] = field(default_factory=list)
    mode: str = "hmac"
    hmac_secret: bytes = b""
    private_key: Any = None

    def headers(self, body: bytes, mode: str | None = None, **claims: Any) -> dict[str, str]:
        if (mode or self.mode) == "hmac":
            sig = hmac.new(self.hmac_secret, body, hashlib.sha256).hexdigest()
            return {"X-Cointracker-Signature": sig}
        now = int(time.time())
        payload = {"iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 300, **claims}
        token = jwt.encode(payload, self.private_key, algorithm="RS256")
        return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def ledger() -> Ledger:
    return Ledger()


def new_delivery(flows: int = 3) -> Delivery:
    flow_ids = [f"flow-{uuid.uuid4().hex}" for _ in range(flows)]
    doc = {
        "flow_ids": flow_ids,
        "cost_basis_run_id": f"run-{uuid.uuid4().hex[:8]}",
        "ghost_user_id": "ghost-system-test",
        "user_config": {},
        "partner_config": {"tier": "system-test"},
    }
    return Delivery(json.dumps(doc).encode(), flow_ids)


def deliver(machine: Machine, ledger: Ledger, count: int = 1) -> list[Delivery]:
    sent = []
    for _ in range(count):
        d = new_delivery()
        status, answer = machine.post(d.body, ledger.headers(d.body))
        assert (status, answer.get("status")) == (200, "accepted"), answer
        d.delivery_id = answer["delivery_id"]
        ledger.accepted.append(d)
        sent.append(d)
    return sent


def imported(machine: Machine, d: Delivery) -> dict[str, Any] | None:
    path = machine.path(f"{IMPORTED}/{d.delivery_id}.json")
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def assert_all_imported(machine: Machine, deliveries: list[Delivery], timeout: float = 60) -> None:
    for d in deliveries:
        doc = wait_for(f"import of {d.delivery_id}", lambda d=d: imported(machine, d), timeout)
        assert doc["delivery_id"] == d.delivery_id
        assert doc["flow_ids"] == d.flow_ids


def assert_all_duplicates(machine: Machine, ledger: Ledger, deliveries: list[Delivery]) -> None:
    for d in deliveries:
        status, answer = machine.post(d.body, ledger.headers(d.body))
        assert (status, answer.get("status")) == (200, "duplicate"), answer


def edit_config(machine: Machine, edits: list[tuple[str, str]]) -> None:
    path = machine.path(CONFIG)
    text = path.read_text()
    for pattern, replacement in edits:
        text, n = re.subn(pattern, replacement, text, count=1, flags=re.M | re.S)
        assert n == 1, f"the shipped config has no match for {pattern!r}"
    path.write_text(text)


def wait_active(machine: Machine, timeout: float = 60) -> dict[str, str]:
    def probe() -> dict[str, str] | None:
        state = machine.show("ActiveState", "SubState", "MainPID", "NRestarts")
        if state["ActiveState"] == "active" and machine.readyz() == 200:
            return state
        return None

    return wait_for("ct-appliance active and ready", probe, timeout)


# --- the steps, in order ---


def test_deb_installs_on_bookworm_without_python(machine: Machine, ledger: Ledger) -> None:
    assert not list(machine.path("/usr/bin").glob("python3*")), "the root must not have Python"
    out = machine.sh(f"cd /root && apt-get install -y ./{machine.deb_name}").stdout
    assert "ct-appliance is installed but not started" in out
    assert machine.run_text("systemctl", "is-enabled", UNIT).strip() == "disabled"
    assert machine.run_text("systemctl", "is-active", UNIT).strip() == "inactive"
    secret = machine.path("/etc/ct-appliance/hmac-secret")
    assert secret.stat().st_mode & 0o777 == 0o600
    ledger.hmac_secret = secret.read_text().strip().encode()
    assert len(ledger.hmac_secret) == 64
    conffiles = machine.run_text("dpkg-query", "-W", "-f=${Conffiles}", "ct-appliance")
    assert CONFIG in conffiles
    version = machine.run_text("ct-appliance", "--version")
    assert re.match(r"ct-appliance \S+ \(commit [0-9a-f]{7,}\S*, built \d{4}-", version), version


def test_shipped_config_refuses_plain_http_in_production(machine: Machine) -> None:
    # check-config as the postinst tells the operator to run it.
    r = machine.run(
        "env", "CREDENTIALS_DIRECTORY=/etc/ct-appliance", "ct-appliance", "check-config",
        "--config", CONFIG, check=False,
    )  # fmt: skip
    assert r.returncode == 2, r
    assert "listen" in r.stdout + r.stderr
    assert machine.run_text("cat", "/etc/ct-appliance/hmac-secret").strip() not in (
        r.stdout + r.stderr
    )


def test_operator_configures_a_reverse_proxy_setup(machine: Machine) -> None:
    edit_config(
        machine,
        [
            (r'bind: \["0\.0\.0\.0:8443"\]', 'bind: ["127.0.0.1:8443"]'),
            (r"^  # behind_proxy: true$", "  behind_proxy: true"),
            (r"backoff_initial_seconds: 5$", "backoff_initial_seconds: 1"),
        ],
    )
    r = machine.run(
        "env", "CREDENTIALS_DIRECTORY=/etc/ct-appliance", "ct-appliance", "check-config",
        "--config", CONFIG, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r


def test_unit_is_active_only_once_readyz_answers_200(machine: Machine) -> None:
    # Sample (unit state, /readyz) as fast as the shell can while systemd starts the unit.
    script = f"""
        systemctl enable {UNIT} 2>/dev/null
        start=$(date +%s%N)
        systemctl start --no-block {UNIT}
        i=0
        while [ $i -lt 3000 ]; do
            s=$(systemctl is-active {UNIT})
            c=$(curl -s -o /dev/null -w '%{{http_code}}' --max-time 2 {READYZ})
            echo "$s $c"
            case $s in active|failed) break;; esac
            i=$((i + 1))
        done
        echo "ms $(( ($(date +%s%N) - start) / 1000000 ))"
    """
    lines = machine.sh(script, timeout=180).stdout.split("\n")
    samples = [line.split() for line in lines if line and not line.startswith("ms ")]
    elapsed_ms = int(next(line for line in lines if line.startswith("ms ")).split()[1])
    assert samples[-1] == ["active", "200"], samples[-10:]
    before = samples[:-1]
    assert all(state in {"inactive", "activating"} for state, _ in before), before
    assert any(code != "200" for _, code in before), "never saw the unit starting: too fast?"
    measure(f"systemctl start -> active (and /readyz 200), in the container: {elapsed_ms} ms")
    state = machine.show("Type", "NotifyAccess", "WatchdogUSec", "MainPID")
    assert state["Type"] == "notify"
    assert state["WatchdogUSec"] == "30s"
    # The onefile binary unpacked itself into the private runtime directory, not /tmp.
    unpacked = machine.run_text("ls", "/run/ct-appliance").split()
    assert len(unpacked) == 1 and unpacked[0].startswith("_MEI"), unpacked


def test_signed_delivery_is_imported_by_the_example_importer(
    machine: Machine, ledger: Ledger
) -> None:
    (d,) = deliver(machine, ledger)
    doc = wait_for("the example importer's file", lambda: imported(machine, d))
    assert doc["flow_ids"] == d.flow_ids
    assert doc["attempt"] == 1
    assert doc["partner_config"] == {"tier": "system-test"}
    status, answer = machine.post(d.body, {"X-Cointracker-Signature": "0" * 64})
    assert status == 401, answer
    assert_all_duplicates(machine, ledger, [d])


def test_watchdog_is_fed_by_the_server_behind_the_bootloader(machine: Machine) -> None:
    # WATCHDOG_PID names the bootloader; the server must ping anyway. A 2 s watchdog for the
    # length of this test: without pings systemd would kill and restart it within 2 s.
    dropin = machine.path(f"/etc/systemd/system/{UNIT}.d/zz-test-watchdog.conf")
    dropin.parent.mkdir(parents=True, exist_ok=True)
    dropin.write_text("[Service]\nWatchdogSec=2s\n")
    machine.run("systemctl", "daemon-reload")
    machine.run("systemctl", "restart", UNIT)
    before = machine.show("NRestarts", "MainPID", "WatchdogTimestampMonotonic")
    time.sleep(5)
    after = machine.show("NRestarts", "MainPID", "WatchdogTimestampMonotonic", "ActiveState")
    assert after["ActiveState"] == "active"
    assert (after["NRestarts"], after["MainPID"]) == (before["NRestarts"], before["MainPID"])
    assert int(after["WatchdogTimestampMonotonic"]) > int(before["WatchdogTimestampMonotonic"])
    dropin.unlink()
    machine.run("systemctl", "daemon-reload")
    machine.run("systemctl", "restart", UNIT)
    assert machine.show("WatchdogUSec")["WatchdogUSec"] == "30s"


def test_port_443_needs_and_gets_only_cap_net_bind_service(
    machine: Machine, ledger: Ledger
) -> None:
    edit_config(machine, [(r'bind: \["127\.0\.0\.1:8443"\]', 'bind: ["127.0.0.1:443"]')])
    refused = machine.run("systemctl", "restart", UNIT, check=False)
    assert refused.returncode != 0, "port 443 must not be bindable without the drop-in"
    dropin = machine.path(f"/etc/systemd/system/{UNIT}.d/port-443.conf")
    dropin.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(machine.path("/usr/share/doc/ct-appliance/port-443.conf"), dropin)
    machine.run("systemctl", "daemon-reload")
    machine.run("systemctl", "reset-failed", UNIT)
    machine.run("systemctl", "restart", UNIT)
    d = new_delivery()
    status, answer = machine.post(
        d.body, ledger.headers(d.body), url=WEBHOOK.replace(":8443", ":443")
    )
    assert (status, answer.get("status")) == (200, "accepted"), answer
    d.delivery_id = answer["delivery_id"]
    ledger.accepted.append(d)
    caps = machine.run_text(
        "sh", "-c", f"grep ^CapEff /proc/$(pgrep -P $(systemctl show -P MainPID {UNIT}))/status"
    )
    assert caps.split()[-1] == "0000000000000400", caps  # CAP_NET_BIND_SERVICE alone
    dropin.unlink()
    edit_config(machine, [(r'bind: \["127\.0\.0\.1:443"\]', 'bind: ["127.0.0.1:8443"]')])
    machine.run("systemctl", "daemon-reload")
    machine.run("systemctl", "restart", UNIT)
    assert_all_imported(machine, [d])


def test_a_broken_config_is_refused_on_reload_and_the_old_one_keeps_serving(
    machine: Machine, ledger: Ledger
) -> None:
    good = machine.path(CONFIG).read_text()
    machine.path(CONFIG).write_text(good.replace("  mode: hmac", "  mode: hmac\n  colour: red"))
    main_pid = machine.show("MainPID")["MainPID"]
    machine.run("systemctl", "reload", UNIT)
    refused = wait_for(
        "the refusal in the journal",
        lambda: [line for line in machine.journal().splitlines() if "reload refused" in line],
        10,
    )
    assert "auth.colour" in refused[-1], refused[-1]
    state = machine.show("MainPID", "ActiveState", "SubState")
    assert state == {"MainPID": main_pid, "ActiveState": "active", "SubState": "running"}
    deliver(machine, ledger)  # still HMAC, still accepted
    machine.path(CONFIG).write_text(good)


def test_reload_switches_from_hmac_to_bearer(machine: Machine, ledger: Ledger) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ledger.private_key = key
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    machine.path("/etc/ct-appliance/bearer-public.pem").write_bytes(pem)
    machine.path("/etc/ct-appliance/bearer-public.pem").chmod(0o644)
    edit_config(
        machine,
        [
            (r"^  mode: hmac$", "  mode: bearer"),
            (
                r"^  # bearer:\n.*?leeway_seconds: 30\n",
                "  bearer:\n"
                f"    issuer: {ISSUER}\n"
                f"    audience: {AUDIENCE}\n"
                "    algorithms: [RS256]\n"
                "    public_key_file: /etc/ct-appliance/bearer-public.pem\n"
                "    leeway_seconds: 30\n",
            ),
        ],
    )
    main_pid = machine.show("MainPID")["MainPID"]
    machine.run("systemctl", "reload", UNIT)
    ledger.mode = "bearer"

    def bearer_accepted() -> Delivery | None:
        d = new_delivery()
        status, answer = machine.post(d.body, ledger.headers(d.body))
        if status != 200:
            return None
        assert answer["status"] == "accepted"
        d.delivery_id = answer["delivery_id"]
        ledger.accepted.append(d)
        return d

    d = wait_for("bearer deliveries to be accepted after reload", bearer_accepted, 20)
    assert machine.show("MainPID")["MainPID"] == main_pid, "reload must not restart"
    assert machine.show("ActiveState")["ActiveState"] == "active"
    other = new_delivery()
    status, _ = machine.post(other.body, ledger.headers(other.body, mode="hmac"))
    assert status == 401, "HMAC must be refused once the mode is bearer"
    status, _ = machine.post(other.body, ledger.headers(other.body, aud="https://elsewhere/"))
    assert status == 401, "a token for another audience must be refused"
    assert_all_imported(machine, [d])


def test_stop_is_clean_and_loses_nothing(machine: Machine, ledger: Ledger) -> None:
    batch = deliver(machine, ledger, 20)
    seen = len(machine.journal().splitlines())
    t0 = time.monotonic()
    machine.run("systemctl", "stop", UNIT)
    measure(f"systemctl stop right after 20 deliveries: {1000 * (time.monotonic() - t0):.0f} ms")
    state = machine.show("Result", "ExecMainCode", "ExecMainStatus", "ActiveState")
    stop_log = "\n".join(machine.journal().splitlines()[seen:])
    gone = machine.run("test", "-e", "/run/ct-appliance", check=False).returncode != 0
    machine.run("systemctl", "start", UNIT)
    assert state == {
        "Result": "success",
        "ExecMainCode": "1",  # CLD_EXITED: the bootloader exited, no signal killed it
        "ExecMainStatus": "0",
        "ActiveState": "inactive",
    }, stop_log
    assert "Traceback" not in stop_log
    assert gone, "the onefile extraction directory must go with the unit"
    assert machine.readyz() == 200
    assert_all_imported(machine, batch)
    assert_all_duplicates(machine, ledger, batch)


def test_a_second_sigterm_during_the_drain_still_ends_in_a_clean_exit(
    machine: Machine, ledger: Ledger
) -> None:
    # Under the default KillMode=control-group (a hand-written unit, another supervisor)
    # systemd signals the server and the bootloader forwards its own SIGTERM too, so the
    # server can get a second SIGTERM while it drains. Made deterministic here: a slow upload
    # keeps the drain busy for a few seconds while the two signals arrive.
    deliver(machine, ledger, 3)
    server = machine.run_text("pgrep", "-P", machine.show("MainPID")["MainPID"]).split()[0]
    seen = len(machine.journal().splitlines())
    machine.sh(
        "head -c 4000 /dev/zero | nohup curl -s -o /dev/null --limit-rate 1000 "
        f"-H 'X-Cointracker-Signature: {'0' * 64}' --data-binary @- {WEBHOOK} "
        ">/dev/null 2>&1 &"
    )
    time.sleep(1)
    machine.run("kill", "-TERM", server)
    time.sleep(0.5)
    machine.run("kill", "-TERM", server, check=False)

    def ended() -> dict[str, str] | None:
        state = machine.show("ActiveState", "ExecMainCode", "ExecMainStatus")
        return state if state["ActiveState"] in {"inactive", "failed"} else None

    state = wait_for("the server to finish draining", ended, 40)
    log = "\n".join(machine.journal().splitlines()[seen:])
    machine.run("systemctl", "reset-failed", UNIT, check=False)
    machine.run("systemctl", "start", UNIT)
    assert (state["ExecMainCode"], state["ExecMainStatus"]) == ("1", "0"), (
        f"the server died of the second signal instead of exiting 0: {state}\n{log[-2000:]}"
    )


@pytest.mark.parametrize("victim", ["main process (bootloader)", "server process (its child)"])
def test_kill_9_is_followed_by_a_restart_with_acknowledged_deliveries_intact(
    machine: Machine, ledger: Ledger, victim: str
) -> None:
    batch = deliver(machine, ledger, 10)
    before = machine.show("MainPID", "NRestarts")
    main_pid = before["MainPID"]
    if victim.startswith("main"):
        pid = main_pid
    else:
        pid = machine.run_text("pgrep", "-P", main_pid).split()[0]
    machine.run("kill", "-9", pid)
    t0 = time.monotonic()

    def restarted() -> dict[str, str] | None:
        state = machine.show("ActiveState", "MainPID", "NRestarts")
        ok = state["NRestarts"] == str(int(before["NRestarts"]) + 1)
        ok = ok and state["ActiveState"] == "active" and machine.readyz() == 200
        return state if ok else None

    after = wait_for("systemd to restart the service", restarted, 60)
    measure(f"kill -9 {victim} -> active again: {1000 * (time.monotonic() - t0):.0f} ms")
    assert after["MainPID"] != main_pid
    assert_all_duplicates(machine, ledger, batch)
    assert_all_imported(machine, batch)


def test_status_accounts_for_every_acknowledged_delivery(machine: Machine, ledger: Ledger) -> None:
    # The operator's view, as INSTALL.md shows it: the CLI as root beside the running server.
    def settled() -> dict[str, Any] | None:
        out = machine.run(
            "env", "CREDENTIALS_DIRECTORY=/etc/ct-appliance", "ct-appliance", "status", "--json"
        ).stdout
        inbox = dict(json.loads(out)["inbox"])
        return inbox if inbox["pending"] == inbox["importing"] == 0 else None

    inbox = wait_for("the inbox to settle", settled, 60)
    assert (inbox["done"], inbox["dead"]) == (len(ledger.accepted), 0), inbox
    owners = machine.run_text("stat", "-c", "%U", "/var/lib/private/ct-appliance/data.mdb")
    assert owners.strip() != "root", "the CLI must not take the store away from the service"


def test_journald_has_json_lines(machine: Machine, ledger: Ledger) -> None:
    journal = machine.journal()
    records = []
    for line in journal.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
    assert len(records) >= 10, journal[-3000:]
    assert all({"level", "msg"} <= set(r) for r in records)
    assert ledger.hmac_secret.decode() not in journal


def test_upgrade_keeps_config_and_store_and_restarts_the_unit(
    machine: Machine, ledger: Ledger, tmp_path: Path
) -> None:
    # Same payload, newer version: what `apt-get install ./ct-appliance_<next>.deb` does.
    unpacked = tmp_path / "deb"
    deb = machine.path(f"/root/{machine.deb_name}")
    subprocess.run(["dpkg-deb", "-R", str(deb), str(unpacked)], check=True)
    control = unpacked / "DEBIAN" / "control"
    text = control.read_text()
    old_version = re.search(r"^Version: (.*)$", text, re.M).group(1)  # type: ignore[union-attr]
    new_version = f"{old_version}+systest1"
    control.write_text(text.replace(f"Version: {old_version}", f"Version: {new_version}"))
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-b", str(unpacked), str(machine.path("/root/up.deb"))],
        check=True,
        capture_output=True,
    )
    config_before = machine.path(CONFIG).read_text()
    secret_before = machine.path("/etc/ct-appliance/hmac-secret").read_text()
    pid_before = machine.show("MainPID")["MainPID"]
    machine.sh("cd /root && apt-get install -y ./up.deb")
    assert machine.run_text("dpkg-query", "-W", "-f=${Version}", "ct-appliance") == new_version
    assert machine.path(CONFIG).read_text() == config_before, "a conffile edit must survive"
    assert machine.path("/etc/ct-appliance/hmac-secret").read_text() == secret_before
    after = wait_active(machine)
    assert after["MainPID"] != pid_before, "the upgrade must restart the running service"
    assert_all_duplicates(machine, ledger, ledger.accepted[-5:])
    assert machine.run_text("systemctl", "is-enabled", UNIT).strip() == "enabled"


def test_purge_keeps_the_store(machine: Machine) -> None:
    store = machine.path("/var/lib/private/ct-appliance")
    files_before = sorted(p.name for p in store.iterdir())
    out = machine.run("apt-get", "purge", "-y", "ct-appliance").stdout
    assert "store kept" in out
    assert machine.run_text("systemctl", "is-active", UNIT).strip() in {"inactive", "unknown"}
    assert not machine.path("/usr/bin/ct-appliance").exists()
    # dpkg removes its conffile, postrm the secret it generated; the operator's own file stays.
    assert not machine.path(CONFIG).exists()
    assert not machine.path("/etc/ct-appliance/hmac-secret").exists()
    assert machine.path("/etc/ct-appliance/bearer-public.pem").exists()
    assert not machine.path(f"/etc/systemd/system/multi-user.target.wants/{UNIT}").exists()
    assert sorted(p.name for p in store.iterdir()) == files_before
