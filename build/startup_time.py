"""Start-up of the built binary: exec to the first 200 from /readyz, median of N runs.

Usage: python build/startup_time.py [BINARY] [RUNS]   (make startup-time)
Each run gets a fresh store and free loopback ports; the first run also pays for the page
cache, so it is reported but the median is over all runs, as an operator would see it.
"""

from __future__ import annotations

import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def one_run(binary: str, workdir: Path) -> float:
    secret = workdir / "secret"
    secret.write_text("0" * 64 + "\n")
    secret.chmod(0o600)
    admin = free_port()
    config = workdir / "config.yaml"
    config.write_text(
        f"""environment: alpha
listen: {{bind: ["127.0.0.1:{free_port()}"], behind_proxy: true}}
auth: {{mode: hmac, hmac: {{secrets: [{{file: {secret}}}]}}}}
store: {{path: {workdir / "store"}}}
importer: {{command: ["/bin/true"]}}
admin: {{bind: "127.0.0.1:{admin}"}}
"""
    )
    config.chmod(0o600)
    env = dict(os.environ, TMPDIR=str(workdir))
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [binary, "serve", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"{binary} exited with {proc.returncode} before /readyz")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=1) as r:
                    if r.status == 200:
                        return time.perf_counter() - t0
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.perf_counter() - t0 > 30:
                raise SystemExit("no /readyz 200 within 30 s")
            time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def main() -> None:
    binary = sys.argv[1] if len(sys.argv) > 1 else "dist/ct-appliance"
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 7
    times = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory(prefix="ct-startup-") as tmp:
            times.append(one_run(binary, Path(tmp)))
    size = os.path.getsize(binary)
    print(f"binary: {binary}, {size / 1e6:.1f} MB ({size} bytes)")
    print("exec -> /readyz 200 (s): " + " ".join(f"{t:.3f}" for t in times))
    print(f"median {statistics.median(times):.3f} s, min {min(times):.3f}, max {max(times):.3f}")


if __name__ == "__main__":
    main()
