"""`cortex`: run the gateway, and operate a running one (status, models, load, unload), or `up` for a laptop.

The commands live one group a module (`serve.py`, `operate.py`, `bench.py`, `up_command.py`); this
module is the program: it mounts them, in the order `cortex --help` lists them.
"""

from __future__ import annotations

import typer

from cortex.cli.bench import bench
from cortex.cli.console import add_version_option
from cortex.cli.operate import load, models, pin, status, unload
from cortex.cli.serve import serve
from cortex.cli.up_command import up

app = typer.Typer(help="cortex gateway: one OpenAI/Anthropic API over a fleet of neurons.", no_args_is_help=True)
add_version_option(app, "cortex")

for command in (serve, status, models, load, unload, pin, bench, up):
    app.command()(command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
