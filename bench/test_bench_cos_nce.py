"""pytest-benchmark entry for the CPU: ``pytest bench/test_bench_cos_nce.py --benchmark-only``.

Paper shape (B = 16, K = 15, D = 98,304, fp32), forward + backward, ours against the best
eager baseline. The full tables come from bench_cos_nce.py.
"""

import pytest
import torch

from bench_cos_nce import Case, eager_best, ours

CASES = [Case("paper", "cos_nce", "explicit", "fp32", 16, 15, 98304),
         Case("paper", "cos_nce", "in_batch", "fp32", 16, 15, 98304),
         Case("bank", "cos_nce", "indexed", "fp32", 64, 64, 768, 50_000)]
IMPLS = {"best_eager": eager_best, "lrc_kernels_auto": ours("auto")}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.mode}-B{c.batch}-K{c.num_neg}-D{c.dim}")
def test_fwd_bwd(benchmark, case, impl):
    s, t, n, idx = case.make_inputs("cpu")
    fn = IMPLS[impl]
    benchmark(lambda: torch.autograd.grad(fn(case.loss, s, t, n, idx), s))
