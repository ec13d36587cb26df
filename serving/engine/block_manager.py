"""The paged KV cache's bookkeeping: which blocks each sequence owns. Plain Python, no tensors.

Block NULL_BLOCK (0) of the cache is never given to a sequence: block-table padding points at it, and padded
rows of a fixed-size (CUDA-graph) decode step write their keys and values into it, so neither ever touches
another sequence's cache. Sequences get blocks 1..num_blocks; the cache holds num_blocks + 1.
"""

from __future__ import annotations

from collections import deque

from serving.engine.sequence import Sequence

NULL_BLOCK = 0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        """num_blocks: the blocks sequences may use (the cache has one more, NULL_BLOCK)."""
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(NULL_BLOCK + 1, num_blocks + 1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Share of the blocks in use, 0..1."""
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Room for the sequence's first `num_tokens` tokens (it keeps the blocks it has)."""
        return self.blocks_for(num_tokens) - len(seq.block_table) <= len(self._free)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Blocks for the sequence's first `num_tokens` tokens (a prefill chunk, or the next decode token)."""
        need = self.blocks_for(num_tokens) - len(seq.block_table)
        assert need <= len(self._free), "grow beyond the free blocks"
        seq.block_table.extend(self._free.popleft() for _ in range(max(0, need)))

    def can_append(self, seq: Sequence) -> bool:
        """Room for the sequence's next token (its last generated one, not yet in the cache)."""
        return self.can_grow(seq, len(seq.token_ids))

    def append(self, seq: Sequence) -> None:
        self.grow(seq, len(seq.token_ids))

    def free(self, seq: Sequence) -> None:
        self._free.extend(seq.block_table)
        seq.block_table = []
