"""CPU projections on oneDNN-packed weights (cpu_linear.py): same results, batch-invariant, reported, released."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from cortex.neuron.engine import Engine, GenerationRequest, LoadedModel, SamplingParams, TextDelta
from cortex.neuron.engine.cpu_linear import FusedPart, PackedLinear, pack_linears

torch.set_num_threads(1)

GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)


def load(directory: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()


def linears(module: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in module.modules() if isinstance(m, torch.nn.Linear | PackedLinear | FusedPart)]


def test_packed_model_computes_what_the_plain_one_does(tiny_model: Path) -> None:
    plain, packed = load(tiny_model), load(tiny_model)
    stats = pack_linears(packed, torch.device("cpu"))
    assert stats.reason is None
    assert stats.packed == len(linears(plain)) > 0
    layers = len(plain.model.layers)
    assert stats.fused == 2 * layers  # q/k/v and gate/up of every layer
    assert sum(type(m) is FusedPart for m in linears(packed)) == 5 * layers
    assert all(type(m) in (PackedLinear, FusedPart) for m in linears(packed))
    ids = torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        want, got = plain(ids).logits, packed(ids).logits
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_only_a_shared_weight_is_kept_beside_its_packed_copy(tiny_model: Path) -> None:
    module = load(tiny_model)  # the tiny model ties its LM head to the embedding
    head_bytes = module.lm_head.weight.numel() * 4
    stats = pack_linears(module, torch.device("cpu"))
    assert module.lm_head.weight is module.model.embed_tokens.weight  # the embedding still needs it
    assert stats.extra_bytes == head_bytes
    layer = module.model.layers[0]
    assert layer.self_attn.q_proj.weight is None  # its packed copy replaced it: no second copy in memory
    assert "self_attn.q_proj.weight" not in dict(layer.named_parameters())


def test_rows_do_not_depend_on_what_shares_their_product(tiny_model: Path) -> None:
    """Each row of a packed product is bit-for-bit the same alone, in a pair, or among nine."""
    module = load(tiny_model)
    pack_linears(module, torch.device("cpu"))
    layer = module.model.layers[0].mlp.up_proj
    rows = torch.randn(9, layer.in_features, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        together = layer(rows)
        assert all(torch.equal(layer(rows[i : i + 1]), together[i : i + 1]) for i in range(9))
        assert torch.equal(layer(rows[2:4]), together[2:4])


def test_a_fused_sibling_answers_any_call_order_and_input(tiny_model: Path) -> None:
    """Out of order, asked twice, or on another input: each part is still its own projection of its input."""
    plain, module = load(tiny_model), load(tiny_model)
    pack_linears(module, torch.device("cpu"))
    want_attn, attn = plain.model.layers[0].self_attn, module.model.layers[0].self_attn
    x, y = torch.randn(2, 5, attn.q_proj.in_features, generator=torch.Generator().manual_seed(9))

    def close(got: torch.Tensor, want: torch.nn.Linear, on: torch.Tensor) -> bool:
        return torch.allclose(got, want(on), rtol=1e-4, atol=1e-5)

    with torch.inference_mode():
        assert close(attn.k_proj(x), want_attn.k_proj, x)  # k before q
        assert close(attn.k_proj(x), want_attn.k_proj, x)  # the same part twice
        assert close(attn.q_proj(y), want_attn.q_proj, y)  # another input before v
        assert close(attn.v_proj(x), want_attn.v_proj, x)
        assert close(attn.v_proj(y), want_attn.v_proj, y)
        for _ in range(2):  # the usual order, twice over: slices of one product
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
            assert close(q, want_attn.q_proj, x) and close(k, want_attn.k_proj, x) and close(v, want_attn.v_proj, x)
        assert attn.q_proj.shared._input is None  # every part taken: nothing held between calls


@pytest.mark.parametrize(
    ("dtype", "device", "enabled", "reason"),
    [
        (torch.float64, "cpu", True, "not a float32 model"),
        (torch.float32, "cpu", False, "disabled by config ([engine] cpu_onednn = false)"),
        (torch.float32, "meta", True, "not a CPU device"),
    ],
)
def test_what_is_not_packed_says_why(
    tiny_model: Path, dtype: torch.dtype, device: str, enabled: bool, reason: str
) -> None:
    module = load(tiny_model, dtype)
    stats = pack_linears(module, torch.device(device), enabled)
    assert (stats.packed, stats.reason) == (0, reason)
    assert all(type(m) is torch.nn.Linear for m in linears(module))


async def answer(model: LoadedModel, prompt: str) -> str:
    request = GenerationRequest("packed", model.encode(prompt), GREEDY)
    return "".join([e.text async for e in model.generate(request) if isinstance(e, TextDelta)])


async def test_engine_serves_packed_reports_it_and_frees_it_on_unload(tiny_model: Path) -> None:
    module = load(tiny_model)
    packed_engine, plain_engine = Engine(["cpu"]), Engine(["cpu"], cpu_onednn=False)
    try:
        model = await packed_engine.adopt("tiny-packed", "cpu", lambda: (module, _tokenizer(tiny_model)))
        plain = await plain_engine.adopt("tiny-plain", "cpu", lambda: (load(tiny_model), _tokenizer(tiny_model)))
        report = model.kv_stats()["cpu_onednn"]
        assert report["packed"] == len(linears(module)) and report["reason"] is None
        assert report["fused_groups"] == 2 * len(module.model.layers)
        assert plain.kv_stats()["cpu_onednn"]["packed"] == 0
        assert model.memory_bytes >= model.info.memory_bytes + model.pack_stats.extra_bytes
        for prompt in ("Name a colour.", "Count to three."):
            assert await answer(model, prompt) == await answer(plain, prompt)
        await packed_engine.unload(model)
        assert all(m.packed is None for m in module.modules() if isinstance(m, PackedLinear))
        assert all(m.shared.packed is None for m in module.modules() if isinstance(m, FusedPart))
    finally:
        packed_engine.close()
        plain_engine.close()


def _tokenizer(directory: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)
