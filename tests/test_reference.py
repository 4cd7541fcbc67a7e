"""The torch backend against the spec written as loops, and gradcheck in float64."""

import zlib

import pytest
import torch
import torch.nn.functional as F

import lrc_kernels as lk
from helpers import LOSSES, MODES, make_inputs


def spec_loss(loss, s, t, negs, temperature=0.1, eps=1e-8):
    """The issue's formulas, one row and one negative at a time, with F.cosine_similarity."""
    out = []
    for b in range(s.shape[0]):
        cos_pos = F.cosine_similarity(s[b].flatten(), t[b].flatten(), dim=0, eps=eps)
        cos_neg = torch.stack([F.cosine_similarity(s[b].flatten(), n.flatten(), dim=0, eps=eps) for n in negs[b]])
        if loss == "cos_nce":
            g_pos, g_neg = 1 - cos_pos, 1 - cos_neg
            k = len(negs[b])
            out.append(g_pos + sum(2 - (g - g_pos) for g in g_neg) / (2 * k))
        else:
            num = torch.exp(cos_pos / temperature)
            out.append(-torch.log(num / (num + torch.exp(cos_neg / temperature).sum())))
    return torch.stack(out)


def negatives_per_row(mode, t, negatives, neg_index):
    batch = t.shape[0]
    if mode == "in_batch":
        return [[t[j] for j in range(batch) if j != b] for b in range(batch)]
    if mode == "explicit":
        return [list(negatives[b]) for b in range(batch)]
    bank = t if negatives is None else negatives
    return [[bank[i] for i in neg_index[b].tolist()] for b in range(batch)]


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(2, 1, (1,)), (3, 4, (5, 7)), (6, 2, (33,))])
def test_torch_backend_matches_the_spec(loss, mode, shape):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((loss, mode, shape)).encode()))
    batch, k, feats = shape
    s, t, n, idx = make_inputs(mode, batch, k, feats, torch.float64, generator=gen, requires_grad=False)
    expected = spec_loss(loss, s, t, negatives_per_row(mode, t, n, idx))
    got = LOSSES[loss](s, t, n, idx, reduction="none", backend="torch")
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_torch_backend(loss, mode):
    gen = torch.Generator().manual_seed(7)
    inputs = make_inputs(mode, 3, 2, (2, 3), torch.float64, generator=gen)
    floats = [x for x in inputs if x is not None and x.is_floating_point()]

    def fn(*xs):
        it = iter(xs)
        args = [next(it) if x is not None and x.is_floating_point() else x for x in inputs]
        return LOSSES[loss](*args, reduction="none", backend="torch")

    assert torch.autograd.gradcheck(fn, floats)


def test_reductions_and_default_temperature():
    s, t, n, _ = make_inputs("explicit", 4, 3, 8)
    rows = lk.info_nce_loss(s, t, n, reduction="none", backend="torch")
    assert rows.shape == (4,)
    torch.testing.assert_close(lk.info_nce_loss(s, t, n, backend="torch"), rows.mean())
    torch.testing.assert_close(lk.info_nce_loss(s, t, n, reduction="sum", backend="torch"), rows.sum())
    torch.testing.assert_close(
        lk.info_nce_loss(s, t, n, temperature=0.1, backend="torch"),
        lk.info_nce_loss(s, t, n, backend="torch"),
    )


def test_cos_nce_range():
    """cos in [-1, 1] puts COS-NCE in [0.5 * 0, 2 + 1.5 + 0.5] = [0, 4]; identical s and t and
    orthogonal negatives give exactly 2 - 1.5 = 0.5."""
    s = torch.eye(4)[:2].clone()
    negs = torch.stack([torch.eye(4)[2:], torch.eye(4)[2:]])
    loss = lk.cos_nce_loss(s, s.clone(), negs, reduction="none", backend="torch")
    torch.testing.assert_close(loss, torch.full((2,), 0.5))
