"""Running the command-line tools under test as subprocesses, as an operator would."""

from __future__ import annotations

import os
import subprocess
import sys


def run_cli(
    module: str, *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """`python -m cortex.cli.MODULE ARGS` (`cortex_cmd` or `neuron_cmd`), its output captured as text.

    Wide columns so that tables are not cut, and no admin key from the developer's environment.
    """
    full_env = {**os.environ, "COLUMNS": "250", "CORTEX_ADMIN_KEY": "", **(env or {})}
    cmd = [sys.executable, "-m", f"cortex.cli.{module}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)


def cortex(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The `cortex` command with these arguments."""
    return run_cli("cortex_cmd", *args, env=env, timeout=timeout)
