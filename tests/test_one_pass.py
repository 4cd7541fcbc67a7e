"""The CPU one-pass path (csrc/cpu one_pass): the loss and the student's gradient in one sweep,
the backward a scale. Against the float64 reference in value and gradient, in every indexed and
explicit mode, both losses and every reduction; no gradient work without grad; the inputs not
kept for backward; bit-deterministic; traceable."""

from __future__ import annotations

import contextlib
import gc
import weakref

import pytest
import torch

import lrc_kernels as lk
from helpers import LOSSES, TOLERANCE, gradient_error, make_inputs, relative_error

pytestmark = pytest.mark.skipif("cpp" not in lk.available_backends("cpu"), reason="no C++ toolchain")
ONE_PASS_MODES = ("explicit", "bank", "teacher_bank")


def extension():
    from lrc_kernels.ops import _build

    return _build.cpu_extension()


def student_only(mode, batch, num_neg, features, dtype=torch.float32, seed=0, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    s, t, n, idx = make_inputs(mode, batch, num_neg, features, dtype, "cpu", generator, requires_grad=False, **kwargs)
    return s.requires_grad_(), t, n, idx


def compare(loss, inputs, reduction="none", weights=None, **kwargs):
    s, t, n, idx = inputs
    dtype = s.dtype
    before = extension().gradient_rows_computed()
    got = LOSSES[loss](s, t, n, idx, reduction=reduction, backend="cpp", **kwargs)
    assert extension().gradient_rows_computed() > before  # the one-pass kernel ran, with its gradient
    s64 = s.detach().double().requires_grad_()
    want = LOSSES[loss](s64, *[None if x is None else (x.double() if x.is_floating_point() else x) for x in (t, n)],
                        idx, reduction=reduction, backend="torch", **kwargs)
    upstream = weights if weights is not None else torch.ones(())
    (got * upstream.to(got)).sum().backward()
    (want * upstream.double()).sum().backward()
    tol = TOLERANCE[dtype]
    assert relative_error(got.detach(), want.detach(), floor=1.0) < tol
    assert s.grad.dtype == dtype and s.grad.shape == s.shape
    assert gradient_error(s.grad, s64.grad, s, s[0].numel(), 1e-8) < tol


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("mode", ONE_PASS_MODES)
def test_one_pass_matches_float64_small_rows(mode, loss, reduction):
    inputs = student_only(mode, 5, 3, 37, seed=1)
    weights = torch.rand(5) + 0.5 if reduction == "none" else None  # a non-uniform grad_output
    compare(loss, inputs, reduction, weights, **({"temperature": 0.3} if loss == "info_nce" else {}))


@contextlib.contextmanager
def threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# Rows of (1 + K) x D x 4 bytes > 512 KiB take the large-row schedules: whole
# rows per thread when that leaves at most a fifth of the threads idle (4 rows on 2 threads),
# else each row split over the threads by D (3 rows on 2 threads).
LARGE_ROW_SCHEDULES = {"rows_per_thread": (4, 2), "row_split_over_threads": (3, 2)}


@pytest.mark.parametrize("schedule", LARGE_ROW_SCHEDULES)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("mode", ONE_PASS_MODES)
def test_one_pass_matches_float64_large_rows(mode, loss, schedule):
    batch, thread_count = LARGE_ROW_SCHEDULES[schedule]
    with threads(thread_count):
        # K = 6: two groups of rows (4 negatives; 2 and the positive), so U is rescaled between them
        compare(loss, student_only(mode, batch, 6, 40_003, seed=2), "none", torch.rand(batch) + 0.5,
                **({"temperature": 0.05} if loss == "info_nce" else {}))


@pytest.mark.parametrize("schedule", LARGE_ROW_SCHEDULES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=str)
def test_one_pass_large_rows_other_dtypes(dtype, schedule):
    # bf16: U in a scratch row, then converted; fp64: U built in G's own row, as for fp32
    batch, thread_count = LARGE_ROW_SCHEDULES[schedule]
    with threads(thread_count):
        compare("info_nce", student_only("explicit", batch, 5, 40_003, dtype, seed=6), "mean")


# K = 10: a sweep of 8 rows, then 3 (the positive and 10 negatives), over two D-chunks.
@pytest.mark.parametrize("shape", [(2, 1, 1), (2, 1, 5), (3, 1, 4099), (4, 6, (3, 11)), (3, 10, 4099)], ids=str)
@pytest.mark.parametrize("mode", ONE_PASS_MODES)
def test_one_pass_odd_shapes(mode, shape):
    compare("cos_nce", student_only(mode, *shape, seed=3), "mean")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("mode", ONE_PASS_MODES)
def test_one_pass_other_dtypes(mode, dtype):
    compare("info_nce", student_only(mode, 4, 9, 70, dtype, seed=4), "mean")  # K = 9: sweeps of 8 and 2


def test_one_pass_strided_and_expanded_inputs():
    base = torch.randn(6, 2, 40)
    s = base[:, 0].clone().requires_grad_()
    t = base[:, 1]  # strided rows
    n = torch.randn(1, 1, 40).expand(6, 3, 40)  # expanded: stride 0
    compare("cos_nce", (s, t, n, None), "sum")


def test_no_gradient_work_under_no_grad_or_inference_mode():
    s, t, n, _ = student_only("explicit", 4, 3, 50)
    before = extension().gradient_rows_computed()
    with torch.no_grad():
        lk.cos_nce_loss(s, t, n, backend="cpp")
    with torch.inference_mode():
        lk.info_nce_loss(s, t, n, backend="cpp")
    lk.cos_nce_loss(s.detach(), t, n, backend="cpp")  # nothing requires grad
    large = student_only("explicit", 3, 3, 40_003)
    with torch.no_grad():
        for count in (1, 2):  # both large-row schedules
            with threads(count):
                lk.info_nce_loss(*large, backend="cpp")
    assert extension().gradient_rows_computed() == before
    lk.cos_nce_loss(s, t, n, backend="cpp")
    assert extension().gradient_rows_computed() == before + 4


def test_the_negatives_are_not_kept_for_backward():
    s, t, n, _ = student_only("explicit", 4, 3, 50)
    alive = weakref.ref(n)
    loss = lk.cos_nce_loss(s, t, n, backend="cpp")
    del n
    gc.collect()
    assert alive() is None  # freed after the forward: only G (and the student) are saved
    loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("case", [("bank", 3, 4, 40_003, "cos_nce", True),
                                  ("bank", 7, 11, 300, "info_nce", True),  # small rows, sweeps of 8 and 4
                                  ("explicit", 3, 4, 40_003, "info_nce", True),
                                  ("in_batch", 9, 8, 5_003, "cos_nce", True),
                                  ("in_batch", 9, 8, 5_003, "info_nce", False),
                                  ("in_batch", 40, 39, 300, "info_nce", False)],
                         ids=str)
def test_one_pass_is_bit_deterministic(case):
    """The same bits run to run; on any number of threads too (3 large rows: one schedule on 1
    thread, the other on 2), except in-batch InfoNCE above 2^18 FMAs, whose GEMMs (BLAS) split
    their sums by the thread count."""
    mode, batch, num_neg, features, loss_name, any_threads = case
    threads = torch.get_num_threads()
    results = []
    try:
        for count in ((1, max(2, threads), 1) if any_threads else (threads,) * 3):
            torch.set_num_threads(count)
            s, t, n, idx = student_only(mode, batch, num_neg, features, seed=5)
            loss = LOSSES[loss_name](s, t, n, idx, backend="cpp")
            loss.backward()
            results.append((loss.detach(), s.grad))
    finally:
        torch.set_num_threads(threads)
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])


def test_the_usual_backward_returns_the_forwards_gradient_without_a_pass():
    """loss.backward() after a mean or a sum: G was pre-scaled by the row gradient in the forward,
    and the backward hands that very buffer on (no pass over [B, D]; below 2^14 elements it scales,
    which costs less than the check)."""
    for reduction, mode in (("mean", "explicit"), ("sum", "bank"), ("mean", "in_batch")):
        s, t, n, idx = student_only(mode, 4, 3, 5_000)
        loss = lk.cos_nce_loss(s, t, n, idx, reduction=reduction, backend="cpp")
        # the one pass, reduced in the kernel's call: one C++ node, no MeanBackward
        assert "OnePassReducedFunction" in loss.grad_fn.name()
        (grad,) = torch.autograd.grad(loss, s, retain_graph=True)
        (again,) = torch.autograd.grad(loss, s)  # the saved G itself both times: not scaled, not copied
        assert again.data_ptr() == grad.data_ptr() and torch.equal(again, grad), reduction
        s64 = s.detach().double().requires_grad_()
        LOSSES["cos_nce"](s64, t.double(), None if n is None else n.double(), idx, reduction=reduction,
                          backend="torch").backward()
        assert gradient_error(grad, s64.grad, s, s[0].numel(), 1e-8) < TOLERANCE[torch.float32]


def test_the_cpp_node_shares_the_python_backends_constants():
    """OnePassReducedFunction (C++) repeats two constants of the Python backward: the same
    double-backward message (tests match on it for every backend) and the same small-G threshold."""
    from lrc_kernels.ops import _autograd, native

    assert extension().DOUBLE_BACKWARD_MESSAGE == _autograd.DOUBLE_BACKWARD_MESSAGE.decode()
    assert extension().SMALL_GRADIENT == native._SMALL_GRADIENT


def test_other_upstream_gradients_are_scaled_exactly():
    for loss_name, scale in (("cos_nce", 2.5), ("info_nce", -0.3)):
        s, t, n, _ = student_only("explicit", 5, 3, 4099 * 40)  # large rows: the G built in the forward
        (scale * LOSSES[loss_name](s, t, n, None, backend="cpp")).backward()
        s64 = s.detach().double().requires_grad_()
        (scale * LOSSES[loss_name](s64, t.double(), n.double(), None, backend="torch")).backward()
        assert gradient_error(s.grad, s64.grad, s, s[0].numel(), 1e-8) < TOLERANCE[torch.float32]


def test_a_second_backward_through_a_retained_graph():
    s, t, n, _ = student_only("explicit", 3, 2, 6_000)  # G above 2^14 elements: the in-place path
    loss = lk.cos_nce_loss(s, t, n, backend="cpp")
    loss.backward(retain_graph=True)  # the usual gradient: G untouched, so a second one is right too
    first = s.grad.clone()
    loss.backward()
    torch.testing.assert_close(s.grad, 2 * first)
    s.grad = None
    loss = 3 * lk.cos_nce_loss(s, t, n, backend="cpp")
    loss.backward(retain_graph=True)  # G scaled in place: a second backward must not read it
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    small = student_only("explicit", 3, 2, 20)[0]  # a small G is scaled into a new buffer
    loss = 3 * lk.cos_nce_loss(small, t[:, :20], n[..., :20], backend="cpp")
    loss.backward(retain_graph=True)
    first = small.grad.clone()
    loss.backward()
    torch.testing.assert_close(small.grad, 2 * first)


def test_compile_and_opcheck_on_the_one_pass_op():
    from lrc_kernels.ops import native

    s, t, n, idx = student_only("bank", 4, 3, 24)
    torch.library.opcheck(torch.ops.lrc_kernels.one_pass_loss.default,
                          (s.detach(), t, n, idx, native.BANK, False, 1e-8, 1.0, False, True),
                          test_utils=("test_schema", "test_faketensor"))
    torch._dynamo.reset()

    def fn(s, t, n, idx):
        return lk.cos_nce_loss(s, t, n, idx, backend="cpp")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = compiled(s, t, n, idx)
    (got_grad,) = torch.autograd.grad(got, s)
    want = fn(s, t, n, idx)
    (want_grad,) = torch.autograd.grad(want, s)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)


# In-batch COS-NCE (every other teacher row a negative) takes the one pass too: kInBatch.


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("shape", [(2, 1), (7, 37), (5, 4099), (3, (5, 13)), (4, 70_001)], ids=str)
@pytest.mark.parametrize("loss", LOSSES)
def test_in_batch_one_pass_matches_float64(loss, shape, reduction):
    batch, features = shape
    weights = torch.rand(batch) + 0.5 if reduction == "none" else None
    kwargs = {"temperature": 0.2} if loss == "info_nce" else {}
    compare(loss, student_only("in_batch", batch, batch - 1, features, seed=6), reduction, weights, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("loss", LOSSES)
def test_in_batch_one_pass_other_dtypes(loss, dtype):
    compare(loss, student_only("in_batch", 6, 5, 70, dtype, seed=7), "mean")


def test_in_batch_one_pass_strided_teacher_and_zero_rows():
    base = torch.randn(6, 2, 40, dtype=torch.float64).float()
    s = base[:, 0].clone()
    s[2] = 0  # a clamped norm: no gradient through it
    s.requires_grad_()
    compare("cos_nce", (s, base[:, 1], None, None), "sum")


def test_in_batch_one_pass_no_gradient_work_without_grad_and_teacher_not_kept():
    s, t, _, _ = student_only("in_batch", 5, 4, 33)
    before = extension().gradient_rows_computed()
    with torch.no_grad():
        lk.cos_nce_loss(s, t, backend="cpp")
    assert extension().gradient_rows_computed() == before
    alive = weakref.ref(t)
    loss = lk.cos_nce_loss(s, t, backend="cpp")
    assert extension().gradient_rows_computed() == before + 5
    del t
    gc.collect()
    assert alive() is None
    loss.backward()
    assert torch.isfinite(s.grad).all()


def test_in_batch_teacher_gradient_takes_the_two_pass_path():
    s, t, _, _ = student_only("in_batch", 4, 3, 21, seed=9)
    t.requires_grad_()
    before = extension().gradient_rows_computed()
    lk.cos_nce_loss(s, t, backend="cpp").backward()
    assert extension().gradient_rows_computed() == before  # in_batch_cos_nce, not the one pass
    t64 = t.detach().double().requires_grad_()
    s64 = s.detach().double().requires_grad_()
    lk.cos_nce_loss(s64, t64, backend="torch").backward()
    assert gradient_error(t.grad, t64.grad, t, 21, 1e-8) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("loss", LOSSES)
def test_compile_and_opcheck_on_the_in_batch_one_pass(loss):
    from lrc_kernels.ops import native

    s, t, _, _ = student_only("in_batch", 4, 3, 24, seed=10)
    torch.library.opcheck(torch.ops.lrc_kernels.one_pass_loss.default,
                          (s.detach(), t, None, None, native.IN_BATCH, loss == "info_nce", 1e-8, 0.5, True, False),
                          test_utils=("test_schema", "test_faketensor"))
    torch._dynamo.reset()

    def fn(s, t):
        return LOSSES[loss](s, t, backend="cpp")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    (got_grad,) = torch.autograd.grad(compiled(s, t), s)
    (want_grad,) = torch.autograd.grad(fn(s, t), s)
    torch.testing.assert_close(got_grad, want_grad)


def _reference_gradient(s, t, n, idx):
    s64 = s.detach().double().requires_grad_()
    lk.cos_nce_loss(s64, t.double(), None if n is None else n.double(), idx, backend="torch").backward()
    return s64.grad


def test_a_freed_gradient_buffer_is_reused_and_fully_overwritten():
    """A freed G of >= 1 MiB is kept for the next call of that size (no page faults on a fresh
    buffer): the next G is the same memory, every element rewritten, and a G still in use is
    never handed out twice."""
    lk.empty_cpu_cache()
    s, t, n, _ = student_only("explicit", 4, 3, 70_001)  # G: 1.12 MB
    nbytes = s.numel() * s.element_size()
    want = _reference_gradient(s, t, n, None)

    def gradient():
        return torch.autograd.grad(lk.cos_nce_loss(s, t, n, backend="cpp"), s)[0]

    first = gradient()
    address = first.data_ptr()
    assert lk.cpu_cache_bytes() == 0  # in use: not in the cache
    first.fill_(float("nan"))  # what a reused buffer holds must not leak into the next gradient
    del first
    assert lk.cpu_cache_bytes() == nbytes
    second = gradient()
    assert second.data_ptr() == address and lk.cpu_cache_bytes() == 0
    third = gradient()  # the second is alive: a new buffer
    assert third.data_ptr() != address
    for grad in (second, third):
        assert gradient_error(grad, want, s, s[0].numel(), 1e-8) < TOLERANCE[torch.float32]
    del second, third, grad
    assert lk.cpu_cache_bytes() == 2 * nbytes
    lk.empty_cpu_cache()
    assert lk.cpu_cache_bytes() == 0


def test_the_cache_limit():
    s, t, n, _ = student_only("explicit", 4, 3, 70_001)
    nbytes = s.numel() * s.element_size()
    try:
        lk.set_cpu_cache_limit(0)
        torch.autograd.grad(lk.cos_nce_loss(s, t, n, backend="cpp"), s)
        assert lk.cpu_cache_bytes() == 0
        lk.set_cpu_cache_limit(nbytes)  # one buffer: the older of two freed ones is dropped
        grads = [torch.autograd.grad(lk.cos_nce_loss(s, t, n, backend="cpp"), s)[0] for _ in range(2)]
        del grads
        assert lk.cpu_cache_bytes() == nbytes
        lk.set_cpu_cache_limit(nbytes - 1)  # lowering the limit frees what is above it
        assert lk.cpu_cache_bytes() == 0
    finally:
        lk.set_cpu_cache_limit(256 << 20)
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="nbytes must be an int >= 0"):
            lk.set_cpu_cache_limit(bad)
