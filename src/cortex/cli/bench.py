"""`cortex bench`: load an OpenAI- or Anthropic-compatible endpoint with concurrent streams and measure it.

The load is `bench_load.py` (workloads, streams, per-request timing), the report `bench_report.py`
(percentiles, the table). Measured at the client, so the figures include the network and the
gateway. Never used as pass/fail: tests check the report's structure only.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import typer

from cortex.cli.bench_load import BenchConfig, run
from cortex.cli.bench_report import report_table, summarise
from cortex.cli.console import console, err_console


def bench(
    model: Annotated[str, typer.Option("--model", "-m", help="Model id or alias")],
    url: Annotated[str, typer.Option("--url", envvar="CORTEX_URL", help="Base URL")] = "http://127.0.0.1:31313",
    dialect: Annotated[str, typer.Option(help="openai (/v1/chat/completions) or anthropic (/v1/messages)")] = "openai",
    requests: Annotated[int, typer.Option(min=1, help="Requests in all")] = 32,
    concurrency: Annotated[int, typer.Option(min=1, help="Streams at once, at most")] = 4,
    rate: Annotated[float | None, typer.Option(help="Arrivals per second (default: back to back)")] = None,
    arrivals: Annotated[str, typer.Option(help="fixed or poisson (random gaps at --rate)")] = "fixed",
    prompt_tokens: Annotated[int, typer.Option(min=1, help="Generated prompt length, in words")] = 128,
    max_tokens: Annotated[int, typer.Option(min=1, help="Output tokens per request")] = 64,
    prompts: Annotated[Path | None, typer.Option(help="A file of prompts, one per line")] = None,
    shared_prefix_tokens: Annotated[int, typer.Option(min=0, help="A system prefix shared by all")] = 0,
    turns: Annotated[int, typer.Option(min=1, help="Turns per conversation (history resent)")] = 1,
    api_key: Annotated[str | None, typer.Option(envvar="CORTEX_API_KEY", help="Client API key")] = None,
    json_out: Annotated[str | None, typer.Option("--json", help="Write the report as JSON here ('-': stdout)")] = None,
    seed: Annotated[int, typer.Option(help="Seed for prompts and arrivals")] = 0,
) -> None:
    """Load an endpoint with concurrent streams: TTFT, inter-token latency, tok/s, errors, as percentiles."""
    if dialect not in ("openai", "anthropic"):
        err_console.print(f"[red]error:[/red] --dialect must be openai or anthropic, not {dialect!r}")
        raise typer.Exit(2)
    if arrivals not in ("fixed", "poisson"):
        err_console.print(f"[red]error:[/red] --arrivals must be fixed or poisson, not {arrivals!r}")
        raise typer.Exit(2)
    prompt_list = None
    if prompts is not None:
        try:
            prompt_list = [line for line in prompts.read_text().splitlines() if line.strip()]
        except OSError as exc:
            err_console.print(f"[red]error:[/red] cannot read {prompts}: {exc.strerror}")
            raise typer.Exit(2) from None
    cfg = BenchConfig(
        url=url,
        model=model,
        dialect=dialect,  # type: ignore[arg-type]
        requests=requests,
        concurrency=concurrency,
        rate=rate,
        arrivals=arrivals,  # type: ignore[arg-type]
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        prompts=prompt_list,
        shared_prefix_tokens=shared_prefix_tokens,
        turns=turns,
        api_key=api_key,
        seed=seed,
    )
    results, wall_s = asyncio.run(run(cfg))
    report = summarise(cfg, results, wall_s)
    if json_out == "-":
        typer.echo(json.dumps(report, indent=2))
    else:
        console.print(report_table(report))
        if report["errors"]:
            console.print("errors: " + ", ".join(f"{k}: {v}" for k, v in report["errors"].items()), highlight=False)
        if json_out:
            Path(json_out).write_text(json.dumps(report, indent=2) + "\n")
            console.print(f"report written to {json_out}", highlight=False)
    if report["requests"]["ok"] == 0:
        raise typer.Exit(1)
