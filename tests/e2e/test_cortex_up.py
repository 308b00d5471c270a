"""The README's run command, as a new user runs it: `cortex up`, then the official SDKs, then Ctrl-C.

One gateway and one local neuron with the embedded SmolLM2-135M-Instruct; the answer must be right
through both dialects, and Ctrl-C must stop both processes cleanly.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import anthropic
import openai
import pytest

from cortex.neuron.default_model import DEFAULT_MODEL_ID
from tests.e2e import snippets
from tests.support.procs import free_port, spawn

QUESTION = "What is the capital of France?"
# A first start reads and converts the GGUF (tens of seconds here, more on a busy machine); the wait ends before
# the module's own timeout so that a start that never gets ready fails with `up`'s output, not a bare timeout.
START_LIMIT_S = 420
pytestmark = pytest.mark.timeout(START_LIMIT_S + 120)


def _models_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/v1/models", timeout=2) as resp:
            listing = json.loads(resp.read())
    except OSError:
        return False
    return any(m["id"] == DEFAULT_MODEL_ID and m.get("status") == "loaded" for m in listing["data"])


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, subprocess.Popen[bytes], Path, int]]:
    gateway, metrics, neuron = free_port(), free_port(), free_port()
    log_path = tmp_path_factory.mktemp("up") / "cortex-up.log"
    args = [sys.executable, "-m", "cortex.cli.cortex_cmd", "up", "--listen", f"127.0.0.1:{gateway}"]
    args += ["--metrics-listen", f"127.0.0.1:{metrics}", "--neuron-listen", f"127.0.0.1:{neuron}"]
    proc = spawn(args, log_path)
    url = f"http://127.0.0.1:{gateway}"
    deadline = time.monotonic() + START_LIMIT_S
    try:
        # What a user waits for: the "ready" line. Once it is printed a model must answer (the tests below).
        # Any other outcome ends the wait at once, with everything `up` printed.
        while "ready in " not in (text := log_path.read_text()):
            assert proc.poll() is None, text
            assert not re.search(r"^up in \d+ s", text, re.MULTILINE), text
            assert time.monotonic() < deadline, f"no 'ready' line after {START_LIMIT_S} s:\n{text}"
            time.sleep(0.5)
        assert _models_ready(url), log_path.read_text()
        yield url, proc, log_path, neuron
    finally:
        if proc.poll() is None:
            proc.kill()


def test_openai_sdk_gets_paris(fleet: tuple[str, subprocess.Popen[bytes], Path, int]) -> None:
    url = fleet[0]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    reply = client.chat.completions.create(
        model=DEFAULT_MODEL_ID, messages=[{"role": "user", "content": QUESTION}], max_tokens=30
    )
    assert "Paris" in (reply.choices[0].message.content or "")
    assert reply.usage is not None and reply.usage.completion_tokens > 0


def test_anthropic_sdk_streams_paris(fleet: tuple[str, subprocess.Popen[bytes], Path, int]) -> None:
    url = fleet[0]
    client = anthropic.Anthropic(base_url=url, api_key="unused")
    with client.messages.stream(
        model="smollm2", max_tokens=30, messages=[{"role": "user", "content": QUESTION}]
    ) as stream:
        message = stream.get_final_message()
    text = "".join(block.text for block in message.content if block.type == "text")
    assert "Paris" in text
    assert message.stop_reason == "end_turn"
    assert message.usage.output_tokens > 0


def test_both_sdks_list_and_retrieve_models(fleet: tuple[str, subprocess.Popen[bytes], Path, int]) -> None:
    url = fleet[0]
    oa = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    assert DEFAULT_MODEL_ID in {m.id for m in oa.models.list()}
    assert oa.models.retrieve(DEFAULT_MODEL_ID).id == DEFAULT_MODEL_ID
    with pytest.raises(openai.NotFoundError):
        oa.models.retrieve("no-such-model")
    an = anthropic.Anthropic(base_url=url, api_key="unused")
    listed = an.models.list()
    assert {DEFAULT_MODEL_ID, "smollm2"} <= {m.id for m in listed.data}
    assert an.models.retrieve("smollm2").type == "model"
    with pytest.raises(anthropic.NotFoundError) as missing:
        an.models.retrieve("no-such-model")
    assert missing.value.body["error"]["type"] == "not_found_error"


def test_models_advertise_context_and_tools(fleet: tuple[str, subprocess.Popen[bytes], Path, int]) -> None:
    """Where clients look for them: `context_length`/`max_model_len`, `supported_parameters`, `tool_call`."""
    with urllib.request.urlopen(f"{fleet[0]}/v1/models", timeout=5) as resp:
        entries = {m["id"]: m for m in json.loads(resp.read())["data"]}
    for name in (DEFAULT_MODEL_ID, "smollm2"):
        entry = entries[name]
        assert entry["context_length"] == entry["max_model_len"] == 8192
        assert isinstance(entry["tool_call"], bool)
        assert ("tools" in entry["supported_parameters"]) is entry["tool_call"]


def test_unknown_anthropic_route_answers_in_anthropic_envelope(
    fleet: tuple[str, subprocess.Popen[bytes], Path, int],
) -> None:
    request = urllib.request.Request(f"{fleet[0]}/v1/messages/batches", method="POST", data=b"{}")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=5)
    assert err.value.code == 404
    body = json.loads(err.value.read())
    assert body["type"] == "error" and body["error"]["type"] == "not_found_error"


def test_start_up_is_told_truthfully(fleet: tuple[str, subprocess.Popen[bytes], Path, int]) -> None:
    """Progress from the neuron's /models, no tqdm bars, "ready" once a model answers, then the next steps."""
    url, _, log_path, _ = fleet
    log = log_path.read_text()
    assert f"loading {DEFAULT_MODEL_ID} on local:" in log
    ready = log.index("ready in ")
    assert log.index(f"loading {DEFAULT_MODEL_ID} on local: 100% loaded") < ready
    assert f"{DEFAULT_MODEL_ID} (alias smollm2) answers on local" in log
    for step in (f"OPENAI_BASE_URL={url}/v1", f"ANTHROPIC_BASE_URL={url}", "/metrics", f"{url}/ui", "cortex status"):
        assert step in log[ready:], step
    assert "it/s]" not in log and "Converting and de-quantizing" not in log  # no tqdm bars
    assert "event=model.load.start" not in log[:ready]  # info lines wait while the progress is shown


def test_documented_snippets_run(fleet: tuple[str, subprocess.Popen[bytes], Path, int], tmp_path: Path) -> None:
    """Every runnable command and every Python block of README.md and docs/*.md, against this fleet.

    The documented ports (31313, 31314, 13131) are replaced by this fleet's; which commands run and
    which are covered elsewhere is decided in tests/e2e/snippets.py (tests/e2e/test_docs.py checks it).
    """
    url, _, log_path, neuron_port = fleet
    port = url.rsplit(":", 1)[1]
    metrics_port = re.search(r"metrics\s+http://127\.0\.0\.1:(\d+)/metrics", log_path.read_text()).group(1)
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "CORTEX_URL": url, "PATH": f"{venv_bin}:{os.environ['PATH']}", "COLUMNS": "200"}

    def local(text: str) -> str:
        text = re.sub(r"(localhost|127\.0\.0\.1):31313", f"127.0.0.1:{port}", text)
        text = re.sub(r"(localhost|127\.0\.0\.1):31314", f"127.0.0.1:{metrics_port}", text)
        return re.sub(r"(localhost|127\.0\.0\.1):13131", f"127.0.0.1:{neuron_port}", text)

    ran = 0
    for block in snippets.blocks():
        if block.lang == "python" and snippets.is_program(block):
            args = [sys.executable, "-c", local(block.text)]
            done = subprocess.run(args, capture_output=True, text=True, env=env, cwd=snippets.ROOT, timeout=300)
            assert done.returncode == 0, f"{block.where}:\n{done.stderr}"
            ran += 1
        if block.lang != "bash":
            continue
        for command in snippets.commands(block):
            if snippets.covered_by(command) or not snippets.RUNNABLE.search(command):
                continue
            args = ["bash", "-c", local(command)]
            done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300, cwd=snippets.ROOT)
            assert done.returncode == 0, f"{block.where}: {command}\n{done.stdout}\n{done.stderr}"
            if command.startswith("curl"):
                assert '"error"' not in done.stdout, f"{block.where}: {command}\n{done.stdout}"
            ran += 1
    assert ran >= 5


def test_ctrl_c_stops_gateway_and_neuron(fleet: tuple[str, subprocess.Popen[bytes], Path, int]) -> None:
    """Runs last in this module: it stops the fleet the other tests used."""
    url, proc, log_path, neuron_port = fleet
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0, log_path.read_text()
    log = log_path.read_text()
    assert "event=neuron.stopped" in log
    for port in (int(url.rsplit(":", 1)[1]), neuron_port):
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
