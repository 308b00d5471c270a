"""A tiny Llama trained (overfit, seconds on CPU) to run one two-turn weather tool loop.

Random-weight models never write a tool call, so this one learns exactly two replies under greedy
decoding, with SmolLM2's tokenizer and the Hermes-style `TOOL_TEMPLATE`:

- the user asks for the weather in Paris, a `get_weather` tool is offered: `TOOL_CALL_REPLY`;
- the conversation ends with that tool's result (`TOOL_RESULT`): `ANSWER`.

It trains on prompts rendered the way the neuron renders them (its own `ChatRenderer`), in several
variants of each turn (system message or not, tool description or not, how the assistant's call
was serialised), so every API path through the gateway lands on a prompt it knows.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from tests.support.models import TOOL_TEMPLATE, smollm_gguf, tiny_llama_config

QUESTION = "What's the weather in Paris?"
TOOL_NAME = "get_weather"
TOOL_DESCRIPTION = "Get the current weather for a city."
TOOL_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
}
TOOL_ARGUMENTS = {"city": "Paris"}
TOOL_RESULT = "sunny, 24C"
TOOL_CALL_REPLY = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
ANSWER = "It is sunny and 24C in Paris."
SYSTEM_PROMPT = "You are a helpful assistant."

SYSTEMS = (None, SYSTEM_PROMPT)
MAX_STEPS = 400


def chat_tool(*, description: bool = True) -> dict[str, Any]:
    """The tool in OpenAI Chat shape (what the neuron receives from every dialect)."""
    # Key order as the neuron's request model dumps it (the template renders the tool with `tojson`).
    function: dict[str, Any] = {"name": TOOL_NAME}
    if description:
        function["description"] = TOOL_DESCRIPTION
    function["parameters"] = copy.deepcopy(TOOL_PARAMETERS)
    return {"type": "function", "function": function}


def _assistant_call(arguments: Any, content: Any) -> dict[str, Any]:
    call = {"id": "call_0", "type": "function", "function": {"name": TOOL_NAME, "arguments": arguments}}
    return {"role": "assistant", "content": content, "tool_calls": [call]}


def training_conversations() -> list[tuple[list[dict[str, Any]], list[dict[str, Any]], str]]:
    """(messages, tools, reply) triples: both turns, in every variant the API paths may produce."""
    examples = []
    for system in SYSTEMS:
        head = [{"role": "system", "content": system}] if system else []
        for description in (True, False):
            tools = [chat_tool(description=description)]
            user = {"role": "user", "content": QUESTION}
            examples.append(([*head, user], tools, TOOL_CALL_REPLY))
            tool = {"role": "tool", "tool_call_id": "call_0", "content": TOOL_RESULT}
            for arguments in (json.dumps(TOOL_ARGUMENTS), '{"city":"Paris"}', dict(TOOL_ARGUMENTS)):
                for content in (None, ""):
                    examples.append(([*head, user, _assistant_call(arguments, content), tool], tools, ANSWER))
    return examples


def build_tool_calling_model(out: Path, *, seed: int = 0, hidden: int = 64, layers: int = 2) -> Path:
    """Build, train, check and save (safetensors + tokenizer) the tool-calling model in `out`."""
    from transformers import AutoTokenizer

    from cortex.neuron.engine.chat import ChatRenderer

    if (out / "config.json").exists():
        return out
    directory, gguf = smollm_gguf()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
    tokenizer.chat_template = TOOL_TEMPLATE
    renderer = ChatRenderer(tokenizer)
    eos = tokenizer.eos_token_id

    # Renders that coincide after the neuron's normalisation (arguments, None vs "") are trained once.
    samples: dict[tuple[int, ...], list[int]] = {}
    for messages, tools, reply in training_conversations():
        prompt = tuple(renderer.render(messages, tools))
        samples[prompt] = [*tokenizer.encode(reply, add_special_tokens=False), eos]

    return train_and_save(out, tokenizer, samples, seed=seed, hidden=hidden, layers=layers)


def train_and_save(
    out: Path, tokenizer: Any, samples: dict[tuple[int, ...], list[int]], *, seed: int, hidden: int, layers: int
) -> Path:
    """A tiny Llama trained until greedy decoding gives each prompt its reply (token ids), saved in `out`."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(tokenizer, hidden=hidden, layers=layers, context=1024))
    _train(model, samples, torch)
    model.eval()
    _check_greedy(model, samples, tokenizer, torch)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def _train(model: Any, samples: dict[tuple[int, ...], list[int]], torch: Any) -> None:
    """Teacher-forced cross-entropy on the reply tokens only, the whole set as one padded batch."""
    sequences = [list(prompt) + reply for prompt, reply in samples.items()]
    width = max(len(s) for s in sequences)
    input_ids = torch.zeros(len(sequences), width, dtype=torch.long)
    attention = torch.zeros(len(sequences), width, dtype=torch.long)
    rows, cols, targets = [], [], []
    for row, ((prompt, reply), sequence) in enumerate(zip(samples.items(), sequences, strict=True)):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        attention[row, : len(sequence)] = 1
        for offset, token in enumerate(reply):
            rows.append(row)
            cols.append(len(prompt) - 1 + offset)  # the position whose next token is `token`
            targets.append(token)
    rows_t, cols_t, targets_t = torch.tensor(rows), torch.tensor(cols), torch.tensor(targets)

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(MAX_STEPS):
        hidden = model.model(input_ids=input_ids, attention_mask=attention).last_hidden_state
        logits = model.lm_head(hidden[rows_t, cols_t])  # only the reply positions: the vocab is 49k wide
        loss = torch.nn.functional.cross_entropy(logits, targets_t)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            top2 = logits.topk(2, dim=-1)
            right = top2.indices[:, 0] == targets_t
            margin = (top2.values[:, 0] - top2.values[:, 1]).min()
        if bool(right.all()) and float(margin) > 4.0:  # comfortably greedy-correct everywhere
            return
    raise RuntimeError(f"tool model did not converge in {MAX_STEPS} steps (loss {loss.item():.3f})")


def _check_greedy(model: Any, samples: dict[tuple[int, ...], list[int]], tokenizer: Any, torch: Any) -> None:
    """Greedy generation, as the neuron will run it, must reproduce every reply exactly."""
    with torch.no_grad():
        for prompt, reply in samples.items():
            ids = torch.tensor([list(prompt)])
            output = model.generate(ids, max_new_tokens=len(reply) + 4, do_sample=False, eos_token_id=reply[-1])
            produced = output[0, len(prompt) :].tolist()
            if produced != reply:
                wanted, got = tokenizer.decode(reply), tokenizer.decode(produced)
                raise RuntimeError(f"trained tool model replies {got!r}, wanted {wanted!r}")
