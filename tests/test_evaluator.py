"""The evaluation loop: full ranking in row order, whatever order it scores rows in; batching helpers."""

import numpy as np
import torch

from distillrec.data.batching import causal_windows, length_bucketed_batches
from distillrec.data.dataset import Examples
from distillrec.evaluation.evaluator import EvalProtocol, rank_examples


class LastItemPlusOne(torch.nn.Module):
    """Scores item (last history item + 1) highest: ranks are known by hand."""

    n_items = 6

    def score(self, batch):
        last = batch["history"].gather(1, (batch["lengths"] - 1).view(-1, 1)).squeeze(1)
        scores = -torch.arange(self.n_items + 1, dtype=torch.float).repeat(len(last), 1)  # item 1 best, then 2...
        scores[torch.arange(len(last)), (last % self.n_items) + 1] = 10.0
        return scores


def test_ranks_come_back_in_row_order():
    ex = Examples(
        histories=[np.array([1, 2, 3]), np.array([4]), np.array([2, 5]), np.array([1])],
        targets=np.array([4, 6, 1, 3]),
    )
    ranks = rank_examples(LastItemPlusOne(), ex, EvalProtocol(batch_size=2), max_len=10)
    # row 0: last item 3 puts item 4 on top, target 4 -> rank 0; row 1: item 5 on top, then 1..4, target 6 -> rank 5;
    # row 2: item 6 on top, target 1 -> rank 1; row 3: item 2 on top, then 1, target 3 -> rank 2
    assert ranks.tolist() == [0, 5, 1, 2]
    sub = rank_examples(LastItemPlusOne(), ex, EvalProtocol(batch_size=3), max_len=10, rows=np.array([3, 0]))
    assert sub.tolist() == [2, 0]


def test_length_buckets_use_every_row_once():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 50, 1000)
    batches = length_bucketed_batches(rng.permutation(1000), lengths, 64, rng, chunk_batches=4)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(1000))
    assert all(len(b) <= 64 for b in batches)
    # within a batch, lengths are close: mean spread far below the spread of a random batch
    spread = np.mean([np.ptp(lengths[b]) for b in batches])
    assert spread < 20  # a random batch of 64 spans about 47


def test_causal_windows_cover_long_sequences():
    seq = np.arange(1, 12)  # 11 items -> 10 (input, target) positions
    windows = causal_windows([seq], max_len=4)
    assert sum(len(w[0]) for w in windows) == 10
    for inp, tgt in windows:
        assert np.array_equal(tgt, inp + 1) and len(inp) <= 4
