"""The real OpenAI Codex CLI drives its `apply_patch` loop through a real gateway, on the Responses wire API.

`codex exec` (installed project-locally by scripts/setup.sh, pinned in CODEX_VERSION) talks to a
`cortex serve` process whose neuron is the fake neuron replying by script: no model that could write
a correct patch runs on this machine, so the script plays the model's part (its "[apply_patch]"
entry). What is on the line is everything around the model: Codex declares its freeform
`apply_patch` custom tool (a Lark grammar) for the model slug it knows, the gateway resolves that slug
through a catalogue alias and hands the tool to the neuron as a custom tool, the neuron's custom tool
call goes back to Codex as a streamed `custom_tool_call`, Codex applies the patch on disk, and its
`custom_tool_call_output` reaches the neuron as a tool message on the next turn.

Codex's configuration here is the one docs/clients.md gives, plus what makes a test of it hermetic:
its own CODEX_HOME and HOME, no retries, no update check, no analytics and no plugin sync (the plugin
sync was the only thing that looked up a host other than the gateway). No gateway-specific header:
`web_search = "disabled"` keeps Codex from sending the hosted web search, and the tool search it
runs itself (`tool_search` with `execution: "client"`) reaches the neuron as a function tool.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.support.fake_neuron import APPLY_PATCH
from tests.support.gateway_procs import GatewayDaemon, cortex_toml, run_fake_neuron, run_gateway
from tests.support.procs import Daemon, get_json

REPO = Path(__file__).resolve().parents[2]
CODEX = REPO / ".tools" / "node_modules" / ".bin" / "codex"
CODEX_VERSION = "0.171.0"  # keep in step with scripts/setup.sh
# A slug Codex's bundled model catalogue knows with `apply_patch_tool_type = "freeform"`: for it Codex
# declares apply_patch as a custom tool with a Lark grammar (an unknown slug gets fallback metadata
# and no apply_patch tool at all).
CODEX_MODEL = "gpt-5.5"
MODEL = "scripted"
KEY = "sk-codex-test"
MODELS_TOML = f"""
[[models]]
id = "{MODEL}"
vram_mb = 100

[aliases]
"{CODEX_MODEL}" = "{MODEL}"
"""
CONTEXT = 272000  # what Codex assumes for its slug; the fake counts a token per 4 bytes of JSON


@dataclass
class Fleet:
    gateway: GatewayDaemon
    neuron: Daemon

    def chats(self) -> list[dict[str, Any]]:
        """The chat bodies the neuron received, in order."""
        return get_json(f"{self.neuron.url}/_fake/log")["chat"]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("codex-fleet")
    spec = {
        "name": MODEL,
        "replies": "script",
        "preloaded": [MODEL],
        "devices": [{"vram_total_mb": 80000}],
        "default_size_mb": 100,
        "context": CONTEXT,
        "tool_call": True,
    }
    with run_fake_neuron(tmp, spec) as neuron:
        env = {"CORTEX_GATEWAY__API_KEYS": json.dumps([KEY]), "CORTEX_GATEWAY__MAX_BODY_BYTES": "4000000"}
        with run_gateway(tmp, cortex_toml({MODEL: neuron.url}), MODELS_TOML, env=env, wait_healthy=1) as gateway:
            yield Fleet(gateway, neuron)


def codex_config(gateway_url: str) -> str:
    """docs/clients.md's Codex config, pointed at the test's gateway, with nothing that reaches the internet."""
    return f"""
model = "{CODEX_MODEL}"
model_provider = "cortex"
model_context_window = {CONTEXT}
web_search = "disabled"  # the hosted web search only OpenAI runs: Codex then leaves it out of its requests
check_for_update_on_startup = false

[analytics]
enabled = false

[features]
plugins = false  # else it syncs plugin lists from api.github.com and chatgpt.com at start

[model_providers.cortex]
name = "cortex"
base_url = "{gateway_url}/v1"
wire_api = "responses"
env_key = "CORTEX_API_KEY"
request_max_retries = 0
stream_max_retries = 0
stream_idle_timeout_ms = 20000
"""


def codex(tmp: Path, args: list[str], config: str = "") -> subprocess.CompletedProcess[str]:
    """Run the CLI with a HOME and CODEX_HOME of its own under `tmp` (the developer's ~/.codex is left alone)."""
    if not CODEX.exists():
        pytest.fail(f"the Codex CLI is not installed at {CODEX}: run scripts/setup.sh (it needs npm)")
    home = tmp / "home"
    (home / ".codex").mkdir(parents=True, exist_ok=True)
    (home / ".codex" / "config.toml").write_text(config)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "CODEX_HOME": str(home / ".codex"),
        "CORTEX_API_KEY": KEY,
        "NO_COLOR": "1",
    }
    # stdin at EOF: `codex exec` reads a piped stdin into the prompt
    return subprocess.run(
        [str(CODEX), *args], env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=45
    )


def run_codex(tmp: Path, gateway_url: str, prompt: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    """`codex exec` in a fresh working directory, applying what the model asks without approval or sandbox
    (neither can work in a container); (the finished process, that directory)."""
    workdir = tmp / "work"
    workdir.mkdir()
    args = ["exec", "--json", "--skip-git-repo-check", "--ephemeral", "--dangerously-bypass-approvals-and-sandbox"]
    return codex(tmp, [*args, "-C", str(workdir), prompt], codex_config(gateway_url)), workdir


def events(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_codex_version_is_the_pinned_one(tmp_path: Path) -> None:
    out = codex(tmp_path, ["--version"])
    assert out.stdout.split()[-1] == CODEX_VERSION, out.stdout + out.stderr


def test_codex_applies_the_models_patch_through_the_gateway(fleet: Fleet, tmp_path: Path) -> None:
    done, workdir = run_codex(tmp_path, fleet.gateway.url, "Create hello.txt. [apply_patch]")
    story = f"codex exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert done.returncode == 0, story

    # Codex applied the patch the model wrote, in its working directory.
    assert (workdir / "hello.txt").read_text() == "hello from cortex\n", story

    # Turn 1: the gateway handed Codex's freeform apply_patch to the neuron as a custom tool with its grammar.
    chats = fleet.chats()
    assert len(chats) == 2, story
    first, second = chats
    assert first["model"] == MODEL and first["stream"] is True
    customs = {t["custom"]["name"]: t["custom"] for t in first["tools"] if t["type"] == "custom"}
    grammar = customs["apply_patch"]["format"]
    assert grammar["type"] == "grammar" and grammar["grammar"]["syntax"] == "lark"
    assert "begin_patch" in grammar["grammar"]["definition"]
    assert not any(t["type"] not in ("function", "custom") for t in first["tools"])
    # Codex's own tool search went to the neuron as a function with Codex's description and parameters.
    functions = {t["function"]["name"]: t["function"] for t in first["tools"] if t["type"] == "function"}
    search = functions["tool_search"]
    assert "query" in search["parameters"]["properties"] and "Tool discovery" in search["description"]
    assert "web_search" not in functions

    # Turn 2: Codex's history carries the call as the model made it, and its custom_tool_call_output as a tool
    # message answering that call.
    call_turn, result = second["messages"][-2:]
    assert call_turn["role"] == "assistant"
    assert call_turn["tool_calls"] == [
        {"id": "call_patch", "type": "custom", "custom": {"name": "apply_patch", "input": APPLY_PATCH}}
    ]
    assert result["role"] == "tool" and result["tool_call_id"] == "call_patch"
    assert "Success. Updated the following files:\nA hello.txt" in result["content"], result

    # Codex saw the patch applied and then the model's answer to the result.
    seen = events(done.stdout)
    assert any(e.get("type") == "item.completed" and e["item"].get("type") == "file_change" for e in seen), story
    messages = [e["item"]["text"] for e in seen if e.get("type") == "item.completed" and "text" in e["item"]]
    assert messages and messages[-1] == "results: " + result["content"], story


def test_the_scripted_patch_call_without_streaming(fleet: Fleet) -> None:
    """The same call on a non-streamed Responses request (Codex always streams): one custom_tool_call item."""
    grammar = {"type": "grammar", "syntax": "lark", "definition": 'start: "*** Begin Patch" /(.|\\n)+/'}
    tool = {"type": "custom", "name": "apply_patch", "format": grammar}
    client = openai.OpenAI(base_url=f"{fleet.gateway.url}/v1", api_key=KEY, max_retries=0, timeout=30)
    response = client.responses.create(model=CODEX_MODEL, input="[apply_patch]", tools=[tool])  # type: ignore[list-item]
    [item] = response.output
    assert item.type == "custom_tool_call" and item.name == "apply_patch" and item.input == APPLY_PATCH
