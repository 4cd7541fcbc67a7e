"""torch.library registration: torch.compile(fullgraph=True) matches eager, and opcheck passes."""

import pytest
import torch

import lrc_kernels as lk
from helpers import LOSSES, MODES, make_inputs

# (device, backend) pairs: cpp and torch on CPU (CI); on a GPU also the Triton and CUDA kernels.
COMPILE_CASES = [("cpu", b) for b in ("torch", "cpp") if b in lk.available_backends("cpu")]
if torch.cuda.is_available():
    COMPILE_CASES += [("cuda", b) for b in ("auto", "cuda") if b == "auto" or b in lk.available_backends("cuda")]
COMPILE_IDS = [f"{d}-{b}" for d, b in COMPILE_CASES]


def _grads(loss, inputs, backend, fn=None):
    floats = [x for x in inputs if x is not None and x.is_floating_point()]
    for x in floats:
        x.grad = None
    fn = fn or (lambda *args: LOSSES[loss](*args, backend=backend))
    value = fn(*inputs)
    value.backward()
    return value.detach(), [x.grad.clone() for x in floats]


@pytest.mark.parametrize("device_type, backend", COMPILE_CASES, ids=COMPILE_IDS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("mode", MODES)
def test_compile_fullgraph_matches_eager(device_type, backend, loss, mode):
    torch._dynamo.reset()
    inputs = make_inputs(mode, 5, 3, (2, 7), device=device_type, generator=torch.Generator().manual_seed(3))
    eager_value, eager_grads = _grads(loss, inputs, backend)

    def step(*args):
        return LOSSES[loss](*args, backend=backend) * 2.0  # something around the op, in the same graph

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    value, grads = _grads(loss, inputs, backend, compiled)
    torch.testing.assert_close(value, 2.0 * eager_value, rtol=1e-6, atol=1e-6)
    for g, ref in zip(grads, eager_grads):
        torch.testing.assert_close(g, 2.0 * ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device_type, backend", COMPILE_CASES, ids=COMPILE_IDS)
def test_compile_with_inductor(device_type, backend):
    """One real inductor compile (slow on CPU, so one case): the default torch.compile backend."""
    torch._dynamo.reset()
    s, t, n, idx = make_inputs("bank", 4, 3, 16, device=device_type, generator=torch.Generator().manual_seed(4))
    proj = torch.nn.Linear(16, 16).to(device_type)

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


NATIVE_BACKEND = {"cpu": "cpp", "cuda": "cuda"}


def test_untraceable_backend_inside_compile_raises_clearly():
    torch._dynamo.reset()
    s, t, n, _ = make_inputs("explicit", 3, 2, 8)
    fn = torch.compile(lambda *a: lk.cos_nce_loss(*a, backend="triton"), fullgraph=True, backend="eager")
    with pytest.raises(Exception, match="cannot run inside torch.compile"):
        fn(s, t, n, None)


def test_index_out_of_range_inside_a_compiled_graph_still_raises(device):
    if NATIVE_BACKEND[device.type] not in lk.available_backends(device.type):
        pytest.skip(f"backend {NATIVE_BACKEND[device.type]!r} not built here")
    torch._dynamo.reset()
    s, t, n, _ = make_inputs("bank", 3, 2, 8, device=device, requires_grad=False)
    bad = torch.tensor([[0, 1], [2, 99], [1, 1]], device=device)
    backend = NATIVE_BACKEND[device.type]
    fn = torch.compile(lambda *a: lk.cos_nce_loss(*a, backend=backend), fullgraph=True, backend="aot_eager")
    with pytest.raises(IndexError, match="neg_index"):
        fn(s, t, n, bad)


def test_opcheck_registered_ops(device):
    """The lrc_kernels::* ops on the device's native extension (cpp on CPU, cuda on GPU)."""
    if NATIVE_BACKEND[device.type] not in lk.available_backends(device.type):
        pytest.skip(f"backend {NATIVE_BACKEND[device.type]!r} not built here")
    from lrc_kernels.ops import native

    gen = torch.Generator().manual_seed(5)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen, dtype=dtype).to(device)

    s, t, neg = randn(3, 37), randn(3, 37), randn(3, 2, 37)
    # The CPU kernels accept mixed dtypes; the CUDA wrapper promotes before calling them.
    bank_dtype = torch.float64 if device.type == "cpu" else torch.float32
    bank = randn(6, 37, dtype=bank_dtype)
    idx = torch.randint(0, 6, (3, 2), generator=gen).to(device)
    teacher_idx = torch.randint(0, 3, (3, 2), generator=gen).to(device)
    coef, sigma, v = randn(3, 3), randn(3), randn(37)
    acc64 = bank_dtype == torch.float64
    coef_bank, sigma_bank = (coef.double(), sigma.double()) if acc64 else (coef, sigma)
    ops = torch.ops.lrc_kernels
    cases = [
        (ops.partials.default, (s, t, neg, None, native.EXPLICIT_NEGATIVES, False)),
        (ops.partials.default, (s, t, bank, idx, native.BANK, True)),
        (ops.partials.default, (s, t, None, teacher_idx, native.TEACHER_BANK, True)),
        (ops.partials.default, (s, t, None, None, native.NO_NEGATIVES, False)),
        (ops.weighted_backward.default, (s, t, neg, None, native.EXPLICIT_NEGATIVES, coef, coef, sigma, True, True, True)),
        (ops.weighted_backward.default,
         (s, t, bank, idx, native.BANK, coef_bank, coef_bank, sigma_bank, True, False, True)),
        (ops.weighted_backward.default,
         (s, t, None, teacher_idx, native.TEACHER_BANK, coef, coef, sigma, False, True, False)),
        (ops.weighted_colsum.default, (s, sigma)),
        (ops.row_dot_vec.default, (s, v)),
        (ops.row_combine.default, (s, sigma, t, sigma, v, sigma, torch.bfloat16)),
    ]
    # The whole-loss ops, with their registered autograd formulas.
    grad_inputs = [x.detach().requires_grad_() for x in (s, t, neg, bank)]
    gs, gt, gneg, gbank = grad_inputs
    cases += [
        (ops.gather_negatives_loss.default, (gs, gt, gneg, None, native.EXPLICIT_NEGATIVES, False, 1e-8, 1.0, False)),
        (ops.gather_negatives_loss.default, (gs, gt, gbank, idx, native.BANK, True, 1e-8, 0.1, True)),
        (ops.gather_negatives_loss.default, (gs, gt, None, teacher_idx, native.TEACHER_BANK, False, 1e-8, 1.0, True)),
        (ops.in_batch_cos_nce.default, (gs, gt, 1e-8)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)
