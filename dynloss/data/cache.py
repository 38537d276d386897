"""Keep the decoded batches of un-augmented passes (the ranking pass, evaluation) after their first full pass.

Their views are deterministic, so re-reading and re-decoding the shards every epoch buys nothing when the split
fits in memory: ``PassCache.batches(name, make)`` yields ``make()``'s batches the first time, keeps them while
their tensors total at most ``budget_mb``, and from the next pass on yields the kept ones without calling
``make``. A pass over budget, or one not iterated to its end, is not kept (the next pass streams again); a split
too large for the budget streams every epoch, as before.

In a Ray Train worker each worker keeps the rows its shard of the first pass gave it: the workers' first passes
cover every row exactly once, so their kept passes do too (pipelines.train_worker).

    python -c "from dynloss.data.cache import PassCache; c = PassCache(1); \
print([list(c.batches('eval', lambda: iter([{'x': __import__('torch').zeros(2)}]))) for _ in range(2)])"
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch

Batch = dict[str, torch.Tensor]


def _nbytes(batch: Batch) -> int:
    return sum(v.numel() * v.element_size() for v in batch.values() if isinstance(v, torch.Tensor))


class PassCache:
    """Decoded batches per pass name, within ``budget_mb`` in total (0 keeps nothing)."""

    def __init__(self, budget_mb: float):
        self.budget = int(budget_mb * 2**20)
        self.kept: dict[str, list[Batch]] = {}
        self.used = 0

    def batches(self, name: str, make: Callable[[], Iterable[Batch]]) -> Iterator[Batch]:
        if name in self.kept:
            yield from self.kept[name]
            return
        keep: list[Batch] | None = [] if self.budget > 0 else None
        size = 0
        for batch in make():
            if keep is not None:
                size += _nbytes(batch)
                keep = keep if self.used + size <= self.budget else None  # over budget: stream from now on
                if keep is not None:
                    keep.append(batch)
            yield batch
        if keep is not None:  # only a pass iterated to its end is complete
            self.kept[name] = keep
            self.used += size
