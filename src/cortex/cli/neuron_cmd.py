"""`neuron`: the node daemon's command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cortex.core.logs import setup_logging
from cortex.core.settings import ConfigError

app = typer.Typer(help="cortex node daemon: serves local models in-process on this host's GPUs (or CPU).")


@app.command()
def serve(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="neuron.toml")] = None,
    listen: Annotated[str | None, typer.Option("--listen", help="HOST:PORT (default 0.0.0.0:13131)")] = None,
) -> None:
    """Start the neuron daemon."""
    from cortex.neuron.config import load_neuron_config, parse_listen

    try:
        cfg = load_neuron_config(config)
        if listen is not None:
            parse_listen(listen)
            cfg = cfg.model_copy(update={"listen": listen})
    except (ConfigError, ValueError) as exc:
        typer.echo(f"neuron: configuration error:\n{exc}", err=True)
        raise typer.Exit(2) from None
    setup_logging(cfg.log_level)
    from cortex.neuron.server import run  # torch is imported only once the config is known good

    run(cfg)


@app.command()
def version() -> None:
    """Print the package version."""
    import cortex

    typer.echo(cortex.__version__)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
