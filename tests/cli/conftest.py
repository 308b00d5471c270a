"""A small fleet for CLI tests: fake neurons (tests/support/fake_neuron.py) behind a real `cortex serve`."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.gateway_procs import GatewayDaemon, cortex_toml, run_fake_neuron, run_gateway
from tests.support.procs import Daemon


def models_toml(*models: dict[str, Any], aliases: dict[str, str] | None = None) -> str:
    lines: list[str] = []
    for model in models:
        lines.append("[[models]]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in model.items()]
    if aliases:
        lines.append("[aliases]")
        lines += [f"{json.dumps(alias)} = {json.dumps(target)}" for alias, target in aliases.items()]
    return "\n".join(lines) + "\n"


def cortex(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "250", "CORTEX_ADMIN_KEY": ""}
    cmd = [sys.executable, "-m", "cortex.cli.cortex_cmd", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


@pytest.fixture
def stack() -> Iterator[contextlib.ExitStack]:
    with contextlib.ExitStack() as exits:
        yield exits


@pytest.fixture
def fake(stack: contextlib.ExitStack, tmp_path: Path) -> Any:
    def start(name: str, **spec: Any) -> Daemon:
        return stack.enter_context(run_fake_neuron(tmp_path, {"name": name, **spec}))

    return start


@pytest.fixture
def gateway(stack: contextlib.ExitStack, tmp_path: Path) -> Any:
    def start(neurons: dict[str, Daemon], models: str = "", **config: Any) -> GatewayDaemon:
        toml = cortex_toml({name: d.url for name, d in neurons.items()}, **config)
        return stack.enter_context(run_gateway(tmp_path, toml, models, wait_healthy=len(neurons)))

    return start
