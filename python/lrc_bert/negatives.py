"""Which rows serve as a row's COS-NCE negatives: index draws on the host, from a seeded generator.

* ``sample_in_batch``: K distinct other rows of the batch.
* ``sample_other_label`` (``--negatives other-label``, the public reimplementation's
  ``defined_by_label``): K rows whose label differs from the row's own. An in-batch negative
  that shares the row's class is a *false negative*: it is pushed away although the task
  wants it close. Drawing only from other classes removes those, at the cost of fewer
  distinct negatives; it helps most with few classes and large batches, where many
  in-batch rows share a class (SNLI, MNLI: a third of them).

  The rule when a row has fewer than K other-class rows in the batch: each of them is used
  once, and the remaining slots are drawn again from them uniformly (with replacement), so
  every row keeps exactly K negatives. A row with none at all (the whole batch is one class)
  falls back to K distinct other rows, and the call reports how many rows did.
"""

from __future__ import annotations

import torch


def sample_in_batch(rows: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """[rows, k] distinct other rows of a batch of ``rows``."""
    scores = torch.rand(rows, rows, generator=generator)
    scores.fill_diagonal_(-1.0)  # never the row itself
    return scores.topk(k, dim=1).indices


def sample_other_label(labels: torch.Tensor, k: int, generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """([rows, k] indices of rows with another label, the number of rows that fell back to any
    other row because the batch held no other class); the rule is in the module docstring."""
    labels = labels.reshape(-1).cpu()
    rows = labels.shape[0]
    other = labels[:, None] != labels[None, :]
    counts = other.sum(dim=1)
    scores = torch.rand(rows, rows, generator=generator).masked_fill(~other, -1.0)
    ranked = scores.topk(min(k, rows), dim=1).indices  # other-class rows first, in random order
    if k > rows:
        ranked = torch.cat([ranked, ranked[:, :1].expand(rows, k - rows)], dim=1)
    refill = (torch.rand(rows, k, generator=generator) * counts.clamp(1, k)[:, None]).long()
    chosen = torch.where(torch.arange(k)[None, :] < counts[:, None], ranked, ranked.gather(1, refill))
    lonely = counts == 0
    if lonely.any():
        chosen[lonely] = sample_in_batch(rows, min(k, rows - 1), generator)[lonely].repeat(
            1, -(-k // max(rows - 1, 1)))[:, :k]
    return chosen, int(lonely.sum())
