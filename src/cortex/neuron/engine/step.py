"""One step's forward and sampling: the scheduler's `Work` items packed into ONE batch on the device.

The scheduler (scheduler.py) decides what a step computes: which sequences, how many tokens each.
`StepExecutor.run` turns that into one forward and one sampling pass:

- the packed batch `[1, T]`: one token per decoding sequence first, then each prefill chunk, with
  their positions and KV slots, and `logits_to_keep` = the rows that sample;
- every integer input of the step (ids, positions, slots, kept rows, the decode rows' context lengths
  and padded block tables, each chunk's block ids) in one host buffer and ONE copy to the device
  (staging.py);
- the sampling parameters queued before the forward, grammar masks on constrained rows, one batched
  sampling pass, and one host copy of the sampled tokens: the only device sync of the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .attention import AttentionContext, PrefillChunk, prefix_mask
from .blocks import BlockManager
from .logprobs import step_logprobs, unpack
from .runner import ModelRunner, StepBatch
from .sampling import RowParams, SamplingBatch
from .sequence import Sequence
from .staging import StepStaging
from .token_mask import TokenMask

_NO_BLOCKS = torch.empty(0, dtype=torch.long)  # a prefill chunk's block ids until the step's upload


@dataclass
class Work:
    """One sequence's part of a step: tokens[start:start + count] are computed; it samples if that ends them."""

    sequence: Sequence
    start: int
    count: int

    @property
    def samples(self) -> bool:
        return self.start + self.count == len(self.sequence.tokens)


class StepExecutor:
    """Packs, runs and samples a model's steps, keeping their reusable buffers (staging, grammar mask).

    The runner is passed to each `run`: the scheduler owns it and lets go of it at unload.
    """

    def __init__(self, device: torch.device, blocks: BlockManager, tokenizer: Any) -> None:
        self._blocks = blocks
        self._tokenizer = tokenizer
        self._mask = TokenMask(device)  # grammar-constrained rows (JSON, schemas, grammars, tool calls)
        self._staging = StepStaging(device)  # a step's integer inputs in one host-to-device copy

    def release(self) -> None:
        self._staging.release()

    def run(self, runner: ModelRunner, work: list[Work]) -> list[int | None]:
        """Forward + sample: the sampled token of each item, aligned with `work` (None where it did not sample)."""
        assert runner.kv is not None
        device = runner.device
        block_size = self._blocks.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        keep: list[int] = []
        samplers: list[Sequence] = []
        sampler_items: list[int] = []  # index in `work` of each sampling row
        decode = [item for item in work if item.count == 1 and item.samples]
        tables: list[list[int]] = []
        for index, item in enumerate(work):
            if not (item.count == 1 and item.samples):
                continue
            sequence, position = item.sequence, item.start
            keep.append(len(ids))
            samplers.append(sequence)
            sampler_items.append(index)
            ids.append(sequence.tokens[position])
            positions.append(position)
            blocks = sequence.table.blocks
            slots.append(blocks[position // block_size] * block_size + position % block_size)
            tables.append(blocks)
        prefills: list[PrefillChunk] = []
        chunk_blocks: list[list[int]] = []
        for index, item in enumerate(work):
            if item.count == 1 and item.samples:
                continue
            sequence, start, count = item.sequence, item.start, item.count
            blocks = sequence.table.blocks
            q_start, kv_len = len(ids), start + count
            ids.extend(sequence.tokens[start:kv_len])
            positions.extend(range(start, kv_len))
            slots.extend(blocks[p // block_size] * block_size + p % block_size for p in range(start, kv_len))
            chunk_blocks.append(blocks[: self._blocks.blocks_for(kv_len)])
            mask = None if start == 0 else prefix_mask(count, kv_len, device)
            prefills.append(PrefillChunk(q_start, count, kv_len, _NO_BLOCKS, mask))
            if item.samples:
                keep.append(len(ids) - 1)
                samplers.append(sequence)
                sampler_items.append(index)
        # Every integer input of the step in one host buffer and ONE copy to the device (staging.py):
        # ids, positions, slots, keep, then the decode rows' context lengths and padded block tables,
        # then each prefill chunk's block ids.
        tokens, n = len(ids), len(decode)
        if not keep:
            keep = [tokens - 1]
        width = max((len(t) for t in tables), default=0)
        flat = ids + positions + slots + keep + [p + 1 for p in positions[:n]]
        for t in tables:
            flat += t
            flat += [0] * (width - len(t))
        for chunk_ids in chunk_blocks:
            flat += chunk_ids
        packed = self._staging.upload(flat)
        at = at0 = 3 * tokens + len(keep)
        context = AttentionContext(runner.kv, packed[2 * tokens : 3 * tokens], num_decode=n, prefills=prefills)
        if decode:
            context.context_lens = packed[at : at + n]
            context.block_tables = packed[at + n : at + n + n * width].view(n, width)
            if n == 1:  # eager attention over exactly its tokens (a captured graph ignores it)
                context.decode_length = positions[0] + 1
        at += n + n * width
        for chunk, chunk_ids in zip(prefills, chunk_blocks, strict=True):
            chunk.block_ids = packed[at : at + len(chunk_ids)]
            at += len(chunk_ids)
        # Every row samples in one batched pass; constrained rows first get their grammar's token mask.
        sampling = SamplingBatch([self._row(s) for s in samplers], device) if samplers else None
        batch = StepBatch(packed[:tokens][None], packed[tokens : 2 * tokens][None], packed[3 * tokens : at0], context)
        logits = runner.forward(batch)
        result: list[int | None] = [None] * len(work)
        if not samplers:
            return result
        assert sampling is not None
        constrained = [(i, s.matcher) for i, s in enumerate(samplers) if s.matcher is not None]
        if constrained:
            logits = self._mask.apply(logits.float(), constrained)
        chosen = sampling.sample(logits)
        for row, sequence in enumerate(samplers):
            sequence.record(chosen[row : row + 1])
        tops = [s.params.logprobs for s in samplers]
        wanted = [t for t in tops if t is not None]
        scores = None
        if wanted:  # from the distribution sampled from: penalties, mask and temperature applied
            temperatures = [s.params.temperature for s in samplers]
            assert sampling.penalised_logits is not None
            scores = step_logprobs(sampling.penalised_logits, chosen, temperatures, max(wanted))
        host: list[int] = chosen.tolist()  # the one host sync of the step
        if scores is not None:
            for sequence, token, row, top in zip(samplers, host, scores.tolist(), tops, strict=True):
                sequence.next_logprob = unpack(token, row, top, self._decode_each) if top is not None else None
        for i, index in enumerate(sampler_items):
            result[index] = host[i]
        return result

    def _decode_each(self, ids: list[int]) -> list[str]:
        """Each token's own text (logprobs name the tokens they score)."""
        return list(self._tokenizer.batch_decode([[i] for i in ids]))

    def _row(self, sequence: Sequence) -> RowParams:
        return RowParams(sequence.params, sequence.seed, len(sequence.tokens), sequence.seen, sequence.counts)
