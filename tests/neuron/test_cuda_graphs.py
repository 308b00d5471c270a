"""Decode-graph replay: buckets, padding and static buffers, checked on CPU against the eager forward.

A CUDA graph cannot be captured here; `EagerReplay` runs the very step that would be captured, over
the same static buffers with the same padding, so everything but the recording itself is exercised.
The real capture runs in benchmarks/gpu/run.sh.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cortex.neuron.engine import Engine, LoadSpec, ModelSource
from cortex.neuron.engine.attention import AttentionContext, KVPool, PrefillChunk
from cortex.neuron.engine.compile import compile_cuda_layers
from cortex.neuron.engine.cuda_graphs import (
    DecodeGraphs,
    attention_bytes,
    batch_buckets,
    bucket_for,
    capture_decode_graphs,
    width_buckets,
)
from cortex.neuron.engine.graph_backends import EagerReplay
from cortex.neuron.engine.runner import ModelRunner, StepBatch
from tests.support.procs import run_neuron, wait_model_status

BLOCK = 4
LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 8


def test_batch_buckets_double_up_to_the_maximum() -> None:
    assert batch_buckets(1) == [1]
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 32]
    assert batch_buckets(24) == [1, 2, 4, 8, 16, 24]
    assert batch_buckets(0) == []


def test_width_buckets_double_to_2048_tokens_then_grow_fourfold() -> None:
    assert width_buckets(2560, 16) == [16, 32, 64, 128, 512, 2048, 2560]  # 256, 512, 1k, 2k, 8k, 32k, 40k tokens
    assert width_buckets(2048, 16) == [16, 32, 64, 128, 512, 2048]  # a 32k context: 6 widths
    assert width_buckets(8, 16) == [8]  # a context shorter than the first bucket
    assert width_buckets(16, 16) == [16]


def test_bucket_for_picks_the_smallest_that_holds() -> None:
    assert [bucket_for(n, [1, 2, 4, 8]) for n in (1, 3, 8, 9)] == [1, 4, 8, None]


def test_attention_bytes_counts_keys_and_values() -> None:
    assert attention_bytes(2, 3, 16, 8, 128, torch.bfloat16) == 2 * 2 * 3 * 16 * 8 * 128 * 2


def test_cpu_never_captures() -> None:
    runner, _ = tiny_runner()
    stats = capture_decode_graphs(runner, max_batch=8, max_blocks=16)
    assert not stats.enabled
    assert stats.reason == "not a CUDA device"
    assert getattr(runner, "graphs", None) is None


def tiny_runner() -> tuple[ModelRunner, KVPool]:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=97,
        hidden_size=LAYERS * 16,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    module = LlamaForCausalLM(config).to(torch.float64).eval()
    kv = KVPool(LAYERS, 32, BLOCK, KV_HEADS, HEAD_DIM, torch.float64, torch.device("cpu"))
    kv.storage.zero_()
    return ModelRunner(module, "cpu", kv), kv


SEQUENCES = [  # (prompt tokens, blocks)
    ([5, 9, 2, 7, 1, 3], [1, 2]),
    ([11, 4], [3]),
    ([8, 8, 6, 2, 9, 10, 12, 13, 14], [4, 5, 6]),
]


def prefill(runner: ModelRunner, kv: KVPool) -> None:
    with torch.inference_mode():
        for tokens, blocks in SEQUENCES:
            n = len(tokens)
            slots = torch.tensor([blocks[p // BLOCK] * BLOCK + p % BLOCK for p in range(n)])
            chunk = PrefillChunk(0, n, n, torch.tensor(blocks), None)
            context = AttentionContext(kv, slots, prefills=[chunk])
            runner.forward(StepBatch(torch.tensor([tokens]), torch.arange(n)[None], torch.tensor([n - 1]), context))


def decode_batch(rows: list[int], next_tokens: list[int]) -> StepBatch:
    """One decode token for each sequence in `rows` (its next position after the prompt)."""
    positions = [len(SEQUENCES[r][0]) for r in rows]
    tables = [SEQUENCES[r][1] for r in rows]
    slots = [t[p // BLOCK] * BLOCK + p % BLOCK for t, p in zip(tables, positions, strict=True)]
    width = max(len(t) for t in tables)
    context = AttentionContext(
        kv=KV_HOLDER[0],
        slot_mapping=torch.tensor(slots),
        num_decode=len(rows),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        context_lens=torch.tensor([p + 1 for p in positions]),
    )
    return StepBatch(torch.tensor([next_tokens]), torch.tensor([positions]), torch.arange(len(rows)), context)


KV_HOLDER: list[KVPool] = []


@pytest.fixture
def prefilled() -> tuple[ModelRunner, KVPool]:
    runner, kv = tiny_runner()
    KV_HOLDER[:] = [kv]
    prefill(runner, kv)
    return runner, kv


@pytest.mark.parametrize("rows", [[0], [0, 1, 2], [2, 0]])
def test_replay_with_padding_equals_the_eager_step(prefilled: tuple[ModelRunner, KVPool], rows: list[int]) -> None:
    runner, kv = prefilled
    tokens = [17, 23, 31][: len(rows)]
    before = kv.storage.clone()
    with torch.inference_mode():
        eager = runner.forward(decode_batch(rows, tokens)).clone()
    eager_kv = kv.storage.clone()
    kv.storage.copy_(before)

    # max_blocks 100 → widths of 64 and 100 blocks: the step (≤ 3 blocks) pads to 64 columns; 3 rows pad to 4.
    graphs = DecodeGraphs(runner, max_batch=4, max_blocks=100, backend=EagerReplay())
    stats = graphs.capture()
    assert (stats.batch_sizes, stats.widths_tokens, stats.graphs) == ([1, 2, 4], [64 * BLOCK, 100 * BLOCK], 6)
    assert torch.equal(kv.storage[:, :, 1:], before[:, :, 1:])  # capture touched only the padding block
    assert not kv.storage[:, :, 0].any()  # … and left it zeroed
    runner.graphs = graphs
    with torch.inference_mode():
        replayed = runner.forward(decode_batch(rows, tokens))
    assert graphs.stats.replays == 1
    assert replayed.shape == eager.shape
    torch.testing.assert_close(replayed, eager, rtol=0, atol=1e-12)
    # Every real block holds what the eager step wrote; padding rows wrote only into block 0.
    torch.testing.assert_close(kv.storage[:, :, 1:], eager_kv[:, :, 1:], rtol=0, atol=1e-12)


def test_steps_no_graph_covers_run_eagerly(prefilled: tuple[ModelRunner, KVPool]) -> None:
    runner, kv = prefilled
    graphs = DecodeGraphs(runner, max_batch=2, max_blocks=8, backend=EagerReplay())
    graphs.capture()
    runner.graphs = graphs
    with torch.inference_mode():
        three = decode_batch([0, 1, 2], [1, 2, 3])
        assert graphs.replay(three) is None  # more rows than the largest bucket
        runner.forward(three)
        n = 2
        prefill_step = StepBatch(
            torch.tensor([[4, 5]]),
            torch.arange(n)[None],
            torch.tensor([n - 1]),
            AttentionContext(kv, torch.tensor([40, 41]), prefills=[PrefillChunk(0, n, n, torch.tensor([10]), None)]),
        )
        assert graphs.replay(prefill_step) is None  # a prefill chunk is never captured
    assert graphs.stats.eager_decodes == 2  # the direct call and the one inside forward
    assert graphs.stats.replays == 0


def test_memory_budget_leaves_wide_pairs_to_eager(prefilled: tuple[ModelRunner, KVPool]) -> None:
    runner, _ = prefilled
    graphs = DecodeGraphs(runner, max_batch=4, max_blocks=100, backend=EagerReplay())
    budget = attention_bytes(4, 64, BLOCK, KV_HEADS, HEAD_DIM, torch.float64)
    stats = graphs.capture(memory_budget=budget)
    # (4, 100) is over budget; everything else fits.
    assert stats.graphs == 5
    with torch.inference_mode():
        assert graphs.replay(decode_batch([0, 1, 2], [1, 2, 3])) is not None  # 3 rows, 3 blocks → (4, 64)


async def test_a_cpu_model_reports_graphs_off_with_the_reason(tiny_model: Path) -> None:
    engine = Engine(["cpu"])
    try:
        model = await engine.load(LoadSpec("tiny", ModelSource("local", str(tiny_model)), device="cpu"))
        graphs = model.kv_stats()["cuda_graphs"]
        assert (graphs["enabled"], graphs["reason"], graphs["graphs"]) == (False, "not a CUDA device", 0)
        assert model._scheduler.runner is not None and model._scheduler.runner.graphs is None
    finally:
        engine.close()


async def test_graphs_that_cannot_be_captured_over_compiled_layers_are_captured_over_eager_ones(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`cuda_compile` has not run on a GPU yet: if capture fails over the compiled layers, the compile is
    undone (with the reason) and the graphs captured again, since graphs are worth far more than fusion.
    The capture itself is stubbed: there is no CUDA here."""
    import cortex.neuron.engine.model as model_module
    from cortex.neuron.engine.compile import CompileStats
    from cortex.neuron.engine.cuda_graphs import GraphStats

    engine = Engine(["cpu"])
    try:
        model = await engine.load(LoadSpec("tiny", ModelSource("local", str(tiny_model)), device="cpu"))
        runner = model._scheduler.runner
        assert runner is not None

        class Layers:  # stands in for CompiledLayers: only its undo matters here
            undone = 0

            def undo(self) -> None:
                Layers.undone += 1

        def capture(runner: ModelRunner, **_: object) -> GraphStats:
            if runner.compiled is not None:
                reason = "capture failed: RuntimeError: operation not permitted when capturing"
                return GraphStats(reason=reason, failed=True)
            return GraphStats(enabled=True, graphs=3)

        monkeypatch.setattr(model_module, "capture_decode_graphs", capture)
        runner.compiled = Layers()  # type: ignore[assignment]
        model.compile_stats = CompileStats(compiled=True, scope="layers")
        model._capture_graphs(True, None)
        assert (Layers.undone, runner.compiled) == (1, None)
        assert (model.graph_stats.enabled, model.graph_stats.graphs) == (True, 3)
        report = model.kv_stats()["compile"]
        assert report["compiled"] is False and report["scope"] == "layers"
        assert report["reason"].startswith("undone: graphs could not be captured over it (capture failed: RuntimeError")
    finally:
        engine.close()


def test_the_config_switch_reaches_the_engine(tmp_path: Path, tiny_model: Path) -> None:
    toml = (
        f'model_roots = ["{tiny_model.parent}"]\n[devices]\nuse = "cpu"\n[engine]\ncuda_graphs = false\n'
        f'[[default_models]]\nmodel_id = "tiny"\nsource = "{tiny_model}"\n'
    )
    with run_neuron(tmp_path, toml) as neuron:
        entry = wait_model_status(neuron.url, "tiny")
    assert entry["kv"]["cuda_graphs"]["reason"] == "disabled by config ([engine] cuda_graphs = false)"


async def test_unload_frees_the_graphs_the_kv_pool_and_the_weights(tiny_model: Path) -> None:
    """Nothing of a model with (stand-in) decode graphs outlives its unload: module, KV storage, static buffers."""
    import gc
    import weakref

    from cortex.neuron.engine import GenerationRequest, SamplingParams

    engine = Engine(["cpu"])
    try:
        model = await engine.load(LoadSpec("tiny", ModelSource("local", str(tiny_model)), device="cpu"))
        runner = model._scheduler.runner
        assert runner is not None and runner.kv is not None and runner.module is not None

        def attach(runner: ModelRunner = runner) -> DecodeGraphs:
            graphs = DecodeGraphs(runner, max_batch=4, max_blocks=64, backend=EagerReplay())
            graphs.capture()
            runner.graphs = graphs
            return graphs

        graphs = await model._worker.call(attach)
        refs = {
            "module": weakref.ref(runner.module),
            "kv storage": weakref.ref(runner.kv.storage),
            "graphs": weakref.ref(graphs),
            "static ids": weakref.ref(graphs.input_ids),
            "graph logits": weakref.ref(next(iter(graphs._graphs.values())).logits),
        }
        del graphs, runner
        sampling = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)
        async for _ in model.generate(GenerationRequest("r", [1, 2, 3], sampling)):
            pass
        assert model.kv_stats()["cuda_graphs"] is not None
        assert await engine.unload(model) > 0
        gc.collect()
        assert [name for name, ref in refs.items() if ref() is not None] == []
    finally:
        engine.close()


def test_released_graphs_and_runner_hold_nothing(prefilled: tuple[ModelRunner, KVPool]) -> None:
    import gc
    import weakref

    runner, kv = prefilled
    graphs = DecodeGraphs(runner, max_batch=2, max_blocks=8, backend=EagerReplay())
    graphs.capture()
    runner.graphs = graphs
    assert runner.module is not None
    module, storage = weakref.ref(runner.module), weakref.ref(kv.storage)
    KV_HOLDER.clear()
    del kv
    runner.release()
    assert graphs.runner is None and graphs.kv is None and not graphs._graphs
    del graphs
    gc.collect()
    assert module() is None and storage() is None


def mixed_batch(kv: KVPool, rows: list[int], tokens: list[int], sampling: bool) -> StepBatch:
    """Decode rows for `rows`, then a 3-token prefill chunk of a new sequence in block 10 (sampling or not)."""
    decode = decode_batch(rows, tokens)
    n = len(rows)
    chunk = [4, 5, 6]
    ids = torch.cat([decode.input_ids[0], torch.tensor(chunk)])[None]
    positions = torch.cat([decode.positions[0], torch.arange(3)])[None]
    slots = torch.cat([decode.context.slot_mapping, torch.tensor([40, 41, 42])])
    keep = torch.cat([torch.arange(n), torch.tensor([n + 2])]) if sampling else torch.arange(n)
    context = AttentionContext(
        kv,
        slots,
        num_decode=n,
        block_tables=decode.context.block_tables,
        context_lens=decode.context.context_lens,
        prefills=[PrefillChunk(n, 3, 3, torch.tensor([10]), None)],
    )
    return StepBatch(ids, positions, keep, context)


@pytest.mark.parametrize("sampling", [True, False])
def test_a_mixed_step_runs_its_decoders_from_the_graph_and_equals_the_eager_step(
    prefilled: tuple[ModelRunner, KVPool], sampling: bool
) -> None:
    runner, kv = prefilled
    before = kv.storage.clone()
    with torch.inference_mode():
        eager = runner.forward(mixed_batch(kv, [0, 2], [17, 23], sampling)).clone()
    eager_kv = kv.storage.clone()
    kv.storage.copy_(before)
    graphs = DecodeGraphs(runner, max_batch=4, max_blocks=8, backend=EagerReplay())
    graphs.capture()
    runner.graphs = graphs
    with torch.inference_mode():
        mixed = runner.forward(mixed_batch(kv, [0, 2], [17, 23], sampling))
    assert (graphs.stats.replays, graphs.stats.mixed_replays) == (1, 1)
    assert mixed.shape == eager.shape == (3 if sampling else 2, 97)
    torch.testing.assert_close(mixed, eager, rtol=0, atol=1e-12)
    torch.testing.assert_close(kv.storage[:, :, 1:], eager_kv[:, :, 1:], rtol=0, atol=1e-12)


def test_layers_compiled_before_capture_share_one_graph_and_replay_the_eager_step(
    prefilled: tuple[ModelRunner, KVPool],
) -> None:
    """`[engine] cuda_compile`: every layer compiled in place, one graph for all (the layer index is a
    buffer, not an int to specialise on), compiled before capture so nothing compiles while recording."""
    runner, kv = prefilled
    before = kv.storage.clone()
    with torch.inference_mode():
        eager = runner.forward(decode_batch([0, 1, 2], [17, 23, 29])).clone()
    kv.storage.copy_(before)
    stats = compile_cuda_layers(runner, enabled=True)
    assert (stats.compiled, stats.scope, stats.reason) == (True, "layers", None)
    assert stats.graphs == 2  # a one-token step and a dynamic one, for both layers
    graphs = DecodeGraphs(runner, max_batch=4, max_blocks=8, backend=EagerReplay())
    graphs.capture()
    runner.graphs = graphs
    with torch.inference_mode():
        replayed = runner.forward(decode_batch([0, 1, 2], [17, 23, 29]))
    assert graphs.stats.replays == 1
    # float32-close, not float64-equal: the model's RMSNorm rounds through float32, which fusion may skip
    torch.testing.assert_close(replayed, eager, rtol=1e-5, atol=1e-6)
    assert stats.steps >= graphs.stats.graphs and stats.recompiles == 0  # every captured step ran compiled
    assert compile_cuda_layers(runner, enabled=False).reason == "disabled by config ([engine] cuda_compile = false)"


class _FakeGraph:
    def __init__(self) -> None:
        self.resets = 0

    def reset(self) -> None:
        self.resets += 1


def test_releasing_the_cuda_backend_resets_every_graph_and_drops_cublas_workspaces(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Unload must not leave the private pool pinned: by a graph object someone still holds (reset it
    explicitly), or by the cuBLAS workspace cached for the capture stream, which lives in that pool."""
    import cortex.neuron.engine.graph_backends as graph_backends

    cleared: list[str] = []
    monkeypatch.setattr(graph_backends, "clear_cublas_workspaces", lambda: cleared.append("cleared"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    backend = graph_backends.CudaGraphBackend(torch.device("cpu"))
    graphs = [_FakeGraph(), _FakeGraph()]
    backend.graphs.extend(graphs)
    backend.pool = (1, 0)
    backend.release()
    assert [g.resets for g in graphs] == [1, 1]
    assert backend.graphs == [] and backend.pool is None
    assert cleared == ["cleared"]


def test_capture_tells_the_backend_when_it_is_done_and_release_reaches_it(
    prefilled: tuple[ModelRunner, KVPool],
) -> None:
    runner, _ = prefilled
    calls: list[str] = []

    class Recording(EagerReplay):
        def captured(self) -> None:
            calls.append("captured")

        def release(self) -> None:
            calls.append("release")

    graphs = DecodeGraphs(runner, max_batch=2, max_blocks=8, backend=Recording())
    graphs.capture()
    assert calls == ["captured"]
    graphs.release()
    assert calls == ["captured", "release"]


def test_clearing_cublas_workspaces_is_a_no_op_without_cuda() -> None:
    from cortex.neuron.engine.graph_backends import clear_cublas_workspaces

    clear_cublas_workspaces()


@pytest.mark.parametrize("row", [0, 1, 2])
def test_a_lone_decode_row_with_its_host_length_equals_the_masked_padded_attention(
    prefilled: tuple[ModelRunner, KVPool], row: int
) -> None:
    """The eager single-sequence path (exactly its tokens, no mask) computes what the padded, masked one does."""
    runner, kv = prefilled
    before = kv.storage.clone()
    with torch.inference_mode():
        padded = decode_batch([row], [17])
        wide = torch.zeros((1, 8), dtype=torch.long)  # wider than its blocks: padding columns point at block 0
        wide[0, : padded.context.block_tables.shape[1]] = padded.context.block_tables[0]
        padded.context.block_tables = wide
        masked = runner.forward(padded).clone()
        kv.storage.copy_(before)
        lone = decode_batch([row], [17])
        lone.context.decode_length = len(SEQUENCES[row][0]) + 1
        exact = runner.forward(lone)
    torch.testing.assert_close(exact, masked, rtol=0, atol=1e-12)
