"""torch.library registration: torch.compile(fullgraph=True) matches eager, and opcheck passes."""

import pytest
import torch

import lrc_kernels as lk
from helpers import LOSSES, MODES, make_inputs

COMPILE_BACKENDS = [b for b in ("torch", "cpp") if b in lk.available_backends("cpu")]


def _grads(loss, inputs, backend, fn=None):
    floats = [x for x in inputs if x is not None and x.is_floating_point()]
    for x in floats:
        x.grad = None
    fn = fn or (lambda *args: LOSSES[loss](*args, backend=backend))
    value = fn(*inputs)
    value.backward()
    return value.detach(), [x.grad.clone() for x in floats]


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("mode", MODES)
def test_compile_fullgraph_matches_eager(backend, loss, mode):
    torch._dynamo.reset()
    inputs = make_inputs(mode, 5, 3, (2, 7), generator=torch.Generator().manual_seed(3))
    eager_value, eager_grads = _grads(loss, inputs, backend)

    def step(*args):
        return LOSSES[loss](*args, backend=backend) * 2.0  # something around the op, in the same graph

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    value, grads = _grads(loss, inputs, backend, compiled)
    torch.testing.assert_close(value, 2.0 * eager_value, rtol=1e-6, atol=1e-6)
    for g, ref in zip(grads, eager_grads):
        torch.testing.assert_close(g, 2.0 * ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_compile_with_inductor(backend):
    """One real inductor compile (slow on CPU, so one case): the default torch.compile backend."""
    torch._dynamo.reset()
    s, t, n, idx = make_inputs("bank", 4, 3, 16, generator=torch.Generator().manual_seed(4))
    proj = torch.nn.Linear(16, 16)

    def step(x):
        return lk.cos_nce_loss(proj(x), t, n, idx, backend=backend)

    x = s.detach()
    eager = step(x)
    eager.backward()
    ref = proj.weight.grad.clone()
    proj.weight.grad = None
    compiled = torch.compile(step, fullgraph=True)(x)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(proj.weight.grad, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif("cpp" not in lk.available_backends("cpu"), reason="cpp backend not built here")
def test_index_out_of_range_inside_a_compiled_graph_still_raises():
    torch._dynamo.reset()
    s, t, n, _ = make_inputs("bank", 3, 2, 8, requires_grad=False)
    bad = torch.tensor([[0, 1], [2, 99], [1, 1]])
    fn = torch.compile(lambda *a: lk.cos_nce_loss(*a, backend="cpp"), fullgraph=True, backend="aot_eager")
    with pytest.raises(IndexError, match="neg_index"):
        fn(s, t, n, bad)


@pytest.mark.skipif("cpp" not in lk.available_backends("cpu"), reason="cpp backend not built here")
def test_opcheck_registered_ops():
    from lrc_kernels.ops import cos_nce_cpp  # registers the ops

    gen = torch.Generator().manual_seed(5)
    s, t = torch.randn(3, 37, generator=gen), torch.randn(3, 37, generator=gen)
    neg = torch.randn(3, 2, 37, generator=gen)
    bank = torch.randn(6, 37, generator=gen, dtype=torch.float64)
    idx = torch.randint(0, 6, (3, 2), generator=gen)
    coef = torch.randn(3, 3, generator=gen)
    sigma = torch.randn(3, generator=gen)
    ops = torch.ops.lrc_kernels
    cases = [
        (ops.cpu_partials.default, (s, t, neg, None, cos_nce_cpp._EXPLICIT)),
        (ops.cpu_partials.default, (s, t, bank, idx, cos_nce_cpp._BANK)),
        (ops.cpu_partials.default, (s, t, None, None, cos_nce_cpp._NO_NEGATIVES)),
        (ops.cpu_weighted_backward.default, (s, t, neg, None, cos_nce_cpp._EXPLICIT, coef, coef, sigma, True, True, True)),
        (ops.cpu_weighted_backward.default,
         (s, t, bank, idx, cos_nce_cpp._BANK, coef.double(), coef.double(), sigma.double(), True, False, True)),
        (ops.cpu_weighted_colsum.default, (s, sigma)),
        (ops.cpu_row_dot_vec.default, (s, torch.randn(37, generator=gen))),
        (ops.cpu_row_combine.default, (s, sigma, t, sigma, torch.randn(37, generator=gen), sigma, torch.bfloat16)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)
