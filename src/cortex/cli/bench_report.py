"""`cortex bench`'s report: the results of a run as percentiles, and as a table for the terminal.

What it reports, per request and as percentiles (docs/fleet.md#cortex-bench):

- TTFT: from sending the request to the first streamed text;
- inter-token latency (ITL): the gaps between streamed text events after the first;
- tok/s per stream: output tokens after the first, over the time they took; and the aggregate:
  all output tokens over the wall time of the run;
- errors, by kind (HTTP status and error type, or the exception).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict
from typing import Any

from rich.table import Table

from cortex.cli.bench_load import BenchConfig, Result


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    return {
        "mean": statistics.fmean(ordered),
        "p50": pick(0.50),
        "p90": pick(0.90),
        "p99": pick(0.99),
        "max": ordered[-1],
    }


def summarise(cfg: BenchConfig, results: list[Result], wall_s: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error or "unknown"] = errors.get(r.error or "unknown", 0) + 1
    output_tokens = sum(r.output_tokens for r in ok)
    config = {k: v for k, v in asdict(cfg).items() if k not in ("api_key", "prompts")}
    config["prompts"] = len(cfg.prompts) if cfg.prompts else None
    return {
        "config": config,
        "requests": {"sent": len(results), "ok": len(ok), "failed": len(results) - len(ok)},
        "errors": errors,
        "wall_s": wall_s,
        "output_tokens": output_tokens,
        "aggregate_tokens_per_s": output_tokens / wall_s if wall_s > 0 else None,
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else None,
        "ttft_s": percentiles([r.ttft_s for r in ok if r.ttft_s is not None]),
        "itl_s": percentiles([gap for r in ok for gap in r.itl_s]),
        "stream_tokens_per_s": percentiles([tps for r in ok if (tps := r.tokens_per_s) is not None]),
        "latency_s": percentiles([r.duration_s for r in ok]),
    }


def report_table(report: dict[str, Any]) -> Table:
    cfg = report["config"]
    title = (
        f"cortex bench — {cfg['model']} via {cfg['dialect']} at {cfg['url']}: "
        f"{report['requests']['ok']}/{report['requests']['sent']} ok in {report['wall_s']:.1f} s, "
        f"{_fmt(report['aggregate_tokens_per_s'])} tok/s aggregate"
    )
    table = Table(title=title, title_justify="left")
    for column in ("metric", "mean", "p50", "p90", "p99", "max"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    rows = (
        ("time to first token", report["ttft_s"], _ms),
        ("inter-token latency", report["itl_s"], _ms),
        ("tok/s per stream", report["stream_tokens_per_s"], _fmt),
        ("request latency", report["latency_s"], _ms),
    )
    for name, figures, fmt in rows:
        table.add_row(name, *(fmt(figures[k]) for k in ("mean", "p50", "p90", "p99", "max")))
    return table


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
