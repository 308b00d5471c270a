"""The block manager: which KV blocks each sequence holds, and which full blocks hold a known prefix.

Pure bookkeeping on the host (no tensors), owned by the model's scheduler on the device worker.

- A sequence holds a block table: block i holds the keys/values of its tokens [i*B, (i+1)*B).
- Blocks are reference-counted. A block that is full and computed gets a hash chained on its parent
  block's hash and its own token ids, so equal hashes mean equal prefixes. A new sequence starts
  with the longest run of cached blocks matching its prompt (always leaving at least the last token
  to compute, so there are logits to sample) and shares them with whoever else holds them.
- When the last holder lets go, a hashed block is kept in an LRU free list, still findable by its
  hash, until its memory is needed for something else. Unhashed blocks are reused first.
- Never-used blocks are handed out before any cached block is evicted; they are reported to the
  caller so the pool can zero them (see `KVPool`). Block 0 is reserved (the padding block).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence as Ids
from dataclasses import dataclass, field


@dataclass
class BlockTable:
    """A sequence's blocks and how much of them is computed/hashed; lives on the `Sequence`."""

    blocks: list[int] = field(default_factory=list)
    hashed: int = 0  # leading blocks whose hash is registered (or that came from the cache)
    last_hash: int | None = None  # hash of block `hashed - 1`


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2:
            raise ValueError("a KV pool needs at least two blocks (one is reserved)")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._refs = [0] * num_blocks
        self._hash: list[int | None] = [None] * num_blocks
        self._tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self._by_hash: dict[int, int] = {}
        self._free: OrderedDict[int, None] = OrderedDict()  # used before, ref 0; front = reused first
        self._fresh = 1  # blocks [_fresh, num_blocks) were never handed out; block 0 is reserved
        self._cached = 0  # free blocks that still hold a findable prefix (a counter: the loop thread reads it)
        self.fresh_blocks: list[int] = []  # handed out for the first time since the caller last took them
        self.hit_tokens = 0
        self.lookup_tokens = 0

    # Figures.

    @property
    def usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def free_blocks(self) -> int:
        """Blocks that can be handed out now (never used, or free, cached ones included)."""
        return len(self._free) + self.num_blocks - self._fresh

    @property
    def cached_blocks(self) -> int:
        """Free blocks that still hold a findable prefix."""
        return self._cached

    @property
    def used_blocks(self) -> int:
        return self.usable_blocks - self.free_blocks

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # Sequences.

    def allocate(self, table: BlockTable, tokens: Ids[int]) -> int | None:
        """Blocks for all of `tokens`, reusing the longest cached prefix; the reused token count, or None (full)."""
        assert not table.blocks
        hits, hashes = self._match(tokens)
        need = self.blocks_for(len(tokens)) - len(hits)
        revived = sum(1 for block in hits if self._refs[block] == 0)
        if self.free_blocks - revived < need:
            return None
        for block in hits:
            if self._refs[block] == 0:
                del self._free[block]
                self._cached -= 1
            self._refs[block] += 1
        table.blocks = hits + [self._take() for _ in range(need)]
        table.hashed = len(hits)
        table.last_hash = hashes[len(hits) - 1] if hits else None
        self.lookup_tokens += len(tokens)
        self.hit_tokens += len(hits) * self.block_size
        return len(hits) * self.block_size

    def append_slot(self, table: BlockTable, length: int) -> bool:
        """Make room for a sequence of `length` tokens (one more block at a boundary); False if none is free."""
        if len(table.blocks) * self.block_size >= length:
            return True
        if self.free_blocks == 0:
            return False
        table.blocks.append(self._take())
        return True

    def register(self, table: BlockTable, tokens: Ids[int], computed: int) -> None:
        """Hash the blocks that became full and computed, so later sequences can reuse them."""
        size = self.block_size
        while table.hashed < computed // size:
            index = table.hashed
            ids = tuple(tokens[index * size : (index + 1) * size])
            digest = hash((table.last_hash, ids))
            block = table.blocks[index]
            if digest not in self._by_hash and self._hash[block] is None:
                self._by_hash[digest] = block
                self._hash[block] = digest
                self._tokens[block] = ids
            table.hashed += 1
            table.last_hash = digest

    def free(self, table: BlockTable) -> None:
        """Let go of a sequence's blocks: hashed ones stay cached (most recent last), the rest are reused first."""
        for block in reversed(table.blocks):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free[block] = None
                if self._hash[block] is None:
                    self._free.move_to_end(block, last=False)
                else:
                    self._cached += 1
        table.blocks = []
        table.hashed = 0
        table.last_hash = None

    # Internals.

    def _match(self, tokens: Ids[int]) -> tuple[list[int], list[int]]:
        size = self.block_size
        hits: list[int] = []
        hashes: list[int] = []
        parent: int | None = None
        for index in range((len(tokens) - 1) // size):  # never the block holding the last token
            ids = tuple(tokens[index * size : (index + 1) * size])
            parent = hash((parent, ids))
            block = self._by_hash.get(parent)
            if block is None or self._tokens[block] != ids:
                break
            hits.append(block)
            hashes.append(parent)
        return hits, hashes

    def _take(self) -> int:
        if self._fresh < self.num_blocks:
            block = self._fresh
            self._fresh += 1
            self.fresh_blocks.append(block)
        else:
            block, _ = self._free.popitem(last=False)
            digest = self._hash[block]
            if digest is not None:
                self._cached -= 1
                if self._by_hash.get(digest) == block:
                    del self._by_hash[digest]
                self._hash[block] = None
                self._tokens[block] = None
        self._refs[block] = 1
        return block
