"""Every code block in README.md and docs/*.md parses, and every shell command is runnable or covered.

The runnable commands and the Python blocks are run against a real fleet by
tests/e2e/test_cortex_up.py (`test_documented_snippets_run`); this module checks the rest without one.
"""

from __future__ import annotations

import tomllib

import pytest

from cortex.core.gateway_config import GatewayConfig
from cortex.core.settings import validate_settings
from cortex.neuron.config import NeuronConfig
from tests.e2e.snippets import RUNNABLE, Block, blocks, commands, covered_by

ALL = blocks()


def _ids(block: Block) -> str:
    return block.where


@pytest.mark.parametrize("block", [b for b in ALL if b.lang == "bash"], ids=_ids)
def test_every_shell_command_is_runnable_or_covered(block: Block) -> None:
    for command in commands(block):
        assert RUNNABLE.search(command) or covered_by(command), (
            f"{block.where}: `{command}` is neither run by the docs test nor covered by another test: "
            "make it runnable against the test fleet or add a rule in tests/e2e/snippets.py"
        )


@pytest.mark.parametrize("block", [b for b in ALL if b.lang == "toml"], ids=_ids)
def test_toml_blocks_parse_and_configs_validate(block: Block, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tomllib.loads(block.text)
    for name in ("FLEET_TOKEN", "GATEWAY_API_KEY", "CORTEX_API_KEY"):
        monkeypatch.setenv(name, "documented-secret")
    first = block.text.splitlines()[0] if block.text else ""
    if "neuron.toml" in first:
        data.pop("token", None)  # a file: reference names a file on the reader's host
        validate_settings(NeuronConfig, data, block.where)
    elif "cortex.toml" in first:
        for key in ("api_keys", "admin_key", "metrics_key", "neuron_token"):
            data.get("gateway", {}).pop(key, None)
        data.pop("models_config", None)
        data.setdefault("gateway", {})["allow_anonymous"] = True
        GatewayConfig.model_validate(data)


@pytest.mark.parametrize("block", [b for b in ALL if b.lang == "python"], ids=_ids)
def test_python_blocks_compile(block: Block) -> None:
    compile(block.text, block.where, "exec")


def test_the_docs_have_snippets_to_check() -> None:
    assert {b.lang for b in ALL} >= {"bash", "python", "toml"}
