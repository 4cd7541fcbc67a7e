"""Every fast backend against the float64 torch reference: values and all gradients.

Backends are discovered from the registry, so native backends join these tests by
registering. On CPU the Triton kernels run under TRITON_INTERPRET=1 (set in conftest).
"""

import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lrc_kernels as lk
from helpers import LOSSES, MODES, check_against_float64, make_inputs


def fast_backends(device_type):
    return [b for b in lk.available_backends(device_type) if b != "torch"]


def _seeded(*key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _backends_on(device):
    names = fast_backends(device.type)
    if not names:
        pytest.skip(f"no fast backend available on {device.type}")
    return names


# (batch, K, features): D = 1, D not a multiple of any block, K = 1, B = 2, K above the
# K-block, whole-layer [L, d] features, and D spread over several splits.
SHAPES = [(2, 1, 1), (2, 1, 2), (3, 5, 33), (5, 3, (4, 13)), (4, 17, 100), (7, 2, 257)]


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64_reference_fp32(device, loss, mode, shape):
    for backend in _backends_on(device):
        inputs = make_inputs(mode, *shape, torch.float32, device, _seeded(loss, mode, shape))
        check_against_float64(loss, inputs, backend, temperature=0.2) if loss == "info_nce" else \
            check_against_float64(loss, inputs, backend)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("mode", MODES)
def test_matches_float64_reference_other_dtypes(device, dtype, loss, mode):
    for backend in _backends_on(device):
        inputs = make_inputs(mode, 4, 6, 70, dtype, device, _seeded(dtype, loss, mode))
        check_against_float64(loss, inputs, backend)


@pytest.mark.parametrize("loss", LOSSES)
def test_very_large_k(device, loss):
    for backend in _backends_on(device):
        for mode in ("explicit", "bank"):
            inputs = make_inputs(mode, 2, 300, 5, torch.float32, device, _seeded(loss, mode), bank_rows=50)
            check_against_float64(loss, inputs, backend)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("mode", MODES)
def test_zero_vectors_give_finite_loss_and_grads(device, loss, mode):
    for backend in _backends_on(device):
        s, t, n, idx = make_inputs(mode, 4, 3, 20, torch.float32, device, _seeded(loss, mode), requires_grad=False)
        s[0] = 0
        t[1] = 0
        if mode == "explicit":
            n[2, 1] = 0
        elif mode == "bank":
            n[idx[3, 0]] = 0
        inputs = [x if x is None or not x.is_floating_point() else x.requires_grad_() for x in (s, t, n, idx)]
        # Grads of zero rows scale with 1/eps; compare at a moderate eps to keep them comparable.
        check_against_float64(loss, inputs, backend, eps=1e-3)


@pytest.mark.parametrize("loss", LOSSES)
def test_non_contiguous_inputs(device, loss):
    gen = _seeded("strided", loss)
    base = torch.randn(6, 9, 16, generator=gen).to(device)
    student = base.permute(0, 2, 1)[:, ::2]  # [6, 8, 9], last stride != 1: copied
    teacher = torch.randn(6, 8, 9, 2, generator=gen).to(device)[..., 0]  # strided rows
    one_neg = torch.randn(6, 1, 8, 9, generator=gen).to(device)
    negatives = one_neg.expand(6, 4, 8, 9)  # stride 0 along K
    for backend in _backends_on(device):
        for args in ((student, teacher, None, None), (student, teacher, negatives, None)):
            inputs = [None if x is None else x.detach().requires_grad_() for x in args]
            check_against_float64(loss, inputs, backend)


def test_mixed_dtypes(device):
    for backend in _backends_on(device):
        s, t, n, idx = make_inputs("bank", 3, 4, 40, torch.float32, device, _seeded("mixed"))
        s = s.detach().to(torch.bfloat16).requires_grad_()
        check_against_float64("cos_nce", [s, t, n, idx], backend)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy warns on inf / inf
@pytest.mark.parametrize("mode", MODES)
def test_non_finite_input_gives_nan(device, mode):
    for backend in ["torch", *fast_backends(device.type)]:
        s, t, n, idx = make_inputs(mode, 3, 2, 10, torch.float32, device, _seeded(mode), requires_grad=False)
        s[1, 3] = float("inf")
        for fn in LOSSES.values():
            assert torch.isnan(fn(s, t, n, idx, backend=backend)).item()


def test_double_backward_fails_clearly(device):
    for backend in _backends_on(device):
        s, t, n, _ = make_inputs("explicit", 3, 2, 10, torch.float32, device)
        loss = lk.cos_nce_loss(s, t, n, backend=backend)
        (grad,) = torch.autograd.grad(loss, s, create_graph=True)
        with pytest.raises(RuntimeError, match="do not support double backward"):
            grad.sum().backward()


def test_under_autocast(device):
    dtype = torch.bfloat16
    for backend in _backends_on(device):
        torch.manual_seed(0)
        proj = torch.nn.Linear(12, 24).to(device)
        x = torch.randn(5, 3, 12, device=device)
        teacher = torch.randn(5, 3, 24, device=device)
        with torch.autocast(device.type, dtype=dtype):
            student = proj(x)
            assert student.dtype == dtype
            loss = lk.info_nce_loss(student, teacher, backend=backend)
        assert loss.dtype == torch.float32
        loss.backward()
        grad = proj.weight.grad.clone()
        proj.weight.grad = None
        ref = lk.info_nce_loss(proj(x).to(dtype).float(), teacher, backend="torch")
        ref.backward()
        assert torch.allclose(loss, ref, rtol=1e-2)
        assert ((grad - proj.weight.grad).abs().max() / proj.weight.grad.abs().max()) < 3e-2


def test_auto_picks_triton_on_cuda_and_the_native_kernel_on_cpu(device, monkeypatch):
    calls = []
    from lrc_kernels import backends

    real_resolve = backends.resolve

    def spy(name, dev):
        fn = real_resolve(name, dev)
        calls.append(fn.backend)
        return fn

    monkeypatch.setattr(backends, "resolve", spy)
    s, t, _, _ = make_inputs("in_batch", 3, 2, 8, torch.float32, device)
    lk.cos_nce_loss(s, t)
    if device.type == "cuda":
        expected = "triton"
    else:
        expected = "cpp" if "cpp" in lk.available_backends("cpu") else "torch"
    assert calls == [expected]


@settings(max_examples=25, deadline=None)
@given(
    loss=st.sampled_from(sorted(LOSSES)),
    mode=st.sampled_from(MODES),
    batch=st.integers(2, 6),
    num_neg=st.integers(1, 12),
    dim=st.integers(1, 90),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_shapes_property(loss, mode, batch, num_neg, dim, seed):
    for backend in fast_backends("cpu"):
        inputs = make_inputs(mode, batch, num_neg, dim, torch.float32, "cpu", torch.Generator().manual_seed(seed))
        check_against_float64(loss, inputs, backend)


def test_64bit_offsets_in_a_large_bank():
    """A bank of more than 2**31 elements: rows past the 32-bit boundary must be gathered right."""
    for backend in fast_backends("cpu"):
        dim, rows = 1024, (2**31) // 1024 + 8
        try:
            bank = torch.empty(rows, dim, dtype=torch.bfloat16)
        except RuntimeError:
            pytest.skip("not enough memory for a 4 GiB bank")
        gen = _seeded("big")
        neg_index = torch.tensor([[rows - 1, 5], [rows - 3, rows - 2]])
        bank[neg_index.flatten()] = torch.randn(4, dim, generator=gen).to(torch.bfloat16)
        s, t = torch.randn(2, dim, generator=gen), torch.randn(2, dim, generator=gen)
        for fn in LOSSES.values():
            got = fn(s, t, bank, neg_index, reduction="none", backend=backend)
            ref = fn(s.double(), t.double(), bank[neg_index.flatten()].view(2, 2, dim).double(), reduction="none",
                     backend="torch")
            torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
