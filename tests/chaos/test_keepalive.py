"""A real neuron's keep-alive comments during a stream's prefill, and what an SDK client makes of them.

The neuron sends `: keep-alive` every `stream_keepalive_s` until a stream's first output (here
1 ms, so every prefill shows some); the gateway reads past them (they are not output) and its
clients hear only its own keep-alives: the OpenAI SDK's stream, through the gateway, is the same
text as the neuron's whole answer. The interplay with the gateway's timeouts is in
tests/gateway/test_relay.py.
"""

from __future__ import annotations

from pathlib import Path

import aiohttp
import openai

from tests.chaos.conftest import chaos_gateway_toml
from tests.support.gateway_procs import run_gateway
from tests.support.procs import cpu_neuron_toml, run_neuron, wait_model_status

MODEL = "tiny"
# A long prompt: the prefill is the wait the keep-alives cover.
PROMPT = " ".join(f"word{i}" for i in range(100))
BODY = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 16, "temperature": 0}


async def test_keepalive_comments_cover_the_prefill_and_never_reach_an_sdk_as_content(
    tmp_path: Path, tiny_model: Path
) -> None:
    with run_neuron(tmp_path, "stream_keepalive_s = 0.001\n" + cpu_neuron_toml(tiny_model, MODEL)) as neuron:
        wait_model_status(neuron.url, MODEL)
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{neuron.url}/v1/chat/completions", json={**BODY, "stream": True}) as resp:
                lines = [line.decode().rstrip("\n") for line in (await resp.read()).split(b"\n") if line]
            async with http.post(f"{neuron.url}/v1/chat/completions", json=BODY) as resp:
                whole = (await resp.json())["choices"][0]["message"]["content"]
        first_text = next(i for i, line in enumerate(lines) if '"content":"' in line and '"content":""' not in line)
        assert ": keep-alive" in lines[:first_text], lines[:5]
        assert ": keep-alive" not in lines[first_text:]  # only until the first output
        with run_gateway(tmp_path, chaos_gateway_toml({"n": neuron.url}), wait_healthy=1) as gateway:
            client = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="none", max_retries=0)
            stream = await client.chat.completions.create(**BODY, stream=True)
            text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
            await client.close()
        assert text == whole
