"""dynloss.data.cache.PassCache: decoded un-augmented passes kept after the first complete one, within a budget."""
import torch

from dynloss.data.cache import PassCache


def _source(n: int, calls: list):
    def make():
        calls.append(1)
        for i in range(n):
            yield {"id": torch.tensor([i]), "x": torch.full((1, 256), float(i))}  # 1 KiB + 8 B per batch
    return make


def test_a_complete_pass_is_kept_and_replayed_without_decoding_again():
    cache, calls = PassCache(budget_mb=1), []
    first = [b["id"].item() for b in cache.batches("eval", _source(5, calls))]
    second = [b["id"].item() for b in cache.batches("eval", _source(5, calls))]
    assert first == second == [0, 1, 2, 3, 4] and len(calls) == 1
    assert len(list(cache.batches("rank", _source(3, calls)))) == 3 and len(calls) == 2  # a pass per name


def test_over_budget_or_unfinished_passes_stream_every_time():
    calls = []
    small = PassCache(budget_mb=3 / 1024)  # room for 2 of the 5 batches
    for _ in range(2):
        assert [b["id"].item() for b in small.batches("eval", _source(5, calls))] == [0, 1, 2, 3, 4]
    assert len(calls) == 2 and small.kept == {} and small.used == 0
    off, calls = PassCache(budget_mb=0), []
    for _ in range(2):
        list(off.batches("eval", _source(2, calls)))
    assert len(calls) == 2
    cache, calls = PassCache(budget_mb=1), []
    it = cache.batches("eval", _source(5, calls))
    next(it), next(it)  # abandoned after two batches
    assert [b["id"].item() for b in cache.batches("eval", _source(5, calls))] == [0, 1, 2, 3, 4]
    assert len(calls) == 2
