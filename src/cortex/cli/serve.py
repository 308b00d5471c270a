"""`cortex serve`: run the gateway from cortex.toml, refusing a bad config or a busy port in one line."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from cortex.cli.console import CliError, err_console, fail
from cortex.core.settings import ConfigError

CLIENT_VARIABLES = ("CORTEX_URL", "CORTEX_ADMIN_KEY", "CORTEX_API_KEY")  # for `cortex status`, `bench`, …

# Names that major clients resolve themselves (Claude Code's model aliases): a model or alias by one of
# these names is never reached from that client, so `cortex serve` warns about it.
CLIENT_RESERVED_NAMES = frozenset({"default", "sonnet", "opus", "haiku", "best", "opusplan", "sonnet[1m]"})


def serve(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="cortex.toml")] = None,
) -> None:
    """Run the gateway (config from cortex.toml, CORTEX_* environment overrides)."""
    from cortex.core.gateway_config import load_fleet_config
    from cortex.core.logs import setup_logging

    if config is None and Path("cortex.toml").is_file():
        config = Path("cortex.toml")
    # The CLI's own client variables share the CORTEX_ prefix with config overrides: not config keys.
    for name in CLIENT_VARIABLES:
        os.environ.pop(name, None)
    try:
        fleet = load_fleet_config(config)
    except ConfigError as exc:
        err_console.print(f"[red]cortex: configuration error[/red]\n{exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    from cortex.cli.up import check_ports

    section = fleet.gateway.gateway
    wanted = [(section.listen, "gateway API", "gateway.listen")]
    if section.metrics_listen:
        wanted.append((section.metrics_listen, "gateway metrics", "gateway.metrics_listen"))
    try:
        check_ports(wanted)  # one line, not a traceback from deep inside the server
    except CliError as exc:
        raise fail(f"cortex serve: {exc}", 2) from None
    setup_logging(fleet.gateway.gateway.log_level)
    _warn_about(fleet)
    from cortex.gateway.app import run

    run(fleet)


def _warn_about(fleet: Any) -> None:
    """Start anyway, but say what will surprise: no neurons, names that clients keep for themselves."""
    if not fleet.gateway.neurons:
        err_console.print(
            "[yellow]warning:[/yellow] no neurons configured: every request will fail until [[neurons]] entries "
            "are added to cortex.toml (or CORTEX_NEURONS is set)",
            highlight=False,
        )
    names = {m.id for m in fleet.catalogue.models} | set(fleet.catalogue.aliases)
    for name in sorted(names & CLIENT_RESERVED_NAMES):
        err_console.print(
            f"[yellow]warning:[/yellow] model name '{name}' is one Claude Code resolves itself: it never reaches the "
            "gateway from that client; choose another alias (docs/clients.md)",
            highlight=False,
        )
