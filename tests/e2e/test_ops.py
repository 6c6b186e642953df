"""Launch-window operations end to end: the retry drill, the status page in a real Chromium,
a real Prometheus scraping /metrics, `status` and `watch` (spec §1, §7, §8)."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ..conftest import ROOT, SECRET, Appliance, delivery, free_port


def test_staging_retry_drill(make_appliance: Any, tmp_path: Path) -> None:
    app = make_appliance({"testing": {"fail_first_deliveries": 1}}).start()
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "appliance",
            "send",
            app.url,
            "--secret-file",
            str(secret_file),
            "--flows",
            "5",
            "--pages",
            "2",
            "--run-id",
            "drill-run",
            "--backoff-base-seconds",
            "0.2",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "page 1/2 attempt 1: 500 injected_failure" in out
    assert "retrying in 0.2 s" in out
    assert "page 1/2 attempt 2: 200 accepted" in out
    assert "page 2/2 attempt 1: 200 accepted" in out
    app.wait_for(lambda: len(app.imported_docs()) == 2, what="imports")
    flows = [f for d in app.imported_docs() for f in d["flow_ids"]]
    assert sorted(flows) == sorted(set(flows)) and len(flows) == 10
    status = httpx.get(app.admin + "/status").json()["launch_window"]
    assert status["injected_failures"] == 1
    assert status["signals"]["error_5xx_rate"]["value"] == 0  # drill answers shown apart
    # The same drill switched on in production is refused.
    prod = dict(app.config, environment="production")
    app.write_config(prod)
    check = app.cli("check-config", check=False)
    assert check.returncode == 2
    assert "testing.fail_first_deliveries: refused in production" in check.stderr


def test_send_does_not_retry_a_4xx(appliance: Appliance, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-secret")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "appliance",
            "send",
            appliance.url,
            "--secret-file",
            str(wrong),
            "--backoff-base-seconds",
            "0.05",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 1
    assert "attempt 1: 401" in result.stdout and "attempt 2" not in result.stdout


def produce_traffic(app: Appliance) -> None:
    for i in range(6):
        assert app.post(delivery([f"pg-{i}"])).status_code == 200
    assert app.post(delivery(["pg-0"])).json() == {"status": "duplicate"}
    assert app.post(delivery(["pg-0"])).json() == {"status": "duplicate"}
    assert app.post(delivery(["bad"]), secret="wrong").status_code == 401
    assert app.post(delivery(["bad"]), secret="wrong").status_code == 401


def test_status_page_in_headless_chromium(appliance: Appliance, tmp_path: Path) -> None:
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is installed by `make deps`"
    produce_traffic(appliance)
    appliance.wait_for(lambda: len(appliance.imported_docs()) == 6, what="imports")
    args = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    dom = subprocess.run(
        [*args, "--dump-dom", appliance.admin + "/"], capture_output=True, text=True, timeout=60
    ).stdout
    assert 'data-signal="idempotency_skip_rate"' in dom
    # 2 duplicates of 8 accepted+duplicate answers; 2 of 10 answers failed verification.
    assert "25.00 %" in dom and "20.00 %" in dom
    assert 'data-count="done">6<' in dom
    assert "investigate" in dom  # signature failures: any sustained is "investigate"
    assert 'http-equiv="refresh"' in dom and "<script" not in dom
    shot = tmp_path / "status.png"
    subprocess.run(
        [*args, f"--screenshot={shot}", "--window-size=1200,900", appliance.admin + "/"],
        capture_output=True,
        timeout=60,
    )
    assert shot.exists() and shot.stat().st_size > 10_000
    keep = ROOT / "var" / "status-page.png"
    keep.parent.mkdir(exist_ok=True)
    shutil.copy(shot, keep)


@contextlib.contextmanager
def prometheus(appliance: Appliance, tmp_path: Path) -> Iterator[str]:
    """A real Prometheus on loopback scraping the admin listener every second, with ops/ rules."""
    binary = shutil.which("prometheus")
    assert binary, "Debian's prometheus is installed by `make deps`"
    port = free_port()
    rules = ROOT / "ops" / "prometheus" / "ct-appliance.rules.yml"
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(
        json.dumps(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(rules)],
                "scrape_configs": [
                    {
                        "job_name": "ct-appliance",
                        "static_configs": [{"targets": [f"127.0.0.1:{appliance.admin_port}"]}],
                    }
                ],
            }
        )
    )
    data = Path(tempfile.mkdtemp(dir=tmp_path))
    with (tmp_path / "prometheus.log").open("wb") as log:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={cfg}",
                f"--storage.tsdb.path={data}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            raise AssertionError((tmp_path / "prometheus.log").read_text())
        yield url
    finally:
        proc.terminate()
        proc.wait(20)


def query(url: str, expr: str) -> float | None:
    r = httpx.get(url + "/api/v1/query", params={"query": expr}, timeout=5).json()
    assert r["status"] == "success", r
    result = r["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def test_real_prometheus_scrapes_5xx_rate_and_p95(make_appliance: Any, tmp_path: Path) -> None:
    failing = tmp_path / "fail.py"
    failing.write_text("import sys; sys.exit(1)\n")
    app = make_appliance(
        {"ack": "imported", "importer": {"command": [sys.executable, str(failing)]}}
    ).start()
    with prometheus(app, tmp_path) as url:
        # Let Prometheus see the series at zero first, so rate() counts every answer
        # (its target discovery takes a few seconds before the first scrape).
        deadline = time.monotonic() + 30
        while (query(url, "count_over_time(up[1m])") or 0) < 2:
            assert time.monotonic() < deadline, "Prometheus never scraped the appliance"
            time.sleep(0.3)
        for i in range(4):
            r = app.post(delivery([f"prom-{i}"]))
            assert r.status_code == 500 and r.json()["error"] == "import_failed"
        for i in range(4):
            assert app.post(delivery([f"prom-{i}"]), secret="wrong").status_code == 401
        time.sleep(3)
        total = 'sum(ct_appliance_requests_total{job="ct-appliance"})'
        five = 'sum(ct_appliance_requests_total{job="ct-appliance",status=~"5.."})'
        assert query(url, f"{five} / {total}") == pytest.approx(0.5)
        rate = query(
            url,
            'sum(rate(ct_appliance_requests_total{status=~"5.."}[1m])) / sum(rate(ct_appliance_requests_total[1m]))',
        )
        assert rate == pytest.approx(0.5, abs=0.01)
        p95 = query(
            url,
            "histogram_quantile(0.95, sum by (le) (ct_appliance_request_duration_seconds_bucket))",
        )
        ours = httpx.get(app.admin + "/status").json()["launch_window"]["signals"]
        assert p95 == pytest.approx(ours["p95_latency_seconds"]["value"], rel=1e-6)
        assert ours["error_5xx_rate"]["value"] == pytest.approx(0.5)
        # The recording rules shipped in ops/ evaluate against the live series too.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            recorded = query(url, "ct_appliance:webhook_5xx_ratio:rate15m")
            if recorded is not None and recorded > 0:
                break
            time.sleep(0.5)
        assert recorded == pytest.approx(0.5, abs=0.01)


def test_watch_once_and_status_through_a_full_disk(make_appliance: Any, tmp_path: Path) -> None:
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)])
    assert mounted.returncode == 0, "the test mounts a small tmpfs (CI runs as root)"
    try:
        app = make_appliance({"store": {"path": str(mnt / "store"), "initial_map_bytes": 1 << 20}})
        app.start()
        for i in range(5):
            assert app.post(delivery([f"ok-{i}"])).status_code == 200
        watch = app.cli("watch", "--once", check=False)
        assert watch.returncode == 0, watch.stdout
        assert "healthy" in watch.stdout
        filler = mnt / "filler"
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True)
        codes = [
            app.post(delivery([f"full-{i}"], body_pad="x" * 50_000)).status_code for i in range(20)
        ]
        assert 503 in codes and set(codes) <= {200, 503}, codes
        # Right after a refusal /readyz says 503, unless the once-a-second probe's tiny write
        # (which fits in pages LMDB can reuse) got in between (docs/RELIABILITY.md, limits):
        # of five refusals, at least one is followed by a 503 from /readyz.
        ready = []
        for i in range(5):
            r = app.post(delivery([f"full-x{i}"], body_pad="x" * 50_000))
            assert r.status_code == 503 and r.headers["retry-after"]
            ready.append(httpx.get(app.admin + "/readyz").status_code)
        assert 503 in ready, ready
        watch = app.cli("watch", "--once", check=False)
        assert watch.returncode == 1, watch.stdout
        assert "alert CoinTracker now" in watch.stdout or "investigate" in watch.stdout
        assert app.proc is not None and app.proc.poll() is None  # the server stays up
        filler.unlink()
        app.wait_for(lambda: httpx.get(app.admin + "/readyz").status_code == 200, what="recovery")
        assert app.post(delivery(["after-full"])).status_code == 200
        assert app.stop() == 0
        # The store opens intact: every delivery answered 200 is there.
        known = app.cli_json("flows", "show", "ok-0", "ok-4", "after-full")
        assert all(f["known"] for f in known)
        offline = app.cli("status").stdout
        assert "not running" in offline and "done" in offline
    finally:
        subprocess.run(["umount", "-l", str(mnt)])
