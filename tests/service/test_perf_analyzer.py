"""NVIDIA's perf_analyzer, unmodified, against a real server: it reads the model's config, streams
sequences (`sequence_batching` in the config turns its sequence mode on) and reads the
statistics extension, whose counts it checks.

It runs when TCNSERVE_PERF_ANALYZER names the binary (scripts/install_perf_analyzer.sh prints it;
.ci/run installs it) or `perf_analyzer` is on PATH; how to get it on a machine: docs/oip.md.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from service.app import create_app
from tests.service.conftest import uvicorn_thread

PERF_ANALYZER = os.environ.get("TCNSERVE_PERF_ANALYZER") or shutil.which("perf_analyzer")
pytestmark = pytest.mark.skipif(
    not PERF_ANALYZER, reason="no perf_analyzer: scripts/install_perf_analyzer.sh (docs/oip.md)"
)
KEY = "perf-analyzer-key-0123456789"
ROWS = 3  # timesteps per request


@pytest.fixture
def server(make_settings):
    with uvicorn_thread(create_app(make_settings(api_keys=[KEY]))) as (url, _):
        yield url


def perf_analyzer(url: str, out: Path, *args: str) -> tuple[str, list[dict]]:
    """Run it to completion: (its report, the rows of its CSV)."""
    run = subprocess.run(
        [
            PERF_ANALYZER, "-m", "tiny", "-u", url.removeprefix("http://"), "-i", "http",
            "-H", f"Authorization: Bearer {KEY}",
            "--input-data", "zero",  # its random default holds non-finite values: refused
            "--shape", f"input:{ROWS},2",
            "--measurement-mode", "count_windows", "--measurement-request-count", "40",
            "--max-trials", "8", "--stability-percentage", "50", "-f", str(out), *args,
        ],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    with out.open() as f:
        return run.stdout, list(csv.DictReader(f))


def stats(url: str) -> dict:
    r = httpx.get(f"{url}/v2/models/tiny/stats", headers={"Authorization": f"Bearer {KEY}"})
    return r.json()["model_stats"][0]


def test_concurrency_mode_runs_and_the_server_side_statistics_add_up(server, tmp_path):
    before = stats(server)["inference_count"]
    report, rows = perf_analyzer(server, tmp_path / "c.csv", "--concurrency-range", "2")
    assert [row["Concurrency"] for row in rows] == ["2"]
    assert float(rows[0]["Inferences/Second"]) > 0
    assert "Server: \n    Inference count:" in report  # it read /stats and its counts agreed
    served = stats(server)["inference_count"] - before
    assert served > 0 and served % ROWS == 0  # whole requests of ROWS timesteps each


def test_sequence_mode_streams_sequences_as_sessions(server, tmp_path):
    report, rows = perf_analyzer(
        server, tmp_path / "s.csv", "--concurrency-range", "4", "--sequence-length", "5",
        "--sequence-id-range", "100:100000",
    )  # fmt: skip
    assert "Sequence count:" in report and rows
    page = httpx.get(f"{server}/metrics").text
    created = sum(
        float(line.rpartition(" ")[2])
        for line in page.splitlines()
        if line.startswith('tcnserve_sessions_created_total{model="tiny"}')
    )
    assert created >= 4  # a session per sequence it streamed
