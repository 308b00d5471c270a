"""`cortex bench` against a real tiny fleet (a neuron with a random 2-layer model, a real gateway).

Only the report's structure and counts are checked: its figures are measurements, never pass/fail.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cli import cortex
from tests.support.gateway_procs import RealFleet, run_single_model_fleet

MODEL = "tiny-bench"
FIGURES = {"mean", "p50", "p90", "p99", "max"}


@pytest.fixture(scope="module")
def fleet(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealFleet]:
    with run_single_model_fleet(tmp_path_factory.mktemp("bench"), MODEL, tiny_model) as real:
        yield real


def bench(fleet: RealFleet, *args: str) -> subprocess.CompletedProcess[str]:
    return cortex("bench", "--url", fleet.gateway.url, "--model", MODEL, *args, timeout=300)


@pytest.mark.parametrize("dialect", ["openai", "anthropic"])
def test_bench_reports_percentiles_per_stream_and_aggregate(fleet: RealFleet, dialect: str) -> None:
    args = ["--dialect", dialect, "--requests", "4", "--concurrency", "2", "--max-tokens", "8", "--json", "-"]
    done = bench(fleet, *args)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["requests"] == {"sent": 4, "ok": 4, "failed": 0} and report["errors"] == {}
    for key in ("ttft_s", "itl_s", "stream_tokens_per_s", "latency_s"):
        assert set(report[key]) == FIGURES
    assert report["ttft_s"]["p50"] is not None and report["latency_s"]["max"] is not None
    assert report["output_tokens"] > 0 and report["aggregate_tokens_per_s"] > 0
    assert report["config"]["dialect"] == dialect and "api_key" not in report["config"]


def test_bench_agent_conversations_with_poisson_arrivals_and_a_table(fleet: RealFleet, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    args = ["--requests", "4", "--turns", "2", "--shared-prefix-tokens", "40", "--prompt-tokens", "8"]
    args += ["--max-tokens", "4", "--rate", "20", "--arrivals", "poisson", "--json", str(out)]
    done = bench(fleet, *args)
    assert done.returncode == 0, done.stderr
    for column in ("time to first token", "inter-token latency", "tok/s per stream", "p50", "p99"):
        assert column in done.stdout
    report = json.loads(out.read_text())
    assert report["requests"]["ok"] == 4
    assert report["config"]["turns"] == 2 and report["config"]["arrivals"] == "poisson"


def test_bench_counts_errors_by_kind(fleet: RealFleet) -> None:
    done = cortex("bench", "--url", fleet.gateway.url, "--model", "no-such-model", "--requests", "2", "--json", "-")
    assert done.returncode == 1  # nothing succeeded
    report = json.loads(done.stdout)
    assert report["requests"] == {"sent": 2, "ok": 0, "failed": 2}
    assert report["errors"] == {"HTTP 404 invalid_request_error": 2}
