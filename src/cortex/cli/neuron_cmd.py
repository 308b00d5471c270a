"""`neuron`: the node daemon's command line."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cortex.cli.console import add_version_option
from cortex.core.logs import setup_logging
from cortex.core.settings import ConfigError

if TYPE_CHECKING:
    from cortex.neuron.config import NeuronConfig

app = typer.Typer(help="cortex node daemon: serves local models in-process on this host's GPUs (or CPU).")
add_version_option(app, "neuron")


@app.command()
def serve(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="neuron.toml")] = None,
    listen: Annotated[str | None, typer.Option("--listen", help="HOST:PORT (default 127.0.0.1:13131)")] = None,
) -> None:
    """Start the neuron daemon."""
    from cortex.neuron.config import check_exposure, load_neuron_config, parse_listen

    try:
        cfg = load_neuron_config(config)
        if listen is not None:
            parse_listen(listen)
            cfg = cfg.model_copy(update={"listen": listen})
        check_exposure(cfg)
    except (ConfigError, ValueError) as exc:
        typer.echo(f"neuron: configuration error:\n{exc}", err=True)
        raise typer.Exit(2) from None
    from cortex.cli.up import CliError, check_ports

    try:
        check_ports([(cfg.listen, "neuron", "--listen or listen in neuron.toml")])  # one line, not a traceback
    except CliError as exc:
        typer.echo(f"neuron: {exc}", err=True)
        raise typer.Exit(2) from None
    setup_logging(cfg.log_level)
    # A daemon's log is lines, not terminal progress bars (hub downloads, GGUF conversion): `cortex load`
    # and `cortex up` show progress from /models instead. An explicit setting in the environment wins.
    for key in ("HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE"):
        os.environ.setdefault(key, "1")
    _configure_threads(cfg)
    from cortex.neuron.cuda_devices import HardwareError
    from cortex.neuron.server import run  # torch is imported only once the config is known good

    try:
        run(cfg)
    except HardwareError as exc:
        typer.echo(f"neuron: {exc}", err=True)
        raise typer.Exit(2) from None


def _configure_threads(cfg: NeuronConfig) -> None:
    """Choose the engine's CPU threads and OpenMP's spin policy before torch loads, then apply them."""
    from cortex.core.logs import log_event
    from cortex.neuron import threads

    choice = threads.choose(cfg.engine.threads, cfg.engine.interop_threads, cfg.engine.cores)
    env_set = threads.prepare_environment(choice)  # before `import torch`: OpenMP reads it at load
    applied = threads.apply(choice)
    log_event(
        logging.getLogger("cortex.neuron"),
        "neuron.threads",
        threads=applied.threads,
        interop_threads=applied.interop_threads,
        cores=applied.cores,
        source=applied.source,
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "-"),
        env_set=",".join(env_set) or "-",
    )


@app.command()
def version() -> None:
    """Print the package version."""
    import cortex

    typer.echo(cortex.__version__)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
