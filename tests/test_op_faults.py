"""The op under hostile use: double backward, dynamic compile, inference-mode tensors,
overflowing norms, sparse / nested / meta inputs, and the JIT cache across checkouts."""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

import pytest
import torch

import lrc_kernels as lk
from helpers import LOSSES, MODES, make_inputs


def fast_backends():
    return [b for b in lk.available_backends("cpu") if b != "torch"]


# ------------------------------------------------------------------ double backward


@pytest.mark.parametrize("mode", MODES)
def test_double_backward_with_only_the_student_requiring_grad_fails_clearly(mode):
    for backend in fast_backends():
        s, t, n, idx = make_inputs(mode, 4, 3, 10, requires_grad=False)
        s.requires_grad_()
        loss = lk.cos_nce_loss(s, t, n, idx, backend=backend)
        (grad,) = torch.autograd.grad(loss, s, create_graph=True)
        assert grad.shape == s.shape
        with pytest.raises(RuntimeError, match="do not support double backward"):
            grad.sum().backward()


@pytest.mark.parametrize("mode", ["in_batch", "explicit"])
def test_second_derivative_towards_another_used_input_is_never_a_silent_none(mode):
    for backend in fast_backends():
        s, t, n, idx = make_inputs(mode, 4, 3, 10, requires_grad=False)
        s.requires_grad_(), t.requires_grad_()
        (grad,) = torch.autograd.grad(lk.cos_nce_loss(s, t, n, idx, backend=backend), s, create_graph=True)
        with pytest.raises(RuntimeError, match="do not support double backward"):
            torch.autograd.grad(grad.sum(), t, allow_unused=True)


def test_reference_backend_still_gives_higher_order_gradients():
    s, t, n, _ = make_inputs("explicit", 3, 2, 6, dtype=torch.float64)
    (grad,) = torch.autograd.grad(lk.cos_nce_loss(s, t, n, backend="torch"), s, create_graph=True)
    (second,) = torch.autograd.grad(grad.pow(2).sum(), t)
    assert torch.isfinite(second).all() and second.abs().sum() > 0


# ------------------------------------------------------------------ torch.compile(dynamic=True)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_compile_dynamic_traces_the_op(backend):
    if backend not in lk.available_backends("cpu"):
        pytest.skip(f"{backend} not available")
    torch._dynamo.reset()

    def fn(s, t, n, eps):
        return lk.cos_nce_loss(s, t, n, eps=eps, backend=backend) + lk.info_nce_loss(s, t, backend=backend)

    compiled = torch.compile(fn, dynamic=True, fullgraph=True, backend="aot_eager")
    for batch in (3, 5):
        s, t, n, _ = make_inputs("explicit", batch, 2, 7, requires_grad=False)
        s.requires_grad_()
        got = compiled(s, t, n, 1e-8)
        (got_grad,) = torch.autograd.grad(got, s)
        want = fn(s, t, n, 1e-8)
        (want_grad,) = torch.autograd.grad(want, s)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ inference-mode tensors


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("loss", LOSSES)
def test_inference_mode_teacher_with_a_student_that_requires_grad(mode, loss):
    s, t, n, idx = make_inputs(mode, 4, 3, 10, requires_grad=False)
    with torch.inference_mode():
        t_inf, n_inf = t.clone(), None if n is None else n.clone()
    assert t_inf.is_inference()
    for backend in lk.available_backends("cpu"):
        student = s.clone().requires_grad_()
        value = LOSSES[loss](student, t_inf, n_inf, idx, backend=backend)
        value.backward()
        reference = s.clone().requires_grad_()
        LOSSES[loss](reference, t, n, idx, backend="torch").backward()
        torch.testing.assert_close(value, LOSSES[loss](s, t, n, idx, backend="torch"), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(student.grad, reference.grad, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ overflow


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the Triton interpreter's numpy warns on overflow
@pytest.mark.parametrize("scale,dtype", [(1e20, torch.float32), (1e30, torch.float32), (1e200, torch.float64)])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", ["none", "sum"])  # "sum": the CPU one pass's reduced call falls back too
def test_finite_rows_whose_squared_norm_overflows_give_the_right_cosine(scale, dtype, mode, loss, reduction):
    generator = torch.Generator().manual_seed(11)
    s, t, n, idx = make_inputs(mode, 4, 3, 10, torch.float64, generator=generator)
    expected = LOSSES[loss](s, t, n, idx, reduction=reduction, backend="torch")
    expected.sum().backward()
    want_grad = s.grad / scale  # cos is scale-invariant: d/d(c s) = (d/ds) / c
    assert torch.isfinite(expected).all()
    for backend in lk.available_backends("cpu"):
        big = [None if x is None else (x.detach() * scale).to(dtype) for x in (s, t, n)]
        student = big[0].requires_grad_()
        got = LOSSES[loss](student, big[1], big[2], idx, reduction=reduction, backend=backend)
        if backend == "triton":  # the GPU kernels accumulate squared norms: NaN, never a wrong value
            assert torch.isnan(got).any() or torch.allclose(got.double(), expected.detach(), rtol=1e-4)
            continue
        torch.testing.assert_close(got.double(), expected.detach(), rtol=1e-5, atol=1e-5)
        got.sum().backward()
        torch.testing.assert_close(student.grad.double(), want_grad, rtol=1e-4, atol=1e-6 / scale)


def test_cosine_like_torch_at_large_scale():
    x = torch.randn(3, 8) * 1e20
    y = torch.randn(3, 8) * 1e20
    neg = torch.randn(3, 1, 8)
    # One negative: COS-NCE = 2 - 1.5 cos(s, t) + 0.5 cos(s, n).
    want = 2 - 1.5 * torch.cosine_similarity(x.double(), y.double()) + 0.5 * torch.cosine_similarity(
        x.double(), neg[:, 0].double())
    for backend in lk.available_backends("cpu"):
        if backend == "triton":
            continue
        got = lk.cos_nce_loss(x, y, neg, reduction="none", backend=backend)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ sparse, nested, meta


@pytest.mark.parametrize("argument", ["student", "teacher", "negatives"])
def test_sparse_nested_and_meta_inputs_are_refused_by_name(argument):
    s, t, n, _ = make_inputs("explicit", 2, 2, 3, requires_grad=False)
    values = {"student": s, "teacher": t, "negatives": n}
    x = values[argument]
    bad_inputs = [(TypeError, "layout", x.to_sparse()),
                  (ValueError, "meta", x.to("meta"))]
    if argument != "negatives":
        with warnings.catch_warnings():  # nested tensors are a prototype API
            warnings.simplefilter("ignore")
            nested = torch.nested.nested_tensor(list(x))
        bad_inputs.append((TypeError, "nested", nested))
    for error, word, bad in bad_inputs:
        with pytest.raises(error, match=f"{argument}.*{word}"):
            lk.cos_nce_loss(**{**values, argument: bad})


def test_sparse_neg_index_is_refused_by_name():
    s, t, _, idx = make_inputs("teacher_bank", 3, 2, 4, requires_grad=False)
    with pytest.raises(TypeError, match="neg_index.*layout"):
        lk.cos_nce_loss(s, t, neg_index=idx.to_sparse())


# ------------------------------------------------------------------ JIT cache


def test_jit_cache_is_keyed_by_content_not_path(tmp_path, caplog, monkeypatch):
    if "cpp" not in lk.available_backends("cpu"):
        pytest.skip("no C++ toolchain")
    from lrc_kernels.ops import _build

    def build():
        return _build.build_extension("cpu", _build.CPU_SOURCES, _build.cpu_flags(),
                                      extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])

    first = build()
    library = Path(first.__file__)
    built_at = library.stat().st_mtime_ns
    # The same sources in another checkout: the same build, not rebuilt, no "building" message.
    other = tmp_path / "checkout" / "csrc"
    shutil.copytree(_build.native_root(), other)
    monkeypatch.setattr(_build, "_PACKAGED", tmp_path / "no-package-copy")
    monkeypatch.setattr(_build, "_CHECKOUT", other)
    assert _build.native_root() == other
    with caplog.at_level(logging.INFO, logger="lrc_kernels"):
        second = build()
    assert second.__name__ == first.__name__
    assert library.stat().st_mtime_ns == built_at
    assert "building" not in caplog.text
